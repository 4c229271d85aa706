"""Feature assets: one zarr feature store per recipe of each gradient-based method (train and query side, per
checkpoint for TracIn/ReTrac), computed in shards; a rerun after a crash computes only the missing shards."""
import dagster as dg

from attribution.experiment import Experiment, MethodSpec
from storage.resources import StorageResource

from .common import ACCELERATOR_POOL, code_version, finish, key, setup_torch
from .modeling import ModelKit, explained_model

GROUP = "features"
SIMILARITY_KINDS = ("pixel", "embedding")  # methods scored directly on images, no gradient features


def build(exp: Experiment) -> list[dg.AssetsDefinition]:
    return [_feature_asset(exp, name, m) for name, m in exp.attribution.methods.items() if m.kind not in SIMILARITY_KINDS]


def _feature_asset(exp: Experiment, name: str, method: MethodSpec) -> dg.AssetsDefinition:
    a = exp.attribution

    @dg.asset(
        key=key(exp, f"features_{name}"),
        group_name=GROUP,
        kinds={"pytorch", "zarr"},
        pool=ACCELERATOR_POOL,
        deps=[key(exp, explained_model(exp)), key(exp, "training_set"), key(exp, "query_set")],
        code_version=code_version("3", exp, "attribution"),
        description=f"Projected per-sample gradient features for '{name}' ({method.kind}, output {method.output}, "
                    f"K={method.K}, {a.projector} projection to k={a.proj_dim}): zarr stores for the training and "
                    "query sets, written shard by shard with a completion mask.",
    )
    def features(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
        import hashlib
        import time

        import numpy as np

        from attribution.methods import Featurizer, feature_recipes, feature_spec
        from attribution.outputs import NoiseSchedule
        from storage.artefacts import load_arrays
        from storage.datasets import load_image_dataset
        from storage.features import FeatureStore, compute_missing_shards
        from storage.warehouse import now

        device = setup_torch(exp)
        paths = storage.paths(exp.name)
        kit = ModelKit(exp, paths, device)
        model = kit.stored(explained_model(exp))
        record = model.load_record()
        schedule = NoiseSchedule.from_scheduler(model.load_scheduler())
        train, _ = load_image_dataset(paths.dataset("train_images"))
        train_x = kit.inputs("train", train)
        queries, _ = load_arrays(paths.dataset("query_set"), "query set (materialize query_set first)")
        n_gen = int((queries["kind"] == "generated").sum())
        recipes = feature_recipes(name, method, model.n_checkpoints())
        rows, digests, table = {}, [], []
        for recipe in recipes:
            unet = model.load_unet(device, checkpoint=recipe.checkpoint)
            x, ids, t, labels = recipe_inputs(recipe, train_x, train.labels, queries, record, n_gen)
            cond = kit.conditioning(labels)
            data_hash = hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()[:16]
            feat = Featurizer(unet, schedule, recipe, projector=a.projector, proj_dim=a.proj_dim,
                              proj_seed=a.proj_seed, noise_seed=a.noise_seed, threads=exp.torch_threads)
            spec = feature_spec(recipe, model_digest=model.digest, num_params=feat.engine.num_params,
                                projector=feat.projector.spec(), noise_seed=a.noise_seed, data_hash=data_hash,
                                n_rows=len(x))
            store = FeatureStore.create_or_open(paths.features(recipe.store_name), spec, len(x), feat.dim,
                                                a.shard_rows)

            def compute(shard, sl, x=x, ids=ids, t=t, cond=cond, feat=feat):
                out = []
                for b in range(sl.start, sl.stop, a.batch_size):
                    e = min(b + a.batch_size, sl.stop)
                    out.append(feat.rows(x[b:e], ids[b:e], None if t is None else t[b:e],
                                         None if cond is None else cond[b:e]))
                return np.concatenate(out)

            start = time.perf_counter()
            done = compute_missing_shards(store, compute, on_shard=lambda s, r=recipe, st=store: context.log.info(
                f"{r.store_name}: shard {s + 1}/{st.n_shards} done"))
            wall = time.perf_counter() - start
            per_row = recipe.K * recipe.noise_draws
            computed_rows = sum(store.shard_slice(s).stop - store.shard_slice(s).start for s in done)
            speed = computed_rows * per_row / wall if done else None
            context.log.info(f"{recipe.store_name}: {len(done)} of {store.n_shards} shards computed "
                             f"({store.n_shards - len(done)} already complete) in {wall:.1f} s; per-sample "
                             f"gradients by the {feat.engine.backend} backend ({feat.engine.backend_reason}) on {device}")
            digest = store.digest()
            digests.append(digest)
            rows[recipe.store_name] = {"rows": len(x), "k": feat.dim, "shards_computed": len(done),
                                       "shards": store.n_shards, "seconds": round(wall, 2),
                                       "sample_timesteps_per_s": round(speed, 1) if speed else None,
                                       "gradient_backend": feat.engine.backend}
            table.append(dict(experiment=exp.name, method=name, store=recipe.store_name, role=recipe.role,
                              checkpoint=recipe.checkpoint, n_rows=len(x), dim=feat.dim,
                              num_params=feat.engine.num_params, projector=a.projector, shards_total=store.n_shards,
                              shards_computed=len(done), wall_seconds=wall, sample_timesteps_per_s=speed,
                              digest=digest, url=store.url, run_id=context.run.run_id, created_at=now()))
        storage.warehouse().replace_rows("feature_stores", table, {"experiment": exp.name, "method": name})
        version = hashlib.sha256("".join(digests).encode()).hexdigest()
        return finish(context, storage, exp, version, {
            "stores": dg.MetadataValue.json(rows),
            "num_params": table[0]["num_params"],
            "k": a.proj_dim,
            "projector": a.projector,
            "shards_computed": sum(r["shards_computed"] for r in rows.values()),
        })

    return features


def recipe_inputs(recipe, train_x, train_labels, queries: dict, record: dict, n_gen: int, query_ids=None):
    """(x, ids, t, labels) a recipe featurizes: the training inputs (with their recorded timesteps for TracIn), the
    queries, or the queries' Journey-TRAK trajectory points; labels condition a conditional model. Query ids are
    negative (default -1, -2, ...) so their noise streams never coincide with a training sample's."""
    import numpy as np

    from attribution.methods import journey_query_inputs

    from .modeling import query_inputs

    if recipe.role == "train":
        t = record["last_timesteps"][recipe.checkpoint] if recipe.timesteps == "recorded" else None
        return train_x, np.arange(len(train_x)), t, train_labels
    x_q = query_inputs(queries)
    ids = query_ids if query_ids is not None else -1 - np.arange(len(x_q))
    labels = queries["label"] if "label" in queries else np.zeros(len(x_q), np.int64)
    if recipe.timesteps == "trajectory":
        x, t, steps = journey_query_inputs(queries["trajectory_x0"], queries["trajectory_timesteps"], x_q, n_gen)
        return (x, (-1 - np.arange(len(x)) if query_ids is None else np.repeat(ids, steps)), t,
                np.repeat(labels, steps))
    return x_q, ids, None, labels
