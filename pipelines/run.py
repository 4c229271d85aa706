"""Headless run of an experiment's whole asset graph: `python -m pipelines.run [experiments/digits.yaml]`.

Runs are recorded in the Dagster instance of $DAGSTER_HOME (the Makefile points it at .dagster/), so `make ui`
shows them afterwards.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DEFAULT_EXPERIMENT = Path(__file__).resolve().parent.parent / "experiments" / "digits.yaml"


def materialize_experiment(exp, storage, instance=None, log_level: str = "INFO"):
    import dagster as dg

    from .definitions import experiment_assets

    result = dg.materialize(experiment_assets(exp), instance=instance, resources={"storage": storage},
                            tags={"diffattr/experiment": exp.name}, raise_on_error=False,
                            run_config={"loggers": {"console": {"config": {"log_level": log_level}}}})
    if not result.success:
        failed = [e.step_key for e in result.all_events if e.is_step_failure]
        raise SystemExit(f"run {result.run_id} failed at steps {failed}: see the log above, or `make ui` -> Runs")
    return result


def summary(exp, storage) -> str:
    wh = storage.warehouse()
    lines = [f"Artefacts: {storage.paths(exp.name).base}", f"Warehouse: {wh.path}", ""]
    datasets = wh.query("SELECT split, n_images, shape, n_groups FROM diffattr.datasets WHERE experiment = ? "
                        "ORDER BY split DESC", [exp.name])
    runs = wh.query("SELECT model, n_train, steps, parameters, round(final_loss, 4) AS final_loss, "
                    "round(wall_seconds, 1) AS wall_s FROM diffattr.training_runs WHERE experiment = ?", [exp.name])
    attribution = wh.query(
        "SELECT method, kind, scorer, round(kernel_lambda, 4) AS lambda, n_queries, n_train, "
        "unique_in_top_k || '/' || top_k_slots AS unique_top_k FROM diffattr.attribution_runs WHERE experiment = ? "
        "ORDER BY method", [exp.name])
    lines += ["Datasets:", datasets.to_string(index=False), "", "Models:", runs.to_string(index=False), ""]
    if len(attribution):
        lines += ["Attribution (unique_top_k: distinct training images among all queries' top-k proponents):",
                  attribution.to_string(index=False), ""]
    lines += ["See the results with SQL:",
              f"  duckdb -readonly {wh.path} \"SELECT method, query_id, rank, train_id, train_group, "
              f"round(score, 4) AS score FROM diffattr.top_attributions WHERE experiment = '{exp.name}' AND "
              "direction = 'proponent' AND rank <= 3 ORDER BY method, query_id, rank\""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", nargs="?", default=str(DEFAULT_EXPERIMENT), help="experiment YAML file")
    args = parser.parse_args(argv)

    import dagster as dg

    from attribution.experiment import ExperimentError, load_experiment
    from storage.resources import StorageResource

    try:
        exp = load_experiment(args.experiment)
    except ExperimentError as e:
        print(e, file=sys.stderr)
        return 2
    storage = StorageResource()
    start = time.perf_counter()
    with dg.DagsterInstance.get() as instance:
        materialize_experiment(exp, storage, instance)
    print(f"\nExperiment '{exp.name}' materialized in {time.perf_counter() - start:.0f} s.\n")
    print(summary(exp, storage))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
