"""Group attribution end to end on a tiny experiment: coalition models by all three methods, group values, group LDS
and the top/bottom counterfactual, checked against the stored game values (not against themselves)."""
import json

import numpy as np
import pytest

from attribution.experiment import parse_experiment
from tests.conftest import materialization_events, materialized, tiny_experiment_dict

pytestmark = pytest.mark.slow

GROUPS = ["0", "1", "2", "3"]
PROPS = ["inception_score", "diversity", "fid", "tests.assets.property_hooks:brightness"]


def group_experiment_dict(name="tiny_groups") -> dict:
    d = tiny_experiment_dict(name)
    d["data"]["classes"] = GROUPS
    d["lds"] = {"enabled": False}
    d["counterfactual"] = {"enabled": False, "encoder_steps": 20}
    d["attribution"]["methods"] = {"dtrak": {"kind": "trak", "output": "square", "K": 2}}
    d["shapley"] = {
        "groups": GROUPS, "properties": PROPS, "n_images": 16, "sampling_steps": 3, "reference_clusters": 4,
        "methods": ["retrain", "finetune", "sparsified_finetune"], "n_coalitions": 10, "banzhaf_coalitions": 4,
        "lds_coalitions": 3, "bootstrap": 20,
        "finetune": {"steps": 8, "batch_size": 16, "warmup_steps": 2, "checkpoints": 1},
        "pruned_finetune": {"steps": 8, "batch_size": 16, "warmup_steps": 2, "checkpoints": 1},
        "counterfactual_methods": ["shapley_sparsified_finetune"],
    }
    return d


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    exp = parse_experiment(group_experiment_dict())
    with materialized(exp, tmp_path_factory) as (storage, instance, results):
        yield exp, storage, instance, results


def table(storage, name, exp):
    return storage.warehouse().query(f"SELECT * FROM diffattr.{name} WHERE experiment = ?", [exp.name])


def test_every_coalition_model_is_trained_and_scored(run):
    from assets.groups import coalition_plan

    exp, storage, instance, results = run
    plan = coalition_plan(exp)
    runs = table(storage, "coalition_runs", exp)
    expected = sum(len(plan.model_coalitions(m)) for m in exp.shapley.methods) + 5  # null, full, pruned, 2 cf
    assert len(runs) == expected * len(PROPS)
    assert set(runs.property) == set(PROPS) and np.isfinite(runs.value).all()
    trained = runs[runs.purpose.str.contains("kernel|loo|lds|banzhaf|full") & (runs.steps > 0)]
    assert (trained.wall_seconds > 0).all()
    per_method = runs[runs.property == PROPS[0]].groupby("method").coalition.nunique()
    assert per_method["finetune"] == len(plan.model_coalitions("finetune"))
    events = materialization_events(results)
    assert "tiny_groups/contributor_groups" in events and "tiny_groups/group_counterfactual" in events
    # brightness hook value = mean pixel of the stored generated images
    from assets.groups import result_name
    from storage.artefacts import load_arrays

    arrays, meta = load_arrays(storage.paths(exp.name).result(result_name("finetune", "c1111")))
    assert meta["properties"][PROPS[3]] == pytest.approx(float(arrays["images"].mean()), rel=1e-6)


def test_sft_model_is_pruned(run):
    exp, storage, *_ = run
    runs = table(storage, "coalition_runs", exp)
    params = runs[runs.property == PROPS[0]].groupby("method").parameters.max()
    assert params["sparsified_finetune"] < 0.7 * params["finetune"]
    assert params["finetune"] == params["retrain"]


def test_group_values_satisfy_efficiency_and_match_loo(run):
    exp, storage, *_ = run
    values = table(storage, "group_values", exp)
    runs = table(storage, "coalition_runs", exp)
    v = {(r.method, r.coalition, r.property): r.value for r in runs.itertuples()}
    n_est = len(exp.shapley.estimators())
    assert len(values) == n_est * len(GROUPS) * len(PROPS)
    for p in PROPS:
        v0 = v[("null", "c0000", p)]
        for m in exp.shapley.methods:
            est = values[(values.property == p) & (values.estimator == f"shapley_{m}")]
            assert est.value.sum() == pytest.approx(v[(m, "c1111", p)] - v0, abs=1e-9)
            assert (est.ci_low <= est.value + 1e-12).all() and (est.value <= est.ci_high + 1e-12).all()
            loo = values[(values.property == p) & (values.estimator == f"loo_{m}")].set_index("group_name").value
            for g in range(4):
                without = "c" + "".join("0" if i == g else "1" for i in range(4))
                assert loo[GROUPS[g]] == pytest.approx(v[(m, "c1111", p)] - v[(m, without, p)], abs=1e-12)


def test_aggregated_dtrak_baseline_matches_score_matrix(run):
    from storage.artefacts import load_arrays
    from storage.datasets import load_image_dataset
    from storage.scores import load_scores

    exp, storage, *_ = run
    paths = storage.paths(exp.name)
    scores = load_scores(paths.scores("dtrak"))[0]["scores"]
    kinds = load_arrays(paths.dataset("query_set"))[0]["kind"]
    train, _ = load_image_dataset(paths.dataset("train_images"))
    per_sample = scores[kinds == "generated"].astype(np.float64).mean(axis=0)
    expected = [per_sample[train.groups == g].sum() for g in GROUPS]
    values = table(storage, "group_values", exp)
    got = values[(values.estimator == "sum_dtrak") & (values.property == PROPS[0])].set_index("group_name").value
    np.testing.assert_allclose(got[GROUPS].to_numpy(), expected, rtol=1e-9)


def test_group_lds_and_counterfactual_tables(run):
    from scipy.stats import spearmanr

    from assets.groups import coalition_plan
    from attribution.groups import coalition_id

    exp, storage, *_ = run
    plan = coalition_plan(exp)
    lds = table(storage, "group_lds", exp)
    assert len(lds) == len(exp.shapley.estimators()) * len(PROPS)
    values = table(storage, "group_values", exp)
    runs = table(storage, "coalition_runs", exp)
    p, e = PROPS[0], "shapley_sparsified_finetune"
    phi = values[(values.property == p) & (values.estimator == e)].set_index("group_name").value[GROUPS].to_numpy()
    f = [runs[(runs.method == "retrain") & (runs.coalition == coalition_id(m)) & (runs.property == p)].value.iloc[0]
         for m in plan.lds]
    expected = spearmanr(plan.lds.astype(float) @ phi, f).statistic
    got = lds[(lds.property == p) & (lds.estimator == e)].value.iloc[0]
    assert got == pytest.approx(expected, abs=1e-9) or (np.isnan(got) and np.isnan(expected))
    cf = table(storage, "group_counterfactual", exp)
    assert sorted(cf.removed.unique()) == ["bottom", "top"] and len(cf) == 2 * len(PROPS)
    top = json.loads(cf[cf.removed == "top"].groups_removed.iloc[0])
    best = values[(values.property == p) & (values.estimator == e)].sort_values("value", ascending=False)
    assert top == sorted(best.group_name.iloc[:2].tolist())  # 40% of 4 groups = 2


def test_unknown_group_is_a_clear_error(tmp_path):
    import dagster as dg

    from attribution.groups import GroupError
    from pipelines.definitions import experiment_assets
    from storage.resources import StorageResource

    d = group_experiment_dict("bad_groups")
    d["shapley"]["groups"] = ["0", "1", "2", "7"]
    exp = parse_experiment(d)
    assets = experiment_assets(exp)
    with pytest.raises(GroupError, match=r"\['7'\] have no training images"):
        dg.materialize(assets, selection=[dg.AssetKey(["bad_groups", "training_set"]),
                                          dg.AssetKey(["bad_groups", "contributor_groups"])],
                       resources={"storage": StorageResource(root=str(tmp_path))})
