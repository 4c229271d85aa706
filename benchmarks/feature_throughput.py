"""Throughput, memory and fidelity of DiffAttr's per-sample feature computation (CPU).

Run from the repository root::

    .venv/bin/python benchmarks/feature_throughput.py            # full run, 11-12 min on a busy 2-vCPU machine
    .venv/bin/python benchmarks/feature_throughput.py --quick    # smoke test, under a minute

Results go to ``benchmarks/results/feature_throughput.{md,json}``.

What is measured (D-TRAK recipe: output "square", K=10 uniform timesteps, common noise, k=2048):

1. Feature throughput in sample-timesteps/s of ``Featurizer.rows`` for every projector, plus "gradients only"
   (``GradientEngine.averaged_grads`` without projection: the floor any projector adds to) for the default
   per-layer backend and for the ``torch.func`` vmap backend.
2. Peak RSS delta of each configuration, each in a fresh process (forked from a forkserver that has only imported
   the libraries, so that a configuration never inherits another one's heap or high-water mark).
3. The physical limit: one batched forward+backward over the same B*K (sample, timestep) inputs; features/limit
   says how much per-sample gradients plus projection cost over the cheapest possible pass over the same work.
4. Projection fidelity on real per-sample (D-TRAK) gradients: Pearson r of projected vs exact inner products over
   all pairs, and the mean relative error of the norms.
5. The TRAK reference library's CPU ``BasicProjector`` on the same gradients (time and fidelity), and
   "traker-style" featurization = our gradients + ``BasicProjector``.  traker is optional and not a project
   dependency: install for the comparison with ``pip install --no-deps traker`` (its declared dependencies would
   pull torchvision and possibly a CUDA torch; the projector itself only needs torch and numpy).

The dense projectors of the ~1M-parameter model cost about 70 s per batch of 32 (P is regenerated on every call:
p*k*4 bytes exceed the projector cache), which does not fit the 10-minute budget with warm-up and repetitions;
``--big-dense`` adds them.
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import math
import multiprocessing
import os
import platform
import resource
import shlex
import statistics
import sys
import time
import types
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
PROJECTORS = ("countsketch", "countsketch_gaussian", "gaussian", "rademacher")
DENSE = ("gaussian", "rademacher")
TRAK_TYPES = ("normal", "rademacher")
K_TIMESTEPS = 10
SEED = 0
WARMUP_ROWS = 2

MODELS = {
    "small": dict(spec=dict(block_out_channels=[16, 32], norm_num_groups=4), size=8, channels=1,
                  data="first rows of scikit-learn's 8x8 digits (the default experiment's data)"),
    "1M": dict(spec=dict(block_out_channels=[32, 64, 64], attention=True, norm_num_groups=8), size=32, channels=3,
               data="uniform[-1, 1] noise images (seed 0): timing does not depend on pixel values"),
}
# Libraries the forkserver imports once, so that each fresh configuration process starts in milliseconds
# (importing diffusers alone takes ~8 s here).
PRELOAD = ["numpy", "torch", "diffusers.models.unets.unet_2d", "diffusers.schedulers.scheduling_ddpm",
           "sklearn.datasets", "attribution.methods", "attribution.gradients", "attribution.projectors",
           "attribution.models", "attribution.data", "trak.projectors"]


@dataclass(frozen=True)
class Settings:
    """Everything that shapes a run; ``--quick`` shrinks batches, k and repetitions."""

    quick: bool
    reps: int
    k: int
    batches: dict
    fidelity_rows: int
    fidelity_ks: tuple
    compare_batch: int
    big_dense: bool
    threads: int
    rounds: dict = None  # interleaved rounds per model

    @classmethod
    def from_args(cls, args) -> "Settings":
        if args.quick:
            return cls(True, 1, 128, {"small": (4,), "1M": (2,)}, 16, (32, 128), 4, args.big_dense, args.threads,
                       {"small": 2, "1M": 1})
        return cls(False, args.reps, 2048, {"small": (32, 64), "1M": (32,)}, 64, (512, 2048), 32, args.big_dense,
                   args.threads, {"small": 12, "1M": 4})


# ---------------------------------------------------------------------------------------------- child-side helpers
def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _reset_peak() -> float | None:
    """Reset the kernel's RSS high-water mark (what ru_maxrss reports) to the current RSS and return that RSS;
    None where /proc/self/clear_refs cannot be written (then ru_maxrss still holds earlier peaks)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return _rss_mib()


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(warm_up, run, reps: int) -> dict:
    """Warm-up, then ``reps`` timed calls of ``run``, with two peak-RSS deltas: of the whole configuration (from
    before the warm-up: one-time caches and first-use code page-in included) and of the timed batches alone
    (above the RSS after the warm-up: the working memory of one batch)."""
    base = _reset_peak() or _rss_mib()
    warm_up()
    warm_peak = _peak_mib()
    batch_base = _reset_peak()
    times = _timed(run, reps)
    end_peak = _peak_mib()
    return dict(times=times, rss_baseline_mib=base, rss_config_delta_mib=max(warm_peak, end_peak) - base,
                rss_batch_delta_mib=None if batch_base is None else end_peak - batch_base)


def _init_torch(threads: int):
    """The pipeline steps' process set-up (threads, retained freed memory), so timings are what a step sees."""
    import torch

    from attribution.runtime import configure_torch

    configure_torch(threads)
    return torch


def _model(name: str):
    """(unet, NoiseSchedule, ModelSpec) for a MODELS entry, weights seeded."""
    from attribution.experiment import ModelSpec
    from attribution.models import build_scheduler, build_unet
    from attribution.outputs import NoiseSchedule

    m = MODELS[name]
    spec = ModelSpec(**m["spec"])
    unet = build_unet(spec, m["size"], m["channels"], seed=SEED)
    return unet, NoiseSchedule.from_scheduler(build_scheduler(spec)), spec


def _images(name: str, n: int):
    """(n, C, H, W) float32 in [-1, 1]: real digits for the small model, seeded noise for the 1M model."""
    import numpy as np

    if name == "small":
        from attribution.data import load_digits

        return np.ascontiguousarray(load_digits().images[:n])
    m = MODELS[name]
    return np.random.default_rng(SEED).uniform(-1, 1, (n, m["channels"], m["size"], m["size"])).astype(np.float32)


def _dtrak_recipe():
    from attribution.experiment import MethodSpec
    from attribution.methods import feature_recipes

    return feature_recipes("dtrak", MethodSpec(kind="trak", output="square", K=K_TIMESTEPS), n_checkpoints=1)[0]


def _dtrak_grads(engine, x, ids):
    """The (B, p) gradients exactly as Featurizer.rows computes them for the D-TRAK recipe, minus the projection."""
    import torch

    from attribution.runtime import single_thread
    from attribution.timesteps import common_noise_fn, timesteps

    xt = torch.from_numpy(x)
    t_sets = timesteps("uniform", K_TIMESTEPS, engine.schedule.num_train_timesteps, [int(i) for i in ids], seed=SEED)
    with single_thread():
        return engine.averaged_grads(xt, t_sets, common_noise_fn(SEED, tuple(xt.shape[1:])))


def _warm_up(engine, project_fns, x, ids) -> None:
    """One gradient call on the full batch (first calls at a new tensor shape ran ~25% slower) and one projection
    of WARMUP_ROWS rows per projector: that fills the countsketch hash and dense-stage caches, and the dense
    projectors multiply fixed 8-row tiles, so 2 rows already run the exact kernels of a full batch."""
    from attribution.runtime import single_thread

    G = _dtrak_grads(engine, x, ids)
    with single_thread():
        for fn in project_fns or ():
            fn(G[:WARMUP_ROWS])


def _timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def import_trak_projectors():
    """(trak.projectors module, note).  Falls back to loading the module without running trak/__init__.py (which
    imports the whole TRAKer stack) when that import fails; raises ImportError when traker is not installed."""
    try:
        import trak.projectors as tp

        return tp, ""
    except ImportError as e:
        first = f"{type(e).__name__}: {e}"
    for mod in [m for m in sys.modules if m == "trak" or m.startswith("trak.")]:
        del sys.modules[mod]
    spec = importlib.util.find_spec("trak")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"traker is not installed (pip install --no-deps traker); import said {first}")
    pkg = types.ModuleType("trak")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["trak"] = pkg
    import trak.projectors as tp

    return tp, f"trak/__init__.py skipped ({first})"


def _trak_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("traker")
    except PackageNotFoundError:
        return "not installed"


# ---------------------------------------------------------------------------------------------- child tasks
def task_features(model: str, batch: int, projector: str | None, k: int, reps: int, threads: int,
                  backend: str = "auto") -> dict:
    """Featurizer.rows (or, with projector=None, the gradients alone from the given GradientEngine backend) on one
    batch: warm-up, then timed reps."""
    _init_torch(threads)
    from attribution.gradients import GradientEngine
    from attribution.methods import Featurizer

    unet, schedule, _ = _model(model)
    x = _images(model, batch)
    ids = list(range(batch))
    if projector is None:
        engine = GradientEngine(unet, schedule, "square", backend=backend)
        out = measure(lambda: _warm_up(engine, None, x, ids), lambda: _dtrak_grads(engine, x, ids), reps)
    else:
        feat = Featurizer(unet, schedule, _dtrak_recipe(), projector=projector, proj_dim=k, proj_seed=SEED,
                          noise_seed=SEED)
        engine = feat.engine
        out = measure(lambda: _warm_up(engine, [feat.projector.project], x, ids), lambda: feat.rows(x, ids), reps)
    return dict(out, params=engine.num_params, backend=engine.backend)


def task_limit(model: str, batch: int, reps: int, threads: int) -> dict:
    """One batched forward+backward over the same B*K (sample, timestep, noise) inputs, mean "square" loss."""
    torch = _init_torch(threads)
    unet, schedule, _ = _model(model)
    step = limit_step(unet, schedule, torch.from_numpy(_images(model, batch)), K_TIMESTEPS)
    return measure(step, step, reps)


def limit_step(unet, schedule, x0, K: int):
    """The physical limit's work: one batched forward+backward of `unet` over every (image, uniform timestep,
    common noise) pair the D-TRAK features of x0 cover, with the mean "square" output as the loss."""
    import torch

    from attribution.outputs import get_output_function
    from attribution.timesteps import common_noise_fn, timesteps

    unet.eval()  # as GradientEngine does (no dropout in these models either way)
    t = timesteps("uniform", K, schedule.num_train_timesteps, range(len(x0))).reshape(-1)
    eps_fn = common_noise_fn(SEED, tuple(x0.shape[1:]))
    eps = torch.stack([eps_fn(int(ti), 0) for ti in t])
    x = x0.repeat_interleave(K, dim=0)
    square = get_output_function("square")

    def step():
        unet.zero_grad(set_to_none=True)
        pred = unet(schedule.add_noise(x, eps, t), t).sample
        square(pred, eps, t, schedule).mean().backward()

    return step


def _fidelity(G, Z) -> dict:
    """Pearson r of projected vs exact inner products (pairs i<j), mean relative norm error, mean |cosine error|."""
    import torch

    G, Z = G.double(), Z.double()
    iu = torch.triu_indices(G.shape[0], G.shape[0], 1)
    exact, approx = (G @ G.T)[iu[0], iu[1]], (Z @ Z.T)[iu[0], iu[1]]
    r = torch.corrcoef(torch.stack([exact, approx]))[0, 1]
    gn, zn = G.norm(dim=1), Z.norm(dim=1)
    cos_err = ((approx - exact) / (gn[iu[0]] * gn[iu[1]])).abs().mean()
    return dict(pearson_r=float(r), norm_rel_err=float(((zn - gn).abs() / gn).mean()), cos_abs_err=float(cos_err))


def _coherence(G) -> dict:
    """How aligned and how concentrated the gradients are: with one dominant shared direction, every pair's error
    comes from how a single P treats that direction, so one P draw decides the fidelity numbers."""
    import torch

    G = G.double()
    n = G.norm(dim=1)
    iu = torch.triu_indices(G.shape[0], G.shape[0], 1)
    cos = ((G @ G.T) / (n[:, None] * n[None]))[iu[0], iu[1]]
    sv = torch.linalg.svdvals(G) ** 2
    mass = (G**2).sum(0).sort(descending=True).values
    return dict(mean_pair_cosine=float(cos.mean()), top_direction_energy=float(sv[0] / sv.sum()),
                top100_coordinate_energy=float(mass[:100].sum() / mass.sum()))


def task_fidelity(rows: int, ks: tuple, threads: int) -> dict:
    """Every projector (ours and traker's) at every k on the same real per-sample gradients of the small model."""
    torch = _init_torch(threads)
    from attribution.gradients import GradientEngine
    from attribution.projectors import make_projector

    unet, schedule, _ = _model("small")
    engine = GradientEngine(unet, schedule, "square")
    G = _dtrak_grads(engine, _images("small", rows), list(range(rows)))
    base = dict(params=engine.num_params, coherence=_coherence(G))
    results = []
    for k in ks:
        for name in PROJECTORS:
            proj = make_projector(name, engine.num_params, k, seed=SEED)
            t0 = time.perf_counter()
            Z = proj.project(G)
            results.append(dict(impl="diffattr", projector=name, k=k, seconds=time.perf_counter() - t0,
                                **_fidelity(G, Z)))
    try:
        tp, note = import_trak_projectors()
    except Exception as e:  # recorded, never faked
        return dict(base, results=results, trak_error=f"traker unavailable: {type(e).__name__}: {e}")
    for k in ks:
        for ptype in TRAK_TYPES:
            proj = tp.BasicProjector(engine.num_params, k, SEED, ptype, "cpu", dtype=torch.float32)
            t0 = time.perf_counter()
            Z = proj.project(G, 0) / math.sqrt(k)  # BasicProjector does not scale by 1/sqrt(k)
            results.append(dict(impl="traker", projector=f"BasicProjector {ptype}", k=k,
                                seconds=time.perf_counter() - t0, **_fidelity(G, Z)))
    return dict(base, results=results, trak_note=note)


def task_interleaved(model: str, batch: int, k: int, rounds: int, threads: int) -> dict:
    """The fwd+bwd limit, the gradients and the countsketch features in one process, timed round by round in a
    rotating order: a ratio taken within a round cancels the machine's drift (shared VM: the same call varies by
    10-30% over minutes), which separate processes run minutes apart cannot."""
    torch = _init_torch(threads)
    from attribution.gradients import GradientEngine
    from attribution.methods import Featurizer

    unet, schedule, _ = _model(model)
    x = _images(model, batch)
    ids = list(range(batch))
    engine = GradientEngine(unet, schedule, "square")
    feat = Featurizer(unet, schedule, _dtrak_recipe(), projector="countsketch", proj_dim=k, proj_seed=SEED,
                      noise_seed=SEED)
    calls = {"limit": limit_step(unet, schedule, torch.from_numpy(x), K_TIMESTEPS),
             "gradients": lambda: _dtrak_grads(engine, x, ids), "features": lambda: feat.rows(x, ids)}
    for fn in calls.values():
        fn()
    wall = {name: [] for name in calls}
    cpu = {name: [] for name in calls}
    names = list(calls)
    for r in range(rounds):
        for name in names[r % 3:] + names[: r % 3]:
            t0, c0 = time.perf_counter(), time.process_time()
            calls[name]()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return dict(wall=wall, cpu=cpu, params=engine.num_params, backend=engine.backend)


def task_compare(batch: int, k: int, reps: int, threads: int) -> dict:
    """Projection time per batch on the same gradient matrix (ours vs traker BasicProjector), and traker-style
    featurization (our GradientEngine gradients + BasicProjector) end to end, on the small model."""
    torch = _init_torch(threads)
    from attribution.gradients import GradientEngine
    from attribution.projectors import make_projector
    from attribution.runtime import single_thread

    try:
        tp, note = import_trak_projectors()
    except Exception as e:
        return dict(trak_error=f"traker unavailable: {type(e).__name__}: {e}")
    unet, schedule, _ = _model("small")
    engine = GradientEngine(unet, schedule, "square")
    p = engine.num_params
    x = _images("small", batch)
    ids = list(range(batch))
    projectors = {f"diffattr {n}": (lambda G, P=make_projector(n, p, k, seed=SEED): P.project(G)) for n in PROJECTORS}
    for ptype in TRAK_TYPES:
        P = tp.BasicProjector(p, k, SEED, ptype, "cpu", dtype=torch.float32)
        projectors[f"traker BasicProjector {ptype}"] = lambda G, P=P: P.project(G, 0)
    _warm_up(engine, list(projectors.values()), x, ids)
    grad_times, proj_times = [], {name: [] for name in projectors}
    for _ in range(reps):
        t0 = time.perf_counter()
        G = _dtrak_grads(engine, x, ids)
        grad_times.append(time.perf_counter() - t0)
        with single_thread():
            for name, fn in projectors.items():
                t0 = time.perf_counter()
                fn(G)
                proj_times[name].append(time.perf_counter() - t0)
    return dict(grad_times=grad_times, proj_times=proj_times, trak_note=note, params=p)


# ---------------------------------------------------------------------------------------------- orchestration
def run_fresh(ctx, fn, **kwargs) -> dict:
    """fn(**kwargs) in a new process forked from the forkserver; an exception becomes {"error": ...}."""
    t0 = time.perf_counter()
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as ex:
            out = ex.submit(fn, **kwargs).result()
    except Exception as e:
        out = {"error": f"{type(e).__name__}: {e}"}
    out["wall_s"] = time.perf_counter() - t0
    label = " ".join(f"{k}={v}" for k, v in kwargs.items() if k != "threads")
    print(f"  {fn.__name__:<14} {label:<60} {out['wall_s']:7.1f} s{'  ' + out['error'] if 'error' in out else ''}",
          flush=True)
    return out


def plan(s: Settings) -> list[tuple]:
    """(section, task, kwargs) for every configuration, cheapest first so that --quick failures show early."""
    jobs = []
    for model, batches in s.batches.items():
        for b in batches:
            jobs.append(("limit", task_limit, dict(model=model, batch=b, reps=s.reps, threads=s.threads)))
            jobs.append(("features", task_features, dict(model=model, batch=b, projector=None, k=s.k, reps=s.reps,
                                                         threads=s.threads, backend="vmap")))
            for proj in (None, *PROJECTORS):
                if model != "small" and proj in DENSE and not s.big_dense:
                    continue
                jobs.append(("features", task_features,
                             dict(model=model, batch=b, projector=proj, k=s.k, reps=s.reps, threads=s.threads)))
    for model, batches in s.batches.items():
        for b in batches:
            jobs.append(("interleaved", task_interleaved,
                         dict(model=model, batch=b, k=s.k, rounds=s.rounds[model], threads=s.threads)))
    jobs.append(("fidelity", task_fidelity, dict(rows=s.fidelity_rows, ks=s.fidelity_ks, threads=s.threads)))
    jobs.append(("compare", task_compare, dict(batch=s.compare_batch, k=s.k, reps=s.reps, threads=s.threads)))
    return jobs


def run_header(script: str, argv: list[str]) -> dict:
    """The command line, date, machine and load of a benchmark run (for the results header)."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    exe = Path(sys.executable)
    exe_s = os.path.relpath(exe, REPO) if exe.is_relative_to(REPO) else str(exe)
    return dict(command=shlex.join([exe_s, f"benchmarks/{script}", *argv]),
                date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
                python=platform.python_version(), cpu=cpu, cpu_count=os.cpu_count(),
                loadavg_at_start=[round(v, 2) for v in os.getloadavg()])


def environment(s: Settings, argv: list[str]) -> dict:
    from importlib.metadata import version  # not importing diffusers here: that alone takes ~8 s

    return dict(run_header("feature_throughput.py", argv), torch=version("torch"), diffusers=version("diffusers"),
                traker=_trak_version(), threads=s.threads, settings=asdict(s))


# ---------------------------------------------------------------------------------------------- report
def _median(times: list[float]) -> float:
    return statistics.median(times)


def _fmt(v: float, digits: int = 2) -> str:
    return f"{v:,.{digits}f}"


def throughput_rows(s: Settings, records: list[dict]) -> list[dict]:
    """One row per (model, batch, configuration) with throughput and ratio to the fwd+bwd limit."""
    limits = {(r["model"], r["batch"]): r for r in records if r["section"] == "limit"}
    rows = []
    for r in records:
        if r["section"] not in ("limit", "features"):
            continue
        key = (r["model"], r["batch"])
        name = ("fwd+bwd limit (batched)" if r["section"] == "limit" else r["projector"] if r["projector"] else
                "gradients only" if r.get("backend", "layers") == "layers" else f"gradients only ({r['backend']})")
        row = dict(model=r["model"], params=None, batch=r["batch"], config=name, error=r.get("error"))
        if not row["error"]:
            med = _median(r["times"])
            lim = limits.get(key)
            lim_rate = None if not lim or lim.get("error") else r["batch"] * K_TIMESTEPS / _median(lim["times"])
            rate = r["batch"] * K_TIMESTEPS / med
            row.update(params=r.get("params"), seconds=med, rate=rate, ratio=rate / lim_rate if lim_rate else None,
                       rss=r["rss_config_delta_mib"], rss_batch=r["rss_batch_delta_mib"], reps=len(r["times"]))
        rows.append(row)
    params = {r["model"]: r["params"] for r in rows if r["params"]}
    for model, batches in s.batches.items():
        if model != "small" and not s.big_dense:
            rows += [dict(model=model, batch=b, config=p, skipped=True) for b in batches for p in DENSE]
    for row in rows:
        row["params"] = params.get(row["model"])
    order = {"gradients only (vmap)": -1, "gradients only": 0, **{p: i + 1 for i, p in enumerate(PROJECTORS)},
             "fwd+bwd limit (batched)": 9}
    return sorted(rows, key=lambda r: (list(MODELS).index(r["model"]), r["batch"], order[r["config"]]))


def throughput_table(rows: list[dict]) -> list[str]:
    out = ["| model (params) | batch | configuration | median s/batch | sample-timesteps/s | samples/s "
           "| features / limit | peak RSS delta, config (MiB) | peak RSS delta, per batch (MiB) | reps |",
           "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        head = f"| {r['model']} ({r['params']:,}) | {r['batch']} | {r['config']} "
        if r.get("skipped"):
            out.append(head + "| not run: P is regenerated on every call (4pk bytes > cache), ~70 s per batch of 32 "
                              "for the projection alone; use --big-dense | | | | | | |")
        elif r.get("error"):
            out.append(head + f"| failed: {r['error']} | | | | | | |")
        else:
            ratio = "1 (reference)" if r["config"].startswith("fwd+bwd") else (
                f"{r['ratio']:.3f}" if r["ratio"] is not None else "n/a")
            out.append(head + f"| {_fmt(r['seconds'], 3)} | {_fmt(r['rate'], 1)} | "
                              f"{_fmt(r['rate'] / K_TIMESTEPS, 2)} | {ratio} | {_fmt(r['rss'], 0)} | "
                              f"{'n/a' if r['rss_batch'] is None else _fmt(r['rss_batch'], 0)} | {r['reps']} |")
    return out


def interleaved_table(records: list[dict]) -> list[str]:
    """Per-round ratios limit time / configuration time, their median (and range) over the rounds."""
    out = ["| model (params) | batch | rounds | limit s (median) | gradients / limit | countsketch features / limit "
           "| same, by CPU time |",
           "|---|---:|---:|---:|---:|---:|---:|"]

    def ratios(times: dict, name: str) -> list[float]:
        return [lim / t for lim, t in zip(times["limit"], times[name])]

    def cell(v: list[float]) -> str:
        return f"**{statistics.median(v):.3f}** ({min(v):.2f}-{max(v):.2f})"

    for r in (r for r in records if r["section"] == "interleaved"):
        head = f"| {r['model']} ({r.get('params', 0):,}) | {r['batch']} | {r['rounds']} "
        if r.get("error"):
            out.append(head + f"| failed: {r['error']} | | | |")
            continue
        out.append(head + f"| {_median(r['wall']['limit']):.3f} | {cell(ratios(r['wall'], 'gradients'))} | "
                          f"{cell(ratios(r['wall'], 'features'))} | {cell(ratios(r['cpu'], 'features'))} |")
    return out


def fidelity_table(rec: dict) -> list[str]:
    if rec.get("error"):
        return [f"fidelity run failed: {rec['error']}"]
    c = rec["coherence"]
    out = [f"These gradients (untrained model) are highly coherent: mean pairwise cosine {c['mean_pair_cosine']:.3f}, "
           f"top singular direction {c['top_direction_energy']:.1%} of the energy, 100 largest of "
           f"{rec['params']:,} coordinates {c['top100_coordinate_energy']:.1%} of the squared norm. Every pair's "
           "error then comes mostly from how one P treats the shared direction, so differences between projectors "
           "at equal k are largely the luck of one P draw (one seed each here).",
           "",
           "| implementation | projector | k | Pearson r (inner products) | mean rel. norm error "
           "| mean abs. cosine error | s per call |",
           "|---|---|---:|---:|---:|---:|---:|"]
    for r in sorted(rec["results"], key=lambda r: (r["k"], r["impl"] != "diffattr")):
        out.append(f"| {r['impl']} | {r['projector']} | {r['k']} | {r['pearson_r']:.5f} | {r['norm_rel_err']:.4f} "
                   f"| {r['cos_abs_err']:.4f} | {r['seconds']:.2f} |")
    if rec.get("trak_error"):
        out.append(f"\n{rec['trak_error']}")
    return out


def compare_table(rec: dict, s: Settings, feature_rows: list[dict]) -> list[str]:
    if rec.get("error") or rec.get("trak_error"):
        return [rec.get("trak_error") or f"comparison run failed: {rec['error']}"]
    grads = rec["grad_times"]
    featurizer = {r["config"]: r for r in feature_rows
                  if r["model"] == "small" and r["batch"] == s.compare_batch and "seconds" in r}
    out = ["| implementation | projection s/batch (same G) | end-to-end s/batch | end-to-end sample-timesteps/s "
           "| end-to-end measured as |",
           "|---|---:|---:|---:|---|"]
    for name, times in rec["proj_times"].items():
        if name.startswith("traker"):
            e2e = _median([g + p for g, p in zip(grads, times)])
            how = "our GradientEngine + BasicProjector (this process)"
        else:
            fr = featurizer.get(name.split(" ", 1)[1])
            e2e = fr["seconds"] if fr else float("nan")
            how = "Featurizer.rows (throughput table)"
        rate = s.compare_batch * K_TIMESTEPS / e2e
        out.append(f"| {name} | {_fmt(_median(times), 3)} | {_fmt(e2e, 3)} | {_fmt(rate, 1)} | {how} |")
    out.append(f"| (gradients alone, this process) | - | {_fmt(_median(grads), 3)} | "
               f"{_fmt(s.compare_batch * K_TIMESTEPS / _median(grads), 1)} | GradientEngine.averaged_grads |")
    if rec.get("trak_note"):
        out.append(f"\nNote: {rec['trak_note']}")
    return out


def render(s: Settings, env: dict, records: list[dict], total_s: float) -> str:
    rows = throughput_rows(s, records)
    fid = next(r for r in records if r["section"] == "fidelity")
    cmp_ = next(r for r in records if r["section"] == "compare")
    models = "\n".join(f"- `{name}`: ModelSpec({', '.join(f'{k}={v}' for k, v in m['spec'].items())}), "
                       f"{m['channels']}x{m['size']}x{m['size']} images, "
                       f"{next((r['params'] for r in rows if r['model'] == name and r['params']), 0):,} parameters; "
                       f"data: {m['data']}" for name, m in MODELS.items())
    lines = [
        "# DiffAttr feature throughput" + (" (--quick smoke run: not representative)" if s.quick else ""),
        "",
        f"- command: `{env['command']}`",
        f"- date: {env['date']}; total runtime {total_s:.0f} s",
        f"- torch {env['torch']}, diffusers {env['diffusers']}, traker {env['traker']}, Python {env['python']}",
        f"- process set-up: `attribution.runtime.configure_torch({env['threads']})` in every process, as in "
        "pipeline steps: torch threads, and freed memory kept for reuse (Featurizer.rows and the dense projections "
        "force one thread anyway)",
        f"- machine: {env['cpu']}, {env['cpu_count']} logical CPUs; load average at start "
        f"{env['loadavg_at_start']}, at end {env['loadavg_at_end']} (shared machine: other work ran concurrently, "
        "so times carry some contention noise)",
        "",
        "## Setup",
        "",
        models,
        f"- recipe: D-TRAK (output \"square\", K={K_TIMESTEPS} uniform timesteps 0, 100, ..., 900, common noise), "
        f"k={s.k}, projector/noise seed {SEED}; untrained (seeded initial) weights",
        "- timing: warm-up = one gradient call on the full batch (same tensor shapes as the timed calls) plus one "
        f"projection of {WARMUP_ROWS} rows (fills the countsketch hash and dense-stage caches; dense projections "
        f"run in fixed 8-row tiles, so this warms the same kernels), then {s.reps} timed call(s) of the whole "
        "configuration on the full batch; the median is reported; sample-timesteps/s = batch x K / median",
        "- memory (resource.getrusage ru_maxrss, i.e. RSS; not tracemalloc, which does not see torch's CPU "
        "allocations): each configuration runs in a fresh process forked from a forkserver that had only imported "
        "the libraries. 'config' = peak RSS minus the RSS just before the warm-up (model and inputs already built): "
        "includes one-time caches and first-use page-in of library code. 'per batch' = peak RSS during the timed "
        "calls minus the RSS after the warm-up: the working memory of one batch. The kernel high-water mark is "
        "reset at both points (/proc/self/clear_refs).",
        "- limit: one batched forward+backward of the same model over the same batch x K inputs (each sample at each "
        "of its K timesteps with the same noise), loss = mean of the \"square\" output, loss.backward(); "
        "features / limit = feature throughput / limit throughput",
        "",
        "## Feature throughput and memory",
        "",
        *throughput_table(rows),
        "",
        "## Throughput relative to the limit, interleaved in one process",
        "",
        "The limit, the gradients alone (GradientEngine.averaged_grads) and the countsketch features "
        "(Featurizer.rows), each warmed up once, then timed in rounds of one call each (rotating order) in a single "
        "fresh process; each ratio is taken within a round (limit time / configuration time; > 1 = faster than the "
        "limit), and the table gives the median over rounds (range in brackets). This cancels the machine's drift "
        "between the separate processes of the table above, which run minutes apart.",
        "",
        *interleaved_table(records),
        "",
        f"## Projection fidelity (small model, {s.fidelity_rows} samples, D-TRAK gradients, "
        f"all {s.fidelity_rows * (s.fidelity_rows - 1) // 2} pairs i<j)",
        "",
        "Pearson r between <Pg_i, Pg_j> and <g_i, g_j>; norm error = mean | ||Pg|| - ||g|| | / ||g||; cosine error "
        "= mean |<Pg_i, Pg_j> - <g_i, g_j>| / (||g_i|| ||g_j||). traker's BasicProjector is unscaled: its output is "
        "divided by sqrt(k) (irrelevant to r). 's per call' = one call of a freshly built projector on all rows, so "
        "it includes generating P and filling any cache.",
        "",
        *fidelity_table(fid),
        "",
        f"## traker comparison (small model, batch {s.compare_batch}, k={s.k}, float32 BasicProjector, "
        "default block_size=100, device cpu)",
        "",
        *compare_table(cmp_, s, rows),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: small batches, k=128, 1 repetition (< 1 min)")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions per configuration (full mode)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads per process")
    ap.add_argument("--big-dense", action="store_true",
                    help="also time gaussian/rademacher on the 1M model (~4-5 min each with 3 repetitions)")
    args = ap.parse_args(argv)
    if args.reps < 1:
        ap.error("--reps must be >= 1")
    s = Settings.from_args(args)
    env = environment(s, argv)
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    t0 = time.perf_counter()
    records = []
    for section, fn, kwargs in plan(s):
        records.append({"section": section, **kwargs, **run_fresh(ctx, fn, **kwargs)})
    total = time.perf_counter() - t0
    env["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    md = render(s, env, records, total)
    (RESULTS_DIR / "feature_throughput.md").write_text(md)
    (RESULTS_DIR / "feature_throughput.json").write_text(
        json.dumps(dict(environment=env, total_seconds=total, records=records), indent=1, default=str) + "\n")
    print(md)
    print(f"total {total:.0f} s; wrote {RESULTS_DIR / 'feature_throughput.md'} and .json")


if __name__ == "__main__":
    main()
