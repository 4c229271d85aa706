"""The diffusion model family: a diffusers UNet2DModel with a DDPM noise schedule."""
from __future__ import annotations

from .experiment import ModelSpec


def build_unet(spec: ModelSpec, sample_size: int, channels: int, seed: int):
    """A freshly initialised UNet; the seed fixes the initial weights (common random numbers across subsets)."""
    import torch
    from diffusers import UNet2DModel

    n = len(spec.block_out_channels)
    down = ["DownBlock2D"] * n
    up = ["UpBlock2D"] * n
    if spec.attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(spec.block_out_channels),
        layers_per_block=spec.layers_per_block,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        norm_num_groups=spec.norm_num_groups,
        attention_head_dim=min(spec.block_out_channels[-1], 32) if spec.attention else None,
        add_attention=spec.attention,
    )
    use_classic_attention(unet)
    return unet


def use_classic_attention(model) -> int:
    """Switch every diffusers Attention module to the classic processor: torch.func.vmap has no CPU batching rule
    for SDPA, and the classic processor is exact. UNet2DModel has no set_attn_processor, so go module by module."""
    from diffusers.models.attention_processor import Attention, AttnProcessor

    n = 0
    for module in model.modules():
        if isinstance(module, Attention):
            module.set_processor(AttnProcessor())
            n += 1
    return n


def build_scheduler(spec: ModelSpec):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=spec.num_train_timesteps, beta_schedule=spec.beta_schedule)


def count_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
