"""Asset checks on a tiny materialized experiment: all pass on a clean run; each corruption (a lost shard marker, a
NaN score, lost warehouse rows, an LDS outside its interval) fails exactly the check guarding it. Every test restores
what it corrupted, so the order does not matter."""
from pathlib import Path

import dagster as dg
import numpy as np
import pytest

from assets import checks
from attribution.experiment import parse_experiment
from pipelines.definitions import experiment_assets
from tests.conftest import materialized, tiny_experiment_dict


def experiment(name: str = "tiny"):
    d = tiny_experiment_dict(name)
    d["counterfactual"]["enabled"] = False  # no check guards it; saves the retraining
    return parse_experiment(d)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    exp = experiment()
    with materialized(exp, tmp_path_factory) as (storage, instance, _):
        yield exp, storage, instance


def run_checks(exp, storage, instance, only: str | None = None) -> dict:
    """Execute the experiment's checks (not the assets) -> {"<asset name>:<check name>": evaluation}."""
    defs = checks.build(exp)
    selected = [c for c in defs if only is None or any(only in k.to_user_string() for k in c.check_keys)]
    result = dg.materialize([*experiment_assets(exp), *defs], selection=dg.AssetSelection.checks(*selected),
                            instance=instance, resources={"storage": storage}, raise_on_error=False,
                            run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}})
    assert not result.get_asset_materialization_events()  # checks only: nothing rematerialized
    # a failed blocking check fails its step (and the run); its evaluation is still recorded
    return {f"{e.asset_key.path[-1]}:{e.check_name}": e for e in result.get_asset_check_evaluations()}


def test_checks_are_built_per_experiment_with_descriptions(run):
    exp, *_ = run
    names = {f"{k.asset_key.path[-1]}:{k.name}" for c in checks.build(exp) for k in c.check_keys}
    assert names == {"features_dtrak:stores_complete_and_finite", "scores_dtrak:score_matrix_finite_and_shaped",
                     "scores_dtrak:top_attributions_row_count", "scores_pixel:score_matrix_finite_and_shaped",
                     "scores_pixel:top_attributions_row_count", "model_outputs:warehouse_matches_zarr",
                     "lds:lds_rows_valid"}
    assert all(s.description for c in checks.build(exp) for s in c.check_specs)
    no_lds = tiny_experiment_dict()
    no_lds["lds"]["enabled"] = False
    assert not any(k.asset_key.path[-1] in ("lds", "model_outputs")
                   for c in checks.build(parse_experiment(no_lds)) for k in c.check_keys)


def test_all_checks_pass_on_a_clean_run(run):
    evals = run_checks(*run)
    assert len(evals) == 7
    failed = {k: e.description for k, e in evals.items() if not e.passed}
    assert not failed
    feats = evals["features_dtrak:stores_complete_and_finite"].metadata
    assert feats["rows"].value == 64 + 5 and feats["dim"].value == 32 and feats["missing_shards"].value == 0
    assert evals["scores_dtrak:top_attributions_row_count"].metadata["rows"].value == 5 * 2 * 3
    assert evals["model_outputs:warehouse_matches_zarr"].metadata["rows"].value == 5 * 6 * 2


def test_missing_shard_marker_fails_the_features_check(run):
    exp, storage, instance = run
    marker = Path(storage.paths(exp.name).features("dtrak_train")) / ".done" / "2"
    marker.unlink()
    try:
        e = run_checks(exp, storage, instance, only="features_dtrak")["features_dtrak:stores_complete_and_finite"]
    finally:
        marker.touch()
    assert not e.passed
    assert "dtrak_train: shards [2] of 4 missing" in e.description and "features_dtrak" in e.description
    assert e.metadata["missing_shards"].value == 1


def test_nan_score_fails_the_score_matrix_check(run):
    import zarr

    exp, storage, instance = run
    arr = zarr.open_group(storage.paths(exp.name).scores("pixel"), mode="r+")["scores"]
    original = float(arr[1, 7])
    arr[1, 7] = np.nan
    try:
        evals = run_checks(exp, storage, instance, only="scores_pixel")
    finally:
        arr[1, 7] = original
    e = evals["scores_pixel:score_matrix_finite_and_shaped"]
    assert not e.passed and "1 NaN/inf" in e.description and "rematerialize tiny/scores_pixel" in e.description
    assert evals["scores_pixel:top_attributions_row_count"].passed


def test_lost_warehouse_rows_fail_the_row_count_check(run):
    exp, storage, instance = run
    wh = storage.warehouse()
    saved = wh.query("SELECT * FROM diffattr.top_attributions WHERE experiment = ? AND method = 'dtrak'", [exp.name])
    with wh.connect() as con:
        con.execute("DELETE FROM diffattr.top_attributions WHERE experiment = ? AND method = 'dtrak' AND rank = 3",
                    [exp.name])
    try:
        evals = run_checks(exp, storage, instance, only="scores_dtrak")
    finally:
        wh.replace_rows("top_attributions", saved, {"experiment": exp.name, "method": "dtrak"})
    e = evals["scores_dtrak:top_attributions_row_count"]
    assert not e.passed and "has 20 rows" in e.description and "expected 30" in e.description
    assert evals["scores_dtrak:score_matrix_finite_and_shaped"].passed


def test_lds_value_outside_its_interval_fails_the_lds_check(run):
    exp, storage, instance = run
    wh = storage.warehouse()
    saved = wh.query("SELECT * FROM diffattr.lds WHERE experiment = ?", [exp.name])
    with wh.connect() as con:
        con.execute("UPDATE diffattr.lds SET ci_low = value + 0.5 WHERE experiment = ? AND method = 'pixel' "
                    "AND query_set = 'generated'", [exp.name])
    try:
        e = run_checks(exp, storage, instance, only=":lds_rows_valid")["lds:lds_rows_valid"]
    finally:
        wh.replace_rows("lds", saved, {"experiment": exp.name})
    assert not e.passed and "outside [ci_low, ci_high] (or NaN) for pixel/generated" in e.description
    assert e.metadata["bad_ci_rows"].value == 1
    assert run_checks(exp, storage, instance, only=":lds_rows_valid")["lds:lds_rows_valid"].passed  # restored


def test_checks_on_an_unmaterialized_experiment_fail_cleanly(run):
    _, storage, instance = run
    evals = run_checks(experiment("ghost"), storage, instance)
    assert len(evals) == 7 and not any(e.passed for e in evals.values())
    assert "rematerialize ghost/features_dtrak" in evals["features_dtrak:stores_complete_and_finite"].description
    assert "rematerialize ghost/lds" in evals["lds:lds_rows_valid"].description  # no rows at all
