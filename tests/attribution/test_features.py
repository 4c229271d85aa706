"""Numeric checks for the feature hot path: output functions, timesteps/noise, per-sample gradients, projectors.

Tolerances: per-sample gradients (both backends: per-layer rules and torch.func) are compared with a plain autograd
loop at rtol=1e-4 and atol=1e-6 * max|reference| (float32; they compute the same math with different kernel
orderings, observed differences ~1e-7 relative).  Everything that the spec requires to be reproducible (projections, sharding,
seeded draws) is compared bit for bit with torch.equal.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from attribution.gradients import GradientEngine, select_parameters
from attribution.outputs import OUTPUT_FUNCTIONS, NoiseSchedule, get_output_function
from attribution import projectors
from attribution.projectors import (
    CHUNK_ELEMENTS,
    DEFAULT_MAX_CACHE_BYTES,
    HASH_BLOCK,
    TILE_ROWS,
    CountSketchProjector,
    GaussianProjector,
    make_projector,
)
from attribution.timesteps import (
    common_noise_fn,
    noise,
    sample_noise,
    sample_noise_fn,
    timesteps,
)
from attribution.runtime import stable_seed

T = 1000
RANDOM_PROJECTORS = ["gaussian", "rademacher", "countsketch", "countsketch_gaussian"]


def _tiny_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    model = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=8,
    )
    # perturb every parameter so no gradient is trivially zero (diffusers zero-inits nothing here, but be sure)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=T)


@pytest.fixture(scope="module")
def schedule(scheduler):
    return NoiseSchedule.from_scheduler(scheduler)


@pytest.fixture(scope="module")
def unet():
    return _tiny_unet()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(7)
    x0 = torch.randn(3, 1, 8, 8, generator=g)
    eps = torch.randn(3, 1, 8, 8, generator=g)
    t = torch.tensor([0, 417, 999])
    return x0, t, eps


def _autograd_reference(model, schedule, output, x0, t, eps, names=None):
    """Per-sample gradients the slow obvious way: one sample at a time, torch.autograd.grad."""
    fn = get_output_function(output)
    params = [p for n, p in model.named_parameters() if names is None or n in names]
    rows = []
    for i in range(x0.shape[0]):
        xt = schedule.add_noise(x0[i : i + 1], eps[i : i + 1], t[i : i + 1])
        out = fn(model(xt, t[i : i + 1]).sample, eps[i : i + 1], t[i : i + 1], schedule).sum()
        grads = torch.autograd.grad(out, params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def _assert_grads_close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))


# --------------------------------------------------------------------------- 1. gradients
@pytest.mark.parametrize("backend", ["layers", "vmap"])
@pytest.mark.parametrize("output", sorted(OUTPUT_FUNCTIONS))
def test_per_sample_grads_match_autograd_loop(unet, schedule, batch, output, backend):
    x0, t, eps = batch
    engine = GradientEngine(unet, schedule, output, backend=backend)
    assert engine.backend == backend
    assert engine.num_attention_modules > 0  # attention is exercised (classic processor under vmap)
    assert engine.num_params == sum(p.numel() for p in unet.parameters())
    G = engine.per_sample_grads(x0, t, eps)
    assert G.shape == (3, engine.num_params) and G.dtype == torch.float32
    ref = _autograd_reference(unet, schedule, output, x0, t, eps)
    assert float(ref.abs().max()) > 0
    _assert_grads_close(G, ref)
    # rows differ (different samples/timesteps), i.e. the gradients really are per sample
    assert not torch.allclose(G[0], G[1])


@pytest.mark.parametrize("backend", ["layers", "vmap"])
def test_averaged_grads_equal_mean_of_per_timestep_grads(unet, schedule, batch, backend):
    x0, _, _ = batch
    engine = GradientEngine(unet, schedule, "square", timestep_chunk=3, backend=backend)
    B, K = x0.shape[0], 4
    t_sets = timesteps("random", K, T, sample_ids=[11, 12, 13], seed=5)
    eps = torch.randn(B, K, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    per_t = torch.stack([engine.per_sample_grads(x0, t_sets[:, k], eps[:, k]) for k in range(K)], dim=1)
    mean = per_t.mean(1)
    for chunk in (1, 3, K):  # timestep chunking changes rounding only
        dense = engine.averaged_grads(x0, t_sets, eps, timestep_chunk=chunk)
        _assert_grads_close(dense, mean)
        blocks = engine.averaged_grads(x0, t_sets, eps, timestep_chunk=chunk, blocks=True)
        assert [tuple(b.shape) for b in blocks] == [(B, n) for n in engine.param_numels]
        assert torch.equal(torch.cat(blocks, 1), dense)  # the same numbers, only not joined
    # per-timestep API returns exactly the per-timestep gradients, and the ReTrac normalisation
    q = engine.query_grads_per_timestep(x0, t_sets, eps)
    assert q.shape == (B, K, engine.num_params)
    _assert_grads_close(q, per_t)
    normed = per_t / per_t.norm(dim=2, keepdim=True)
    qn = engine.query_grads_per_timestep(x0, t_sets, eps, normalize=True)
    torch.testing.assert_close(qn.norm(dim=2), torch.ones(B, K))
    _assert_grads_close(qn, normed)
    _assert_grads_close(engine.averaged_grads(x0, t_sets, eps, normalize_per_timestep=True), normed.mean(1))


def test_averaged_grads_with_noise_callables_and_draws(unet, schedule, batch):
    x0, _, _ = batch
    engine = GradientEngine(unet, schedule, "loss")
    ids = [4, 9, 2]
    t_sets = timesteps("uniform", 3, T, ids)
    shape = tuple(x0.shape[1:])
    # common noise: the callable and the equivalent tensor give the same result
    fn = common_noise_fn(21, shape)
    eps = torch.stack([torch.stack([noise(21, int(t), shape) for t in row]) for row in t_sets])
    assert torch.equal(engine.averaged_grads(x0, t_sets, fn), engine.averaged_grads(x0, t_sets, eps))
    # several draws per timestep: mean over (k, r) of single-draw gradients
    R = 2
    sfn = sample_noise_fn(21, ids, shape)
    got = engine.averaged_grads(x0, t_sets, sfn, noise_draws=R, timestep_chunk=2)
    singles = [
        engine.per_sample_grads(
            x0, t_sets[:, k], torch.stack([sample_noise(21, i, int(t_sets[0, k]), shape, r) for i in ids])
        )
        for k in range(3)
        for r in range(R)
    ]
    _assert_grads_close(got, torch.stack(singles).mean(0))


@pytest.mark.parametrize("backend", ["layers", "vmap"])
def test_param_filter_subset(unet, schedule, batch, backend):
    x0, t, eps = batch
    full = GradientEngine(unet, schedule, "loss", backend="vmap")
    Gfull = full.unflatten(full.per_sample_grads(x0, t, eps))
    pred = lambda n: n.startswith("conv_out") or ".attentions." in n  # noqa: E731
    sub = GradientEngine(unet, schedule, "loss", param_filter=pred, backend=backend)
    expected_p = sum(p.numel() for n, p in unet.named_parameters() if pred(n))
    assert 0 < sub.num_params == expected_p < full.num_params
    Gsub = sub.per_sample_grads(x0, t, eps)
    assert Gsub.shape == (3, expected_p)
    ref = torch.cat([Gfull[n].reshape(3, -1) for n in sub.param_names], 1)
    _assert_grads_close(Gsub, ref)
    # a list of names works the same; unknown names and empty selections raise
    assert list(select_parameters(unet, ["conv_out.bias", "conv_in.weight"])) == ["conv_in.weight", "conv_out.bias"]
    with pytest.raises(ValueError, match="unknown parameter"):
        select_parameters(unet, ["nope.weight"])
    with pytest.raises(ValueError, match="empty"):
        select_parameters(unet, lambda n: False)


@pytest.mark.parametrize("backend", ["layers", "vmap"])
def test_class_conditional_grads(schedule, batch, backend):
    """cond= is passed per sample (class labels for a UNet2DModel with num_class_embeds: an Embedding)."""
    from diffusers import UNet2DModel

    torch.manual_seed(1)
    model = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4, num_class_embeds=3,
    )
    x0, t, eps = batch
    y = torch.tensor([2, 0, 2])
    G = GradientEngine(model, schedule, "loss", backend=backend).per_sample_grads(x0, t, eps, cond=y)
    rows = []
    for i in range(3):
        xt = schedule.add_noise(x0[i : i + 1], eps[i : i + 1], t[i : i + 1])
        out = ((model(xt, t[i : i + 1], class_labels=y[i : i + 1]).sample - eps[i : i + 1]) ** 2).mean()
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(out, list(model.parameters()))]))
    _assert_grads_close(G, torch.stack(rows))
    emb = GradientEngine(model, schedule, "loss").unflatten(G)["class_embedding.weight"]
    assert float(emb[0, 1].abs().sum()) == 0 and float(emb[0, 2].abs().sum()) > 0  # only its own class row


# --------------------------------------------------------------------------- 2. output functions
def test_output_functions_match_hand_formulas(scheduler, schedule):
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 250, 500, 999])
    P, E = pred.numpy().reshape(5, -1), eps.numpy().reshape(5, -1)
    betas = scheduler.betas.numpy().astype(np.float64)
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    w = betas / (2.0 * alphas * (1.0 - abar))
    expected = {
        "loss": ((P - E) ** 2).mean(1),
        "square": (P**2).mean(1),
        "average": P.mean(1),
        "l1": np.abs(P).sum(1),
        "l2": np.sqrt((P**2).sum(1)),
        "linf": np.abs(P).max(1),
        "elbo": w[t.numpy()] * ((P - E) ** 2).mean(1),
        "loss_l1": np.abs(P - E).mean(1),
    }
    assert set(expected) == set(OUTPUT_FUNCTIONS)
    for name, want in expected.items():
        got = get_output_function(name)(pred, eps, t, schedule)
        assert got.shape == (5,)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, err_msg=name)
    # w_0 = 1 / (2 alpha_0): a sanity value independent of the implementation
    assert math.isclose(w[0], 1.0 / (2.0 * alphas[0]), rel_tol=1e-6)
    with pytest.raises(ValueError, match="known: .*elbo.*loss_l1"):
        get_output_function("mse")


def test_noise_schedule_matches_ddpm_scheduler(scheduler, schedule):
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    assert torch.equal(schedule.add_noise(x0, eps, t), scheduler.add_noise(x0, eps, t))
    assert schedule.num_train_timesteps == T
    assert torch.allclose(schedule.alphas_cumprod, torch.cumprod(1 - schedule.betas, 0))


# --------------------------------------------------------------------------- 3. timesteps and noise
def test_uniform_timesteps_grid():
    ts = timesteps("uniform", 10, 1000, sample_ids=[3, 1, 4])
    assert ts.dtype == torch.long and ts.shape == (3, 10)
    assert ts[0].tolist() == list(range(0, 1000, 100))
    assert torch.equal(ts[0], ts[2])
    assert timesteps("uniform", 3, 10, [0])[0].tolist() == [0, 3, 6]
    with pytest.raises(ValueError, match="known: uniform, random"):
        timesteps("linear", 10, 1000, [0])


def test_random_timesteps_do_not_depend_on_the_batch():
    ids = [40, 41, 42, 43, 44, 45, 46]
    big = timesteps("random", 16, T, ids, seed=9)
    assert big.shape == (7, 16) and int(big.min()) >= 0 and int(big.max()) < T
    for row, sid in enumerate(ids):
        assert torch.equal(timesteps("random", 16, T, [sid], seed=9)[0], big[row])
    assert torch.equal(timesteps("random", 16, T, torch.tensor(ids[::-1]), seed=9), big.flip(0))
    assert not torch.equal(big[0], big[1])  # different samples, different draws
    assert not torch.equal(timesteps("random", 16, T, ids, seed=10), big)  # the seed matters


def test_noise_is_common_and_stable():
    a, b = noise(5, 100, (1, 8, 8)), noise(5, 100, (1, 8, 8))
    assert torch.equal(a, b)
    assert not torch.equal(a, noise(5, 200, (1, 8, 8)))
    assert not torch.equal(a, noise(6, 100, (1, 8, 8)))
    assert not torch.equal(a, noise(5, 100, (1, 8, 8), draw=1))
    fn = common_noise_fn(5, (1, 8, 8))
    assert torch.equal(fn(100, 0), a) and torch.equal(fn(100, 3), a)  # same for every row
    s = sample_noise(5, 7, 100, (1, 8, 8))
    assert torch.equal(s, sample_noise(5, 7, 100, (1, 8, 8)))
    assert not torch.equal(s, sample_noise(5, 8, 100, (1, 8, 8)))
    assert not torch.equal(s, a)
    assert torch.equal(sample_noise_fn(5, [8, 7], (1, 8, 8))(100, 1), s)
    # the seed derivation is pinned: changing it silently would change every stored feature
    assert stable_seed("noise", 1, 2, 0) == 8916680209245040278
    assert stable_seed("timesteps", 0, 5) == 1515860381826500944


# --------------------------------------------------------------------------- 4. projectors
@pytest.fixture(scope="module")
def unit_rows():
    g = torch.Generator().manual_seed(1)
    p = 5000
    X = torch.randn(33, p, generator=g) * torch.exp(torch.randn(p, generator=g))  # uneven coordinate scales
    return X / X.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("name", RANDOM_PROJECTORS)
def test_projection_preserves_inner_products(unit_rows, name):
    n, p = unit_rows.shape
    k = 512
    Y = make_projector(name, p, k, seed=3).project(unit_rows)
    assert Y.shape == (n, k) and Y.dtype == torch.float32
    exact = unit_rows.double() @ unit_rows.double().T
    approx = Y.double() @ Y.double().T
    iu = torch.triu_indices(n, n, 1)
    err = (approx - exact)[iu[0], iu[1]].abs()
    # unit vectors: the error of <Px,Py> has std ~ sqrt(1/k) ~ 0.044 here
    assert float(err.mean()) < 4 / math.sqrt(k)
    assert float(err.max()) < 8 / math.sqrt(k)
    norm_err = (Y.norm(dim=1) - 1).abs()
    assert float(norm_err.mean()) < 0.05 and float(norm_err.max()) < 0.15


@pytest.mark.parametrize("name", RANDOM_PROJECTORS)
def test_projection_of_a_row_is_independent_of_batch_and_threads(unit_rows, name):
    p = unit_rows.shape[1]
    proj = make_projector(name, p, 256, seed=11)
    full = proj.project(unit_rows)
    alone = torch.cat([proj.project(unit_rows[i : i + 1]) for i in range(unit_rows.shape[0])])
    assert torch.equal(alone, full)
    assert torch.equal(proj.project(unit_rows[5 : 5 + TILE_ROWS + 3]), full[5 : 5 + TILE_ROWS + 3])
    # the float64 accumulators themselves agree, not just their float32 roundings
    assert torch.equal(proj._project64(unit_rows[7:8]), proj._project64(unit_rows)[7:8])
    # a fresh projector object (another process) gives the same projection
    assert torch.equal(make_projector(name, p, 256, seed=11).project(unit_rows[:4]), full[:4])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = proj.project(unit_rows)
    finally:
        torch.set_num_threads(before)
    assert torch.get_num_threads() == before
    assert torch.equal(two, full)
    assert not torch.equal(make_projector(name, p, 256, seed=12).project(unit_rows[:4]), full[:4])


@pytest.mark.parametrize("name", RANDOM_PROJECTORS + ["identity"])
def test_projecting_column_blocks_equals_projecting_the_matrix(name):
    """Blocks (a gradient per parameter) cut the columns anywhere, also across countsketch hash blocks and scatter
    chunks: the projection is bit-identical to that of the joined matrix."""
    p = HASH_BLOCK + 5000
    G = torch.randn(3, p, generator=torch.Generator().manual_seed(4))
    proj = make_projector(name, p, p if name == "identity" else 64, seed=5)
    cuts = [0, 1, 7, CHUNK_ELEMENTS // 3 - 2, CHUNK_ELEMENTS // 3 + 3, HASH_BLOCK - 2, HASH_BLOCK + 1, p]
    blocks = [G[:, a:b].clone() for a, b in zip(cuts, cuts[1:])]
    assert torch.equal(proj.project(blocks), proj.project(G))
    if name == "countsketch":  # the same without any cache; and both are the sketch (an independent sum)
        assert torch.equal(CountSketchProjector(p, 64, seed=5, max_cache_bytes=0).project(blocks), proj.project(G))
        h, sign = proj.buckets_and_signs()
        sketch = torch.zeros(3, 64, dtype=torch.float64).index_add_(1, h, G.double() * sign)
        torch.testing.assert_close(proj.project(blocks).double(), sketch, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=f"expects \\(B, {p}\\) input"):
        proj.project(blocks[1:])


@pytest.mark.parametrize("name", ["countsketch", "countsketch_gaussian"])
@pytest.mark.parametrize("slice_rows", [None, 2], ids=["one-slice", "2-row-slices"])
def test_projection_threads_give_the_same_bits(name, slice_rows, monkeypatch):
    """Rows cut into slices (all 5 rows in one, or 2 rows each: an output slice of 2 rows' bytes) and threads (5
    rows on 2 or 3 threads, 2 rows on 3 threads), from blocks or the matrix, with and without the cached chunk
    plan: bit for bit the single-thread projection of the whole batch."""
    p = HASH_BLOCK + 5000
    G = torch.randn(5, p, generator=torch.Generator().manual_seed(6))
    ref = make_projector(name, p, 64, seed=7).project(G)
    if slice_rows:
        sketch_width = 64 if name == "countsketch" else 256
        monkeypatch.setattr(projectors, "OUT_SLICE_BYTES", 8 * sketch_width * slice_rows)
    cuts = [0, 3, CHUNK_ELEMENTS // 5 + 1, HASH_BLOCK + 7, p]
    blocks = [G[:, a:b].clone() for a, b in zip(cuts, cuts[1:])]
    one = make_projector(name, p, 64, seed=7)
    assert torch.equal(one.project(blocks), ref)
    for threads in (2, 3):
        for cache in (DEFAULT_MAX_CACHE_BYTES, 0):
            proj = make_projector(name, p, 64, seed=7, threads=threads, max_cache_bytes=cache)
            assert proj.spec() == one.spec()
            assert torch.equal(proj.project(blocks), ref) and torch.equal(proj.project(G), ref)
            assert torch.equal(proj.project([b[:2] for b in blocks]), ref[:2])
    with pytest.raises(ValueError, match="threads must be >= 1"):
        make_projector(name, p, 64, threads=0)


def test_projectors_equal_their_explicit_matrices(unit_rows):
    X = unit_rows[:6]
    p, k = X.shape[1], 512
    gp = GaussianProjector(p, k, seed=2)
    assert gp.num_blocks > 1 and p % gp.block_size != 0  # a ragged last block is exercised
    P = torch.cat([gp.block(j) for j in range(gp.num_blocks)], 1)  # (k, p), test-only materialisation
    assert P.shape == (k, p)
    assert abs(float((P**2).mean()) * k - 1) < 0.02  # entries ~ N(0, 1/k)
    torch.testing.assert_close(gp.project(X).double(), X.double() @ P.T, rtol=1e-6, atol=1e-7)
    cs = CountSketchProjector(p, k, seed=2)
    h, s = cs.buckets_and_signs()
    assert int(h.min()) >= 0 and int(h.max()) < k and set(s.unique().tolist()) == {-1.0, 1.0}
    S = torch.zeros(k, p, dtype=torch.float64)
    S[h, torch.arange(p)] = s
    torch.testing.assert_close(cs.project(X).double(), X.double() @ S.T, rtol=1e-6, atol=1e-7)


def test_identity_projector_and_errors(unit_rows):
    p = unit_rows.shape[1]
    ident = make_projector("identity", p, p, seed=0)
    out = ident.project(unit_rows)
    assert torch.equal(out, unit_rows) and out.data_ptr() != unit_rows.data_ptr()
    with pytest.raises(ValueError, match="k == p"):
        make_projector("identity", p, 10)
    with pytest.raises(ValueError, match="known: gaussian, rademacher, countsketch"):
        make_projector("sjlt", p, 10)
    with pytest.raises(ValueError, match="expects"):
        make_projector("countsketch", p, 10).project(unit_rows[:, :-1])
    spec = make_projector("countsketch_gaussian", p, 64, seed=4).spec()
    assert spec["name"] == "countsketch_gaussian" and spec["m"] == 256 and spec["seed"] == 4


# --------------------------------------------------------------------------- 5. sharding
@pytest.mark.parametrize(
    "strategy,noise_kind,projector", [("uniform", "common", "gaussian"), ("random", "sample", "countsketch")]
)
def test_sharded_features_equal_full_run(unet, schedule, strategy, noise_kind, projector):
    """Rows [4, 8) computed as their own shard equal the same rows of a 10-row run in batches of 4 (bit for bit)."""
    g = torch.Generator().manual_seed(5)
    X = torch.randn(10, 1, 8, 8, generator=g)
    ids = torch.arange(100, 110)
    engine = GradientEngine(unet, schedule, "square")
    proj = make_projector(projector, engine.num_params, 128, seed=1)

    def features(rows: slice) -> torch.Tensor:
        sid = ids[rows]
        t_sets = timesteps(strategy, 3, T, sid, seed=2)
        eps = common_noise_fn(8, (1, 8, 8)) if noise_kind == "common" else sample_noise_fn(8, sid, (1, 8, 8))
        return proj.project(engine.averaged_grads(X[rows], t_sets, eps))

    full = torch.cat([features(slice(s, min(s + 4, 10))) for s in range(0, 10, 4)])
    assert full.shape == (10, 128)
    shard = features(slice(4, 8))
    assert torch.equal(shard, full[4:8])
    assert not torch.equal(full[4], full[5])
