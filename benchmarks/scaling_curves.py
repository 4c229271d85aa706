"""Scaling curves of DiffAttr's per-sample feature computation (CPU): time and peak memory vs n, k, K and model size.

Run from the repository root::

    .venv/bin/python benchmarks/scaling_curves.py            # full run, estimated 3-5 min on a quiet 2-vCPU machine
    .venv/bin/python benchmarks/scaling_curves.py --quick    # smoke test, ~20 s on a busy 2-vCPU machine

The measured total runtime of a run is written into its results header.

Results go to ``benchmarks/results/scaling_curves.{md,json,png}`` (``--out DIR`` writes them elsewhere).

Every point uses the D-TRAK recipe (output "square", K uniform timesteps, common noise), the countsketch projector
and one torch thread, and runs in a fresh process forked from a forkserver that has only imported the libraries
(the convention of ``feature_throughput.py``, whose memory helpers this script reuses), so peak RSS is clean:

1. vs the number of training samples n: n rows featurized end to end through the real feature store, called as
   ``assets/features.py`` calls it (``FeatureStore.create_or_open`` + ``compute_missing_shards`` with
   ``Featurizer.rows`` in batches of 32, 256-row shards, k=2048, K=10) into a temporary directory. Time should be
   linear in n and peak memory (nearly) independent of n: only one shard of features is ever held in memory.
2. vs the projection dimension k: one batch of 32 rows, K=10.
3. vs the number of timesteps K: one batch of 32 rows, k=2048.
4. vs model size (small, medium and the ~1M-parameter model of ``feature_throughput.py``): one batch of 16 rows,
   K=10, k=2048, next to the physical limit (one batched forward+backward over the same batch x K inputs).

Each point: warm-up once, then ``--reps`` timed repetitions (median reported); peak RSS = ``ru_maxrss`` of the child
process, absolute and as the delta over the RSS right after the model and data were set up.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import feature_throughput as ft  # noqa: E402  (memory helpers, run_fresh and the 1M model's definition)

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
NAME = "scaling_curves"
SEED = ft.SEED
THREADS = 1
PROJECTOR = "countsketch"
DIGITS = "first rows of scikit-learn's 8x8 digits (attribution.data.load_dataset('digits'))"
MODELS = {
    "small": dict(spec=dict(block_out_channels=[16, 32], norm_num_groups=4), size=8, channels=1, data=DIGITS),
    "medium": dict(spec=dict(block_out_channels=[32, 64], norm_num_groups=8), size=8, channels=1, data=DIGITS),
    "1M": dict(ft.MODELS["1M"]),
}
# What the forkserver imports once, so each fresh configuration process starts in milliseconds.
PRELOAD = ["numpy", "torch", "diffusers.models.unets.unet_2d", "diffusers.schedulers.scheduling_ddpm",
           "sklearn.datasets", "zarr", "fsspec", "attribution.methods", "attribution.gradients",
           "attribution.projectors", "attribution.models", "attribution.data", "storage.features"]


@dataclass(frozen=True)
class Settings:
    """What the curves vary and hold fixed; ``--quick`` shrinks every axis and uses one repetition."""

    quick: bool
    reps: int
    n_values: tuple
    k_values: tuple
    K_values: tuple
    models: tuple
    batch: int = 32           # rows per Featurizer.rows call (curves 1-3)
    size_batch: int = 16      # rows per batch for the model-size curve
    shard_rows: int = 256
    k: int = 2048             # fixed k where k is not varied
    K: int = 10               # fixed K where K is not varied
    model: str = "small"      # model of curves 1-3

    @classmethod
    def from_args(cls, args) -> "Settings":
        if args.quick:
            return cls(True, 1, (32, 64), (512, 2048), (1, 5), ("small", "medium"))
        return cls(False, args.reps, (64, 256, 1024), (512, 2048, 8192, 32768), (1, 5, 10, 20),
                   ("small", "medium", "1M"))


# ---------------------------------------------------------------------------------------------- child-side helpers
def _measure(warm_up, run, reps: int) -> dict:
    """Warm-up, then ``reps`` timed calls of ``run``. rss_setup = RSS after model/data setup (the kernel's
    high-water mark is reset there); rss_peak = the process's absolute peak (setup included); rss_delta = peak
    during warm-up and timed calls minus rss_setup."""
    setup_peak = ft._peak_mib()
    base = ft._reset_peak()
    reset_ok = base is not None
    if base is None:
        base = ft._rss_mib()
    warm_up()
    times = ft._timed(run, reps)
    run_peak = ft._peak_mib()
    return dict(times=times, rss_setup_mib=base, rss_peak_mib=max(setup_peak, run_peak),
                rss_delta_mib=run_peak - base, peak_reset=reset_ok, loadavg_end=list(os.getloadavg()))


def _model(name: str):
    """(unet, NoiseSchedule) for a MODELS entry, weights seeded; the process gets the pipeline steps' set-up."""
    from attribution.experiment import ModelSpec
    from attribution.models import build_scheduler, build_unet
    from attribution.outputs import NoiseSchedule
    from attribution.runtime import configure_torch

    configure_torch(THREADS)

    m = MODELS[name]
    spec = ModelSpec(**m["spec"])
    return build_unet(spec, m["size"], m["channels"], seed=SEED), NoiseSchedule.from_scheduler(build_scheduler(spec))


def _images(name: str, n: int):
    """(n, C, H, W) float32 in [-1, 1]: real digits for the 8x8 models, seeded noise for the 1M model."""
    import numpy as np

    m = MODELS[name]
    if m["data"] == DIGITS:
        from attribution.data import load_dataset

        images = load_dataset("digits").images
        if n > len(images):
            raise ValueError(f"digits has {len(images)} images, asked for {n}")
        return np.ascontiguousarray(images[:n], dtype=np.float32)
    return np.random.default_rng(SEED).uniform(-1, 1, (n, m["channels"], m["size"], m["size"])).astype(np.float32)


def _featurizer(unet, schedule, K: int, k: int):
    """The D-TRAK train-side Featurizer with K uniform timesteps and a countsketch projection to k."""
    from attribution.experiment import MethodSpec
    from attribution.methods import Featurizer, feature_recipes

    recipe = feature_recipes("dtrak", MethodSpec(kind="trak", output="square", K=K), n_checkpoints=1)[0]
    return Featurizer(unet, schedule, recipe, projector=PROJECTOR, proj_dim=k, proj_seed=SEED, noise_seed=SEED)


# ---------------------------------------------------------------------------------------------- child tasks
def task_store(model: str, n: int, k: int, K: int, batch: int, shard_rows: int, reps: int) -> dict:
    """n rows featurized into a fresh feature store per repetition, as assets/features.py does it. Timed:
    FeatureStore.create_or_open + compute_missing_shards. Warm-up: the same on the first min(n, batch) rows."""
    import hashlib
    import shutil
    import tempfile

    import numpy as np

    from attribution.methods import feature_spec
    from attribution.runtime import state_dict_digest
    from storage.features import FeatureStore, compute_missing_shards

    unet, schedule = _model(model)
    x_all = _images(model, n)
    ids_all = np.arange(n)
    feat = _featurizer(unet, schedule, K, k)
    model_digest = state_dict_digest(unet.state_dict())

    def spec_for(rows: int) -> dict:
        data_hash = hashlib.sha256(np.ascontiguousarray(x_all[:rows]).tobytes()).hexdigest()[:16]
        return feature_spec(feat.recipe, model_digest=model_digest, num_params=feat.engine.num_params,
                            projector=feat.projector.spec(), noise_seed=SEED, data_hash=data_hash, n_rows=rows)

    specs = {rows: spec_for(rows) for rows in {n, min(n, batch)}}
    tmp = tempfile.mkdtemp(prefix="diffattr-scaling-")
    stores = []

    def featurize(rows: int) -> None:
        x, ids = x_all[:rows], ids_all[:rows]
        store = FeatureStore.create_or_open(os.path.join(tmp, f"store{len(stores)}"), specs[rows], rows, feat.dim,
                                            shard_rows)
        stores.append(store)

        def compute(shard, sl):
            out = []
            for b in range(sl.start, sl.stop, batch):
                e = min(b + batch, sl.stop)
                out.append(feat.rows(x[b:e], ids[b:e]))
            return np.concatenate(out)

        done = compute_missing_shards(store, compute)
        if len(done) != store.n_shards:
            raise RuntimeError(f"computed {len(done)} of {store.n_shards} shards in a fresh store")

    try:
        out = _measure(lambda: featurize(min(n, batch)), lambda: featurize(n), reps)
        last = stores[-1]  # checked after the peak was read, so reading it back does not count
        values = last.read()
        if values.shape != (n, k) or not np.isfinite(values).all() or not last.is_complete():
            raise RuntimeError(f"store check failed: shape {values.shape}, complete {last.is_complete()}")
        n_shards = last.n_shards
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dict(out, params=feat.engine.num_params, n_shards=n_shards)


def task_rows(model: str, batch: int, k: int, K: int, reps: int) -> dict:
    """Featurizer.rows on one batch; warm-up = one identical call (fills the countsketch hash cache)."""
    unet, schedule = _model(model)
    x = _images(model, batch)
    ids = list(range(batch))
    feat = _featurizer(unet, schedule, K, k)
    out = _measure(lambda: feat.rows(x, ids), lambda: feat.rows(x, ids), reps)
    return dict(out, params=feat.engine.num_params, timestep_chunk=feat.engine.timestep_chunk)


def task_limit(model: str, batch: int, K: int, reps: int) -> dict:
    """One batched forward+backward over the same batch x K (sample, timestep, noise) inputs, mean "square" loss
    (feature_throughput.limit_step, for any MODELS entry and any K)."""
    import torch

    unet, schedule = _model(model)
    step = ft.limit_step(unet, schedule, torch.from_numpy(_images(model, batch)), K)
    return dict(_measure(step, step, reps), params=sum(p.numel() for p in unet.parameters()))


# ---------------------------------------------------------------------------------------------- orchestration
def plan(s: Settings) -> list[tuple]:
    """(curve, task, kwargs) for every point, cheapest curves first so that failures show early."""
    jobs = []
    for k in s.k_values:
        jobs.append(("k", task_rows, dict(model=s.model, batch=s.batch, k=k, K=s.K, reps=s.reps)))
    for K in s.K_values:
        jobs.append(("K", task_rows, dict(model=s.model, batch=s.batch, k=s.k, K=K, reps=s.reps)))
    for n in s.n_values:
        jobs.append(("n", task_store, dict(model=s.model, n=n, k=s.k, K=s.K, batch=s.batch,
                                           shard_rows=s.shard_rows, reps=s.reps)))
    for m in s.models:
        jobs.append(("size", task_rows, dict(model=m, batch=s.size_batch, k=s.k, K=s.K, reps=s.reps)))
        jobs.append(("limit", task_limit, dict(model=m, batch=s.size_batch, K=s.K, reps=s.reps)))
    return jobs


def environment(s: Settings, argv: list[str]) -> dict:
    from importlib.metadata import version  # not importing diffusers here: that alone takes ~8 s

    return dict(ft.run_header(f"{NAME}.py", argv), torch=version("torch"), diffusers=version("diffusers"),
                zarr=version("zarr"), numpy=version("numpy"), threads=THREADS, niceness=os.nice(0),
                settings=asdict(s))


# ---------------------------------------------------------------------------------------------- analysis
def _ok(r: dict) -> bool:
    return not r.get("error")


def _med(r: dict) -> float:
    return statistics.median(r["times"])


def _fmt(v, digits: int = 2) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:,.{digits}f}"


def _loglog_slope(xs, ys) -> float | None:
    """Least-squares slope of log y vs log x (1 = linear, 0 = flat); None with fewer than two points."""
    if len(xs) < 2:
        return None
    lx, ly = [math.log(v) for v in xs], [math.log(v) for v in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    den = sum((a - mx) ** 2 for a in lx)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / den if den else None


def _linfit(xs, ys) -> tuple[float, float] | None:
    """(intercept, slope) of the least-squares line; None with fewer than two points."""
    if len(xs) < 2:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((a - mx) ** 2 for a in xs)
    if not den:
        return None
    b = sum((a - mx) * (c - my) for a, c in zip(xs, ys)) / den
    return my - b * mx, b


def _spread(vals) -> str:
    lo, hi = min(vals), max(vals)
    return f"{lo:,.0f} MiB" if round(lo) == round(hi) else f"{lo:,.0f}-{hi:,.0f} MiB"


def _memory_verdict(xname: str, xs, peaks) -> str:
    """How the absolute peak RSS moves between the smallest and largest x, in words chosen from the numbers."""
    lo, hi = peaks[xs.index(min(xs))], peaks[xs.index(max(xs))]
    change = (hi - lo) / lo
    if abs(change) < 0.05:
        how = "flat"
    elif abs(change) < 0.15:
        how = "nearly flat"
    else:
        how = "clearly " + ("growing" if change > 0 else "falling")
    return (f"peak RSS goes from {lo:,.0f} MiB at {xname}={min(xs):,} to {hi:,.0f} MiB at {xname}={max(xs):,} "
            f"({change:+.1%}): {how}")


def curve(records: list[dict], name: str, key: str) -> list[dict]:
    """The successful points of one curve, sorted by the varied quantity."""
    return sorted((r for r in records if r["curve"] == name and _ok(r)), key=lambda r: r[key])


def failures(records: list[dict], name: str, key: str) -> list[str]:
    return [f"| {r[key]} | failed: {r['error']} |" for r in records if r["curve"] == name and not _ok(r)]


def n_section(s: Settings, records: list[dict]) -> list[str]:
    pts = curve(records, "n", "n")
    out = [f"n rows of the `{s.model}` model featurized end to end (FeatureStore.create_or_open + "
           f"compute_missing_shards, Featurizer.rows in batches of {s.batch}, {s.shard_rows}-row shards, k={s.k}, "
           f"K={s.K}) into a fresh store in a temporary directory per repetition.", "",
           "| n | shards | median s | rows/s | sample-timesteps/s | peak RSS (MiB) | peak RSS delta over setup (MiB) "
           "| RSS after setup (MiB) | reps |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in pts:
        t = _med(r)
        out.append(f"| {r['n']:,} | {r['n_shards']} | {_fmt(t, 2)} | {_fmt(r['n'] / t, 1)} | "
                   f"{_fmt(r['n'] * r['K'] / t, 1)} | {_fmt(r['rss_peak_mib'], 0)} | {_fmt(r['rss_delta_mib'], 0)} | "
                   f"{_fmt(r['rss_setup_mib'], 0)} | {len(r['times'])} |")
    out += failures(records, "n", "n")
    if len(pts) >= 2:
        ns, ts = [r["n"] for r in pts], [_med(r) for r in pts]
        slope, fit = _loglog_slope(ns, ts), _linfit(ns, ts)
        rates = [n / t for n, t in zip(ns, ts)]
        feat_mib = max(ns) * s.k * 4 / 2**20
        shape = "close to linear" if abs(slope - 1) < 0.15 else ("sub-linear" if slope < 1 else "super-linear")
        out += ["", "Reading: " + (
            f"time goes from {ts[0]:.2f} s at n={ns[0]:,} to {ts[-1]:.2f} s at n={ns[-1]:,} "
            f"({ts[-1] / ts[0]:.1f}x for {ns[-1] / ns[0]:.0f}x the rows; log-log slope {slope:.2f}: {shape}, "
            f"1 being exactly linear); a straight-line fit gives {fit[1] * 1e3:.1f} ms per row plus {fit[0]:+.2f} s fixed "
            f"cost, and throughput ranges over {min(rates):,.1f}-{max(rates):,.1f} rows/s. Memory: "
            f"{_memory_verdict('n', ns, [r['rss_peak_mib'] for r in pts])}; the delta over the post-setup RSS is "
            f"{_spread([r['rss_delta_mib'] for r in pts])}. For scale, the whole feature matrix at n={max(ns):,} is "
            f"{feat_mib:.1f} MiB (one {s.shard_rows}-row shard, all that is held in memory at once: "
            f"{min(max(ns), s.shard_rows) * s.k * 4 / 2**20:.1f} MiB).")]
    return out


def rows_section(s: Settings, records: list[dict], name: str) -> list[str]:
    key = name  # "k" or "K"
    pts = curve(records, name, key)
    fixed = f"K={s.K}" if name == "k" else f"k={s.k}"
    out = [f"One batch of {s.batch} rows of the `{s.model}` model through Featurizer.rows ({fixed}, {PROJECTOR}).",
           "",
           f"| {key} | median s/batch | sample-timesteps/s | peak RSS (MiB) | peak RSS delta over setup (MiB) "
           "| RSS after setup (MiB) | reps |",
           "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in pts:
        t = _med(r)
        out.append(f"| {r[key]:,} | {_fmt(t, 3)} | {_fmt(r['batch'] * r['K'] / t, 1)} | {_fmt(r['rss_peak_mib'], 0)} "
                   f"| {_fmt(r['rss_delta_mib'], 0)} | {_fmt(r['rss_setup_mib'], 0)} | {len(r['times'])} |")
    out += failures(records, name, key)
    if len(pts) < 2:
        return out
    xs, ts = [r[key] for r in pts], [_med(r) for r in pts]
    deltas = [r["rss_delta_mib"] for r in pts]
    mem = _memory_verdict(key, xs, [r["rss_peak_mib"] for r in pts])
    if name == "k":
        buf = s.batch * max(xs) * 8 / 2**20
        ratio = ts[-1] / ts[0]
        how = ("within +-25%, i.e. k hardly matters next to the gradients" if abs(math.log(ratio)) < math.log(1.25)
               else "so k adds a visible cost")
        text = (f"time per batch goes from {ts[0]:.3f} s at k={xs[0]:,} to {ts[-1]:.3f} s at k={xs[-1]:,} "
                f"({ratio:.2f}x for {xs[-1] / xs[0]:.0f}x the width, log-log slope {_loglog_slope(xs, ts):.2f}; "
                f"fastest {min(ts):.3f} s, slowest {max(ts):.3f} s: {how}). Memory: {mem}; the delta over setup is "
                f"{_spread(deltas)}, against a float64 B x k projection output of {buf:.1f} MiB at k={max(xs):,}.")
    else:
        a, b = _linfit(xs, ts)
        per = [t / x for x, t in zip(xs, ts)]
        chunk = pts[0].get("timestep_chunk")
        text = (f"time per batch goes from {ts[0]:.3f} s at K={xs[0]} to {ts[-1]:.3f} s at K={xs[-1]} "
                f"(log-log slope {_loglog_slope(xs, ts):.2f}); a straight-line fit gives {b:.3f} s per timestep "
                f"plus {a:+.3f} s per batch, i.e. {per[0] * 1e3:.0f} ms per timestep (whole batch) at K={xs[0]} and "
                f"{per[-1] * 1e3:.0f} ms at K={xs[-1]}. Memory: {mem}; the delta over setup is "
                f"{', '.join(f'{d:,.0f}' for d in deltas)} MiB at K={', '.join(map(str, xs))}"
                + (f" (GradientEngine runs each sample's timesteps in chunks of timestep_chunk={chunk}, so activation "
                   f"memory should stop growing beyond K={chunk})." if chunk else "."))
    return out + ["", "Reading: " + text]


def size_section(s: Settings, records: list[dict]) -> list[str]:
    feats = {r["model"]: r for r in records if r["curve"] == "size"}
    limits = {r["model"]: r for r in records if r["curve"] == "limit"}
    out = [f"One batch of {s.size_batch} rows, K={s.K}, k={s.k}, {PROJECTOR}. 'limit' = one batched "
           f"forward+backward of the same model over the same {s.size_batch} x {s.K} inputs (mean \"square\" loss, "
           "loss.backward()); features / limit = feature throughput / limit throughput.", "",
           "| model | params | image | features s/batch | sample-timesteps/s | peak RSS (MiB) | peak RSS delta (MiB) "
           "| limit s/batch | limit sample-timesteps/s | limit peak RSS (MiB) | limit peak RSS delta (MiB) "
           "| features / limit | reps |",
           "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    rows = []
    for m in s.models:
        f, lim = feats.get(m), limits.get(m)
        spec = MODELS[m]
        img = f"{spec['channels']}x{spec['size']}x{spec['size']}"
        if f is None or not _ok(f):
            out.append(f"| {m} | | {img} | failed: {f.get('error') if f else 'not run'} | | | | | | | | | |")
            continue
        tf = _med(f)
        rate = s.size_batch * s.K / tf
        row = dict(model=m, params=f["params"], t=tf, rate=rate, pixels=spec["channels"] * spec["size"] ** 2)
        if lim is not None and _ok(lim):
            tl = _med(lim)
            row["ratio"] = tl / tf
            lim_cells = (f"{_fmt(tl, 3)} | {_fmt(s.size_batch * s.K / tl, 1)} | {_fmt(lim['rss_peak_mib'], 0)} | "
                         f"{_fmt(lim['rss_delta_mib'], 0)} | {row['ratio']:.3f}")
        else:
            lim_cells = f"failed: {lim.get('error') if lim else 'not run'} | | | | n/a"
        rows.append(row)
        out.append(f"| {m} | {f['params']:,} | {img} | {_fmt(tf, 3)} | {_fmt(rate, 1)} | {_fmt(f['rss_peak_mib'], 0)} "
                   f"| {_fmt(f['rss_delta_mib'], 0)} | {lim_cells} | {len(f['times'])} |")
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        ratios = ", ".join(f"{r['model']} {r['ratio']:.2f}" for r in rows if "ratio" in r)
        deltas = {r["model"]: feats[r["model"]]["rss_delta_mib"] for r in rows}
        out += ["", "Reading: " + (
            f"from `{a['model']}` to `{b['model']}` the parameter count grows {b['params'] / a['params']:.1f}x "
            f"and the pixels per image {b['pixels'] / a['pixels']:.0f}x, while the time per batch grows "
            f"{b['t'] / a['t']:.1f}x ({a['rate']:,.1f} -> {b['rate']:,.1f} sample-timesteps/s; time per parameter "
            f"x{(b['t'] / b['params']) / (a['t'] / a['params']):.2f}). Per-sample features run at "
            f"{ratios or 'n/a'} of the batched forward+backward limit. Peak RSS delta over setup (features): "
            + ", ".join(f"{m} {d:,.0f} MiB" for m, d in deltas.items()) + ".")]
    return out


# ---------------------------------------------------------------------------------------------- plot
def plot(s: Settings, records: list[dict], path: Path) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    from attribution.images import _pyplot

    plt = _pyplot()
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5), dpi=100)
    # (curve, x key, title, x label, log x, log y): log-log where time should be a power law of x (n, model size)
    panels = [("n", "n", f"vs training rows n (feature store, {s.model}, k={s.k}, K={s.K})", "n (rows)", True, True),
              ("k", "k", f"vs projection dim k ({s.model}, batch {s.batch}, K={s.K})", "k", True, False),
              ("K", "K", f"vs timesteps K ({s.model}, batch {s.batch}, k={s.k})", "K", False, False),
              ("size", "params", f"vs model size (batch {s.size_batch}, K={s.K}, k={s.k})", "parameters", True, True)]
    for ax, (name, key, title, xlabel, logx, logy) in zip(axes.flat, panels):
        pts = curve(records, name, key)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("median wall time (s)")
        if not pts:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center")
            continue
        xs = [r[key] for r in pts]
        times = [_med(r) for r in pts]
        handles = ax.plot(xs, times, "o-", color="C0", label="time (end to end)" if name == "n" else "time per batch")
        if name == "size":
            lim = {r["model"]: r for r in records if r["curve"] == "limit" and _ok(r)}
            with_lim = [r for r in pts if r["model"] in lim]
            lim_times = [_med(lim[r["model"]]) for r in with_lim]
            handles += ax.plot([r["params"] for r in with_lim], lim_times, "o--", color="C3",
                               label="fwd+bwd limit (batched)")
            times += lim_times
        if logx:
            ax.set_xscale("log")
        if logy:
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5)))
            ax.set_ylim(min(times) / 1.5, max(times) * 3)  # headroom for the legend
        else:
            ax.set_ylim(0, max(times) * 1.6)
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(plain)
            axis.set_minor_formatter(NullFormatter())
        ax.set_xticks(xs)
        if name == "size":
            ax.set_xticklabels([f"{r['model']}\n{r['params'] / 1e3:,.0f}k" for r in pts])
        ax.grid(True, which="major", alpha=0.3)
        ax2 = ax.twinx()
        handles += ax2.plot(xs, [r["rss_peak_mib"] for r in pts], "s-", color="C1", label="peak RSS (absolute)")
        handles += ax2.plot(xs, [r["rss_delta_mib"] for r in pts], "^:", color="C2", label="peak RSS delta over setup")
        ax2.set_ylabel("peak RSS (MiB)")
        ax2.set_ylim(0, 1.6 * max(r["rss_peak_mib"] for r in pts))
        ax2.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="upper left", ncol=2, framealpha=0.9)
    fig.suptitle("DiffAttr feature computation scaling (D-TRAK, countsketch, 1 thread, CPU)"
                 + (" -- --quick smoke run" if s.quick else ""), fontsize=11)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- report
def render(s: Settings, env: dict, records: list[dict], total_s: float) -> str:
    params = {r["model"]: r["params"] for r in records if _ok(r) and r.get("params")}
    models = "\n".join(f"- `{name}`: ModelSpec({', '.join(f'{k}={v}' for k, v in MODELS[name]['spec'].items())}), "
                       f"{MODELS[name]['channels']}x{MODELS[name]['size']}x{MODELS[name]['size']} images, "
                       f"{params.get(name, 0):,} parameters; data: {MODELS[name]['data']}" for name in s.models)
    lines = [
        "# DiffAttr feature scaling curves" + (" (--quick smoke run: not representative)" if s.quick else ""),
        "",
        f"- command: `{env['command']}` (process niceness {env['niceness']})",
        f"- date: {env['date']}; total runtime {total_s:.0f} s",
        f"- torch {env['torch']}, diffusers {env['diffusers']}, zarr {env['zarr']}, numpy {env['numpy']}, "
        f"Python {env['python']}",
        f"- process set-up: `attribution.runtime.configure_torch({env['threads']})` in every process, as in "
        "pipeline steps (Featurizer.rows forces one thread anyway)",
        f"- machine: {env['cpu']}, {env['cpu_count']} logical CPUs; load average at start {env['loadavg_at_start']}, "
        f"at end {env['loadavg_at_end']} (a load well above 0 means other work ran concurrently and times carry "
        "contention noise)",
        "",
        "## Setup",
        "",
        models,
        f"- recipe: D-TRAK train side (output \"square\", K uniform timesteps 0, T/K, 2T/K, ..., common noise), "
        f"{PROJECTOR} projector, projector/noise seed {SEED}; untrained (seeded initial) weights",
        f"- timing: every point warms up once (curves k, K and model size: one identical call; curve n: the same "
        f"end-to-end featurization of the first min(n, {s.batch}) rows into a separate store), then {s.reps} timed "
        "repetition(s); the median is reported; sample-timesteps/s = rows x K / median",
        "- memory: resource.getrusage(RUSAGE_SELF).ru_maxrss of the child process; each point runs in a fresh process "
        "forked from a forkserver that had only imported the libraries. 'peak RSS' = the absolute peak of that "
        "process (imported libraries, model and data included); 'delta' = peak during warm-up and timed repetitions "
        "minus the RSS right after model/data setup (the kernel high-water mark is reset there through "
        "/proc/self/clear_refs" + ("" if all(r.get("peak_reset", True) for r in records) else
                                   "; that reset FAILED in some processes, so their delta may include setup peaks")
        + ")",
        "",
        f"## 1. Time and memory vs number of training rows n (`{s.model}`)",
        "",
        *n_section(s, records),
        "",
        f"## 2. vs projection dimension k (`{s.model}`, batch {s.batch}, K={s.K})",
        "",
        *rows_section(s, records, "k"),
        "",
        f"## 3. vs number of timesteps K (`{s.model}`, batch {s.batch}, k={s.k})",
        "",
        *rows_section(s, records, "K"),
        "",
        f"## 4. vs model size (batch {s.size_batch}, K={s.K}, k={s.k})",
        "",
        *size_section(s, records),
        "",
        f"Plot: `{NAME}.png` (time on the left axis, peak RSS on the right).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: n 32/64, k 512/2048, K 1/5, small+medium models, 1 repetition (< 3 min)")
    ap.add_argument("--reps", type=int, default=2, help="timed repetitions per point (full mode; --quick uses 1)")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR, help=f"results directory (default {RESULTS_DIR})")
    args = ap.parse_args(argv)
    if args.reps < 1:
        ap.error("--reps must be >= 1")
    s = Settings.from_args(args)
    env = environment(s, argv)
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    t0 = time.perf_counter()
    records = []
    for name, fn, kwargs in plan(s):
        records.append(dict(curve=name, **kwargs, **ft.run_fresh(ctx, fn, **kwargs)))
    total = time.perf_counter() - t0
    env["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    md = render(s, env, records, total)
    (out / f"{NAME}.md").write_text(md)
    (out / f"{NAME}.json").write_text(
        json.dumps(dict(environment=env, total_seconds=total, records=records), indent=1, default=str) + "\n")
    plot(s, records, out / f"{NAME}.png")
    print(md)
    print(f"total {total:.0f} s; wrote {out / NAME}.md, .json and .png")


if __name__ == "__main__":
    main()
