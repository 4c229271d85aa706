"""Structured magnitude channel pruning of a diffusers UNet2DModel, for sparsified fine-tuning (DESIGN 1.5, sFT).

torch-pruning (MetaPruner + L2 MagnitudeImportance) removes whole channels and rewrites every coupled layer (skip
concatenations, residuals, GroupNorms, time-embedding projections, attention q/k/v/out). What it does not know
about is diffusers' bookkeeping attributes, so after pruning we re-derive them from the pruned weights:
`Downsample2D/Upsample2D.channels` (asserted in forward), `ResnetBlock2D.in_channels/out_channels` and the
Attention dims. The diffusers config still describes the *unpruned* template: a pruned model is saved as a plain
state dict whose tensor shapes carry the per-layer widths (storage.models.save_model(pruned=True)), and reloaded by
resizing a freshly built template (load_pruned_state).

GroupNorm: torch-pruning treats a GroupNorm(G) as G channel groups, averages importance over the groups and removes
the same within-group positions from each, so a width C becomes C - k*G and stays divisible by G. No `round_to` is
used: in torch-pruning 1.6.1 it mixes that per-group count with the full layer width and skips most GroupNorm-coupled
layers (ratio 0.3, round_to=8 removed 9% of a [32, 64]/GroupNorm(8) UNet's parameters, 62% without). The
per-group count is floor-rounded toward *keeping fewer* channels (kept = int(C/G * (1-r)), so any ratio > 0 removes
at least one channel per group), and a conv's parameters scale with in*out widths, so the fraction of parameters
removed is much larger than the requested channel ratio (ratio 0.3 with 4 channels per group removes half the
channels, ~75% of conv weights).
`PruneReport.achieved_param_ratio` is the number to quote.

Attention: q/k/v/out are pruned jointly on the inner (head) dimension; with more than one head the heads are
declared to torch-pruning (`num_heads`) so every head loses the same number of dims and the inner width stays
divisible by the head count. The softmax scale keeps the original dim_head**-0.5 (a constant; fine-tuning absorbs
it).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PruneReport:
    params_before: int
    params_after: int
    requested_ratio: float          # channel ratio asked of torch-pruning (per layer group)
    achieved_param_ratio: float     # fraction of parameters removed: 1 - after/before
    channels: dict = field(default_factory=dict)  # module name -> [width before, width after], changed layers only

    def to_dict(self) -> dict:
        return {"params_before": self.params_before, "params_after": self.params_after,
                "requested_ratio": self.requested_ratio, "achieved_param_ratio": self.achieved_param_ratio,
                "channels": self.channels}


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _widths(unet) -> dict:
    """Output width of every conv/linear/groupnorm: the structure pruning changes."""
    import torch.nn as nn

    out = {}
    for name, m in unet.named_modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            out[name] = int(m.out_channels)
        elif isinstance(m, nn.Linear):
            out[name] = int(m.out_features)
        elif isinstance(m, nn.GroupNorm):
            out[name] = int(m.num_channels)
    return out


def _has_conv(sampler) -> bool:
    import torch.nn as nn

    return isinstance(getattr(sampler, "conv", None), nn.Conv2d | nn.ConvTranspose2d)


def _check_supported(unet) -> None:
    """Refuse structures whose bookkeeping cannot be re-derived from weights, rather than return a broken model."""
    from diffusers import UNet2DModel
    from diffusers.models.attention_processor import Attention
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.upsampling import Upsample2D

    if not isinstance(unet, UNet2DModel):
        raise TypeError(f"prune_unet expects a diffusers UNet2DModel, got {type(unet).__name__}")
    in_resnet = {id(s) for m in unet.modules() if isinstance(m, ResnetBlock2D)
                 for s in (m.upsample, m.downsample) if s is not None}
    for name, m in unet.named_modules():
        if isinstance(m, Downsample2D | Upsample2D):
            if getattr(m, "norm", None) is not None:
                raise NotImplementedError(f"{name}: {type(m).__name__} with a norm layer is not supported by pruning")
            if not _has_conv(m) and id(m) not in in_resnet:
                raise NotImplementedError(
                    f"{name}: {type(m).__name__} without a conv outside a ResnetBlock2D has no weight to recover "
                    "its pruned `channels` from; not supported")
        if isinstance(m, Attention):
            if (getattr(m, "is_cross_attention", False) or getattr(m, "add_k_proj", None) is not None
                    or getattr(m, "spatial_norm", None) is not None):
                raise NotImplementedError(f"{name}: cross/added-kv/spatial-norm attention is not supported by pruning")
            if getattr(m, "norm_cross", None) is not None or getattr(m, "norm_q", None) is not None:
                raise NotImplementedError(f"{name}: attention with q/k/cross norms is not supported by pruning")


def sync_pruned_attributes(unet) -> None:
    """Re-derive diffusers' width attributes from the (pruned) weights; forward asserts on some of them."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.upsampling import Upsample2D

    for m in unet.modules():
        if isinstance(m, Downsample2D | Upsample2D) and _has_conv(m):
            m.channels = int(m.conv.in_channels)
            m.out_channels = int(m.conv.out_channels)
        elif isinstance(m, ResnetBlock2D):
            m.in_channels = int(m.conv1.in_channels)
            m.out_channels = int(m.conv1.out_channels)
            for s in (m.upsample, m.downsample):  # pooling/interpolation on the block input: its width
                if isinstance(s, Downsample2D | Upsample2D) and not _has_conv(s):
                    s.channels = s.out_channels = m.in_channels
        elif isinstance(m, Attention):
            m.query_dim = int(m.to_q.in_features)
            m.inner_dim = int(m.to_q.out_features)
            m.inner_kv_dim = int(m.to_k.out_features)
            m.cross_attention_dim = int(m.to_k.in_features)
            m.out_dim = int(m.to_out[0].out_features)
            if hasattr(m, "out_context_dim"):
                m.out_context_dim = m.out_dim


def _validate(unet, example, expected_out_channels: int) -> None:
    """Post-conditions of a pruned UNet; raise instead of handing back a model that fails later."""
    import torch
    import torch.nn as nn
    from diffusers.models.attention_processor import Attention

    for name, m in unet.named_modules():
        if isinstance(m, nn.GroupNorm) and (m.num_channels == 0 or m.num_channels % m.num_groups):
            raise RuntimeError(f"pruning left {name} with {m.num_channels} channels for {m.num_groups} groups")
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear) and m.weight.numel() == 0:
            raise RuntimeError(f"pruning removed every channel of {name}; use a smaller ratio")
        if isinstance(m, Attention) and m.inner_dim % m.heads:
            raise RuntimeError(f"pruning left {name} with inner dim {m.inner_dim} for {m.heads} heads")
    if unet.conv_out.out_channels != expected_out_channels:
        raise RuntimeError("conv_out lost output channels")
    with torch.no_grad():
        y = unet(*example).sample
    if y.shape != example[0].shape or not torch.isfinite(y).all():
        raise RuntimeError(f"pruned UNet forward gave shape {tuple(y.shape)} / non-finite values")


def prune_unet(unet, ratio: float, *, example_shape=None, seed: int = 0) -> PruneReport:
    """Prune `unet` in place: structured L2-magnitude channel pruning (local, per layer group) with torch-pruning.

    `ratio` is the channel ratio requested per group; see the module docstring for why the parameter ratio removed
    is larger. conv_out is ignored (its output must keep the image channels). `example_shape` (default
    (1, in_channels, sample_size, sample_size)) and `seed` only make the tracing inputs; magnitude importance does
    not depend on them, so pruning is deterministic in the weights. On an error the model may be partly pruned:
    prune a copy if the original is still needed.
    """
    import torch
    import torch_pruning as tp
    from diffusers.models.attention_processor import Attention

    if not 0.0 <= float(ratio) < 1.0:
        raise ValueError(f"pruning ratio must be in [0, 1), got {ratio}")
    _check_supported(unet)
    cfg = unet.config
    if example_shape is None:
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else tuple(cfg.sample_size)
        hw = (size, size) if isinstance(size, int) else size
        example_shape = (1, cfg.in_channels, *hw)
    gen = torch.Generator().manual_seed(int(seed))
    device = next(unet.parameters()).device
    x = torch.randn(tuple(example_shape), generator=gen).to(device)
    t = torch.full((x.shape[0],), max(int(cfg.get("num_train_timesteps") or 1000) // 2, 1), dtype=torch.long,
                   device=device)
    example = (x, t)

    was_training = unet.training
    unet.eval()
    before_widths, before = _widths(unet), _count(unet)
    out_channels = int(unet.conv_out.out_channels)
    num_heads = {}
    for m in unet.modules():
        if isinstance(m, Attention) and m.heads > 1:
            num_heads.update({m.to_q: m.heads, m.to_k: m.heads, m.to_v: m.heads})

    if ratio > 0:
        pruner = tp.pruner.MetaPruner(
            unet,
            example,
            importance=tp.importance.MagnitudeImportance(p=2),
            pruning_ratio=float(ratio),
            ignored_layers=[unet.conv_out],
            num_heads=num_heads,
            # fresh dicts: torch-pruning 1.6.1 fills these in place and their defaults are shared mutable dicts,
            # which would keep every previously pruned model's modules alive across calls
            in_channel_groups={},
            out_channel_groups={},
            forward_fn=lambda model, inputs: model(*inputs).sample,
        )
        pruner.step()
        del pruner
    sync_pruned_attributes(unet)
    _validate(unet, example, out_channels)
    unet.train(was_training)

    after = _count(unet)
    after_widths = _widths(unet)
    changed = {k: [v, after_widths[k]] for k, v in before_widths.items() if after_widths.get(k) != v}
    return PruneReport(params_before=before, params_after=after, requested_ratio=float(ratio),
                       achieved_param_ratio=1.0 - after / before, channels=changed)


def load_pruned_state(unet, state_dict: dict):
    """Resize an unpruned template in place to the widths of a pruned `state_dict` and load it (strict).

    Also the way to start fine-tuning from a pruned checkpoint held as a plain state dict."""
    import torch
    import torch.nn as nn

    modules = dict(unet.named_modules())
    own = unet.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise ValueError(f"pruned state dict does not match the template: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    for key, value in state_dict.items():
        mod_name, _, attr = key.rpartition(".")
        m = modules[mod_name]
        current = own[key]
        if tuple(current.shape) == tuple(value.shape):
            continue
        if not isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear | nn.GroupNorm):
            raise NotImplementedError(f"cannot resize {type(m).__name__} {mod_name!r} to a pruned shape")
        empty = torch.empty(tuple(value.shape), dtype=current.dtype, device=current.device)
        if attr in m._parameters:
            m._parameters[attr] = nn.Parameter(empty, requires_grad=m._parameters[attr].requires_grad)
        else:
            m._buffers[attr] = empty
    for m in unet.modules():
        if isinstance(m, nn.Conv2d):
            m.out_channels, m.in_channels = m.weight.shape[0], m.weight.shape[1] * m.groups
        elif isinstance(m, nn.ConvTranspose2d):
            m.in_channels, m.out_channels = m.weight.shape[0], m.weight.shape[1] * m.groups
        elif isinstance(m, nn.Linear):
            m.out_features, m.in_features = m.weight.shape
        elif isinstance(m, nn.GroupNorm) and m.weight is not None:
            m.num_channels = m.weight.shape[0]
    sync_pruned_attributes(unet)
    unet.load_state_dict(state_dict, strict=True)
    return unet
