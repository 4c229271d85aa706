"""The Dagster code location: one asset graph per experiment, asset keys prefixed with the experiment name."""
from __future__ import annotations

import dagster as dg

from assets import checks, counterfactual, data, evaluation, features, groups, models, scores
from attribution.experiment import Experiment
from storage.resources import StorageResource

from .experiments import load_experiments

STAGES = (data, models, features, scores, evaluation, counterfactual, groups)


def experiment_assets(exp: Experiment) -> list[dg.AssetsDefinition]:
    return [a for stage in STAGES for a in stage.build(exp)]


def experiment_checks(exp: Experiment) -> list[dg.AssetChecksDefinition]:
    return checks.build(exp)


def experiment_jobs(exp: Experiment, exp_assets: list[dg.AssetsDefinition]) -> list:
    """One job for the unpartitioned graph, one per partitioned fan-out (backfill it to run every partition)."""
    partitioned = [a for a in exp_assets if a.partitions_def is not None]
    jobs = [dg.define_asset_job(
        f"{exp.name}__main",
        selection=dg.AssetSelection.assets(*[a.key for a in exp_assets if a.partitions_def is None]),
        description=f"Every unpartitioned asset of '{exp.name}' (the retraining fan-outs have jobs of their own; "
                    "`make run` runs all of it in order).")]
    for a in partitioned:
        jobs.append(dg.define_asset_job(
            f"{exp.name}__{a.key.path[-1]}_job", selection=dg.AssetSelection.assets(a.key),
            description=f"Retraining fan-out {a.key.to_user_string()}: launch a backfill over its partitions."))
    return jobs


def build_definitions(experiments: list[Experiment], storage: StorageResource | None = None) -> dg.Definitions:
    assets, jobs = [], []
    for exp in experiments:
        exp_assets = experiment_assets(exp)
        assets.extend(exp_assets)
        jobs.extend(experiment_jobs(exp, exp_assets))
    return dg.Definitions(assets=assets, asset_checks=[c for exp in experiments for c in experiment_checks(exp)], jobs=jobs,
                          resources={"storage": storage or StorageResource()})


defs = build_definitions(load_experiments())
