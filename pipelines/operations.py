"""How an experiment lives in Dagster: jobs per stage, the evaluation schedule, declarative automation, the inbox
sensor for new query images and run-failure visibility. Everything is built per experiment from its
`operations` section; heavy imports stay inside the sensor bodies so the code location loads fast."""
from __future__ import annotations

import dagster as dg

from attribution.experiment import Experiment
from storage.resources import StorageResource

# Asset groups (assets/*.py) -> the stage jobs users launch from the UI.
STAGE_GROUPS = {
    "train": ("data", "models"),
    "features": ("features",),
    "scores": ("attribution",),
    "evaluation": ("evaluation",),
}
GROUP_ATTRIBUTION_ASSETS = ("contributor_groups", "null_model", "full_model", "pruned_model", "group_values",
                            "group_lds", "group_counterfactual")


def stale_condition() -> dg.AutomationCondition:
    """Re-materialize after an upstream asset or this asset's code version changed; never on mere absence (the
    first tick must not launch a whole experiment) and never while it or an upstream is running."""
    changed = dg.AutomationCondition.any_deps_updated() | dg.AutomationCondition.code_version_changed()
    return (changed.since_last_handled() & ~dg.AutomationCondition.any_deps_missing()
            & ~dg.AutomationCondition.any_deps_in_progress() & ~dg.AutomationCondition.in_progress()
            ).with_label("stale: upstream data or code changed")


def with_automation(exp: Experiment, assets: list) -> list:
    """Unpartitioned assets get the stale condition; partitioned fan-outs (hundreds of retrainings) are
    re-run deliberately, by a backfill."""
    if not exp.operations.automation:
        return assets
    return [a if a.partitions_def is not None else dg.map_asset_specs(
        lambda spec: spec.replace_attributes(automation_condition=stale_condition()), [a])[0] for a in assets]


def stage_jobs(exp: Experiment, assets: list) -> list:
    """One job per stage over the experiment's unpartitioned assets, plus one per partitioned fan-out."""
    unpartitioned = {a.key for a in assets if a.partitions_def is None}
    jobs = []
    groups = {k: spec.group_name for a in assets for spec in a.specs for k in [spec.key]}
    stages = {name: [k for k in unpartitioned if groups[k] in g] for name, g in STAGE_GROUPS.items()}
    stages["group_attribution"] = [k for k in unpartitioned if k.path[-1] in GROUP_ATTRIBUTION_ASSETS]
    stages["main"] = sorted(unpartitioned)
    for name, keys in stages.items():
        if keys:
            jobs.append(dg.define_asset_job(
                f"{exp.name}__{name}", selection=dg.AssetSelection.assets(*sorted(keys)),
                description=_JOB_TEXT.get(name, f"The {name} stage of '{exp.name}'.")))
    for a in assets:
        if a.partitions_def is not None:
            jobs.append(dg.define_asset_job(
                f"{exp.name}__{a.key.path[-1]}_job", selection=dg.AssetSelection.assets(a.key),
                description=f"Fan-out {a.key.to_user_string()}: launch a backfill over its partitions."))
    return jobs


_JOB_TEXT = {
    "main": "Every unpartitioned asset (the retraining fan-outs have jobs of their own; `make run` runs all of it).",
    "train": "Data and models: training set, base model, queries, encoder (and the group game's fixed models).",
    "features": "Per-sample gradient feature stores (resume from their completed shards).",
    "scores": "Attribution score matrices, top proponents, group values.",
    "evaluation": "LDS, counterfactual and group-LDS tables from the already retrained models.",
    "group_attribution": "Group attribution: contributor groups, null/full/pruned models, values, group LDS.",
}


def evaluation_schedule(exp: Experiment) -> dg.ScheduleDefinition:
    return dg.ScheduleDefinition(
        name=f"{exp.name}__evaluation_schedule", job_name=f"{exp.name}__evaluation",
        cron_schedule=exp.operations.evaluation_cron,
        default_status=dg.DefaultScheduleStatus.RUNNING if exp.operations.evaluation_schedule_running
        else dg.DefaultScheduleStatus.STOPPED,
        description=f"Re-runs the evaluation job of '{exp.name}' on '{exp.operations.evaluation_cron}' "
                    "(operations.evaluation_cron); stopped until switched on (operations.evaluation_schedule_running).")


def inbox_sensor(exp: Experiment) -> dg.SensorDefinition:
    from assets.common import key
    from assets.inbox import inbox_partitions

    target = key(exp, "inbox_attributions")
    partitions = inbox_partitions(exp)
    ops = exp.operations

    @dg.sensor(
        name=f"{exp.name}__inbox_sensor",
        minimum_interval_seconds=ops.inbox_interval_seconds,
        asset_selection=[target],
        default_status=dg.DefaultSensorStatus.RUNNING if ops.inbox_sensor_running else dg.DefaultSensorStatus.STOPPED,
        description=f"Watches <artefact root>/{exp.name}/inbox/ for PNG/JPEG/NPY images: valid ones become "
                    "partitions of inbox_attributions and are attributed; invalid ones are moved to inbox/rejected/ "
                    "with a .reason.txt.",
    )
    def sensor(context: dg.SensorEvaluationContext, storage: StorageResource):
        from storage.inbox import scan_inbox

        shape = training_shape(storage, exp.name)
        if shape is None:
            return dg.SkipReason(f"materialize {exp.name}/training_set first: the inbox needs the image shape")
        result = scan_inbox(storage.paths(exp.name), shape, ops.inbox_max_files)
        for name, reason in result.rejected:
            context.log.warning(f"inbox: rejected {name}: {reason} (moved to inbox/rejected/)")
        if not result.accepted:
            return dg.SkipReason(f"no new images ({len(result.rejected)} rejected)" if result.rejected
                                 else "no new images")
        context.log.info(f"inbox: {len(result.accepted)} new image(s): {result.accepted}")
        return dg.SensorResult(
            run_requests=[dg.RunRequest(run_key=k, partition_key=k, asset_selection=[target])
                          for k in result.accepted],
            dynamic_partitions_requests=[partitions.build_add_request(result.accepted)])

    return sensor


def training_shape(storage: StorageResource, experiment: str) -> tuple[int, int, int] | None:
    """(C, H, W) of the experiment's training images, from the warehouse (cheap: no image is loaded)."""
    import ast

    try:
        rows = storage.warehouse().query("SELECT shape FROM diffattr.datasets WHERE experiment = ? AND "
                                         "split = 'train'", [experiment])
    except Exception:  # noqa: BLE001 - no warehouse yet
        return None
    return tuple(ast.literal_eval(rows["shape"].iloc[0])) if len(rows) else None


@dg.run_failure_sensor(name="diffattr_run_failures", monitor_all_code_locations=False,
                       default_status=dg.DefaultSensorStatus.RUNNING,
                       description="Records every failed run (job, failed steps, error) in diffattr.run_failures.")
def run_failure_sensor(context: dg.RunFailureSensorContext, storage: StorageResource):
    record_run_failure(storage, context.dagster_run, context.failure_event, context.get_step_failure_events())


def record_run_failure(storage: StorageResource, run, failure_event, step_failures) -> None:
    import json

    from storage.warehouse import now

    message = failure_event.message if failure_event is not None else ""
    storage.warehouse().replace_rows("run_failures", [dict(
        experiment=run.tags.get("diffattr/experiment") or _experiment_of(run), run_id=run.run_id,
        job_name=run.job_name, failed_steps=json.dumps([e.step_key for e in step_failures]),
        message=(message or "")[:2000], created_at=now())], {"run_id": run.run_id})


def _experiment_of(run) -> str | None:
    selection = run.asset_selection or set()
    prefixes = {k.path[0] for k in selection if len(k.path) > 1}
    return prefixes.pop() if len(prefixes) == 1 else None


def automation_sensor() -> dg.AutomationConditionSensorDefinition:
    return dg.AutomationConditionSensorDefinition(
        "diffattr_automation", target=dg.AssetSelection.all(),
        default_status=dg.DefaultSensorStatus.STOPPED,
        description="Re-materializes stale assets (an upstream or the code changed) of every experiment; stopped "
                    "until switched on, so opening the UI never starts hours of work by itself.")
