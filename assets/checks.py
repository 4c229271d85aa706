"""Asset checks per experiment: the artefacts on disk and the warehouse rows agree with each other and hold no
NaN/inf. Every check reads what the asset stored (never recomputes it); a missing or broken artefact makes the check
fail with a message naming the asset to rematerialize, it never raises."""
from __future__ import annotations

import functools

import dagster as dg

from attribution.experiment import Experiment, MethodSpec
from storage.resources import StorageResource

from .common import key
from .modeling import explained_model
from .features import SIMILARITY_KINDS

LDS_TOLERANCE = 1e-9  # float slack for ci_low <= value <= ci_high


def build(exp: Experiment) -> list[dg.AssetChecksDefinition]:
    checks = []
    for name, method in exp.attribution.methods.items():
        if method.kind not in SIMILARITY_KINDS:
            checks.append(_features_check(exp, name, method))
        checks += [_scores_check(exp, name), _top_attributions_check(exp, name)]
    if exp.lds.enabled:
        checks += [_model_outputs_check(exp), _lds_check(exp)]
    return checks


def _fail(message: str, **metadata) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=False, description=message, metadata={"problem": message, **metadata})


def _missing_artefact_fails(rematerialize: str):
    """Turn a missing/unfinished artefact into a failed check naming the asset to rematerialize."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            from storage.artefacts import IncompleteArtefactError
            from storage.features import FeatureStoreError

            try:
                return fn(*args, **kwargs)
            except (IncompleteArtefactError, FeatureStoreError, FileNotFoundError, KeyError) as e:
                return _fail(f"artefact missing or unreadable ({type(e).__name__}: {e}); "
                             f"rematerialize {rematerialize}")

        return run

    return wrap


def _sizes(paths) -> tuple[int, int]:
    """(n_queries, n_train) of the query and training sets on disk."""
    from storage.artefacts import load_arrays

    queries = load_arrays(paths.dataset("query_set"), "query set (materialize query_set)")[0]
    train = load_arrays(paths.dataset("train_images"), "training set (materialize training_set)")[0]
    return len(queries["images"]), len(train["images"])


def _features_check(exp: Experiment, name: str, method: MethodSpec) -> dg.AssetChecksDefinition:
    asset = key(exp, f"features_{name}")

    @dg.asset_check(asset=asset, name="stores_complete_and_finite", blocking=True,
                    description=f"Every feature store of '{name}' (train and query side, each checkpoint) has all its "
                                "shards marked complete and only finite values: the scores never read a hole or a "
                                "NaN.")
    @_missing_artefact_fails(f"{asset.to_user_string()}")
    def check(storage: StorageResource) -> dg.AssetCheckResult:
        import numpy as np

        from attribution.methods import feature_recipes
        from storage.features import FeatureStore
        from storage.models import StoredModel

        paths = storage.paths(exp.name)
        n_ckpt = (StoredModel(paths.model(explained_model(exp))).n_checkpoints() if method.kind in ("tracin", "retrac")
                  else 0)
        stores, problems = {}, []
        for recipe in feature_recipes(name, method, n_ckpt):
            try:
                store = FeatureStore.open(paths.features(recipe.store_name))
            except Exception as e:  # noqa: BLE001 - any unreadable store is a failed check, named below
                stores[recipe.store_name] = {"error": str(e)}
                problems.append(f"{recipe.store_name}: no readable store")
                continue
            missing = store.missing_shards()
            non_finite = sum(int((~np.isfinite(store.read(store.shard_slice(s)))).sum())
                             for s in range(store.n_shards) if s not in missing)
            stores[recipe.store_name] = {"rows": store.n_rows, "dim": store.dim, "shards": store.n_shards,
                                         "missing_shards": missing, "non_finite": non_finite}
            if missing:
                problems.append(f"{recipe.store_name}: shards {missing} of {store.n_shards} missing")
            if non_finite:
                problems.append(f"{recipe.store_name}: {non_finite} non-finite values")
        metadata = {
            "stores": dg.MetadataValue.json(stores),
            "rows": sum(s.get("rows", 0) for s in stores.values()),
            "dim": max((s.get("dim", 0) for s in stores.values()), default=0),
            "missing_shards": sum(len(s.get("missing_shards", [])) for s in stores.values()),
        }
        if problems:
            return _fail("; ".join(problems) + f": rematerialize {asset.to_user_string()} (it computes only the "
                         "missing shards; delete a store with non-finite values first)", **metadata)
        return dg.AssetCheckResult(passed=True, metadata=metadata)

    return check


def _scores_check(exp: Experiment, name: str) -> dg.AssetChecksDefinition:
    asset = key(exp, f"scores_{name}")

    @dg.asset_check(asset=asset, name="score_matrix_finite_and_shaped", blocking=True,
                    description=f"The stored score matrix of '{name}' is finite and has shape (n_queries, n_train) of "
                                "the query and training sets now on disk (a matrix left from an older data set fails).")
    @_missing_artefact_fails(f"{asset.to_user_string()}")
    def check(storage: StorageResource) -> dg.AssetCheckResult:
        import numpy as np

        from storage.scores import load_scores

        paths = storage.paths(exp.name)
        n_queries, n_train = _sizes(paths)
        s = load_scores(paths.scores(name))[0]["scores"]
        non_finite = int((~np.isfinite(s)).sum())
        metadata = {"shape": str(tuple(s.shape)), "expected_shape": str((n_queries, n_train)),
                    "non_finite": non_finite}
        problems = []
        if s.shape != (n_queries, n_train):
            problems.append(f"score matrix has shape {tuple(s.shape)}, expected {(n_queries, n_train)}")
        if non_finite:
            problems.append(f"score matrix has {non_finite} NaN/inf values")
        if problems:
            return _fail("; ".join(problems) + f": rematerialize {asset.to_user_string()}", **metadata)
        return dg.AssetCheckResult(passed=True, metadata=metadata)

    return check


def _top_attributions_check(exp: Experiment, name: str) -> dg.AssetChecksDefinition:
    asset = key(exp, f"scores_{name}")
    top_k = exp.attribution.top_k

    @dg.asset_check(asset=asset, name="top_attributions_row_count",
                    description=f"diffattr.top_attributions holds exactly n_queries x 2 directions x "
                                f"min(top_k={top_k}, n_train) rows for ('{exp.name}', '{name}'): no query or rank "
                                "lost or duplicated in the warehouse.")
    @_missing_artefact_fails(f"{asset.to_user_string()}")
    def check(storage: StorageResource) -> dg.AssetCheckResult:
        n_queries, n_train = _sizes(storage.paths(exp.name))
        expected = n_queries * 2 * min(top_k, n_train)
        rows = int(storage.warehouse().query(
            "SELECT count(*) AS n FROM diffattr.top_attributions WHERE experiment = ? AND method = ?",
            [exp.name, name]).n.iloc[0])
        metadata = {"rows": rows, "expected_rows": expected}
        if rows != expected:
            return _fail(f"diffattr.top_attributions has {rows} rows for ('{exp.name}', '{name}'), expected "
                         f"{expected} ({n_queries} queries x 2 x {min(top_k, n_train)}): rematerialize "
                         f"{asset.to_user_string()}", **metadata)
        return dg.AssetCheckResult(passed=True, metadata=metadata)

    return check


def _model_outputs_check(exp: Experiment) -> dg.AssetChecksDefinition:
    asset = key(exp, "model_outputs")
    lds = exp.lds

    @dg.asset_check(asset=asset, name="warehouse_matches_zarr",
                    description="diffattr.model_outputs has one finite row per entry of the stored outputs array "
                                f"(queries x {lds.n_subsets} subsets x {len(lds.seeds)} seeds), and that array is "
                                "finite and shaped for the query set on disk.")
    @_missing_artefact_fails(f"{asset.to_user_string()}")
    def check(storage: StorageResource) -> dg.AssetCheckResult:
        import numpy as np

        from storage.artefacts import load_arrays
        from storage.scores import load_scores

        paths = storage.paths(exp.name)
        out = load_scores(paths.scores("model_outputs"), ("outputs",))[0]["outputs"]
        n_queries = len(load_arrays(paths.dataset("query_set"), "query set (materialize query_set)")[0]["images"])
        expected_shape = (n_queries, lds.n_subsets, len(lds.seeds))
        counts = storage.warehouse().query(
            "SELECT count(*) AS n, count(*) FILTER (WHERE output IS NULL OR isnan(output) OR isinf(output)) AS bad "
            "FROM diffattr.model_outputs WHERE experiment = ?", [exp.name])
        rows, bad_rows = int(counts.n.iloc[0]), int(counts.bad.iloc[0])
        non_finite = int((~np.isfinite(out)).sum())
        metadata = {"rows": rows, "array_size": int(out.size), "shape": str(tuple(out.shape)),
                    "expected_shape": str(expected_shape), "non_finite_array": non_finite,
                    "non_finite_rows": bad_rows}
        problems = []
        if rows != out.size:
            problems.append(f"diffattr.model_outputs has {rows} rows, the outputs array {out.size} entries")
        if tuple(out.shape) != expected_shape:
            problems.append(f"outputs array has shape {tuple(out.shape)}, expected {expected_shape}")
        if non_finite or bad_rows:
            problems.append(f"{non_finite} NaN/inf in the array, {bad_rows} in the warehouse")
        if problems:
            return _fail("; ".join(problems) + f": rematerialize {asset.to_user_string()}", **metadata)
        return dg.AssetCheckResult(passed=True, metadata=metadata)

    return check


def _lds_check(exp: Experiment) -> dg.AssetChecksDefinition:
    asset = key(exp, "lds")
    lds = exp.lds
    n_test = lds.n_subsets - lds.n_selection
    methods = sorted(exp.attribution.methods)

    @dg.asset_check(asset=asset, name="lds_rows_valid",
                    description=f"Every diffattr.lds row of '{exp.name}' has ci_low <= value <= ci_high, a value in "
                                f"[-1, 1] and n_subsets = {n_test} (the test subsets, selection subsets excluded); "
                                "every method has rows.")
    @_missing_artefact_fails(f"{asset.to_user_string()}")
    def check(storage: StorageResource) -> dg.AssetCheckResult:
        df = storage.warehouse().query(
            "SELECT method, query_set, value, ci_low, ci_high, n_subsets FROM diffattr.lds WHERE experiment = ? "
            "ORDER BY method, query_set", [exp.name])
        tol = LDS_TOLERANCE
        bad_ci = df[~((df.ci_low <= df.value + tol) & (df.value <= df.ci_high + tol))]
        bad_range = df[~df.value.between(-1.0, 1.0)]
        bad_n = df[df.n_subsets != n_test]
        absent = sorted(set(methods) - set(df.method))

        def where(rows) -> str:
            return ", ".join(f"{r.method}/{r.query_set}" for r in rows.itertuples())

        problems = []
        if len(bad_ci):
            problems.append(f"value outside [ci_low, ci_high] (or NaN) for {where(bad_ci)}")
        if len(bad_range):
            problems.append(f"value outside [-1, 1] (or NaN) for {where(bad_range)}")
        if len(bad_n):
            problems.append(f"n_subsets != {n_test} for {where(bad_n)}")
        if absent:
            problems.append(f"no rows for methods {absent}")
        metadata = {"rows": len(df), "bad_ci_rows": len(bad_ci), "out_of_range_rows": len(bad_range),
                    "wrong_n_subsets_rows": len(bad_n), "expected_n_subsets": n_test}
        if problems:
            return _fail("; ".join(problems) + f": rematerialize {asset.to_user_string()}", **metadata)
        return dg.AssetCheckResult(passed=True, metadata=metadata)

    return check
