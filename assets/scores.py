"""Score assets: the query x train attribution matrix of each method (zarr), its top proponents and opponents per
query (DuckDB), the "generally influential" statistics, and a picture of queries beside their top proponents."""
import dagster as dg

from attribution.experiment import Experiment, MethodSpec
from storage.resources import StorageResource

from .common import WAREHOUSE_POOL, code_version, finish, key, png_markdown
from .modeling import explained_model

GROUP = "attribution"
GRID_PROPONENTS = 8


def build(exp: Experiment) -> list[dg.AssetsDefinition]:
    return [_score_asset(exp, name, m) for name, m in exp.attribution.methods.items()]


def _score_asset(exp: Experiment, name: str, method: MethodSpec) -> dg.AssetsDefinition:
    a = exp.attribution
    deps = [key(exp, "training_set"), key(exp, "query_set")]
    if method.kind == "embedding":
        deps.append(key(exp, "image_encoder"))
    elif method.kind != "pixel":
        deps.append(key(exp, f"features_{name}"))

    @dg.asset(
        key=key(exp, f"scores_{name}"),
        group_name=GROUP,
        kinds={"numpy", "zarr", "duckdb"},
        pool=WAREHOUSE_POOL,
        deps=deps,
        code_version=code_version("1", exp, "attribution"),
        description=f"Attribution scores of '{name}' ({method.kind}"
                    f"{', ' + method.scorer + ' scorer' if method.kind in ('trak', 'journey_trak') else ''}) for "
                    f"every query and training image; top-{a.top_k} proponents/opponents per query in "
                    "diffattr.top_attributions.",
    )
    def scores(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
        import hashlib
        import json

        import numpy as np
        import pandas as pd

        from attribution.images import image_grid
        from attribution.influence_stats import influence_summary, top_k
        from storage.artefacts import load_arrays
        from storage.datasets import load_image_dataset
        from storage.scores import save_scores
        from storage.warehouse import now

        paths = storage.paths(exp.name)
        train, _ = load_image_dataset(paths.dataset("train_images"))
        queries, _ = load_arrays(paths.dataset("query_set"), "query set (materialize query_set first)")
        arrays, lam = compute_scores(paths, explained_model(exp), name, method, a.lambda_factor, train, queries)
        s = arrays["scores"]
        context.log.info(f"{name}: scores {s.shape}, lambda={lam}")
        save_scores(paths.scores(name), arrays, {"method": name, "kind": method.kind, "lambda": lam,
                                                 "experiment": exp.name})

        k = min(a.top_k, s.shape[1])
        stats = influence_summary(s, k)
        created, run_id = now(), context.run.run_id
        rows = []
        for direction, largest in (("proponent", True), ("opponent", False)):
            idx = top_k(s, k, largest=largest)
            for q in range(s.shape[0]):
                for r, i in enumerate(idx[q]):
                    rows.append((exp.name, name, q, str(queries["kind"][q]), direction, r + 1, int(i),
                                 str(train.groups[i]), float(s[q, i]), run_id, created))
        cols = ["experiment", "method", "query_id", "query_kind", "direction", "rank", "train_id", "train_group",
                "score", "run_id", "created_at"]
        wh = storage.warehouse()
        wh.replace_rows("top_attributions", pd.DataFrame(rows, columns=cols),
                       {"experiment": exp.name, "method": name, "query_key": None})  # inbox rows stay
        wh.replace_rows("attribution_runs", [{
            "experiment": exp.name, "method": name, "kind": method.kind,
            "scorer": method.scorer if method.kind in ("trak", "journey_trak") else method.kind, "kernel_lambda": lam,
            "n_queries": s.shape[0], "n_train": s.shape[1], "top_k": k, "unique_in_top_k": stats["unique"],
            "top_k_slots": stats["slots"], "max_top_k_frequency": stats["max_frequency"],
            "most_frequent": json.dumps(stats["most_frequent"]), "url": paths.scores(name), "run_id": run_id,
            "created_at": created}], {"experiment": exp.name, "method": name})

        shown = shown_queries(queries["kind"], a.show_queries)
        best = top_k(s, min(GRID_PROPONENTS, s.shape[1]))
        grid = [np.concatenate([queries["images"][q:q + 1], train.images[best[q]]]) for q in shown]
        version = hashlib.sha256(s.tobytes()).hexdigest()
        return finish(context, storage, exp, version, {
            "queries_and_top_proponents": png_markdown(
                image_grid(grid, scale=3), f"each row: a query, then its top {GRID_PROPONENTS} proponents"),
            "lambda": lam,
            "shape": str(s.shape),
            "unique_in_top_k": dg.MetadataValue.int(stats["unique"]),
            "top_k_slots": stats["slots"],
            "generally_influential": dg.MetadataValue.json(stats),
            "path": paths.scores(name),
        })

    return scores


def shown_queries(kinds, count: int) -> list[int]:
    """Up to `count` queries for the picture, half generated and half held-out when both exist."""
    import numpy as np

    gen, held = np.flatnonzero(kinds == "generated"), np.flatnonzero(kinds != "generated")
    n_gen = min(len(gen), max(count - len(held), (count + 1) // 2))
    return [int(i) for i in list(gen[:n_gen]) + list(held[: count - n_gen])]


class InMemoryFeatures:
    """Query features computed on the fly (e.g. for an inbox image), standing in for a query feature store."""

    def __init__(self, spec: dict, rows):
        self.spec, self.rows = spec, rows

    def read(self):
        return self.rows


def compute_scores(paths, model_name: str, name: str, method: MethodSpec, lambda_factor: float, train, queries,
                   query_features: dict | None = None):
    """-> ({"scores": (m, n)[, "per_step": (m, S, n)]}, lambda or None). Reads the method's feature stores, which
    must come from the stored model `model_name`; `query_features` (store name -> InMemoryFeatures) replaces the
    query-side stores."""
    import numpy as np

    from attribution import methods
    from attribution.scoring import similarity_scores
    from storage.features import FeatureStore
    from storage.models import StoredModel

    if method.kind == "pixel":
        return {"scores": similarity_scores(train.images, queries["images"], method.similarity)}, None
    if method.kind == "embedding":
        from attribution.encoder import embed
        from storage.models import load_classifier

        encoder = load_classifier(paths.model("image_encoder"))
        return {"scores": similarity_scores(embed(encoder, train.images), embed(encoder, queries["images"]),
                                            method.similarity)}, None
    model = StoredModel(paths.model(model_name))
    recipes = methods.feature_recipes(name, method, model.n_checkpoints())
    stores = {r.store_name: (query_features or {}).get(r.store_name) or FeatureStore.open(paths.features(r.store_name))
              for r in recipes}
    for r in recipes:
        spec = stores[r.store_name].spec
        if spec["model_digest"] != model.digest:
            raise ValueError(f"feature store {r.store_name} was computed from another model "
                             f"({spec['model_digest'][:12]} vs {model.digest[:12]}): rematerialize features_{name}")
    pairs = [(stores[t.store_name], stores[q.store_name]) for t, q in zip(recipes[::2], recipes[1::2])]
    for tr, qu in pairs:
        methods.check_compatible(tr.spec, qu.spec)
    if method.kind == "trak":
        s, lam = methods.trak_scores(method, pairs[0][0].read(), pairs[0][1].read(), lambda_factor)
        return {"scores": s}, lam
    if method.kind == "journey_trak":
        n_steps = len(queries["trajectory_timesteps"])
        s, per_step, lam = methods.journey_scores(method, pairs[0][0].read(), pairs[0][1].read(), n_steps,
                                                  lambda_factor)
        return {"scores": s, "per_step": per_step}, lam
    lrs = model.load_record()["checkpoint_lrs"]
    ckpts = [t.checkpoint for t in recipes[::2]]
    s = methods.tracin_method_scores([tr.read() for tr, _ in pairs], [qu.read() for _, qu in pairs],
                                     np.asarray(lrs)[ckpts])
    return {"scores": s}, None
