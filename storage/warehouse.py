"""The DuckDB warehouse: every metric table, with lineage, queryable with plain SQL.

DuckDB allows one read-write process at a time, so every write runs in a short connection under a cross-process
file lock; no caller holds a connection across a long computation. Tables live in schema `diffattr` (never named
after the database file's stem, which makes `<stem>.table` ambiguous).
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

SCHEMA = "diffattr"

# One DDL per table; later stages add theirs here so the schema has a single home.
TABLES: dict[str, str] = {
    "lineage": """
        run_id VARCHAR, asset_key VARCHAR, partition_key VARCHAR, code_version VARCHAR, data_version VARCHAR,
        input_data_versions JSON, experiment VARCHAR, created_at TIMESTAMPTZ""",
    "training_runs": """
        experiment VARCHAR, model VARCHAR, partition_key VARCHAR, n_train INTEGER, steps INTEGER, batch_size INTEGER,
        parameters BIGINT, final_loss DOUBLE, wall_seconds DOUBLE, digest VARCHAR, run_id VARCHAR,
        created_at TIMESTAMPTZ""",
    "datasets": """
        experiment VARCHAR, dataset VARCHAR, split VARCHAR, n_images INTEGER, shape VARCHAR, n_groups INTEGER,
        content_hash VARCHAR, run_id VARCHAR, created_at TIMESTAMPTZ""",
    "feature_stores": """
        experiment VARCHAR, method VARCHAR, store VARCHAR, role VARCHAR, checkpoint INTEGER, n_rows INTEGER,
        dim INTEGER, num_params BIGINT, projector VARCHAR, shards_total INTEGER, shards_computed INTEGER,
        wall_seconds DOUBLE, sample_timesteps_per_s DOUBLE, digest VARCHAR, url VARCHAR, run_id VARCHAR,
        created_at TIMESTAMPTZ""",
    "top_attributions": """
        experiment VARCHAR, method VARCHAR, query_id INTEGER, query_kind VARCHAR, direction VARCHAR, rank INTEGER,
        train_id INTEGER, train_group VARCHAR, score DOUBLE, run_id VARCHAR, created_at TIMESTAMPTZ,
        query_key VARCHAR""",
    "attribution_runs": """
        experiment VARCHAR, method VARCHAR, kind VARCHAR, scorer VARCHAR, kernel_lambda DOUBLE, n_queries INTEGER,
        n_train INTEGER, top_k INTEGER, unique_in_top_k INTEGER, top_k_slots INTEGER, max_top_k_frequency DOUBLE,
        most_frequent JSON, url VARCHAR, run_id VARCHAR, created_at TIMESTAMPTZ""",
    "model_outputs": """
        experiment VARCHAR, subset INTEGER, seed INTEGER, query_id INTEGER, query_kind VARCHAR, output DOUBLE,
        run_id VARCHAR, created_at TIMESTAMPTZ""",
    "lds": """
        experiment VARCHAR, method VARCHAR, kind VARCHAR, spec JSON, kernel_lambda DOUBLE, query_set VARCHAR,
        value DOUBLE, ci_low DOUBLE, ci_high DOUBLE, noise_ceiling DOUBLE, n_subsets INTEGER, n_queries INTEGER,
        n_seeds INTEGER, run_id VARCHAR, created_at TIMESTAMPTZ""",
    "counterfactual": """
        experiment VARCHAR, method VARCHAR, query_id INTEGER, removed INTEGER, pixel_l2 DOUBLE,
        embedding_cosine DOUBLE, run_id VARCHAR, created_at TIMESTAMPTZ""",
    "lds_lambda_sweep": """
        experiment VARCHAR, method VARCHAR, kernel_lambda DOUBLE, lambda_factor DOUBLE, selection_lds DOUBLE,
        run_id VARCHAR, created_at TIMESTAMPTZ""",
    "coalition_runs": """
        experiment VARCHAR, method VARCHAR, coalition VARCHAR, purpose VARCHAR, n_groups INTEGER, n_train INTEGER,
        steps INTEGER, parameters BIGINT, wall_seconds DOUBLE, property VARCHAR, value DOUBLE, run_id VARCHAR,
        created_at TIMESTAMPTZ""",
    "group_values": """
        experiment VARCHAR, property VARCHAR, estimator VARCHAR, method VARCHAR, group_name VARCHAR, value DOUBLE,
        ci_low DOUBLE, ci_high DOUBLE, rank INTEGER, n_coalitions INTEGER, run_id VARCHAR, created_at TIMESTAMPTZ""",
    "shapley_convergence": """
        experiment VARCHAR, property VARCHAR, method VARCHAR, n_coalitions INTEGER, group_name VARCHAR, value DOUBLE,
        run_id VARCHAR, created_at TIMESTAMPTZ""",
    "group_lds": """
        experiment VARCHAR, property VARCHAR, estimator VARCHAR, value DOUBLE, ci_low DOUBLE, ci_high DOUBLE,
        n_coalitions INTEGER, run_id VARCHAR, created_at TIMESTAMPTZ""",
    "group_counterfactual": """
        experiment VARCHAR, estimator VARCHAR, removed VARCHAR, groups_removed JSON, n_train INTEGER, property VARCHAR,
        value DOUBLE, full_value DOUBLE, change DOUBLE, run_id VARCHAR, created_at TIMESTAMPTZ""",
    "run_failures": """
        experiment VARCHAR, run_id VARCHAR, job_name VARCHAR, failed_steps JSON, message VARCHAR,
        created_at TIMESTAMPTZ""",
}

# Stable, documented read interface (README "Query the results with SQL"): tables may gain columns, views keep theirs.
VIEWS: dict[str, str] = {
    "v_lds": f"""
        SELECT experiment, method, kind, query_set, value AS lds, ci_low, ci_high, noise_ceiling, kernel_lambda,
               n_subsets, n_queries, n_seeds, run_id, created_at
        FROM {SCHEMA}.lds""",
    "v_top_proponents": f"""
        SELECT experiment, method, query_id, query_key, query_kind, rank, train_id, train_group, score, run_id,
               created_at
        FROM {SCHEMA}.top_attributions WHERE direction = 'proponent'""",
    "v_group_values": f"""
        SELECT experiment, property, estimator, method, group_name, value, ci_low, ci_high, rank, n_coalitions,
               run_id, created_at
        FROM {SCHEMA}.group_values""",
    "v_group_lds": f"""
        SELECT experiment, property, estimator, value AS group_lds, ci_low, ci_high, n_coalitions, run_id, created_at
        FROM {SCHEMA}.group_lds""",
    "v_coalition_cost": f"""
        WITH per_model AS (
            SELECT DISTINCT experiment, method, coalition, purpose, steps, parameters, wall_seconds
            FROM {SCHEMA}.coalition_runs WHERE purpose NOT IN ('null', 'pruned', 'full'))
        SELECT experiment, method, count(*) AS models, avg(steps) AS steps, max(parameters) AS parameters,
               avg(wall_seconds) AS mean_wall_seconds,
               avg(avg(wall_seconds)) FILTER (WHERE method = 'retrain') OVER (PARTITION BY experiment)
                   / avg(wall_seconds) AS speedup_vs_retrain
        FROM per_model GROUP BY experiment, method""",
    "v_lineage": f"""
        SELECT experiment, asset_key, partition_key, run_id, code_version, data_version, input_data_versions,
               created_at,
               row_number() OVER (PARTITION BY experiment, asset_key, partition_key ORDER BY created_at DESC) = 1
                   AS is_latest
        FROM {SCHEMA}.lineage""",
    "v_run_failures": f"""
        SELECT experiment, run_id, job_name, failed_steps, message, created_at FROM {SCHEMA}.run_failures""",
}


class Warehouse:
    def __init__(self, path: str | Path, lock_timeout: float = 600.0):
        self.path = Path(path)
        self.lock_timeout = lock_timeout

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    @contextmanager
    def connect(self, write: bool = True) -> Iterator["object"]:
        """A short-lived connection under the writers' lock; readers take it too so they never meet a writer."""
        import duckdb
        from filelock import FileLock

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.lock_path), timeout=self.lock_timeout):
            if not write and not self.path.exists():
                write = True  # first use: create the schema
            con = self._open(duckdb, write)
            try:
                if write:
                    self._ensure_schema(con)
                yield con
            finally:
                con.close()

    def _open(self, duckdb, write: bool):
        """DuckDB's own file lock also sees processes outside ours (a `duckdb -readonly` shell, a notebook): wait for
        them, retrying, instead of failing a materialization."""
        import time

        deadline = time.monotonic() + self.lock_timeout
        delay = 0.05
        while True:
            try:
                return duckdb.connect(str(self.path), read_only=not write)
            except duckdb.IOException as e:
                if "lock" not in str(e).lower() or time.monotonic() > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    @staticmethod
    def _ensure_schema(con) -> None:
        """Create what is missing; columns added to a table's DDL later are added to an older warehouse (at the
        end, where the DDL lists them), so upgrading never needs a rebuild."""
        con.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
        for name, cols in TABLES.items():
            con.execute(f"CREATE TABLE IF NOT EXISTS {SCHEMA}.{name} ({cols})")
            have = {r[0] for r in con.execute("SELECT column_name FROM information_schema.columns WHERE "
                                              "table_schema = ? AND table_name = ?", [SCHEMA, name]).fetchall()}
            for column in (c.strip() for c in cols.split(",")):
                col_name = column.split()[0]
                if col_name not in have:
                    con.execute(f"ALTER TABLE {SCHEMA}.{name} ADD COLUMN {column}")
        for name, sql in VIEWS.items():
            con.execute(f"CREATE OR REPLACE VIEW {SCHEMA}.{name} AS {sql}")

    def replace_rows(self, table: str, rows: "object", match: dict) -> int:
        """Idempotent write: delete the rows equal on `match` (e.g. experiment + model), then insert `rows`.

        `rows` is a pandas DataFrame or a list of dicts; columns must be the table's (missing ones become NULL).
        """
        import pandas as pd

        df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
        if table not in TABLES:
            raise KeyError(f"unknown warehouse table {table!r}; known: {sorted(TABLES)}")
        with self.connect() as con:
            cols = [r[0] for r in con.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_schema=? AND table_name=? "
                "ORDER BY ordinal_position", [SCHEMA, table]).fetchall()]
            unknown = set(df.columns) - set(cols)
            if unknown:
                raise KeyError(f"columns {sorted(unknown)} are not in {SCHEMA}.{table} ({cols})")
            con.execute("BEGIN")
            if match:
                where = " AND ".join(f"{k} IS NOT DISTINCT FROM ?" for k in match)
                con.execute(f"DELETE FROM {SCHEMA}.{table} WHERE {where}", list(match.values()))
            if len(df):
                con.register("incoming", df)
                select = ", ".join(c if c in df.columns else f"NULL AS {c}" for c in cols)
                con.execute(f"INSERT INTO {SCHEMA}.{table} SELECT {select} FROM incoming")
                con.unregister("incoming")
            con.execute("COMMIT")
        return len(df)

    def record_lineage(self, *, run_id: str, asset_key: str, partition_key: str | None, code_version: str | None,
                       data_version: str | None, input_data_versions: dict, experiment: str) -> None:
        row = dict(run_id=run_id, asset_key=asset_key, partition_key=partition_key, code_version=code_version,
                   data_version=data_version, input_data_versions=json.dumps(input_data_versions, sort_keys=True),
                   experiment=experiment, created_at=now())
        with self.connect() as con:
            con.execute(f"INSERT INTO {SCHEMA}.lineage VALUES (?, ?, ?, ?, ?, ?, ?, ?)", list(row.values()))

    def query(self, sql: str, params: list | None = None):
        """Read-only SQL -> DataFrame; tables are addressed as diffattr.<table>."""
        with self.connect(write=False) as con:
            return con.execute(sql, params or []).df()

    def export_parquet(self, root: str) -> list[str]:
        """Every table as <root>/warehouse/<table>.parquet, root any fsspec URL: the metric tables travel with the
        artefacts (object storage), and query_exports reads them back with DuckDB from there."""
        import io

        from .artefacts import write_bytes
        from .paths import join

        urls = []
        for table in TABLES:
            buf = io.BytesIO()
            self.query(f"SELECT * FROM {SCHEMA}.{table}").to_parquet(buf, index=False)
            urls.append(join(root, "warehouse", f"{table}.parquet"))
            write_bytes(urls[-1], buf.getvalue())
        return urls


def query_exports(root: str, sql: str):
    """Run `sql` against the parquet exports under <root>/warehouse/ (tables addressed as diffattr.<table>) in an
    in-memory DuckDB that reads them through fsspec: no local warehouse file needed."""
    import duckdb

    from .paths import filesystem, join

    fs, _ = filesystem(root)
    con = duckdb.connect()
    try:
        con.register_filesystem(fs)
        con.execute(f"CREATE SCHEMA {SCHEMA}")
        for table in TABLES:
            url = join(root, "warehouse", f"{table}.parquet")
            if fs.exists(filesystem(url)[1]):
                con.execute(f"CREATE VIEW {SCHEMA}.{table} AS SELECT * FROM read_parquet('{url}')")
        return con.execute(sql).df()
    finally:
        con.close()


def now() -> datetime:
    return datetime.now(timezone.utc)


def main(argv: list[str] | None = None) -> int:
    """`python -m storage.warehouse "SELECT ..." [--db artefacts/warehouse.duckdb]`: a read-only query that waits
    for a writer's short transaction instead of failing on DuckDB's file lock."""
    import argparse

    import pandas as pd

    from .paths import default_root, join, local_path

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("sql")
    parser.add_argument("--db", default=local_path(join(default_root(), "warehouse.duckdb")))
    args = parser.parse_args(argv)
    if not Path(args.db).exists():
        print(f"no warehouse at {args.db}: run `make run` first, or pass --db", flush=True)
        return 2
    with pd.option_context("display.max_rows", 200, "display.width", 200):
        print(Warehouse(args.db).query(args.sql).to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
