"""Train M small DDPMs in one process at once: retraining throughput for LDS subsets x seeds (issue 8).

``train_ddpm_many(image_sets, model_spec, spec, seeds)`` returns, for every model m, what
``train_ddpm(image_sets[m], model_spec, spec, seed=seeds[m])`` would: the same initial weights (same init seed, bit
for bit), the same batches, timesteps and noises (each model keeps its own seeded ``order``/``noise`` generators and
draws from them in train_ddpm's order), the same AdamW + warm-up/cosine LR + per-model global-norm clipping + EMA.
Only what subset retraining needs is produced: the final (EMA) weights in a UNet2DModel per model, the loss curve
and the wall time. No checkpoints and no last timesteps (TracIn's inputs): ``checkpoints`` etc. are left empty.

How the M models run (``engine``):

- ``"wide"`` (default where supported): one hand-written forward over *channel-stacked* models. The activations
  are (B, M*C, H, W); every convolution is one grouped convolution (groups=M) with the M weight tensors stacked,
  every GroupNorm is one ``group_norm`` with M*G groups (= G groups per model), linear layers are one ``baddbmm``.
  It mirrors diffusers' UNet2DModel for the configurations ``build_unet`` makes without attention, and is checked
  against the real UNet on the first batch of every run (a mismatch raises instead of training silently wrong).
- ``"vmap"``: ``torch.func.vmap`` over ``functional_call`` of the real UNet with stacked parameters. Slower than
  "wide" and, with attention, it fails inside GroupNorm ("NYI: querying is_contiguous inside of vmap"), so it is
  never chosen automatically and only allowed where "wide" is; kept for comparison (benchmarks/).
- ``"loop"``: M ``functional_call``s on slices of the stacked parameters, one fused optimizer step. The forward
  and backward are train_ddpm's own ops, so it is bit-identical to sequential training, and it runs any UNet
  (attention included): the fallback where "wide" does not apply.

Why "wide": at this scale a training step is compute-bound in small oneDNN convolutions (conv backward ~45%,
forward ~20% of a step; per-op Python overhead is minor), so running M models only pays if the convolutions get
bigger. A grouped convolution over M models runs ~1.2-1.5x more FLOP/s than M small ones. vmap produces the same
grouped convolutions but adds layout copies and an unfused GroupNorm affine (mul/add/sum per norm) that eat most of
the gain; "loop" only saves the optimizer's per-tensor overhead. Measured on the default experiment's model (one
torch thread, quiet machine, models/hour vs one train_ddpm per process; benchmarks/results/batched_retraining.md):
wide 1.26x (M=2), 1.49x (M=4), 1.62x (M=8); vmap 1.18x and loop 1.13x (M=4). Wide M=8 in each of two processes ran
201 models/hour vs 127 for two single-model processes (1.58x).
The float results of "wide"/"vmap" differ from sequential training only by reduction order (grouped vs plain
convolutions, batched matmuls): loss curves agree to < 1e-6 relative, final EMA weights to ~2e-6 absolute after
150 steps of the default model and ~1e-5 after 30 steps of the test model.

Image sets may differ in size. A model whose set is smaller than the batch size trains on its whole set each step
(as train_ddpm does); its batch is zero-padded to the common size and the padded rows are left out of its loss
and gradient.
"""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from .experiment import ModelSpec, TrainingSpec
from .runtime import stable_seed
from .training import TrainingResult, _index_stream, lr_factor

ENGINES = ("auto", "wide", "vmap", "loop")
_BETAS, _EPS = (0.9, 0.999), 1e-8  # torch.optim.AdamW defaults, as train_ddpm uses them


# ---------------------------------------------------------------- the "wide" forward: M models as channel groups
def _conv(P, name, mod, x, M):
    import torch.nn.functional as F

    w, b = P[name + ".weight"], P.get(name + ".bias")
    return F.conv2d(
        x, w.reshape(-1, *w.shape[2:]), None if b is None else b.reshape(-1),
        mod.stride, mod.padding, mod.dilation, M * mod.groups)


def _norm(P, name, mod, x, M):
    import torch.nn.functional as F

    return F.group_norm(x, M * mod.num_groups, P[name + ".weight"].reshape(-1), P[name + ".bias"].reshape(-1), mod.eps)


def _linear(P, name, x):
    """x (M, B, in) -> (M, B, out), one batched matmul for the M models."""
    import torch

    return torch.baddbmm(P[name + ".bias"].unsqueeze(1), x, P[name + ".weight"].transpose(1, 2))


def _resnet(P, name, mod, x, temb, M):
    import torch.nn.functional as F

    h = _conv(P, name + ".conv1", mod.conv1, F.silu(_norm(P, name + ".norm1", mod.norm1, x, M)), M)
    e = _linear(P, name + ".time_emb_proj", F.silu(temb))  # (M, B, C_out)
    h = h + e.transpose(0, 1).reshape(h.shape[0], -1)[:, :, None, None]
    h = _conv(P, name + ".conv2", mod.conv2, F.silu(_norm(P, name + ".norm2", mod.norm2, h, M)), M)
    if mod.conv_shortcut is not None:
        x = _conv(P, name + ".conv_shortcut", mod.conv_shortcut, x, M)
    return (x + h) / mod.output_scale_factor


def _cat(a, b, M):
    """Skip connection: concatenate channels per model, keeping each model's channels contiguous."""
    import torch

    B, _, H, W = a.shape
    return torch.cat([a.view(B, M, -1, H, W), b.view(B, M, -1, H, W)], 2).view(B, -1, H, W)


def _wide_forward(base, P, x, t):
    """x (M, B, C, H, W), t (M, B) -> eps prediction (M, B, C_out, H, W), mirroring UNet2DModel.forward."""
    import torch.nn.functional as F

    M, B = t.shape
    temb = base.time_proj(t.reshape(-1)).view(M, B, -1)
    temb = _linear(P, "time_embedding.linear_2", F.silu(_linear(P, "time_embedding.linear_1", temb)))
    h = _conv(P, "conv_in", base.conv_in, x.transpose(0, 1).reshape(B, -1, *x.shape[3:]), M)
    res = [h]
    for i, block in enumerate(base.down_blocks):
        for j, r in enumerate(block.resnets):
            h = _resnet(P, f"down_blocks.{i}.resnets.{j}", r, h, temb, M)
            res.append(h)
        for j, d in enumerate(block.downsamplers or []):
            h = _conv(P, f"down_blocks.{i}.downsamplers.{j}.conv", d.conv, h, M)
            res.append(h)
    for j, r in enumerate(base.mid_block.resnets):
        h = _resnet(P, f"mid_block.resnets.{j}", r, h, temb, M)
    for i, block in enumerate(base.up_blocks):
        for j, r in enumerate(block.resnets):
            h = _resnet(P, f"up_blocks.{i}.resnets.{j}", r, _cat(h, res.pop(), M), temb, M)
        for j, u in enumerate(block.upsamplers or []):
            h = _conv(P, f"up_blocks.{i}.upsamplers.{j}.conv", u.conv, F.interpolate(h, scale_factor=2.0), M)
    h = _conv(P, "conv_out", base.conv_out, F.silu(_norm(P, "conv_norm_out", base.conv_norm_out, h, M)), M)
    return h.view(B, M, -1, *h.shape[2:]).transpose(0, 1)


def wide_supported(unet) -> bool:
    """Whether _wide_forward mirrors this UNet: build_unet's family without attention, default resnet options."""
    c = unet.config
    resnets = [r for b in [*unet.down_blocks, unet.mid_block, *unet.up_blocks] for r in b.resnets]
    return (
        c.time_embedding_type == "positional" and not c.center_input_sample and c.class_embed_type is None
        and c.num_class_embeds is None and c.act_fn == "silu" and c.resnet_time_scale_shift == "default"
        and set(c.down_block_types) == {"DownBlock2D"} and set(c.up_block_types) == {"UpBlock2D"}
        and c.mid_block_type == "UNetMidBlock2D" and all(a is None for a in unet.mid_block.attentions)
        and c.downsample_type == "conv" and c.upsample_type == "conv" and c.downsample_padding != 0
        and unet.time_embedding.cond_proj is None and unet.time_embedding.post_act is None
        and all(r.upsample is None and r.downsample is None and not r.skip_time_act and r.time_emb_proj is not None
                and r.time_embedding_norm == "default" for r in resnets)
        and all(u.interpolate and not u.use_conv_transpose and u.norm is None
                for b in unet.up_blocks for u in (b.upsamplers or []))
    )


def _make_forward(engine: str, base, buffers, sizes):
    """The M-model forward: (params, x (M, B, C, H, W), t (M, B)) -> (M, B, C, H, W). "loop" skips each model's
    padding rows (zeros out), so that its convolutions see exactly train_ddpm's batch."""
    import torch
    from torch.func import functional_call, vmap

    if engine == "wide":
        return lambda P, x, t: _wide_forward(base, P, x, t)

    def one(p, b, x, t):
        return functional_call(base, (p, b), (x, t), {"return_dict": False})[0]

    if engine == "vmap":
        return lambda P, x, t: vmap(one)(P, buffers, x, t)

    def loop(P, x, t):
        out = torch.zeros_like(x)
        for m, b in enumerate(sizes):
            out[m, :b] = one({k: v[m] for k, v in P.items()}, {k: v[m] for k, v in buffers.items()}, x[m, :b], t[m, :b])
        return out

    return loop


# ---------------------------------------------------------------- training
def _validate(image_sets, seeds):
    if len(image_sets) != len(seeds):
        raise ValueError(f"got {len(image_sets)} image sets but {len(seeds)} seeds: one seed per model")
    if len(image_sets) == 0:
        raise ValueError("train_ddpm_many needs at least one image set")
    shapes = set()
    for m, images in enumerate(image_sets):
        if getattr(images, "ndim", 0) != 4 or len(images) == 0:
            raise ValueError(f"image set {m} must be a non-empty (n, C, H, W) array, got shape "
                             f"{getattr(images, 'shape', None)}")
        shapes.add(tuple(images.shape[1:]))
    if len(shapes) > 1:
        raise ValueError(f"all image sets must share one (C, H, W) shape to train together, got {sorted(shapes)}")


def train_ddpm_many(
    image_sets: Sequence[np.ndarray],
    model_spec: ModelSpec,
    spec: TrainingSpec,
    seeds: Sequence[int],
    device: str = "cpu",
    engine: str = "auto",
) -> list[TrainingResult]:
    """Train one fresh DDPM per (image set, seed) pair, all in lock-step in this process.

    Result m matches ``train_ddpm(image_sets[m], model_spec, spec, seed=seeds[m])`` up to float reduction order
    (bit for bit with engine="loop"). ``checkpoints``, ``checkpoint_steps``, ``checkpoint_lrs`` are empty and
    ``last_timesteps`` has 0 rows; ``wall_seconds`` is the run's wall time divided by M (its share), and ``extra``
    holds the whole run's wall time, M and the engine used.
    """
    import torch

    from .models import build_scheduler, build_unet

    _validate(image_sets, seeds)
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    M = len(image_sets)
    c, h, w = image_sets[0].shape[1:]
    unets = [build_unet(model_spec, sample_size=h, channels=c, seed=stable_seed("init", s)).to(device).train()
             for s in seeds]
    if engine == "auto":
        engine = "wide" if wide_supported(unets[0]) else "loop"
    elif engine in ("wide", "vmap") and not wide_supported(unets[0]):
        raise ValueError(f"engine={engine!r} does not support this model (attention or non-default blocks): "
                         "use 'loop'")
    base = unets[0]
    names = [n for n, p in base.named_parameters() if p.requires_grad]
    per_model = [dict(u.named_parameters()) for u in unets]
    P = {n: torch.stack([p[n].detach() for p in per_model]).requires_grad_() for n in names}
    buffers = {n: torch.stack([u.get_buffer(n) for u in unets]) for n, _ in base.named_buffers()}
    params = list(P.values())
    sizes = [min(spec.batch_size, len(x)) for x in image_sets]
    forward = _make_forward(engine, base, buffers, sizes)

    abar = build_scheduler(model_spec).alphas_cumprod.to(device=device, dtype=torch.float32)
    T = model_spec.num_train_timesteps
    data = [torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device) for x in image_sets]
    B = max(sizes)
    streams = []
    for s, x, b in zip(seeds, image_sets, sizes):
        order_gen = torch.Generator().manual_seed(stable_seed("order", s))
        noise_gen = torch.Generator().manual_seed(stable_seed("noise", s))
        streams.append((_index_stream(len(x), b, order_gen), noise_gen))

    exp_avg = [torch.zeros_like(p) for p in params]
    exp_avg_sq = [torch.zeros_like(p) for p in params]
    ema = [p.detach().clone() for p in params] if spec.ema_decay else None
    losses = np.empty((M, spec.steps), dtype=np.float32)
    start = time.perf_counter()
    for step in range(spec.steps):
        lr = spec.lr * lr_factor(step, spec)
        x_t = torch.zeros(M, B, c, h, w, device=device)
        eps = torch.zeros(M, B, c, h, w, device=device)
        t_all = torch.zeros(M, B, dtype=torch.long, device=device)
        for m, ((next_batch, noise_gen), b) in enumerate(zip(streams, sizes)):
            idx = next_batch()  # draws exactly as train_ddpm: indices, then timesteps, then noise
            t = torch.randint(0, T, (b,), generator=noise_gen).to(device)
            e = torch.randn((b, c, h, w), generator=noise_gen).to(device)
            a = abar[t].view(-1, 1, 1, 1)
            x_t[m, :b] = a.sqrt() * data[m][idx.to(device)] + (1 - a).sqrt() * e
            eps[m, :b], t_all[m, :b] = e, t
        if step == 0 and engine != "loop":  # guard against a diffusers version the wide forward no longer mirrors
            with torch.no_grad():
                ours = forward(P, x_t, t_all)[0]
                ref = base(x_t[0], t_all[0]).sample
            if not torch.allclose(ours, ref, rtol=1e-4, atol=1e-4):
                raise RuntimeError(f"engine {engine!r} disagrees with UNet2DModel (max abs diff "
                                   f"{(ours - ref).abs().max().item():.2e}): use engine='loop'")
        sq = (forward(P, x_t, t_all) - eps) ** 2
        loss = torch.stack([sq[m, :b].mean() for m, b in enumerate(sizes)])  # train_ddpm's mean, padding left out
        for p in params:
            p.grad = None
        loss.sum().backward()  # the models are independent: d(sum)/d(theta_m) = d(loss_m)/d(theta_m)
        with torch.no_grad():
            grads = [p.grad for p in params]
            if spec.grad_clip:  # torch.nn.utils.clip_grad_norm_, per model
                norms = torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads], 1)  # (M, P)
                coef = torch.clamp(spec.grad_clip / (torch.linalg.vector_norm(norms, dim=1) + 1e-6), max=1.0)
                for g in grads:
                    g.mul_(coef.view(-1, *[1] * (g.dim() - 1)))
            _adamw_step(params, grads, exp_avg, exp_avg_sq, step + 1, lr, spec.weight_decay)
            if ema is not None:
                decay = min(spec.ema_decay, (1 + step) / (10 + step))
                torch._foreach_lerp_(ema, params, 1 - decay)
        losses[:, step] = loss.detach().cpu().numpy()
    wall = time.perf_counter() - start

    final = ema if ema is not None else [p.detach() for p in params]
    results = []
    for m, (unet, x) in enumerate(zip(unets, image_sets)):
        with torch.no_grad():
            for name, value in zip(names, final):
                unet.get_parameter(name).copy_(value[m])
        unet.eval().to("cpu")
        results.append(TrainingResult(
            unet=unet, checkpoints=[], checkpoint_steps=[], checkpoint_lrs=[],
            last_timesteps=np.empty((0, len(x)), dtype=np.int32), loss_curve=losses[m].copy(),
            wall_seconds=wall / M, extra={"batch_wall_seconds": wall, "models_in_batch": M, "engine": engine}))
    return results


def _adamw_step(params, grads, exp_avg, exp_avg_sq, step: int, lr: float, weight_decay: float) -> None:
    """torch.optim.AdamW's single-tensor CPU update, op for op, on the stacked (M, ...) tensors: all M models share
    the step count and learning rate, and elementwise ops give the same bits stacked or not."""
    import torch

    beta1, beta2 = _BETAS
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avg, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sq, beta2)
    torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1 - beta2)
    step_size = lr / (1 - beta1 ** step)
    denom = torch._foreach_sqrt(exp_avg_sq)
    torch._foreach_div_(denom, (1 - beta2 ** step) ** 0.5)
    torch._foreach_add_(denom, _EPS)
    torch._foreach_addcdiv_(params, exp_avg, denom, value=-step_size)
