"""Headless run of an experiment's whole asset graph: `python -m pipelines.run [experiments/digits.yaml]`.

Runs are recorded in the Dagster instance of $DAGSTER_HOME (the Makefile points it at .dagster/), so `make ui`
shows them afterwards.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

DEFAULT_EXPERIMENT = Path(__file__).resolve().parent.parent / "experiments" / "digits.yaml"


class MaterializationError(RuntimeError):
    """A step of the experiment's graph failed; its run is in the Dagster instance with the full log."""


def _log_config(log_level: str) -> dict:
    return {"loggers": {"console": {"config": {"log_level": log_level}}}}


def execution_waves(assets) -> list[tuple[str, list]]:
    """The graph in waves: ("run", unpartitioned keys to materialize together) or ("partitions", one partitioned
    asset to run partition by partition), each only after everything it depends on."""
    import dagster as dg

    # dynamic partitions (inbox images) are created and run by their sensor, not by a whole-graph run
    pending = {a.key: a for a in assets if not isinstance(a.partitions_def, dg.DynamicPartitionsDefinition)}
    waves: list[tuple[str, list]] = []
    while pending:
        batch: list = []
        grew = True
        while grew:  # unpartitioned assets none of whose upstreams is still pending
            grew = False
            for k, a in list(pending.items()):
                if a.partitions_def is None and all(d not in pending for d in a.asset_deps[k]):
                    batch.append(k)
                    del pending[k]
                    grew = True
        if batch:
            waves.append(("run", batch))
        ready = [k for k, a in pending.items() if all(d not in pending for d in a.asset_deps[k])]
        if not ready and not batch:
            raise MaterializationError(f"cannot order assets {sorted(k.to_user_string() for k in pending)}")
        for k in ready:
            waves.append(("partitions", [k]))
            del pending[k]
    return waves


def _materialize(definitions, selection, storage, instance, log_level, tags, partition_key=None):
    """One run of the selected assets; their asset checks run in it too (blocking ones stop it on bad data)."""
    import dagster as dg

    return dg.materialize(definitions, selection=selection, instance=instance, resources={"storage": storage},
                          partition_key=partition_key, tags=tags, raise_on_error=False,
                          run_config=_log_config(log_level))


def _partition_worker(exp_json: str, storage_config: dict, instance_ref, key_path: list, partition_key: str,
                      log_level: str) -> tuple[str, bool, str]:
    """One partition in a fresh process (spawned: torch and dagster state never leak between partitions)."""
    import json

    import dagster as dg

    from attribution.experiment import parse_experiment
    from storage.resources import StorageResource

    from .definitions import experiment_assets, experiment_checks

    exp = parse_experiment(json.loads(exp_json))
    with dg.DagsterInstance.from_ref(instance_ref) as instance:
        result = _materialize(experiment_assets(exp) + experiment_checks(exp), [dg.AssetKey(key_path)], StorageResource(**storage_config),
                              instance, log_level, {"diffattr/experiment": exp.name}, partition_key)
    return partition_key, result.success, result.run_id


def materialize_experiment(exp, storage, instance=None, log_level: str = "INFO", workers: int = 1):
    """Materialize the experiment's whole graph: unpartitioned assets upstream of the partitioned ones, then every
    partition (in `workers` parallel processes when the instance is persistent), then the rest."""
    import dagster as dg

    from .definitions import experiment_assets, experiment_checks

    assets = experiment_assets(exp)
    by_key = {a.key: a for a in assets}
    definitions = assets + experiment_checks(exp)
    tags = {"diffattr/experiment": exp.name}
    failed: list[str] = []
    results = []
    ephemeral = instance is None
    with (dg.DagsterInstance.ephemeral() if ephemeral else nullcontext(instance)) as inst:
        for kind, keys in execution_waves(assets):
            if failed:
                break
            if kind == "run":
                results.append(_materialize(definitions, keys, storage, inst, log_level, tags))
                failed += _failures(results[-1])
                continue
            partition_keys = by_key[keys[0]].partitions_def.get_partition_keys()
            if workers > 1 and not ephemeral and inst.get_ref() is not None:
                failed += _run_partitions_in_pool(exp, storage, inst, keys[0], partition_keys, log_level, workers)
            else:
                for pk in partition_keys:
                    results.append(_materialize(definitions, keys, storage, inst, log_level, tags, pk))
                    failed += [f"{f} [{pk}]" for f in _failures(results[-1])]
    if failed:
        raise MaterializationError(f"materialization failed at {failed}: see the log above, or `make ui` -> Runs")
    return results


def _run_partitions_in_pool(exp, storage, instance, key, partition_keys, log_level, workers) -> list[str]:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    config = {"root": storage.root, "warehouse_path": storage.warehouse_path}
    failed = []
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(_partition_worker, exp.model_dump_json(), config, instance.get_ref(), key.path,
                               str(pk), log_level) for pk in partition_keys]
        for done, fut in enumerate(as_completed(futures), 1):
            pk, ok, run_id = fut.result()
            print(f"[{done}/{len(futures)}] {key.to_user_string()} partition {pk}: "
                  f"{'ok' if ok else 'FAILED (run ' + run_id + ')'}", flush=True)
            if not ok:
                failed.append(f"{key.to_user_string()} [{pk}]")
    return failed


def _failures(result) -> list[str]:
    steps = [e.step_key for e in result.all_events if e.is_step_failure]
    checks = [f"check {c.asset_key.to_user_string()}:{c.check_name}" for c in result.get_asset_check_evaluations()
              if not c.passed]
    return steps + checks


# (title, SQL with one parameter: the experiment) of each table `make run` prints when it has rows
SUMMARY_SECTIONS = (
    ("Attribution (unique_top_k: distinct training images among all queries' top-k proponents):",
     "SELECT method, kind, scorer, round(kernel_lambda, 4) AS lambda, n_queries, n_train, "
     "unique_in_top_k || '/' || top_k_slots AS unique_top_k FROM diffattr.attribution_runs WHERE experiment = ? "
     "ORDER BY method"),
    ("LDS on the test subsets (bootstrap 95% CI over queries; ceiling: best LDS reachable given seed-to-seed "
     "training noise):",
     "SELECT method, query_set, round(value, 3) AS lds, '[' || round(ci_low, 3) || ', ' || round(ci_high, 3) || ']' "
     "AS ci95, round(noise_ceiling, 3) AS ceiling, round(kernel_lambda, 4) AS lambda, n_subsets, n_queries "
     "FROM diffattr.lds WHERE experiment = ? AND query_set != 'all' ORDER BY query_set, value DESC"),
    ("Counterfactual (regenerated after removing each method's top proponents or random images; larger L2 / lower "
     "cosine = the removed images mattered more):",
     "SELECT method, count(*) AS queries, round(avg(pixel_l2), 3) AS mean_pixel_l2, "
     "round(avg(embedding_cosine), 4) AS mean_embedding_cosine FROM diffattr.counterfactual "
     "WHERE experiment = ? GROUP BY method ORDER BY method"),
    ("Group LDS (Spearman of summed group values vs F of models retrained on held-out half coalitions):",
     "SELECT property, estimator, round(group_lds, 3) AS group_lds, '[' || round(ci_low, 2) || ', ' || "
     "round(ci_high, 2) || ']' AS ci95, n_coalitions FROM diffattr.v_group_lds WHERE experiment = ? "
     "ORDER BY property, group_lds DESC"),
    ("Coalition models (wall seconds while running in parallel; benchmarks/coalition_speed.py measures them alone):",
     "SELECT method, models, steps, parameters, round(mean_wall_seconds, 1) AS s_per_model, "
     "round(speedup_vs_retrain, 1) AS speedup FROM diffattr.v_coalition_cost WHERE experiment = ? "
     "ORDER BY mean_wall_seconds DESC"),
    ("Group counterfactual (retrained without the top / bottom groups; change of F vs the full model):",
     "SELECT estimator, removed, groups_removed, property, round(change, 3) AS change_of_F FROM "
     "diffattr.group_counterfactual WHERE experiment = ? ORDER BY estimator, property, removed DESC"),
)


def summary(exp, storage) -> str:
    wh = storage.warehouse()
    lines = [f"Artefacts: {storage.paths(exp.name).base}", f"Warehouse: {wh.path}", ""]
    datasets = wh.query("SELECT split, n_images, shape, n_groups FROM diffattr.datasets WHERE experiment = ? "
                        "ORDER BY split DESC", [exp.name])
    runs = wh.query("SELECT model, count(*) AS models, min(n_train) AS n_train, min(steps) AS steps, "
                    "min(parameters) AS parameters, round(avg(final_loss), 4) AS mean_final_loss, "
                    "round(avg(wall_seconds), 1) AS mean_wall_s FROM diffattr.training_runs WHERE experiment = ? "
                    "GROUP BY model ORDER BY min(created_at)", [exp.name])
    lines += ["Datasets:", datasets.to_string(index=False), "", "Models:", runs.to_string(index=False), ""]
    for title, sql in SUMMARY_SECTIONS:
        table = wh.query(sql, [exp.name])
        if len(table):
            lines += [title, table.to_string(index=False), ""]
    lines += ["See the results with SQL:",
              f"  duckdb -readonly {wh.path} \"SELECT method, query_id, rank, train_id, train_group, "
              f"round(score, 4) AS score FROM diffattr.top_attributions WHERE experiment = '{exp.name}' AND "
              "direction = 'proponent' AND rank <= 3 ORDER BY method, query_id, rank\""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", nargs="?", default=str(DEFAULT_EXPERIMENT), help="experiment YAML file")
    parser.add_argument("--workers", type=int, default=None,
                        help="parallel processes for partitions (default: CPU count / torch_threads)")
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
    if args.workers is None:
        args.workers = max(1, (os.cpu_count() or 1) // exp.torch_threads)
    start = time.perf_counter()
    with dg.DagsterInstance.get() as instance:
        try:
            materialize_experiment(exp, storage, instance, workers=args.workers)
        except MaterializationError as e:
            print(e, file=sys.stderr)
            return 1
    print(f"\nExperiment '{exp.name}' materialized in {time.perf_counter() - start:.0f} s.\n")
    print(summary(exp, storage))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
