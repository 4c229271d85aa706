"""New query images dropped into the experiment's inbox (one dynamic partition each, registered by the inbox sensor
in pipelines/operations.py), attributed with every method of the experiment against the stored training features.
Results land in the same tables as the query set's: diffattr.top_attributions with query_kind 'inbox' and the
partition key in query_key."""
import dagster as dg

from attribution.experiment import Experiment
from storage.resources import StorageResource

from .common import ACCELERATOR_POOL, code_version, finish, key, png_markdown, setup_torch
from .modeling import explained_model

GRID_PROPONENTS = 8


def inbox_partitions(exp: Experiment) -> dg.DynamicPartitionsDefinition:
    return dg.DynamicPartitionsDefinition(name=f"{exp.name}__inbox")


def build(exp: Experiment) -> list[dg.AssetsDefinition]:
    if not exp.operations.inbox:
        return []
    a = exp.attribution
    deps = [key(exp, "training_set"), key(exp, explained_model(exp)), key(exp, "query_set")]
    deps += [key(exp, f"features_{n}") for n, m in a.methods.items() if m.kind not in ("pixel", "embedding")]
    if any(m.kind == "embedding" for m in a.methods.values()):
        deps.append(key(exp, "image_encoder"))

    @dg.asset(
        key=key(exp, "inbox_attributions"),
        group_name="attribution",
        kinds={"pytorch", "duckdb"},
        pool=ACCELERATOR_POOL,
        partitions_def=inbox_partitions(exp),
        deps=deps,
        code_version=code_version("1", exp, "attribution"),
        description="A new image dropped into the experiment's inbox, attributed with every method (its query "
                    f"features computed now, scored against the stored training features); top-{a.top_k} "
                    "proponents and opponents in diffattr.top_attributions (query_kind 'inbox').",
    )
    def inbox_attributions(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
        import hashlib

        import numpy as np
        import pandas as pd

        from attribution.images import image_grid
        from attribution.influence_stats import top_k
        from storage.artefacts import load_arrays, save_arrays
        from storage.datasets import load_image_dataset
        from storage.inbox import load_inbox_image
        from storage.warehouse import now

        from .scores import compute_scores

        device = setup_torch(exp)
        pk = context.partition_key
        paths = storage.paths(exp.name)
        image, source = load_inbox_image(paths, pk)
        train, _ = load_image_dataset(paths.dataset("train_images"))
        query_set = load_arrays(paths.dataset("query_set"), "query set (materialize query_set)")[0]
        queries = {"images": image[None], "kind": np.array(["inbox"]),
                   "trajectory_x0": np.zeros((0, 0, *image.shape), np.float32),
                   "trajectory_timesteps": query_set["trajectory_timesteps"]}
        query_id = -1 - int(hashlib.sha256(pk.encode()).hexdigest()[:7], 16)  # its own noise stream
        rows, grid, scores = [], [], {}
        created, run_id = now(), context.run.run_id
        for name, method in a.methods.items():
            arrays, _ = compute_scores(paths, explained_model(exp), name, method, a.lambda_factor, train, queries,
                                       query_features=fresh_query_features(exp, paths, name, method, queries,
                                                                           np.array([query_id]), device))
            s = arrays["scores"]
            scores[name] = s[0]
            k = min(a.top_k, s.shape[1])
            for direction, largest in (("proponent", True), ("opponent", False)):
                for r, i in enumerate(top_k(s, k, largest=largest)[0]):
                    rows.append(dict(experiment=exp.name, method=name, query_id=-1, query_kind="inbox",
                                     direction=direction, rank=r + 1, train_id=int(i), train_group=str(train.groups[i]),
                                     score=float(s[0, i]), run_id=run_id, created_at=created, query_key=pk))
            grid.append(np.concatenate([image[None], train.images[top_k(s, min(GRID_PROPONENTS, s.shape[1]))[0]]]))
        storage.warehouse().replace_rows("top_attributions", pd.DataFrame(rows),
                                         {"experiment": exp.name, "query_key": pk})
        save_arrays(paths.result(f"inbox/{pk}"), scores, {"source": source})
        context.log.info(f"{source}: attributed with {', '.join(a.methods)}")
        version = hashlib.sha256(b"".join(v.tobytes() for v in scores.values())).hexdigest()
        return finish(context, storage, exp, version, {
            "source_file": source,
            "top_proponents": png_markdown(image_grid(grid, scale=4), "each row (one per method: "
                                           + ", ".join(a.methods) + "): the image, then its top proponents"),
        })

    return [inbox_attributions]


def fresh_query_features(exp: Experiment, paths, name: str, method, queries: dict, query_ids,
                         device: str = "cpu") -> dict:
    """Query-side features of new images for a gradient method (store name -> InMemoryFeatures), computed with
    exactly the recipe, model and projection of the method's stored query features (on ``device``, as the
    features asset computes them)."""
    import hashlib

    import numpy as np

    from attribution.methods import Featurizer, feature_recipes, feature_spec
    from attribution.outputs import NoiseSchedule
    from storage.models import StoredModel

    from .features import recipe_inputs
    from .scores import InMemoryFeatures

    a = exp.attribution
    if method.kind in ("pixel", "embedding"):
        return {}
    model = StoredModel(paths.model(explained_model(exp)))
    schedule = NoiseSchedule.from_scheduler(model.load_scheduler())
    out = {}
    for recipe in feature_recipes(name, method, model.n_checkpoints())[1::2]:
        unet = model.load_unet(device, checkpoint=recipe.checkpoint)
        x, ids, t, _ = recipe_inputs(recipe, None, None, queries, {}, n_gen=0, query_ids=query_ids)
        feat = Featurizer(unet, schedule, recipe, projector=a.projector, proj_dim=a.proj_dim, proj_seed=a.proj_seed,
                          noise_seed=a.noise_seed, threads=exp.torch_threads)
        rows = np.concatenate([feat.rows(x[b:b + a.batch_size], ids[b:b + a.batch_size],
                                         None if t is None else t[b:b + a.batch_size])
                               for b in range(0, len(x), a.batch_size)])
        spec = feature_spec(recipe, model_digest=model.digest, num_params=feat.engine.num_params,
                            projector=feat.projector.spec(), noise_seed=a.noise_seed,
                            data_hash=hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()[:16],
                            n_rows=len(x))
        out[recipe.store_name] = InMemoryFeatures(spec, rows)
    return out
