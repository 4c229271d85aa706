import json
import multiprocessing as mp

import duckdb
import pytest

from storage.warehouse import SCHEMA, Warehouse


def test_lineage_rows_and_schema(tmp_path):
    wh = Warehouse(tmp_path / "metrics.duckdb")  # a file stem that could clash with a schema name
    wh.record_lineage(run_id="r1", asset_key="digits/base_model", partition_key=None, code_version="1-abc",
                      data_version="d1", input_data_versions={"digits/training_set": "h1"}, experiment="digits")
    df = wh.query(f"SELECT * FROM {SCHEMA}.lineage")
    assert len(df) == 1
    row = df.iloc[0]
    assert (row.run_id, row.asset_key, row.code_version, row.data_version) == ("r1", "digits/base_model", "1-abc", "d1")
    assert json.loads(row.input_data_versions) == {"digits/training_set": "h1"}
    assert row.created_at is not None


def test_replace_rows_is_idempotent_and_checks_columns(tmp_path):
    wh = Warehouse(tmp_path / "w.duckdb")
    rows = [dict(experiment="e", dataset="digits", split=s, n_images=n) for s, n in (("train", 3), ("heldout", 2))]
    wh.replace_rows("datasets", rows, {"experiment": "e"})
    wh.replace_rows("datasets", rows, {"experiment": "e"})
    wh.replace_rows("datasets", [dict(experiment="f", split="train", n_images=9)], {"experiment": "f"})
    df = wh.query(f"SELECT experiment, split, n_images, shape FROM {SCHEMA}.datasets ORDER BY experiment, split")
    assert df.values.tolist() == [["e", "heldout", 2, None], ["e", "train", 3, None], ["f", "train", 9, None]]
    with pytest.raises(KeyError, match="bogus"):
        wh.replace_rows("datasets", [dict(experiment="e", bogus=1)], {"experiment": "e"})
    with pytest.raises(KeyError, match="unknown warehouse table"):
        wh.replace_rows("nope", [], {})


def _writer(path, worker, n):
    wh = Warehouse(path)
    for i in range(n):
        wh.record_lineage(run_id=f"w{worker}-{i}", asset_key="a", partition_key=str(i), code_version=None,
                          data_version=None, input_data_versions={}, experiment="e")
        wh.replace_rows("datasets", [dict(experiment="e", split=f"w{worker}", n_images=i)],
                        {"experiment": "e", "split": f"w{worker}"})


def test_concurrent_writers_never_fail_on_the_lock(tmp_path):
    path = str(tmp_path / "w.duckdb")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, w, 15)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    wh = Warehouse(path)
    assert wh.query(f"SELECT count(*) AS n FROM {SCHEMA}.lineage").n[0] == 60
    final = wh.query(f"SELECT split, n_images FROM {SCHEMA}.datasets ORDER BY split").values.tolist()
    assert final == [[f"w{w}", 14] for w in range(4)]


def test_unserialized_second_writer_would_fail(tmp_path):
    """Why the lock exists: DuckDB refuses a second read-write process on the same file."""
    path = tmp_path / "w.duckdb"
    Warehouse(path).query("SELECT 1")
    con = duckdb.connect(str(path))
    try:
        ctx = mp.get_context("spawn")
        with ctx.Pool(1) as pool:
            ok = pool.apply(_try_connect, (str(path),))
        assert ok is False
    finally:
        con.close()


def _try_connect(path):
    try:
        duckdb.connect(path).close()
        return True
    except duckdb.IOException:
        return False


def test_writer_waits_for_an_outside_reader_to_close(tmp_path):
    """A `duckdb -readonly` shell holding the file delays a write instead of failing it."""
    import subprocess
    import sys
    import time

    from storage.warehouse import Warehouse

    wh = Warehouse(tmp_path / "w.duckdb")
    wh.replace_rows("datasets", [{"experiment": "a", "split": "train"}], {"experiment": "a"})
    code = ("import duckdb, time; c = duckdb.connect(%r, read_only=True); print('open', flush=True); "
            "time.sleep(3); c.close()" % str(wh.path))
    reader = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert reader.stdout.readline().strip() == "open"
    start = time.monotonic()
    wh.replace_rows("datasets", [{"experiment": "b", "split": "train"}], {"experiment": "b"})
    waited = time.monotonic() - start
    reader.wait(timeout=30)
    assert waited > 1.0
    assert sorted(wh.query("SELECT experiment FROM diffattr.datasets").experiment) == ["a", "b"]


def test_parquet_exports_round_trip_through_a_remote_root(tmp_path):
    from storage.warehouse import Warehouse, query_exports

    wh = Warehouse(tmp_path / "w.duckdb")
    wh.replace_rows("lds", [{"experiment": "e", "method": m, "query_set": "heldout", "value": v}
                            for m, v in (("dtrak", 0.3), ("trak", 0.4))], {"experiment": "e"})
    root = f"memory://exports-{tmp_path.name}"
    urls = wh.export_parquet(root)
    assert any(u.endswith("/warehouse/lds.parquet") for u in urls)
    got = query_exports(root, "SELECT method, value FROM diffattr.lds ORDER BY value DESC")
    assert got.method.tolist() == ["trak", "dtrak"] and got.value.tolist() == [0.4, 0.3]
