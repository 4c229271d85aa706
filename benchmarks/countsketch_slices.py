"""Speed of the countsketch projection: all rows at once vs rows in cache-sized output slices vs slices on 2 threads.

Run from the repository root::

    .venv/bin/python benchmarks/countsketch_slices.py           # about 3 minutes on the 2-vCPU machine
    .venv/bin/python benchmarks/countsketch_slices.py --quick   # smoke test (prints, writes nothing)

Results go to ``benchmarks/results/countsketch_slices.{md,json}``.

``CountSketchProjector`` adds each row's entries into its output row with ``index_add_``, at random places of the
row's k float64 values.  With all B rows in one call those writes spread over B * k * 8 bytes (16 MiB at B=64,
k=32768), far beyond the core's 2 MiB L2 cache; output slices of ``OUT_SLICE_BYTES`` (1 MiB: 4 rows at k=32768)
keep them in cache.  With ``threads=n`` the slices are shared out to n threads (``torch_threads`` of the
experiment: a GPU machine projects the gradients its GPU computed on its CPU cores).  Every variant gives the same
bits (checked here on every configuration); the per-sample gradients are random (B, p) float32 matrices in
parameter-sized column blocks of 40,000 columns, projected under one torch intra-op thread as the featurizer does.
Timings are interleaved round by round (the machine drifts by 10-30% over minutes) and reported as medians.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import feature_throughput as ft  # noqa: E402  (the shared results header)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# (rows B, parameters p, k): the default model's features, the 1.1M-parameter model's, and a larger model at the
# D-TRAK CIFAR-2 k
CONFIGS = [(32, 159_697, 2048), (32, 1_100_000, 2048), (32, 1_100_000, 8192), (64, 4_000_000, 32768)]
VARIANTS = {"all rows at once, 1 thread": (False, 1), "output slices, 1 thread": (True, 1),
            "output slices, 2 threads": (True, 2)}


def measure(B: int, p: int, k: int, rounds: int) -> dict:
    import torch

    from attribution import projectors
    from attribution.runtime import single_thread

    G = torch.randn(B, p, generator=torch.Generator().manual_seed(0))
    blocks = [b.clone() for b in G.split(40_000, dim=1)]
    del G
    default_slice = projectors.OUT_SLICE_BYTES
    projector = {n: projectors.CountSketchProjector(p, k, seed=0, threads=n) for n in (1, 2)}
    times = {name: [] for name in VARIANTS}
    outputs = {}

    def run(name: str) -> float:
        sliced, threads = VARIANTS[name]
        projectors.OUT_SLICE_BYTES = default_slice if sliced else 8 * k * B  # one slice: every row at once
        try:
            proj = projector[threads]
            t0 = time.perf_counter()
            outputs[name] = proj.project(blocks)
            return time.perf_counter() - t0
        finally:
            projectors.OUT_SLICE_BYTES = default_slice

    names = list(VARIANTS)
    with single_thread():
        for name in names:  # warm-up: hash cache, chunk plans
            run(name)
        for r in range(rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                times[name].append(run(name))
    ref = outputs[names[0]]
    return dict(B=B, p=p, k=k, rows_per_slice=max(1, min(default_slice // (8 * k), B)),
                same_bits=all(torch.equal(ref, o) for o in outputs.values()),
                seconds={n: statistics.median(v) for n, v in times.items()}, all_seconds=times)


def render(env: dict, records: list[dict], total: float) -> str:
    names = list(VARIANTS)
    lines = [
        "# countsketch projection: output slices and threads",
        "",
        f"- command: `{env['command']}`",
        f"- date: {env['date']}; CPU: {env['cpu']} ({env['cpu_count']} logical cores); load at start "
        f"{env['loadavg_at_start']}; total {total:.0f} s",
        "- median seconds per projection of B rows (interleaved rounds); speed-up over all rows at once in brackets;"
        " same bits = every variant returned an identical (B, k) matrix; \"same call\": the slice holds every row, so"
        " the first two columns ran identical code and their ratio shows the timing noise",
        "",
        "| B | p | k | rows per slice | " + " | ".join(names) + " | same bits |",
        "|---|---|---|---|" + "---|" * len(names) + "---|",
    ]
    for r in records:
        base = r["seconds"][names[0]]
        cells = [f"{r['seconds'][n]:.3f}" + ("" if n == names[0] else f" ({base / r['seconds'][n]:.2f}x)")
                 for n in names]
        if r["rows_per_slice"] >= r["B"]:  # one slice either way: the first two columns ran the same code
            cells[1] += " (same call)"
        lines.append(f"| {r['B']} | {r['p']:,} | {r['k']} | {r['rows_per_slice']} | " + " | ".join(cells)
                     + f" | {'yes' if r['same_bits'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: the two smallest configurations, 1 round")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    from attribution.runtime import configure_torch

    configure_torch(1)
    env = ft.run_header("countsketch_slices.py", argv)
    t0 = time.perf_counter()
    records = []
    for B, p, k in CONFIGS[:2] if args.quick else CONFIGS:
        rec = measure(B, p, k, 1 if args.quick else args.rounds)
        records.append(rec)
        print(f"B={B} p={p:,} k={k}: " + ", ".join(f"{n} {s:.3f} s" for n, s in rec["seconds"].items())
              + f"; same bits: {rec['same_bits']}", flush=True)
    total = time.perf_counter() - t0
    md = render(env, records, total)
    if args.quick:  # a smoke test leaves the recorded results alone
        print(md)
        return
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "countsketch_slices.md").write_text(md)
    (RESULTS_DIR / "countsketch_slices.json").write_text(
        json.dumps(dict(environment=env, records=records, total_seconds=total), indent=1) + "\n")
    print(md)


if __name__ == "__main__":
    main()
