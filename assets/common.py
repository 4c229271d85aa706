"""What every DiffAttr asset does on the way out: lineage row, data version, metadata people can read."""
from __future__ import annotations

import base64
import hashlib

import dagster as dg

from attribution.experiment import Experiment

DATA_VERSION_TAG = "dagster/data_version"

# Dagster concurrency pools, limited by the instance across all runs (dagster.yaml `concurrency: pools:
# default_limit`, or per pool: `dagster instance concurrency set diffattr_accelerator 1` on a one-GPU machine):
# steps that train, sample or differentiate models, and steps whose output is mainly warehouse tables. Every other
# warehouse write is a short transaction serialized by storage.warehouse's file lock.
ACCELERATOR_POOL = "diffattr_accelerator"
WAREHOUSE_POOL = "diffattr_warehouse"


def key(exp: Experiment, name: str) -> dg.AssetKey:
    return dg.AssetKey([exp.name, name])


def code_version(base: str, exp: Experiment, *sections: str) -> str:
    """The asset's logic version plus a hash of the experiment sections it reads: editing those marks it stale."""
    return f"{base}-{hashlib.sha256(exp.section_json(*sections).encode()).hexdigest()[:12]}"


def upstream_data_versions(context: dg.AssetExecutionContext) -> dict[str, str | None]:
    """Data versions of the latest materialization of each upstream asset (what this one was computed from); for a
    partitioned upstream, a digest over every partition's latest version ("<n> partitions:<sha256 prefix>")."""
    versions = {}
    for dep in sorted(context.assets_def.asset_deps[context.asset_key], key=lambda k: k.to_user_string()):
        partitions = context.instance.get_materialized_partitions(dep)
        if partitions:
            versions[dep.to_user_string()] = _partitions_version(context.instance, dep, partitions)
            continue
        event = context.instance.get_latest_materialization_event(dep)
        tags = event.asset_materialization.tags if event and event.asset_materialization else {}
        versions[dep.to_user_string()] = (tags or {}).get(DATA_VERSION_TAG)
    return versions


def _partitions_version(instance, dep: dg.AssetKey, partitions: set) -> str:
    latest: dict[str, str | None] = {}
    cursor = None
    while True:  # records come newest first: the first seen per partition is its latest
        page = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=dep), limit=1000, cursor=cursor)
        for record in page.records:
            mat = record.asset_materialization
            if mat.partition not in latest:
                latest[mat.partition] = (mat.tags or {}).get(DATA_VERSION_TAG)
        if not page.has_more:
            break
        cursor = page.cursor
    joined = "|".join(f"{p}={latest.get(p)}" for p in sorted(partitions))
    return f"{len(partitions)} partitions:{hashlib.sha256(joined.encode()).hexdigest()[:16]}"


def png_markdown(png: bytes, alt: str) -> dg.MetadataValue:
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})")


def finish(context: dg.AssetExecutionContext, storage, exp: Experiment, data_version: str,
           metadata: dict) -> dg.MaterializeResult:
    """Record lineage in the warehouse and return the materialization with its data version."""
    storage.warehouse().record_lineage(
        run_id=context.run.run_id,
        asset_key=context.asset_key.to_user_string(),
        partition_key=context.partition_key if context.has_partition_key else None,
        code_version=context.assets_def.code_versions_by_key.get(context.asset_key),
        data_version=data_version,
        input_data_versions=upstream_data_versions(context),
        experiment=exp.name,
    )
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(data_version))


def setup_torch(exp: Experiment) -> str:
    """Per-step torch set-up (threads, device); returns the device to use."""
    from attribution.runtime import configure_torch, resolve_device

    configure_torch(exp.torch_threads)
    return resolve_device(exp.device)
