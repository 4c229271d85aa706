"""Seconds per coalition model by method (retrain / finetune / sparsified_finetune), one process, one torch thread,
nothing else running: the speed-up of sFT over retraining measured, not assumed (DESIGN 2; the Shapley paper reports
5.3x / 10.4x / 18.6x on GPU). Needs the base and pruned models of an experiment that has been materialized:

    .venv/bin/python -m pipelines.run experiments/digits_groups.yaml      # once
    .venv/bin/python benchmarks/coalition_speed.py [experiments/digits_groups.yaml] [--repeats 3]

Writes benchmarks/results/coalition_speed.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("experiment", nargs="?", default=str(ROOT / "experiments" / "digits_groups.yaml"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import numpy as np
    import torch

    from assets.groups import GameScorer
    from attribution.experiment import load_experiment
    from attribution.groups import build_groups, half_coalitions
    from attribution.models import count_parameters
    from attribution.runtime import configure_torch
    from attribution.training import train_ddpm
    from storage.datasets import load_image_dataset
    from storage.models import StoredModel
    from storage.resources import StorageResource

    configure_torch(1)  # the pipeline steps' process set-up
    exp = load_experiment(args.experiment)
    sh = exp.shapley
    paths = StorageResource().paths(exp.name)
    train, _ = load_image_dataset(paths.dataset("train_images"))
    groups = build_groups(train.groups, sh.groups)
    coalition = half_coalitions(len(sh.groups), 1, seed=123)[0]
    images = train.images[groups.rows(coalition)]
    base = StoredModel(paths.model("base_model")).load_unet()
    pruned = StoredModel(paths.model("pruned_model")).load_unet()
    scorer = GameScorer(exp, paths, "cpu")
    recipes = {
        "retrain": dict(spec=exp.training, init=None),
        "finetune": dict(spec=sh.finetune, init=base),
        "sparsified_finetune": dict(spec=sh.finetune, init=pruned),
    }
    rows = []
    for rep in range(args.repeats):  # interleaved, so drifting machine load affects every method alike
        for method, r in recipes.items():
            result = train_ddpm(images, exp.model, r["spec"], init_model=r["init"])
            start = time.perf_counter()
            scorer(result.unet)
            score_s = time.perf_counter() - start
            rows.append(dict(method=method, repeat=rep, steps=r["spec"].steps, params=count_parameters(result.unet),
                             train_s=result.wall_seconds, s_per_step=result.wall_seconds / r["spec"].steps,
                             score_s=score_s))
            print(rows[-1], flush=True)
    summary = {}
    for method in recipes:
        mine = [r for r in rows if r["method"] == method]
        summary[method] = {k: float(np.median([r[k] for r in mine])) for k in ("train_s", "s_per_step", "score_s")}
        summary[method].update(steps=mine[0]["steps"], params=mine[0]["params"])
    for method in recipes:
        s = summary[method]
        s["speedup_train"] = summary["retrain"]["train_s"] / s["train_s"]
        s["speedup_with_scoring"] = ((summary["retrain"]["train_s"] + summary["retrain"]["score_s"])
                                     / (s["train_s"] + s["score_s"]))
        s["per_step_speedup"] = summary["retrain"]["s_per_step"] / s["s_per_step"]
    pruned_meta = StoredModel(paths.model("pruned_model")).meta
    out = {"experiment": exp.name, "coalition_images": int(len(images)), "repeats": args.repeats,
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
           "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread",
           "one_time_sft_cost_s": pruned_meta.get("recovery_seconds"), "summary": summary, "rows": rows,
           "command": "python benchmarks/coalition_speed.py " + " ".join(sys.argv[1:])}
    res = ROOT / "benchmarks" / "results"
    res.mkdir(parents=True, exist_ok=True)
    (res / "coalition_speed.json").write_text(json.dumps(out, indent=1))
    lines = [f"# Seconds per coalition model ({exp.name}, {len(images)} images in the coalition, median of "
             f"{args.repeats})", "", f"{out['date']}, torch {torch.__version__}, one thread. Command: "
             f"`{out['command']}`", "",
             "| method | steps | parameters | train s | s/step | F scoring s | speed-up (train) | speed-up incl. scoring |",
             "|---|---|---|---|---|---|---|---|"]
    for m, s in summary.items():
        lines.append(f"| {m} | {s['steps']} | {s['params']} | {s['train_s']:.1f} | {s['s_per_step']:.4f} | "
                     f"{s['score_s']:.1f} | {s['speedup_train']:.1f}x | {s['speedup_with_scoring']:.1f}x |")
    lines += ["", f"One-time cost of sFT: pruning + recovery of the pruned model on the full data "
              f"({sh.pruned_finetune.steps} steps): {out['one_time_sft_cost_s'] or 0:.1f} s."]
    (res / "coalition_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
