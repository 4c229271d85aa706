"""Counterfactual evaluation (DESIGN 2): remove a generated image's top proponents, retrain, regenerate it from the
same seed, and measure how far it moved (pixel L2, in-domain embedding cosine) against removing random images."""
import dagster as dg

from attribution.experiment import Experiment
from storage.resources import StorageResource

from .common import ACCELERATOR_POOL, WAREHOUSE_POOL, code_version, finish, key, png_markdown, setup_torch
from .modeling import ModelKit, training_inputs

RANDOM = "random"


def partition_key(query: int, method: str) -> str:
    return f"q{query:03d}__{method}"


def build(exp: Experiment) -> list[dg.AssetsDefinition]:
    cf = exp.counterfactual

    @dg.asset(
        key=key(exp, "image_encoder"),
        group_name="models",
        kinds={"pytorch"},
        pool=ACCELERATOR_POOL,
        deps=[key(exp, "training_set")],
        code_version=code_version("1", exp, "data", "counterfactual"),
        description="In-domain image encoder: a small CNN classifier trained on the training labels. Its "
                    "penultimate features replace CLIP embeddings, its posteriors Inception's (nothing downloads).",
    )
    def image_encoder(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
        from attribution.encoder import classifier_config, predict_proba, train_classifier
        from storage.datasets import load_image_dataset
        from storage.models import save_classifier

        setup_torch(exp)
        paths = storage.paths(exp.name)
        train, _ = load_image_dataset(paths.dataset("train_images"))
        heldout, _ = load_image_dataset(paths.dataset("heldout_images"))
        n_classes = len(train.class_names)
        model, train_acc = train_classifier(train.images, train.labels, n_classes, steps=cf.encoder_steps)
        heldout_acc = float((predict_proba(model, heldout.images).argmax(1) == heldout.labels).mean())
        context.log.info(f"encoder accuracy: train {train_acc:.3f}, held-out {heldout_acc:.3f}")
        digest = save_classifier(paths.model("image_encoder"), model, classifier_config(train.images, n_classes),
                                 {"train_accuracy": train_acc, "heldout_accuracy": heldout_acc})
        return finish(context, storage, exp, digest, {"train_accuracy": train_acc, "heldout_accuracy": heldout_acc})

    if not cf.enabled:
        return [image_encoder]
    removal_methods = [*cf.methods, RANDOM]
    partitions = dg.StaticPartitionsDefinition(
        [partition_key(q, m) for q in range(cf.n_queries) for m in removal_methods])

    @dg.asset(
        key=key(exp, "counterfactual_models"),
        group_name="models",
        kinds={"pytorch", "diffusers"},
        pool=ACCELERATOR_POOL,
        partitions_def=partitions,
        deps=[*[key(exp, n) for n in training_inputs(exp)], key(exp, "query_set"),
              *[key(exp, f"scores_{m}") for m in cf.methods]],
        code_version=code_version("1", exp, "model", "training", "queries", "counterfactual", "lora"),
        description=f"For each of the first {cf.n_queries} generated queries and each method (and a random "
                    f"control): the base recipe retrained without the query's top {cf.remove} proponents, and the "
                    "query regenerated from its original seed.",
    )
    def counterfactual_models(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
        import numpy as np

        from attribution.influence_stats import top_k
        from attribution.runtime import stable_seed
        from storage.artefacts import load_arrays, save_arrays
        from storage.datasets import load_image_dataset
        from storage.scores import load_scores

        device = setup_torch(exp)
        q_part, method = context.partition_key.split("__")
        q = int(q_part[1:])
        kit = ModelKit(exp, storage.paths(exp.name), device)
        paths = kit.paths
        train, _ = load_image_dataset(paths.dataset("train_images"))
        queries = load_arrays(paths.dataset("query_set"))[0]
        if method == RANDOM:
            removed = np.sort(np.random.default_rng(stable_seed("counterfactual-random", q)).choice(
                len(train), cf.remove, replace=False))
        else:
            removed = np.sort(top_k(load_scores(paths.scores(method))[0]["scores"][q:q + 1], cf.remove)[0])
        keep = np.setdiff1d(np.arange(len(train)), removed)
        context.log.info(f"query {q}, {method}: retraining on {len(keep)} images ({cf.remove} removed)")
        result = kit.train(kit.inputs("train", train)[keep], train.labels[keep])
        regen = kit.decode(kit.sample(result.unet, queries["seed"][q:q + 1], queries["label"][q:q + 1],
                                      train.shape, steps=exp.queries.sampling_steps).images)[0]
        digest = kit.save(f"counterfactual/{context.partition_key}", result.unet, meta={"query": q, "method": method})
        save_arrays(paths.dataset(f"counterfactual_{context.partition_key}"),
                    {"regenerated": regen, "removed": removed}, {"query": q, "method": method})
        l2 = float(np.linalg.norm(regen - queries["images"][q]))
        return finish(context, storage, exp, digest, {"query": q, "method": method, "pixel_l2": l2,
                                                      "wall_seconds": round(result.wall_seconds, 1)})

    @dg.asset(
        key=key(exp, "counterfactual"),
        group_name="evaluation",
        kinds={"numpy", "duckdb"},
        pool=WAREHOUSE_POOL,
        deps=[key(exp, "counterfactual_models"), key(exp, "image_encoder"), key(exp, "query_set")],
        code_version=code_version("1", exp, "counterfactual"),
        description="How far each generated query moved when its top proponents (or random images) were removed: "
                    "pixel L2 and in-domain embedding cosine to the original. Larger moves mean better attribution.",
    )
    def counterfactual(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
        import hashlib

        import numpy as np
        import pandas as pd

        from attribution.encoder import cosine, embed
        from attribution.images import image_grid
        from storage.artefacts import load_arrays
        from storage.models import load_classifier
        from storage.warehouse import now

        paths = storage.paths(exp.name)
        queries = load_arrays(paths.dataset("query_set"))[0]
        encoder = load_classifier(paths.model("image_encoder"))
        rows, grid = [], []
        for q in range(cf.n_queries):
            original = queries["images"][q]
            regenerated = [load_arrays(paths.dataset(f"counterfactual_{partition_key(q, m)}"),
                                       "counterfactual image (materialize counterfactual_models)")[0]["regenerated"]
                           for m in removal_methods]
            sims = cosine(np.repeat(embed(encoder, original[None]), len(regenerated), 0),
                          embed(encoder, np.stack(regenerated)))
            for m, img, sim in zip(removal_methods, regenerated, sims):
                rows.append(dict(method=m, query_id=q, removed=cf.remove,
                                 pixel_l2=float(np.linalg.norm(img - original)), embedding_cosine=float(sim)))
            grid.append(np.stack([original, *regenerated]))
        table = pd.DataFrame(rows)
        table["experiment"], table["run_id"], table["created_at"] = exp.name, context.run.run_id, now()
        storage.warehouse().replace_rows("counterfactual", table, {"experiment": exp.name})
        summary = table.groupby("method", sort=False)[["pixel_l2", "embedding_cosine"]].mean().round(4)
        context.log.info("\n" + summary.to_string())
        return finish(context, storage, exp, hashlib.sha256(table[["pixel_l2"]].to_numpy().tobytes()).hexdigest(), {
            "mean_by_method": dg.MetadataValue.md(summary.reset_index().to_markdown(index=False)),
            "regenerated": png_markdown(image_grid(grid, scale=4), "each row: the original, then regenerated "
                                        f"after removing the top proponents by {', '.join(removal_methods)}"),
        })

    return [image_encoder, counterfactual_models, counterfactual]
