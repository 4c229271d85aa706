"""What retaining freed memory (``attribution.runtime.configure_torch``) buys: time and page faults per call.

Run from the repository root::

    .venv/bin/python benchmarks/page_faults.py              # 1.1M-parameter model, batch 32 (~5 min)
    .venv/bin/python benchmarks/page_faults.py --quick      # small model, batch 8 (~1 min)

For each of "glibc defaults" (torch.set_num_threads only) and "configure_torch", a fresh process builds the model,
warms up, then times ``reps`` interleaved rounds of the fwd+bwd limit and of the countsketch features
(``Featurizer.rows``, D-TRAK recipe), counting minor page faults (getrusage ru_minflt) of every call.  Results go
to ``benchmarks/results/page_faults.{md,json}``.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import feature_throughput as ft  # noqa: E402  (the shared model, data, recipe and limit definitions)

SETUPS = ("glibc defaults", "configure_torch")


def task(setup: str, model: str, batch: int, k: int, reps: int) -> dict:
    import torch

    if setup == "configure_torch":
        from attribution.runtime import configure_torch

        configure_torch(1)
    else:
        torch.set_num_threads(1)
    from attribution.methods import Featurizer

    unet, schedule, _ = ft._model(model)
    x = ft._images(model, batch)
    ids = list(range(batch))
    feat = Featurizer(unet, schedule, ft._dtrak_recipe(), projector="countsketch", proj_dim=k, proj_seed=ft.SEED,
                      noise_seed=ft.SEED)
    calls = {"limit": ft.limit_step(unet, schedule, torch.from_numpy(x), ft.K_TIMESTEPS),
             "features": lambda: feat.rows(x, ids)}
    for _ in range(2):
        for fn in calls.values():
            fn()
    out = {name: {"seconds": [], "faults": []} for name in calls}
    for _ in range(reps):
        for name, fn in calls.items():
            f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            fn()
            out[name]["seconds"].append(time.perf_counter() - t0)
            out[name]["faults"].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def render(header: dict, model: str, batch: int, results: dict) -> str:
    lines = ["# Page faults per batch: glibc defaults vs configure_torch", "",
             f"- command: `{header['command']}`", f"- date: {header['date']}",
             f"- machine: {header['cpu']}, {header['cpu_count']} logical CPUs; one torch thread",
             f"- model `{model}`, batch {batch}, D-TRAK recipe (K={ft.K_TIMESTEPS}), countsketch k as run; each setup "
             "in a fresh process: 2 warm-up rounds, then timed rounds of limit and features; median (min) seconds, "
             "median minor page faults per call", "",
             "| setup | call | seconds, median (min) | page faults per call | GiB faulted per call | process peak RSS "
             "(MiB) |", "|---|---|---:|---:|---:|---:|"]
    for setup in SETUPS:
        r = results[setup]
        for call in ("limit", "features"):
            s, f = r[call]["seconds"], statistics.median(r[call]["faults"])
            lines.append(f"| {setup} | {call} | {statistics.median(s):.3f} ({min(s):.3f}) | {f:,.0f} | "
                         f"{f * 4096 / 2**30:.2f} | {r['peak_rss_mib']:,.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small model, batch 8, k=128")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    model, batch, k = ("small", 8, 128) if args.quick else ("1M", 32, 2048)
    header = ft.run_header("page_faults.py", argv)
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(ft.PRELOAD)
    results = {}
    for setup in SETUPS:
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as ex:
            results[setup] = ex.submit(task, setup, model, batch, k, args.reps).result()
        print(f"  {setup}: done", flush=True)
    md = render(header, model, batch, results)
    ft.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (ft.RESULTS_DIR / "page_faults.md").write_text(md)
    (ft.RESULTS_DIR / "page_faults.json").write_text(json.dumps(dict(header=header, model=model, batch=batch, k=k,
                                                                     results=results), indent=1) + "\n")
    print(md)


if __name__ == "__main__":
    main()
