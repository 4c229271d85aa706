"""The Dagster code location: one asset graph per experiment, asset keys prefixed with the experiment name."""
from __future__ import annotations

import dagster as dg

from assets import data, evaluation, features, models, scores
from attribution.experiment import Experiment
from storage.resources import StorageResource

from .experiments import load_experiments

STAGES = (data, models, features, scores, evaluation)


def experiment_assets(exp: Experiment) -> list[dg.AssetsDefinition]:
    return [a for stage in STAGES for a in stage.build(exp)]


def build_definitions(experiments: list[Experiment], storage: StorageResource | None = None) -> dg.Definitions:
    assets, jobs = [], []
    for exp in experiments:
        exp_assets = experiment_assets(exp)
        assets.extend(exp_assets)
        jobs.append(dg.define_asset_job(
            f"{exp.name}__all", selection=dg.AssetSelection.key_prefixes([exp.name]),
            description=f"Materialize every asset of experiment '{exp.name}'."))
    return dg.Definitions(assets=assets, jobs=jobs, resources={"storage": storage or StorageResource()})


defs = build_definitions(load_experiments())
