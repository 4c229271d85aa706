"""Operating DiffAttr: the inbox sensor (good and bad files), inbox attribution against stored features, the
schedule, stale-asset automation, run-failure records and the SQL views."""
import io

import dagster as dg
import numpy as np
import pytest
from PIL import Image

from attribution.experiment import parse_experiment
from tests.conftest import materialized, tiny_experiment_dict

pytestmark = pytest.mark.slow


def ops_experiment():
    d = tiny_experiment_dict("ops")
    d["lds"] = {"enabled": False}
    d["counterfactual"] = {"enabled": False, "encoder_steps": 20}
    d["attribution"]["methods"] = {"dtrak": {"kind": "trak", "output": "square", "K": 2},
                                   "tracin": {"kind": "tracin", "K": 2, "noise_draws": 1, "checkpoints": [1, 2]},
                                   "pixel": {"kind": "pixel"}}
    return parse_experiment(d)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    exp = ops_experiment()
    with materialized(exp, tmp_path_factory) as (storage, instance, results):
        yield exp, storage, instance


def png_bytes(array: np.ndarray, mode: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def sensor_defs(exp, storage):
    from pipelines.definitions import build_definitions

    return build_definitions([exp], storage)


def test_inbox_sensor_accepts_good_files_and_rejects_bad_ones_without_crashing(run):
    from assets.inbox import inbox_partitions
    from storage.paths import local_path

    exp, storage, instance = run
    inbox = local_path(storage.paths(exp.name).inbox())
    defs = sensor_defs(exp, storage)
    sensor = next(s for s in defs.sensors if s.name == f"{exp.name}__inbox_sensor")
    import os

    os.makedirs(inbox, exist_ok=True)
    good = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
    open(f"{inbox}/seven.png", "wb").write(png_bytes(good, "L"))
    np.save(f"{inbox}/floaty.npy", np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 8, 8))
    open(f"{inbox}/big.png", "wb").write(png_bytes(np.zeros((16, 16), np.uint8), "L"))
    open(f"{inbox}/colour.png", "wb").write(png_bytes(np.zeros((8, 8, 3), np.uint8), "RGB"))
    np.save(f"{inbox}/range.npy", np.full((1, 8, 8), 3.0, np.float32))
    open(f"{inbox}/notes.txt", "w").write("hello")
    open(f"{inbox}/broken.png", "wb").write(b"\x89PNG not really")

    with dg.build_sensor_context(instance=instance, resources={"storage": storage}, definitions=defs) as ctx:
        result = sensor(ctx)
    keys = sorted(r.partition_key for r in result.run_requests)
    assert len(keys) == 2 and keys[0].startswith("floaty-") and keys[1].startswith("seven-")
    assert result.dynamic_partitions_requests[0].partition_keys == sorted(keys) or \
        sorted(result.dynamic_partitions_requests[0].partition_keys) == keys
    rejected = sorted(os.listdir(f"{inbox}/rejected"))
    assert rejected == sorted([*(f"{n}" for n in ("big.png", "broken.png", "colour.png", "notes.txt", "range.npy")),
                               *(f"{n}.reason.txt" for n in ("big.png", "broken.png", "colour.png", "notes.txt",
                                                             "range.npy"))])
    reasons = {n: open(f"{inbox}/rejected/{n}.reason.txt").read() for n in ("big.png", "colour.png", "range.npy")}
    assert "16x16" in reasons["big.png"] and "8x8" in reasons["big.png"]
    assert "3 channel" in reasons["colour.png"] and "[-1, 1]" in reasons["range.npy"]
    assert sorted(os.listdir(f"{inbox}/processed")) == ["floaty.npy", "seven.png"]
    assert [f for f in os.listdir(inbox) if os.path.isfile(f"{inbox}/{f}")] == []

    # a second tick sees nothing new and stays healthy
    with dg.build_sensor_context(instance=instance, resources={"storage": storage}, definitions=defs) as ctx:
        again = sensor(ctx)
    assert isinstance(again, dg.SkipReason)

    # the accepted images attribute against the stored features; rows land in the shared table
    instance.add_dynamic_partitions(inbox_partitions(exp).name, keys)
    from pipelines.definitions import experiment_assets

    for k in keys:
        res = dg.materialize(experiment_assets(exp), selection=[dg.AssetKey([exp.name, "inbox_attributions"])],
                             partition_key=k, instance=instance, resources={"storage": storage})
        assert res.success
    rows = storage.warehouse().query("SELECT * FROM diffattr.v_top_proponents WHERE experiment = ? AND "
                                     "query_kind = 'inbox'", [exp.name])
    assert set(rows.query_key) == set(keys) and set(rows.method) == {"dtrak", "tracin", "pixel"}
    assert len(rows) == 2 * 3 * exp.attribution.top_k


def test_inbox_scores_equal_the_query_set_scores_for_a_query_image(run):
    """An inbox image identical to a held-out query gets the same D-TRAK and pixel scores (common noise, same
    projection); TracIn's per-sample noise differs by design, so it is checked against its own recomputation."""
    from assets.inbox import fresh_query_features
    from assets.scores import compute_scores
    from storage.artefacts import load_arrays
    from storage.datasets import load_image_dataset
    from storage.scores import load_scores

    exp, storage, _ = run
    paths = storage.paths(exp.name)
    qs = load_arrays(paths.dataset("query_set"))[0]
    train, _ = load_image_dataset(paths.dataset("train_images"))
    q = int(np.flatnonzero(qs["kind"] == "heldout")[0])
    queries = {"images": qs["images"][q:q + 1], "kind": np.array(["inbox"]),
               "trajectory_x0": np.zeros((0, 0, 1, 8, 8), np.float32),
               "trajectory_timesteps": qs["trajectory_timesteps"]}
    for name in ("dtrak", "pixel"):
        method = exp.attribution.methods[name]
        fresh = fresh_query_features(exp, paths, name, method, queries, np.array([-1 - q]))
        got = compute_scores(paths, "base_model", name, method, exp.attribution.lambda_factor, train, queries,
                             fresh)[0]["scores"]
        stored = load_scores(paths.scores(name))[0]["scores"][q]
        np.testing.assert_allclose(got[0], stored, rtol=1e-4, atol=1e-6 * np.abs(stored).max())


def test_automation_marks_downstream_stale_after_an_upstream_change(tmp_path):
    from pipelines.definitions import experiment_assets
    from storage.resources import StorageResource

    d = tiny_experiment_dict("auto")
    d["lds"] = {"enabled": False}
    d["counterfactual"] = {"enabled": False, "encoder_steps": 20}
    d["attribution"]["methods"] = {"pixel": {"kind": "pixel"}}
    exp = parse_experiment(d)
    assets = experiment_assets(exp)
    storage = StorageResource(root=str(tmp_path))
    keys = [dg.AssetKey(["auto", n]) for n in ("training_set", "base_model", "query_set", "scores_pixel")]
    defs = dg.Definitions(assets=assets, resources={"storage": storage})
    with dg.instance_for_test() as instance:
        assert dg.materialize(assets, selection=keys, instance=instance, resources={"storage": storage}).success
        first = dg.evaluate_automation_conditions(defs=defs, instance=instance,
                                                  asset_selection=dg.AssetSelection.assets(*keys))
        assert first.total_requested == 0  # nothing changed: the first tick starts nothing
        assert dg.materialize(assets, selection=keys[:1], instance=instance, resources={"storage": storage}).success
        second = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=first.cursor,
                                                   asset_selection=dg.AssetSelection.assets(*keys))
        requested = {k for k in keys if second.get_num_requested(k)}
        assert dg.AssetKey(["auto", "base_model"]) in requested and dg.AssetKey(["auto", "query_set"]) in requested
        assert dg.AssetKey(["auto", "training_set"]) not in requested


def test_run_failures_are_recorded(tmp_path):
    from pipelines.operations import record_run_failure
    from storage.resources import StorageResource

    storage = StorageResource(root=str(tmp_path))

    class Run:
        run_id, job_name, tags, asset_selection = "r1", "x__main", {"diffattr/experiment": "x"}, None

    class Step:
        step_key = "x__base_model"

    class Failure:
        message = "boom"

    record_run_failure(storage, Run(), Failure(), [Step()])
    record_run_failure(storage, Run(), Failure(), [Step()])  # idempotent per run
    rows = storage.warehouse().query("SELECT * FROM diffattr.v_run_failures")
    assert len(rows) == 1 and rows.experiment[0] == "x" and "x__base_model" in rows.failed_steps[0]


def test_views_expose_the_tables(run):
    exp, storage, _ = run
    wh = storage.warehouse()
    top = wh.query("SELECT count(*) AS n FROM diffattr.v_top_proponents WHERE experiment = ? AND query_key IS NULL",
                   [exp.name]).n[0]
    base = wh.query("SELECT count(*) AS n FROM diffattr.top_attributions WHERE experiment = ? AND "
                    "direction = 'proponent' AND query_key IS NULL", [exp.name]).n[0]
    assert top == base > 0
    lineage = wh.query("SELECT asset_key, partition_key, count(*) FILTER (WHERE is_latest) AS latest FROM "
                       "diffattr.v_lineage WHERE experiment = ? GROUP BY ALL", [exp.name])
    assert (lineage.latest == 1).all() and "ops/base_model" in set(lineage.asset_key)
    for view in ("v_lds", "v_group_values", "v_group_lds", "v_coalition_cost"):
        wh.query(f"SELECT * FROM diffattr.{view} LIMIT 1")


def test_sql_cli_reads_while_no_writer(run, capsys):
    from storage.warehouse import main

    exp, storage, _ = run
    assert main(["SELECT count(*) AS n FROM diffattr.datasets", "--db", str(storage.warehouse().path)]) == 0
    assert "n" in capsys.readouterr().out
