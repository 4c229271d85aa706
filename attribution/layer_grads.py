"""Per-sample parameter gradients from one ordinary batched forward and backward pass (issue 8).

A layer's weight gradient is a sum over the batch of products of the gradient at its output with its input
(Linear, Conv2d) or with its normalised input (GroupNorm, LayerNorm).  Keeping that sum per sample
instead of over the whole batch takes the same multiply-adds, so per-sample gradients cost one batched forward,
the backward through the activations (the summed weight gradients are never computed: nothing asks for them) and
one batched matmul per layer: the work of a single forward+backward pass of the batch, the physical limit.

A sample may own ``m`` rows of the batch (its noised copies at m timesteps); its gradient is the sum over those
rows, which folds into the same matmul.

Modules are hooked only while :meth:`LayerGradients.compute` runs (a GroupNorm's forward is swapped for one whose
backward yields dX and the per-sample gradients together).  :func:`unsupported` names the selected
parameters that live in any other kind of module (or are shared between modules); such models are left to the
``torch.func`` path of :class:`attribution.gradients.GradientEngine`.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LayerGradients", "unsupported"]


# Rows are time-major: sample b owns rows b, B + b, 2B + b, ... (row = copy * B + sample).  A view of an
# activation (m*B, C, ...) as (m, B*C, ...) then puts each sample's channels in its own channel group, so the
# per-sample gradients of a convolution or a group norm are that op's ordinary weight gradient with the samples as
# groups: one library call over free views, summed over the m copies by the library itself.
#
# A rule maps (module, input, output gradient, samples, zeros) to the gradients of the module's parameters, each
# (samples, *parameter shape); zeros(shape, like) is a cached zero tensor for arguments whose values a kernel never
# reads.


def _linear(module: nn.Linear, x: Tensor, g: Tensor, B: int, zeros) -> dict[str, Tensor]:
    x = x.reshape(-1, B, x[0].numel() // x.shape[-1], x.shape[-1])
    g = g.reshape(-1, B, g[0].numel() // g.shape[-1], g.shape[-1])
    if x.shape[2] >= 8:
        # a token sequence: one batched matmul per copy, reading its rows in place (half the time of the einsum,
        # which first copies both operands into a sample-major layout)
        dw = torch.bmm(g[0].transpose(1, 2), x[0])
        for i in range(1, x.shape[0]):
            dw.baddbmm_(g[i].transpose(1, 2), x[i])
        out = {"weight": dw}
    else:  # one position per row (time embeddings): the einsum's single matmul wins
        out = {"weight": torch.einsum("mblo,mbli->boi", g, x)}
    if module.bias is not None:
        out["bias"] = g.sum((0, 2))
    return out


def _conv2d(module: nn.Conv2d, x: Tensor, g: Tensor, B: int, zeros) -> dict[str, Tensor]:
    x, g, w = x.contiguous(), g.contiguous(), module.weight  # raw aten kernels below: give them plain layouts
    O, C = w.shape[0] // module.groups, w.shape[1]  # channels per group
    m = x.shape[0] // B
    out: dict[str, Tensor] = {}
    if w.shape[2:] == (1, 1) and module.stride == (1, 1) and module.padding == (0, 0) and module.groups == 1:
        # a 1x1 convolution is a Linear over pixels: one batched matmul per copy, each reading its rows in place
        # (gradient (B, O, HW) times input (B, HW, C) transposed by strides): 2-3x faster than the grouped
        # convolution, which oneDNN runs group by group for 1x1 kernels, and than the summed weight gradient
        gs, xs = g.reshape(m, B, O, -1), x.reshape(m, B, C, -1)
        dw = torch.bmm(gs[0], xs[0].transpose(1, 2))
        for i in range(1, m):
            dw.baddbmm_(gs[i], xs[i].transpose(1, 2))
        out["weight"] = dw.reshape((B,) + tuple(w.shape))
    elif O < 8 <= C and _same_size(module):
        # few output channels (a conv_out to pixels): oneDNN is slow with < 8 channels per group on the output
        # side, so swap the roles of input and output gradient; for a size-preserving stride-1 convolution
        # that yields the same gradient transposed and flipped
        _, dw, _ = torch.ops.aten.convolution_backward(
            x.reshape((m, B * C) + tuple(x.shape[2:])), g.reshape((m, B * O) + tuple(g.shape[2:])),
            zeros((B * C, O) + tuple(w.shape[2:]), w), None, [1, 1], module.padding, [1, 1], False, [0, 0], B,
            [False, True, False])
        out["weight"] = dw.reshape((B, C, O) + tuple(w.shape[2:])).transpose(1, 2).flip(-1, -2)
    else:
        # the grouped weight only needs its shape: dX is not asked for (a zero tensor, allocated once)
        _, dw, db = torch.ops.aten.convolution_backward(
            g.reshape((m, B * g.shape[1]) + tuple(g.shape[2:])), x.reshape((m, B * x.shape[1]) + tuple(x.shape[2:])),
            zeros((B * w.shape[0],) + tuple(w.shape[1:]), w), None if module.bias is None else [B * w.shape[0]],
            module.stride, module.padding, module.dilation, False, [0, 0], B * module.groups,
            [False, True, module.bias is not None])
        out["weight"] = dw.reshape((B,) + tuple(w.shape))
        if module.bias is not None:
            out["bias"] = db.reshape(B, -1)
    if module.bias is not None and "bias" not in out:
        out["bias"] = g.reshape(m, B, g.shape[1], -1).sum((0, 3))
    return out


def _same_size(module: nn.Conv2d) -> bool:
    """Stride 1, no dilation, one group, odd kernel with half-kernel padding: output size = input size."""
    k = module.kernel_size
    return (module.stride == (1, 1) and module.dilation == (1, 1) and module.groups == 1
            and all(n % 2 == 1 for n in k) and tuple(module.padding) == (k[0] // 2, k[1] // 2))


def _group_norm(module: nn.GroupNorm, x: Tensor, g: Tensor, B: int, zeros) -> dict[str, Tensor]:
    """Only where the differentiated graph starts at this layer (see _PerSampleGroupNorm for the others)."""
    C, G = module.num_channels, module.num_groups
    m, hw = x.shape[0] // B, x[0, 0].numel()
    # the CPU kernel reads garbage from a non-contiguous gradient (e.g. the expanded ones of a .sum() loss)
    xs, gs = x.reshape(m, B * C, hw).contiguous(), g.reshape(m, B * C, hw).contiguous()
    _, mean, rstd = torch.native_group_norm(xs, None, None, m, B * C, hw, B * G, module.eps)
    _, dw, db = torch.ops.aten.native_group_norm_backward(  # the kernel wants a weight; dX is not asked for
        gs, xs, mean, rstd, zeros((B * C,), x), m, B * C, hw, B * G, [False, True, True])
    return {"weight": dw.reshape(B, C), "bias": db.reshape(B, C)}


class _PerSampleGroupNorm(torch.autograd.Function):
    """A GroupNorm whose backward also yields each sample's weight and bias gradients.

    dX needs, per row and channel, the sums of g*x and g over the pixels; the per-sample weight gradients are those
    same sums.  Viewed as (m, B*C, pixels) with B*G groups and the weight repeated B times, one
    native_group_norm_backward call returns dX (each sample's groups use the same weight: the ordinary dX) and the
    per-sample gradients from the one pass over x and g that dX needs anyway, instead of a second pass in a rule.
    """

    @staticmethod
    def forward(ctx, x: Tensor, module: nn.GroupNorm, samples: int, store: Callable) -> Tensor:
        x = x.contiguous()
        N, C, hw = x.shape[0], x.shape[1], x[0, 0].numel()
        y, mean, rstd = torch.native_group_norm(x, module.weight, module.bias, N, C, hw, module.num_groups,
                                                module.eps)
        ctx.save_for_backward(x, mean, rstd)
        ctx.module, ctx.samples, ctx.store = module, samples, store
        return y

    @staticmethod
    def backward(ctx, gy: Tensor):
        x, mean, rstd = ctx.saved_tensors
        module, B = ctx.module, ctx.samples
        C, G, hw = module.num_channels, module.num_groups, x[0, 0].numel()
        m = _copies(x.shape[0], B)
        weight = None if module.weight is None else module.weight.detach().repeat(B)
        dx, dw, db = torch.ops.aten.native_group_norm_backward(
            gy.contiguous().view(m, B * C, hw), x.view(m, B * C, hw), mean.view(m, B * G), rstd.view(m, B * G),
            weight, m, B * C, hw, B * G, [ctx.needs_input_grad[0], True, True])
        ctx.store(module, {"weight": dw.view(B, C), "bias": db.view(B, C)})
        return (None if dx is None else dx.view(x.shape)), None, None, None


def _copies(rows: int, samples: int) -> int:
    if rows % samples:
        raise ValueError(f"a layer saw {rows} rows, not a multiple of the {samples} samples")
    return rows // samples


def _layer_norm(module: nn.LayerNorm, x: Tensor, g: Tensor, B: int, zeros) -> dict[str, Tensor]:
    shape = tuple(module.normalized_shape)
    lead = (-1, B, g[0].numel() // math.prod(shape)) + shape  # (copies, samples, positions, *shape)
    out = {"weight": (g * F.layer_norm(x, shape, eps=module.eps)).reshape(lead).sum((0, 2))}
    if module.bias is not None:
        out["bias"] = g.reshape(lead).sum((0, 2))
    return out


def _embedding(module: nn.Embedding, idx: Tensor, g: Tensor, B: int, zeros) -> dict[str, Tensor]:
    rows = idx.reshape(-1, B, idx[0].numel())
    owner = torch.arange(B, device=idx.device).view(1, B, 1).expand_as(rows)
    out = g.new_zeros((B,) + tuple(module.weight.shape))
    out.index_put_((owner.reshape(-1), rows.reshape(-1)), g.reshape(-1, g.shape[-1]), accumulate=True)
    if module.padding_idx is not None:
        out[:, module.padding_idx] = 0
    return {"weight": out}


# exact types: a subclass may change forward (diffusers' LoRACompatibleConv adds a branch), so it is not assumed
_RULES: dict[type, Callable] = {
    nn.Linear: _linear,
    nn.Conv2d: _conv2d,
    nn.GroupNorm: _group_norm,
    nn.LayerNorm: _layer_norm,
    nn.Embedding: _embedding,
}


def _rule(module: nn.Module) -> Callable | None:
    rule = _RULES.get(type(module))
    if rule is _conv2d and (module.padding_mode != "zeros" or isinstance(module.padding, str)):
        return None
    if rule is _embedding and (module.max_norm is not None or module.scale_grad_by_freq or module.sparse):
        return None
    return rule


def _owners(model: nn.Module) -> dict[int, list[tuple[str, nn.Module, str]]]:
    """id(parameter) -> every (full name, module, attribute) that holds it (more than one = a shared parameter)."""
    owners: dict[int, list] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for attr, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((f"{mod_name}.{attr}" if mod_name else attr, module, attr))
    return owners


def unsupported(model: nn.Module, names: list[str]) -> list[str]:
    """The selected parameter names this module cannot differentiate per sample (empty: all of them can)."""
    named = dict(model.named_parameters())
    owners = _owners(model)
    bad = []
    for n in names:
        holders = {id(mod): (mod, attr) for _, mod, attr in owners[id(named[n])]}
        if len(holders) != 1 or _rule(next(iter(holders.values()))[0]) is None:
            bad.append(n)
    return bad


def _take(held: list) -> tuple:
    items = tuple(held)
    held.clear()
    return items


class LayerGradients:
    """Hooks that turn one batched backward into per-sample gradients of the selected parameters.

    ``params``: name -> parameter, in layout order (GradientEngine.param_names: the columns of the (B, p) matrix).
    """

    def __init__(self, model: nn.Module, params: Mapping[str, Tensor]) -> None:
        bad = unsupported(model, list(params))
        if bad:
            raise ValueError(f"no per-layer gradient rule for {bad[:5]}: use the torch.func path")
        named = dict(model.named_parameters())
        self.model = model
        self.layers: dict[nn.Module, dict[str, int]] = {}  # module -> attr -> index in the layout
        owners = _owners(model)
        for i, n in enumerate(params):
            _, module, attr = owners[id(named[n])][0]
            self.layers.setdefault(module, {})[attr] = i
        self._rules = {module: _rule(module) for module in self.layers}
        self._params = [named[n] for n in params]
        self.numels = [p.numel() for p in self._params]
        self.num_params = sum(self.numels)
        self._all_params = list(model.parameters())
        self._zero_cache: dict[tuple, Tensor] = {}
        self._zero_batch = 0

    def _zeros(self, shape: tuple, like: Tensor) -> Tensor:
        """A cached zero tensor; the cache holds one batch size's shapes (at most samples x p floats)."""
        key = (tuple(shape), like.dtype, like.device)
        if key not in self._zero_cache:
            self._zero_cache[key] = torch.zeros(shape, dtype=like.dtype, device=like.device)
        return self._zero_cache[key]

    def compute(self, loss_fn: Callable[[], Tensor], samples: int, out: list[Tensor] | None = None) -> list[Tensor]:
        """Each selected parameter's per-sample gradient d loss / d theta, (samples, numel), in layout order.

        ``loss_fn()`` runs the model on m*samples rows, time-major (sample b owns rows b, samples + b, ...), and
        returns the sum of per-row outputs; rows must not interact (true of eval-mode UNets: GroupNorm and
        attention work within a row).  ``out``: tensors of those shapes to add the gradients into (returned).
        Without it the blocks are the kernels' own outputs, never copied again (:meth:`GradientEngine.blocks`).
        """
        if samples != self._zero_batch:  # zero tensors are per batch size: keep one size's
            self._zero_cache.clear()
            self._zero_batch = samples
        sources: list[Tensor] = []
        holders: list[list] = []
        pending: list[tuple[nn.Module, Tensor]] = []  # source layers: their gradient comes back from autograd
        blocks: list[Tensor | None] = [None] * len(self.numels) if out is None else list(out)

        def store(module: nn.Module, parts: dict[str, Tensor]) -> None:
            for attr, i in self.layers[module].items():
                part = parts[attr].reshape(samples, self.numels[i])
                if blocks[i] is None:
                    blocks[i] = part
                else:  # a module that ran twice, or accumulation into out
                    blocks[i].add_(part)

        def accumulate(module: nn.Module, x: Tensor, g: Tensor) -> None:
            _copies(g.shape[0], samples)
            store(module, self._rules[module](module, x, g, samples, self._zeros))

        def start(module: nn.Module, x: Tensor, output: Tensor) -> Tensor:
            """Nothing upstream is differentiated: the graph starts at this layer's output."""
            leaf = output.detach().requires_grad_(True)
            sources.append(leaf)
            pending.append((module, x))
            return leaf

        def forward_hook(module: nn.Module, args: tuple, output: Tensor):
            x = args[0].detach()
            if output.requires_grad:
                # The hook lives on the output's autograd node, so it must not keep a reference to that node (a
                # cycle through C++ that Python's gc cannot see: the whole graph would leak, every call) nor to x
                # after use (autograd frees a layer's saved input once its backward ran; so must we).  held is
                # emptied by the hook, or in the finally below when the hook never ran.
                held = [x]
                holders.append(held)
                output.register_hook(lambda g: accumulate(module, *_take(held), g))
                return None
            return start(module, x, output)

        def group_norm_forward(module: nn.GroupNorm) -> Callable[[Tensor], Tensor]:
            def forward(x: Tensor) -> Tensor:
                if x.requires_grad:
                    return _PerSampleGroupNorm.apply(x, module, samples, store)
                return start(module, x.detach(), type(module).forward(module, x))
            return forward

        flags = [(p, p.requires_grad) for p in self._all_params]
        handles, patched = [], []
        for module in self.layers:
            if self._rules[module] is _group_norm and "forward" not in vars(module):
                module.forward = group_norm_forward(module)
                patched.append(module)
            else:
                handles.append(module.register_forward_hook(forward_hook))
        try:
            for p, _ in flags:
                p.requires_grad_(False)
            with torch.enable_grad():
                loss = loss_fn()
                if not sources:
                    raise RuntimeError("no hooked layer ran in the forward pass")
                grads = torch.autograd.grad(loss, sources, allow_unused=True)
            for (module, x), g in zip(pending, grads):
                if g is not None:
                    accumulate(module, x, g)
        finally:
            for held in holders:
                held.clear()
            for h in handles:
                h.remove()
            for module in patched:
                del module.forward
            for p, flag in flags:
                p.requires_grad_(flag)
        # parameters the loss does not depend on have zero gradient
        return [torch.zeros((samples, n), dtype=p.dtype, device=p.device) if b is None else b
                for b, p, n in zip(blocks, self._params, self.numels)]
