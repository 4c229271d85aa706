"""Which experiments this code location serves: every YAML file in experiments/ (or DIFFATTR_EXPERIMENTS)."""
from __future__ import annotations

import os
from pathlib import Path

from attribution.experiment import Experiment, ExperimentError, load_experiment

EXPERIMENTS_ENV = "DIFFATTR_EXPERIMENTS"
DEFAULT_DIR = Path(__file__).resolve().parent.parent / "experiments"


def experiment_files() -> list[Path]:
    """DIFFATTR_EXPERIMENTS may name files and/or directories, separated by os.pathsep."""
    raw = os.environ.get(EXPERIMENTS_ENV)
    entries = [Path(p) for p in raw.split(os.pathsep) if p] if raw else [DEFAULT_DIR]
    files: list[Path] = []
    for entry in entries:
        if entry.is_dir():
            files.extend(sorted(entry.glob("*.yaml")))
        elif entry.is_file():
            files.append(entry)
        else:
            raise ExperimentError(f"{EXPERIMENTS_ENV} entry {entry} is neither a YAML file nor a directory")
    return files


def load_experiments(files: list[Path] | None = None) -> list[Experiment]:
    exps = [load_experiment(f) for f in (experiment_files() if files is None else files)]
    seen: dict[str, int] = {}
    for e in exps:
        seen[e.name] = seen.get(e.name, 0) + 1
    dup = [n for n, c in seen.items() if c > 1]
    if dup:
        raise ExperimentError(f"experiment names must be unique across files (they prefix asset keys): {dup}")
    return exps
