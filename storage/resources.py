"""The one Dagster resource: where artefacts and the warehouse live. Chosen per environment in pipelines/."""
from __future__ import annotations

import os

import dagster as dg

from .paths import ExperimentPaths, default_root, is_local, join, local_path
from .warehouse import Warehouse


class StorageResource(dg.ConfigurableResource):
    """Artefact root (local dir or fsspec URL) and the DuckDB warehouse file (always local: DuckDB needs a file)."""

    root: str = default_root()
    warehouse_path: str = os.environ.get("DIFFATTR_WAREHOUSE", "")

    def paths(self, experiment: str) -> ExperimentPaths:
        return ExperimentPaths(self.root, experiment)

    def warehouse(self) -> Warehouse:
        if self.warehouse_path:
            return Warehouse(self.warehouse_path)
        if not is_local(self.root):
            raise ValueError(f"artefact root {self.root} is remote: set the storage resource's warehouse_path to a "
                             "local .duckdb file")
        return Warehouse(local_path(join(self.root, "warehouse.duckdb")))
