"""The LoRA / conditional setting (DESIGN 1.1 "parameters", 1.5 "for LoRA models", 4): a class- or prompt-conditioned
diffusers UNet2DConditionModel, peft LoRA adapters on its attention projections, rank pruning for sparsified
fine-tuning, and the latent-space plumbing of a locally stored Stable Diffusion pipeline.

Attribution in this setting is w.r.t. the adapter weights only: after `add_lora` exactly the LoRA parameters have
requires_grad, which is what `train_ddpm` optimises and what `gradients.select_parameters(unet)` picks.

Conditioning is a fixed per-sample input (n, tokens, dim), as Stable Diffusion's frozen CLIP text encoder gives
during LoRA fine-tuning. The embedded stand-in, `ClassEncoder`, is a frozen seeded embedding rather than one trained
jointly with the base: the cross-attention to_k/to_v projections learn any linear map of it (with orthonormal rows,
i.e. n_classes <= tokens * dim, nothing is lost), so no encoder weights need training, checkpointing or storing with
an adapter, and the same seed rebuilds it anywhere.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .models import use_classic_attention

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
ADAPTER = "default"
SD_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


# ---------------------------------------------------------------------------------------------------- models
def build_conditional_unet(block_out_channels, layers_per_block: int, norm_num_groups: int, sample_size: int,
                           channels: int, cross_attention_dim: int, seed: int, head_dim: int = 8,
                           cross_attention_levels: int = 1):
    """A small UNet2DConditionModel: cross-attention at the `cross_attention_levels` lowest resolutions (down, mid
    and up), plain blocks elsewhere; the seed fixes the initial weights."""
    from diffusers import UNet2DConditionModel

    n, widths = len(block_out_channels), [int(c) for c in block_out_channels]
    levels = int(cross_attention_levels)
    if not 1 <= levels <= n:
        raise ValueError(f"cross_attention_levels={levels} must be between 1 and the {n} resolution levels")
    bad = [w for w in widths[n - levels:] if w % head_dim]
    if bad:
        raise ValueError(f"head_dim={head_dim} must divide the widths of the cross-attention levels {bad}")
    down = ["DownBlock2D"] * (n - levels) + ["CrossAttnDownBlock2D"] * levels
    up = ["CrossAttnUpBlock2D"] * levels + ["UpBlock2D"] * (n - levels)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(widths),
        layers_per_block=layers_per_block,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        norm_num_groups=norm_num_groups,
        cross_attention_dim=cross_attention_dim,
        # diffusers' historical misnomer: the number of heads per block (unused by plain blocks)
        attention_head_dim=tuple(max(1, w // head_dim) for w in widths),
    )
    use_classic_attention(unet)
    return unet


class ClassEncoder(nn.Module):
    """Class/group ids -> encoder_hidden_states (B, tokens, dim): the embedded stand-in for a prompt encoder.

    Seeded orthogonal rows scaled to unit-variance entries (the scale CLIP outputs have), frozen unless
    `trainable` (see the module docstring for why frozen is enough)."""

    def __init__(self, n_classes: int, dim: int, tokens: int = 1, seed: int = 0, trainable: bool = False):
        super().__init__()
        self.tokens, self.dim = int(tokens), int(dim)
        self.embedding = nn.Embedding(n_classes, self.tokens * self.dim)
        with torch.no_grad():
            nn.init.orthogonal_(self.embedding.weight, generator=torch.Generator().manual_seed(int(seed)))
            self.embedding.weight.mul_((self.tokens * self.dim) ** 0.5)
        self.requires_grad_(trainable)

    def forward(self, ids) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.embedding.weight.device)
        return self.embedding(ids).view(len(ids), self.tokens, self.dim)

    def encode(self, ids) -> np.ndarray:
        """(n, tokens, dim) float32: the `conditioning` array of train_ddpm / train_conditional."""
        with torch.no_grad():
            return self(ids).cpu().numpy().astype(np.float32)


# ---------------------------------------------------------------------------------------------------- LoRA
def lora_layers(unet) -> dict:
    """module name -> peft LoRA layer, in named_modules order."""
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in unet.named_modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A}


def lora_parameter_names(unet) -> list[str]:
    return [n for n, _ in unet.named_parameters() if ".lora_A." in n or ".lora_B." in n]


def attach_lora(unet, config, seed: int = 0, state_dict: dict | None = None) -> int:
    """Inject the adapter described by a peft LoraConfig, freeze everything else; returns the trainable count.

    peft draws lora_A from the global RNG: a forked, seeded RNG makes the init deterministic without disturbing
    the caller's random stream (lora_B starts at zero, so the model's output is unchanged)."""
    if lora_layers(unet):
        raise ValueError("the model already carries a LoRA adapter; start from a clean base model")
    unet.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        unet.add_adapter(config, adapter_name=ADAPTER)
    names = set(lora_parameter_names(unet))
    for n, p in unet.named_parameters():
        p.requires_grad_(n in names)
    use_classic_attention(unet)
    if state_dict is not None:
        load_lora_state(unet, state_dict)
    return sum(p.numel() for p in unet.parameters() if p.requires_grad)


def add_lora(unet, rank: int, alpha: float | None = None, target_modules=LORA_TARGETS, seed: int = 0) -> int:
    """Add a LoRA adapter (rank r, scaling alpha/r; alpha defaults to r) to `unet` in place, base weights frozen.
    Returns the number of trainable (LoRA) parameters."""
    from peft import LoraConfig

    if int(rank) < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    config = LoraConfig(r=int(rank), lora_alpha=int(rank) if alpha is None else alpha,
                        target_modules=list(target_modules), init_lora_weights=True)
    return attach_lora(unet, config, seed=seed)


def lora_state_dict(unet) -> dict:
    """The adapter weights under peft's names (no adapter name), cloned to CPU."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(unet, adapter_name=ADAPTER).items()}


def load_lora_state(unet, state_dict: dict) -> None:
    """Load adapter weights saved by lora_state_dict; every LoRA tensor must be present with its shape."""
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(unet, state_dict, adapter_name=ADAPTER)
    missing = [k for k in result.missing_keys if ".lora_" in k]
    unexpected = list(getattr(result, "unexpected_keys", []))
    if missing or unexpected:
        raise ValueError(f"LoRA state does not match the model's adapter: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")


def _refuse_merged(unet) -> None:
    if any(m.merged for m in lora_layers(unet).values()):
        raise ValueError("the LoRA adapter is merged into the base weights; unmerge_lora first")


def base_weights_digest(unet) -> str:
    """Digest of the frozen base weights under their plain names: equals state_dict_digest of the model before
    add_lora, so an adapter can name the base it was trained on."""
    from .runtime import state_dict_digest

    _refuse_merged(unet)
    sd = {k.replace(".base_layer.", "."): v for k, v in unet.state_dict().items() if ".lora_" not in k}
    return state_dict_digest(sd)


def merge_lora(unet) -> None:
    """Fold the adapter into the base weights (peft's merge) for fast inference; unmerge_lora restores them."""
    for m in lora_layers(unet).values():
        if not m.merged:
            m.merge()


def unmerge_lora(unet) -> None:
    for m in lora_layers(unet).values():
        if m.merged:
            m.unmerge()


def merged_copy(unet):
    """A plain copy of the model with the adapter folded in and the LoRA wrappers removed (the caller's model is
    untouched): same module names and state-dict keys as the base model."""
    import copy

    out = copy.deepcopy(unet)
    for name, m in lora_layers(out).items():
        if not m.merged:
            m.merge()
        parent, _, child = name.rpartition(".")
        setattr(out.get_submodule(parent), child, m.get_base_layer())
    if hasattr(out, "peft_config"):
        del out.peft_config
    out._hf_peft_config_loaded = False
    return out


@dataclass
class RankPruneReport:
    keep_fraction: float
    params_before: int
    params_after: int
    ranks_before: dict = field(default_factory=dict)  # module name -> rank
    ranks_after: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"keep_fraction": self.keep_fraction, "params_before": self.params_before,
                "params_after": self.params_after, "ranks_before": self.ranks_before, "ranks_after": self.ranks_after}


def prune_lora_ranks(unet, keep_fraction: float) -> RankPruneReport:
    """Structured magnitude pruning of LoRA ranks in place (sFT for LoRA models, DESIGN 1.5).

    Rank r of a layer scores ||B[:, r]|| * ||A[r, :]|| (the norm of its rank-1 update B[:, r] A[r, :] is exactly
    that product); the top round(keep_fraction * r) (at least 1) ranks are kept, in their original order, as new
    smaller lora_A / lora_B Linears. Each layer keeps its scaling alpha/r_original (alpha is rescaled to
    scaling * r_new), so the kept ranks contribute exactly as before; the per-layer ranks and alphas go into the
    adapter config's rank_pattern / alpha_pattern so a saved adapter reloads with the same shapes."""
    if not 0.0 < float(keep_fraction) <= 1.0:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    layers = lora_layers(unet)
    if not layers:
        raise ValueError("the model has no LoRA adapter to prune (add_lora first)")
    _refuse_merged(unet)
    config = unet.peft_config[ADAPTER]
    if config.use_rslora or config.use_dora:
        raise NotImplementedError("rank pruning supports plain LoRA (no rsLoRA / DoRA)")
    before = sum(p.numel() for n, p in unet.named_parameters() if ".lora_" in n)
    ranks_before, ranks_after = {}, {}
    for name, m in layers.items():
        A, B = m.lora_A[ADAPTER], m.lora_B[ADAPTER]
        r = int(A.weight.shape[0])
        k = max(1, round(float(keep_fraction) * r))
        ranks_before[name], ranks_after[name] = r, k
        if k == r:
            continue
        with torch.no_grad():
            importance = torch.linalg.vector_norm(B.weight, dim=0) * torch.linalg.vector_norm(A.weight, dim=1)
            keep = torch.sort(torch.argsort(importance, descending=True, stable=True)[:k]).values
            new_a = nn.Linear(A.in_features, k, bias=False).to(A.weight)
            new_b = nn.Linear(k, B.out_features, bias=B.bias is not None).to(B.weight)
            new_a.weight.copy_(A.weight[keep])
            new_b.weight.copy_(B.weight[:, keep])
            if B.bias is not None:
                new_b.bias.copy_(B.bias)
        new_a.requires_grad_(A.weight.requires_grad)
        new_b.requires_grad_(B.weight.requires_grad)
        m.lora_A[ADAPTER], m.lora_B[ADAPTER] = new_a, new_b
        m.r[ADAPTER] = k
        m.lora_alpha[ADAPTER] = m.scaling[ADAPTER] * k  # scaling itself is left as is
        config.rank_pattern[name] = k
        config.alpha_pattern[name] = m.lora_alpha[ADAPTER]
    after = sum(p.numel() for n, p in unet.named_parameters() if ".lora_" in n)
    return RankPruneReport(keep_fraction=float(keep_fraction), params_before=before, params_after=after,
                           ranks_before=ranks_before, ranks_after=ranks_after)


# ---------------------------------------------------------------------------------------------------- Stable Diffusion
@dataclass
class SDComponents:
    unet: object            # UNet2DConditionModel (classic attention processors)
    vae: object             # AutoencoderKL, frozen
    text_encoder: object    # CLIPTextModel, frozen
    tokenizer: object       # CLIPTokenizer
    scheduler_config: dict  # the pipeline's noise schedule, for train_conditional


def load_sd_components(path) -> SDComponents:
    """The parts of a locally stored diffusers Stable Diffusion pipeline directory (`save_pretrained` layout), read
    with local_files_only: nothing is downloaded."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = Path(path)
    _check_sd_dir(path)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True)
    if unet.config.addition_embed_type is not None:
        raise NotImplementedError(f"{path}: UNet with addition_embed_type={unet.config.addition_embed_type!r} "
                                  "(SDXL-style extra conditioning) is not supported")
    use_classic_attention(unet)
    vae = load_vae(path)
    text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", local_files_only=True)
    text_encoder.eval().requires_grad_(False)
    tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
    config = {k: v for k, v in json.loads((path / "scheduler" / "scheduler_config.json").read_text()).items()
              if not k.startswith("_")}
    return SDComponents(unet=unet.eval(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        scheduler_config=config)


def _check_sd_dir(path: Path) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"Stable Diffusion pipeline directory {path} does not exist")
    if not (path / "model_index.json").is_file():
        raise ValueError(f"{path} is not a diffusers pipeline directory: it has no model_index.json "
                         "(write one with StableDiffusionPipeline.save_pretrained)")
    missing = [s for s in SD_SUBFOLDERS if not (path / s).is_dir()]
    if missing:
        raise ValueError(f"{path} is not a Stable Diffusion pipeline: missing subfolder(s) {missing} "
                         f"(expected {list(SD_SUBFOLDERS)})")
    if not (path / "scheduler" / "scheduler_config.json").is_file():
        raise ValueError(f"{path}: missing scheduler/scheduler_config.json")


def encode_images_to_latents(vae, images, batch_size: int = 16) -> np.ndarray:
    """(n, 3, H, W) images in [-1, 1] -> (n, c, H/f, W/f) float32 latents, scaled as the UNet sees them.

    Deterministic: the mean of the latent distribution, not a sample from it."""
    x = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    if x.ndim != 4 or x.shape[1] != vae.config.in_channels:
        raise ValueError(f"images must be (n, {vae.config.in_channels}, H, W), got shape {tuple(x.shape)}")
    if x.numel() and (x.min() < -1 - 1e-4 or x.max() > 1 + 1e-4):
        raise ValueError("images must be scaled to [-1, 1] before VAE encoding")
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    dtype = next(vae.parameters()).dtype
    device = next(vae.parameters()).device
    out = []
    with torch.no_grad():
        for s in range(0, len(x), batch_size):
            mean = vae.encode(x[s:s + batch_size].to(device, dtype)).latent_dist.mean
            out.append(((mean - shift) * scale).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0,), np.float32)


def decode_latents(vae, latents, batch_size: int = 16) -> np.ndarray:
    """The inverse of encode_images_to_latents: (n, c, h, w) latents -> (n, 3, H, W) images clipped to [-1, 1]."""
    z = torch.as_tensor(np.asarray(latents), dtype=torch.float32)
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    dtype, device = next(vae.parameters()).dtype, next(vae.parameters()).device
    out = []
    with torch.no_grad():
        for s in range(0, len(z), batch_size):
            x = vae.decode((z[s:s + batch_size] / scale + shift).to(device, dtype)).sample
            out.append(x.clamp(-1, 1).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0,), np.float32)


def load_vae(path):
    """The frozen VAE of a local Stable Diffusion pipeline directory (checked like load_sd_components)."""
    from diffusers import AutoencoderKL

    _check_sd_dir(Path(path))
    return AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=True).eval().requires_grad_(False)


def encode_prompts(text_encoder, tokenizer, prompts, batch_size: int = 32) -> np.ndarray:
    """Prompts -> (n, max_length, dim) float32 encoder_hidden_states, padded to the tokenizer's max length as
    Stable Diffusion 1.x/2.x conditions its UNet."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    max_length = min(int(tokenizer.model_max_length), int(text_encoder.config.max_position_embeddings))
    device = next(text_encoder.parameters()).device
    out = []
    with torch.no_grad():
        for s in range(0, len(prompts), batch_size):
            ids = tokenizer(prompts[s:s + batch_size], padding="max_length", max_length=max_length,
                            truncation=True, return_tensors="pt").input_ids
            out.append(text_encoder(ids.to(device))[0].float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0,), np.float32)


# ---------------------------------------------------------------------------------------------------- training
def train_conditional(unet, data: np.ndarray, conditioning: np.ndarray, spec, *, scheduler_config: dict | None = None,
                      model_spec=None, seed: int | None = None, device: str = "cpu", progress=None,
                      progress_every: int = 200):
    """DDPM training of a conditional UNet on images or latents with per-sample `conditioning` (n, tokens, dim).

    Trains whatever has requires_grad: the whole model for base pretraining, the adapter alone after add_lora.
    A thin front of `training.train_ddpm` (same seeds, checkpoints and record); the caller's model is untouched.
    `scheduler_config` (e.g. SDComponents.scheduler_config) overrides model_spec's noise schedule."""
    from .experiment import ModelSpec
    from .training import train_ddpm

    if scheduler_config is not None and scheduler_config.get("prediction_type", "epsilon") != "epsilon":
        raise NotImplementedError(f"prediction_type={scheduler_config['prediction_type']!r}: only epsilon-"
                                  "prediction models are supported")
    return train_ddpm(np.asarray(data), model_spec or ModelSpec(), spec, seed=seed, device=device, init_model=unet,
                      conditioning=np.asarray(conditioning), scheduler_config=scheduler_config, progress=progress,
                      progress_every=progress_every)
