"""The Dagster code location: one asset graph per experiment, asset keys prefixed with the experiment name, with its
stage jobs, evaluation schedule, inbox sensor and automation (pipelines/operations.py)."""
from __future__ import annotations

import dagster as dg

from assets import checks, counterfactual, data, evaluation, features, groups, inbox, models, scores
from attribution.experiment import Experiment
from storage.resources import StorageResource

from . import operations
from .executors import executor_from_env, uses_dask, without_pools
from .experiments import load_experiments

STAGES = (data, models, features, scores, evaluation, counterfactual, groups, inbox)


def experiment_assets(exp: Experiment) -> list[dg.AssetsDefinition]:
    return operations.with_automation(exp, [a for stage in STAGES for a in stage.build(exp)])


def experiment_checks(exp: Experiment) -> list[dg.AssetChecksDefinition]:
    return checks.build(exp)


def build_definitions(experiments: list[Experiment], storage: StorageResource | None = None) -> dg.Definitions:
    assets, jobs, schedules, sensors = [], [], [], [operations.run_failure_sensor]
    for exp in experiments:
        exp_assets = experiment_assets(exp)
        if uses_dask():
            without_pools(exp_assets)
        assets.extend(exp_assets)
        jobs.extend(operations.stage_jobs(exp, exp_assets))
        if any(j.name == f"{exp.name}__evaluation" for j in jobs):
            schedules.append(operations.evaluation_schedule(exp))
        if exp.operations.inbox:
            sensors.append(operations.inbox_sensor(exp))
    if any(exp.operations.automation for exp in experiments):
        sensors.append(operations.automation_sensor())
    return dg.Definitions(assets=assets, asset_checks=[c for exp in experiments for c in experiment_checks(exp)],
                          jobs=jobs, schedules=schedules, sensors=sensors, executor=executor_from_env(),
                          resources={"storage": storage or StorageResource()})


defs = build_definitions(load_experiments())
