"""The per-sample attribution graph materialized on a tiny experiment: stored results match recomputation, a
resumed feature run recomputes only missing shards, stale features are refused."""
import dagster as dg
import numpy as np
import pytest

from attribution.experiment import parse_experiment
from attribution.scoring import kernel_scores, lambda_scale
from pipelines.definitions import experiment_assets
from storage.features import FeatureStore
from storage.scores import load_scores
from tests.conftest import materialization_events, materialized, tiny_experiment_dict

METHODS = {
    "dtrak": {"kind": "trak", "output": "square", "K": 4},
    "journey": {"kind": "journey_trak", "K": 3, "timesteps": "random", "noise_draws": 1},
    "tracin": {"kind": "tracin", "K": 2, "checkpoints": [1, 2]},
    "retrac": {"kind": "retrac", "K": 2, "checkpoints": [1, 2]},
    "pixel": {"kind": "pixel"},
    "embedding": {"kind": "embedding", "similarity": "cosine"},
}


def experiment(**training):
    d = tiny_experiment_dict()
    d["training"].update(training)
    d["attribution"] = {"proj_dim": 48, "batch_size": 8, "shard_rows": 16, "top_k": 4, "methods": METHODS}
    d["lds"]["enabled"] = False
    return parse_experiment(d)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    exp = experiment()
    with materialized(exp, tmp_path_factory) as (storage, instance, results):
        yield exp, storage, instance, results


def test_graph_groups(run):
    exp, *_ = run
    groups = {a.key.path[1]: a.group_names_by_key[a.key] for a in experiment_assets(exp)}
    assert groups["features_dtrak"] == "features" and groups["scores_pixel"] == "attribution"
    assert "features_pixel" not in groups


def test_stored_scores_equal_a_recomputation_from_the_feature_stores(run):
    exp, storage, *_ = run
    paths = storage.paths(exp.name)
    train = FeatureStore.open(paths.features("dtrak_train")).read()
    query = FeatureStore.open(paths.features("dtrak_query")).read()
    assert train.shape == (64, 48) and query.shape == (5, 48)
    (scores,), attrs = (lambda r: ([r[0]["scores"]], r[1]))(load_scores(paths.scores("dtrak")))
    lam = 0.1 * lambda_scale(train)
    assert attrs["lambda"] == pytest.approx(lam)
    np.testing.assert_allclose(scores, kernel_scores(train, query, lam), rtol=1e-5, atol=1e-6 * np.abs(scores).max())
    per_step = load_scores(paths.scores("journey"), ("scores", "per_step"))[0]
    assert per_step["per_step"].shape == (5, 4, 64)  # 4 DDIM steps
    np.testing.assert_allclose(per_step["scores"], per_step["per_step"].mean(1), rtol=1e-5, atol=1e-7)


def test_top_attributions_table_matches_score_matrix(run):
    exp, storage, *_ = run
    wh = storage.warehouse()
    df = wh.query("SELECT * FROM diffattr.top_attributions WHERE method = 'tracin' ORDER BY query_id, direction, rank")
    assert len(df) == 5 * 2 * 4
    scores = load_scores(storage.paths(exp.name).scores("tracin"))[0]["scores"]
    for (q, direction), g in df.groupby(["query_id", "direction"]):
        expected = np.argsort(-scores[q] if direction == "proponent" else scores[q], kind="stable")[:4]
        assert g.train_id.tolist() == expected.tolist() and g["rank"].tolist() == [1, 2, 3, 4]
        np.testing.assert_allclose(g.score, scores[q, expected], rtol=1e-6)
    runs = wh.query("SELECT method, unique_in_top_k, top_k_slots FROM diffattr.attribution_runs ORDER BY method")
    assert runs.method.tolist() == sorted(METHODS) and (runs.top_k_slots == 20).all()
    assert ((runs.unique_in_top_k >= 4) & (runs.unique_in_top_k <= 20)).all()


def test_metadata_has_the_proponent_grid(run):
    *_, results = run
    meta = {k.split("/")[1]: e.materialization.metadata for k, e in materialization_events(results).items()}
    assert meta["scores_dtrak"]["queries_and_top_proponents"].value.startswith("![each row")
    assert meta["features_tracin"]["shards_computed"].value == 2 * (4 + 1)  # 2 ckpts x (train 4 + query 1 shards)


def test_resume_recomputes_only_missing_shards_bit_identically(run):
    exp, storage, instance, _ = run
    paths = storage.paths(exp.name)
    store = FeatureStore.open(paths.features("dtrak_train"))
    before, digest = store.read(), store.digest()
    fs_root = paths.features("dtrak_train")
    import shutil
    from pathlib import Path

    for shard in (1, 3):  # simulate a run killed before these shards were marked
        (Path(fs_root) / ".done" / str(shard)).unlink()
    assert FeatureStore.open(fs_root).missing_shards() == [1, 3]
    shutil.rmtree(Path(fs_root) / "c" / "1", ignore_errors=True)  # and lose the data of one of them
    key = dg.AssetKey([exp.name, "features_dtrak"])
    res = dg.materialize(experiment_assets(exp), selection=[key], instance=instance,
                         resources={"storage": storage})
    mat = res.asset_materializations_for_node(f"{exp.name}__features_dtrak")[0]
    assert mat.metadata["stores"].value["dtrak_train"]["shards_computed"] == 2
    assert mat.metadata["stores"].value["dtrak_query"]["shards_computed"] == 0
    after = FeatureStore.open(fs_root)
    assert after.digest() == digest
    np.testing.assert_array_equal(after.read(), before)


def test_features_of_another_model_are_refused(run, tmp_path):
    exp, storage, instance, _ = run
    other = experiment(seed=1)  # same experiment name and root, base model retrained with another seed
    assets = experiment_assets(other)
    dg.materialize(assets, selection=[dg.AssetKey([exp.name, "base_model"])], instance=instance,
                   resources={"storage": storage})
    res = dg.materialize(assets, selection=[dg.AssetKey([exp.name, "scores_dtrak"])], instance=instance,
                         resources={"storage": storage}, raise_on_error=False)
    assert not res.success
    failure = [e for e in res.all_events if e.is_step_failure][0]
    assert "computed from another model" in failure.step_failure_data.error.to_string()


def test_embedding_baseline_is_cosine_of_encoder_features(run):
    from attribution.encoder import embed
    from storage.artefacts import load_arrays
    from storage.datasets import load_image_dataset
    from storage.models import load_classifier

    exp, storage, *_ = run
    paths = storage.paths(exp.name)
    enc = load_classifier(paths.model("image_encoder"))
    train, _ = load_image_dataset(paths.dataset("train_images"))
    q = load_arrays(paths.dataset("query_set"))[0]["images"]
    a, b = embed(enc, q), embed(enc, train.images)
    expected = (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T
    np.testing.assert_allclose(load_scores(paths.scores("embedding"))[0]["scores"], expected, rtol=1e-5, atol=1e-6)
