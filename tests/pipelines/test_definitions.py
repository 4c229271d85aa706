import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import numpy as np
import pytest

from assets.common import ACCELERATOR_POOL, WAREHOUSE_POOL
from attribution.experiment import ExperimentError, parse_experiment
from pipelines.definitions import build_definitions
from pipelines.experiments import load_experiments
from pipelines.run import materialize_experiment, summary
from storage.datasets import load_image_dataset
from storage.models import StoredModel
from tests.conftest import materialization_events, tiny_experiment_dict

ROOT = Path(__file__).resolve().parents[2]


def test_dagster_cli_validates_the_workspace():
    env = {**os.environ, "DAGSTER_HOME": ""}
    env.pop("DAGSTER_HOME")
    out = subprocess.run([str(Path(sys.executable).parent / "dagster"), "definitions", "validate", "-w",
                          "workspace.yaml"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Validation successful" in out.stdout + out.stderr


def test_definitions_module_does_not_import_torch():
    code = "import sys, pipelines.definitions; print('torch' in sys.modules, 'diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "False"], out.stderr


def test_one_prefixed_graph_per_experiment():
    a = parse_experiment(tiny_experiment_dict("alpha"))
    b = parse_experiment(tiny_experiment_dict("beta"))
    defs = build_definitions([a, b])
    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    names = ("training_set", "base_model", "query_set", "features_dtrak", "scores_dtrak", "scores_pixel",
             "lds_subsets", "subset_models", "model_outputs", "lds", "image_encoder", "counterfactual_models",
             "counterfactual", "inbox_attributions")
    assert keys == {f"{e}/{n}" for e in ("alpha", "beta") for n in names}
    for k in graph.get_all_asset_keys():
        node = graph.get(k)
        assert node.group_name in {"data", "models", "features", "attribution", "evaluation"} and node.description
    assert graph.get(dg.AssetKey(["alpha", "scores_pixel"])).parent_keys == {
        dg.AssetKey(["alpha", "query_set"]), dg.AssetKey(["alpha", "training_set"])}
    assert graph.get(dg.AssetKey(["alpha", "query_set"])).parent_keys == {
        dg.AssetKey(["alpha", "base_model"]), dg.AssetKey(["alpha", "training_set"])}
    assert {j.name for j in defs.jobs} == {f"{e}__{j}" for e in ("alpha", "beta") for j in (
        "main", "train", "features", "scores", "evaluation", "subset_models_job", "counterfactual_models_job",
        "inbox_attributions_job")}
    assert {s.name for s in defs.schedules} == {"alpha__evaluation_schedule", "beta__evaluation_schedule"}
    assert all(s.default_status == dg.DefaultScheduleStatus.STOPPED for s in defs.schedules)
    assert {s.cron_schedule for s in defs.schedules} == {a.operations.evaluation_cron}
    assert {s.job_name for s in defs.schedules} == {"alpha__evaluation", "beta__evaluation"}
    assert {s.name for s in defs.sensors} == {"alpha__inbox_sensor", "beta__inbox_sensor", "diffattr_run_failures",
                                              "diffattr_automation"}


def test_duplicate_experiment_names_are_refused(tmp_path):
    for f in ("a.yaml", "b.yaml"):
        (tmp_path / f).write_text("name: same\n")
    with pytest.raises(ExperimentError, match="unique"):
        load_experiments([tmp_path / "a.yaml", tmp_path / "b.yaml"])


def test_tiny_experiment_materializes_data_model_queries(tiny_experiment, storage):
    exp = tiny_experiment
    # one slot per concurrency pool: the two worker processes' partition runs queue for the accelerator
    with dg.instance_for_test(overrides={"concurrency": {"pools": {"default_limit": 1}}}) as instance:
        results = materialize_experiment(exp, storage, instance, workers=2)  # partitions in 2 spawned processes
        assert all(r.success for r in results)
        for pool in (ACCELERATOR_POOL, WAREHOUSE_POOL):  # every slot was given back
            info = instance.event_log_storage.get_concurrency_info(pool)
            assert info.limit == 1 and info.claimed_slots == [] and info.pending_steps == []
        evaluations = [c for r in results for c in r.get_asset_check_evaluations()]
        assert {c.check_name for c in evaluations} >= {"stores_complete_and_finite", "score_matrix_finite_and_shaped",
                                                        "top_attributions_row_count", "lds_rows_valid"}
        assert all(c.passed for c in evaluations)
        mats = materialization_events(results)
        assert set(mats) == {f"tiny/{n}" for n in ("training_set", "base_model", "query_set", "features_dtrak",
                                                    "scores_dtrak", "scores_pixel", "lds_subsets", "model_outputs",
                                                    "lds", "image_encoder", "counterfactual")}
        # the partitions ran as separate runs in the worker processes, recorded in the same instance
        assert len(instance.get_materialized_partitions(dg.AssetKey(["tiny", "subset_models"]))) == 12
        assert instance.get_materialized_partitions(dg.AssetKey(["tiny", "counterfactual_models"])) == {
            "q000__dtrak", "q000__random"}
        meta = mats["tiny/base_model"].materialization.metadata
        assert meta["parameters"].value > 1000 and meta["steps"].value == 30
        assert "data:image/png;base64," in meta["samples"].value

    paths = storage.paths(exp.name)
    train, index = load_image_dataset(paths.dataset("train_images"))
    heldout, hindex = load_image_dataset(paths.dataset("heldout_images"))
    assert len(train) == 64 and len(heldout) == 1797 - 64 and not set(index) & set(hindex)
    model = StoredModel(paths.model("base_model"))
    assert model.n_checkpoints() == 3 and model.load_record()["last_timesteps"].shape == (3, 64)

    from storage.artefacts import load_arrays

    q, qmeta = load_arrays(paths.dataset("query_set"))
    assert q["images"].shape == (5, 1, 8, 8) and q["kind"].tolist() == ["generated"] * 3 + ["heldout"] * 2
    assert q["trajectory_x0"].shape == (3, 4, 1, 8, 8) and qmeta["model_digest"] == model.digest
    # held-out queries are real held-out images, bit for bit
    pos = [int(np.flatnonzero(hindex == s)[0]) for s in q["source_index"][3:]]
    np.testing.assert_array_equal(q["images"][3:], heldout.images[pos])

    wh = storage.warehouse()
    lin = wh.query("SELECT asset_key, data_version, input_data_versions, code_version, run_id "
                   "FROM diffattr.lineage ORDER BY created_at")
    order = lin.asset_key.tolist()
    assert order[0] == "tiny/training_set" and order.index("tiny/base_model") < order.index("tiny/query_set")
    # 8 unpartitioned before the partitions, 6 subsets x 2 seeds, 2 counterfactual models, 3 after
    assert len(lin) == 8 + 12 + 2 + 3
    first = lin.drop_duplicates("asset_key").set_index("asset_key")
    versions = first.data_version.to_dict()
    assert versions["tiny/base_model"] == model.digest
    assert json.loads(first.input_data_versions["tiny/base_model"]) == {
        "tiny/training_set": versions["tiny/training_set"]}
    assert json.loads(first.input_data_versions["tiny/query_set"]) == {
        k: versions[k] for k in ("tiny/base_model", "tiny/training_set")}
    # downstream of a partitioned asset: a digest over all 12 subset models' versions
    outputs_inputs = json.loads(first.input_data_versions["tiny/model_outputs"])
    assert outputs_inputs["tiny/subset_models"].startswith("12 partitions:")
    assert all(lin.code_version.str.match(r"\d+-[0-9a-f]{12}$"))
    runs = wh.query("SELECT n_train, steps, digest FROM diffattr.training_runs WHERE model = 'base_model'")
    assert runs.values.tolist() == [[64, 30, model.digest]]
    subset_runs = wh.query("SELECT n_train, partition_key, digest FROM diffattr.training_runs "
                           "WHERE model = 'subset_model' ORDER BY partition_key")
    assert len(subset_runs) == 12 and (subset_runs.n_train == 32).all()
    # a subset model trained in a pool worker equals the same training run here, bit for bit
    from attribution.runtime import state_dict_digest
    from attribution.training import train_ddpm

    masks = load_arrays(paths.dataset("lds_subsets"))[0]["masks"]
    direct = train_ddpm(train.images[masks[2]], exp.model, exp.training, seed=1)
    assert subset_runs.set_index("partition_key").digest["1|s002"] == state_dict_digest(direct.unet.state_dict())
    lds = wh.query("SELECT method, query_set, value, ci_low, ci_high, noise_ceiling, kernel_lambda, n_subsets "
                   "FROM diffattr.lds ORDER BY method, query_set")
    assert lds[["method", "query_set"]].values.tolist() == [
        [m, q] for m in ("dtrak", "pixel") for q in ("all", "generated", "heldout")]
    assert (lds.n_subsets == 3).all() and lds.noise_ceiling.notna().all()
    assert lds.kernel_lambda.notna().tolist() == [True] * 3 + [False] * 3
    assert ((lds.ci_low <= lds.value) & (lds.value <= lds.ci_high)).all()
    sweep = wh.query("SELECT lambda_factor FROM diffattr.lds_lambda_sweep WHERE method = 'dtrak'")
    assert sorted(sweep.lambda_factor) == [0.1, 1.0]

    # counterfactual: the removed set is the query's top proponents; the metrics are recomputable
    from storage.scores import load_scores

    cf = wh.query("SELECT method, pixel_l2, embedding_cosine FROM diffattr.counterfactual ORDER BY method")
    assert cf.method.tolist() == ["dtrak", "random"] and (cf.embedding_cosine.abs() <= 1 + 1e-9).all()
    arr, _ = load_arrays(paths.dataset("counterfactual_q000__dtrak"))
    top = np.argsort(-load_scores(paths.scores("dtrak"))[0]["scores"][0], kind="stable")[:8]
    assert sorted(arr["removed"].tolist()) == sorted(top.tolist())
    np.testing.assert_allclose(cf.pixel_l2[0], np.linalg.norm(arr["regenerated"] - q["images"][0]), rtol=1e-6)
    text = summary(exp, storage)
    assert "duckdb -readonly" in text and "base_model" in text and "dtrak" in text


def test_run_cli_rejects_a_bad_experiment_with_its_key(tmp_path, capsys):
    from pipelines.run import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nlds:\n  n_subsets: 6\n  n_selection: 5\n")
    assert main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "key 'lds'" in err and "fewer than 3" in err


def test_pools_follow_what_each_step_does_and_the_instance_config_limits_them(tmp_path):
    """Model steps (kind pytorch) share the accelerator pool, table-writing steps the warehouse pool; the shipped
    instance config limits every pool."""
    import shutil

    for exp in load_experiments():
        for a in build_definitions([exp]).assets:
            kinds = {k for spec in a.specs for k in spec.kinds}
            expected = ACCELERATOR_POOL if "pytorch" in kinds else WAREHOUSE_POOL if "duckdb" in kinds else None
            assert a.op.pool == expected, (exp.name, a.key, kinds, a.op.pool)
    # on a Dask cluster the pools are dropped (dagster-dask cannot submit a run that carries them)
    dask_env = {"DIFFATTR_EXECUTOR": "dask", "DIFFATTR_DASK_ADDRESS": "tcp://127.0.0.1:8786"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in dask_env.items():
            mp.setenv(k, v)
        assert all(a.op.pool is None for a in build_definitions(load_experiments()[:1]).assets)
    shutil.copy(ROOT / "deploy" / "dagster.yaml", tmp_path / "dagster.yaml")
    config = dg.DagsterInstance.from_config(str(tmp_path)).get_concurrency_config()
    assert config.pool_config.default_pool_limit == 2 and config.run_queue_config.max_concurrent_runs == 2
