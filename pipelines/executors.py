"""Where steps run, chosen per deployment (not per experiment: the same experiment runs anywhere unchanged).

DIFFATTR_EXECUTOR=multiprocess (default): one process per step, at most CPU count / torch threads at a time.
DIFFATTR_EXECUTOR=dask with DIFFATTR_DASK_ADDRESS=tcp://scheduler:8786: steps run on a dask.distributed cluster
(dagster-dask); every worker needs this repository installed and the same DIFFATTR_ROOT (an fsspec URL all of them
can reach, e.g. s3://bucket/diffattr) and DIFFATTR_WAREHOUSE (a DuckDB file on the machine that runs the steps'
writes, see README "Scale-out").
Kubernetes: see deploy/k8s/ (dagster-k8s's k8s_job_executor with GPU requests for training and feature steps).
"""
from __future__ import annotations

import os

EXECUTOR_ENV = "DIFFATTR_EXECUTOR"
DASK_ADDRESS_ENV = "DIFFATTR_DASK_ADDRESS"


def executor_from_env(environ=os.environ):
    import dagster as dg

    kind = environ.get(EXECUTOR_ENV, "multiprocess")
    if kind == "multiprocess":
        threads = int(environ.get("OMP_NUM_THREADS", "1") or 1)
        return dg.multiprocess_executor.configured({"max_concurrent": max(1, (os.cpu_count() or 1) // threads)})
    if kind == "dask":
        address = environ.get(DASK_ADDRESS_ENV)
        if not address:
            raise ValueError(f"{EXECUTOR_ENV}=dask needs {DASK_ADDRESS_ENV}=tcp://<scheduler>:8786")
        return dask_executor(address)
    raise ValueError(f"{EXECUTOR_ENV}={kind!r}: choose 'multiprocess' or 'dask' (Kubernetes: see deploy/k8s/)")


def dask_executor(address: str):
    from dagster_dask import dask_executor as executor

    return executor.configured({"cluster": {"existing": {"address": address}}})


def without_pools(assets: list) -> list:
    """Drop the concurrency pools of freshly built assets run by the Dask executor: dagster-dask 0.29.27 passes the
    run through dask's task-spec parser, which iterates the run's pool record (RunOpConcurrency) and fails ("Iteration
    is not allowed on `@record`"). Dask's own worker resources then govern concurrency. OpDefinition has no public
    setter for its pool, hence the private attribute; the assets must be this job's own objects."""
    for a in assets:
        a.op._pool = None
    return assets


def uses_dask(environ=os.environ) -> bool:
    return environ.get(EXECUTOR_ENV, "multiprocess") == "dask"


def experiment_job(experiment_file: str, job_name: str, root: str, warehouse_path: str, dask_address: str):
    """A job of one experiment on a Dask cluster, rebuilt from plain arguments in every worker (the reconstructable
    form dagster-dask needs: dg.build_reconstructable_job("pipelines.executors", "experiment_job", args))."""
    import dagster as dg

    from attribution.experiment import load_experiment
    from storage.resources import StorageResource

    from .definitions import experiment_assets, experiment_checks
    from .operations import stage_jobs

    exp = load_experiment(experiment_file)
    assets = without_pools(experiment_assets(exp))
    jobs = [j for j in stage_jobs(exp, assets) if j.name == job_name]
    if not jobs:
        raise ValueError(f"experiment {exp.name} has no job {job_name}")
    defs = dg.Definitions(assets=assets, asset_checks=experiment_checks(exp), jobs=jobs,
                          resources={"storage": StorageResource(root=root, warehouse_path=warehouse_path)},
                          executor=dask_executor(dask_address))
    return defs.get_job_def(job_name)
