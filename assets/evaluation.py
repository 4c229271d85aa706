"""Evaluation assets (DESIGN 2): LDS subsets, subset models retrained per (subset, seed) partition, the actual
model outputs, and the LDS of every method with its bootstrap interval, the chosen lambda and the noise ceiling."""
import dagster as dg

from attribution.experiment import Experiment
from storage.resources import StorageResource

from .common import ACCELERATOR_POOL, WAREHOUSE_POOL, code_version, finish, key, png_markdown, setup_torch
from .modeling import ModelKit, explained_model, query_inputs, training_inputs

DATA, MODELS, EVAL = "data", "models", "evaluation"
KERNEL_SCORERS = ("kernel", "relative_if", "renormalized_if")


def subset_partitions(exp: Experiment) -> dg.MultiPartitionsDefinition:
    """(subsets, seed): one subset, or lds.models_per_process consecutive subsets trained together."""
    n, m = exp.lds.n_subsets, exp.lds.models_per_process
    blocks = [subset_key(i) if m == 1 else f"{subset_key(i)}-{subset_key(min(i + m, n) - 1)}" for i in range(0, n, m)]
    return dg.MultiPartitionsDefinition({
        "subset": dg.StaticPartitionsDefinition(blocks),
        "seed": dg.StaticPartitionsDefinition([str(s) for s in exp.lds.seeds]),
    })


def subset_key(i: int) -> str:
    return f"s{i:03d}"


def subsets_of(key: str) -> list[int]:
    """'s003' -> [3]; 's000-s007' -> [0, ..., 7]."""
    first, _, last = key.partition("-")
    return list(range(int(first[1:]), int((last or first)[1:]) + 1))


def subset_model_name(subset: int, seed: int) -> str:
    return f"subsets/{subset_key(subset)}_seed{seed}"


def build(exp: Experiment) -> list[dg.AssetsDefinition]:
    if not exp.lds.enabled:
        return []
    lds = exp.lds

    @dg.asset(
        key=key(exp, "lds_subsets"),
        group_name=DATA,
        kinds={"numpy"},
        deps=[key(exp, "training_set")],
        code_version=code_version("1", exp, "data", "lds"),
        description=f"{lds.n_subsets} random subsets keeping {lds.alpha:.0%} of the training set; "
                    f"{lds.n_selection} are reserved for choosing lambda, the rest give the reported LDS.",
    )
    def lds_subsets(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
        import hashlib


        from attribution.lds import sample_subsets, split_subsets
        from storage.artefacts import save_arrays
        from storage.datasets import load_image_dataset

        paths = storage.paths(exp.name)
        train, _ = load_image_dataset(paths.dataset("train_images"))
        masks = sample_subsets(len(train), lds.n_subsets, lds.alpha, lds.subset_seed)
        selection, test = split_subsets(lds.n_subsets, lds.n_selection, lds.subset_seed)
        save_arrays(paths.dataset("lds_subsets"), {"masks": masks, "selection": selection, "test": test})
        version = hashlib.sha256(masks.tobytes() + selection.tobytes()).hexdigest()
        return finish(context, storage, exp, version, {
            "n_subsets": lds.n_subsets, "subset_size": int(masks[0].sum()), "selection": str(selection.tolist()),
            "test": str(test.tolist())})

    @dg.asset(
        key=key(exp, "subset_models"),
        group_name=MODELS,
        kinds={"pytorch", "diffusers"},
        pool=ACCELERATOR_POOL,
        partitions_def=subset_partitions(exp),
        deps=[key(exp, "lds_subsets"), *[key(exp, n) for n in training_inputs(exp)]],
        code_version=code_version("1", exp, "model", "training", "lds", "lora"),
        description="One model per (subset, seed), retrained from scratch with the base recipe. A seed gives the "
                    "same initialisation and random streams for every subset (common random numbers).",
    )
    def subset_models(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
        import hashlib

        import numpy as np

        from attribution.models import count_parameters
        from storage.artefacts import load_arrays
        from storage.datasets import load_image_dataset
        from storage.warehouse import now

        device = setup_torch(exp)
        dims = context.partition_key.keys_by_dimension
        subsets, seed = subsets_of(dims["subset"]), int(dims["seed"])
        kit = ModelKit(exp, storage.paths(exp.name), device)
        paths = kit.paths
        train, _ = load_image_dataset(paths.dataset("train_images"))
        masks = load_arrays(paths.dataset("lds_subsets"), "LDS subsets (materialize lds_subsets)")[0]["masks"]
        context.log.info(f"subsets {subsets} ({int(masks[subsets[0]].sum())} images each), seed {seed}: "
                         f"{exp.training.steps} steps, {len(subsets)} model(s) side by side")
        x = kit.inputs("train", train)
        results = kit.train_many([x[masks[i]] for i in subsets], [train.labels[masks[i]] for i in subsets],
                                 [seed] * len(subsets))
        digests, losses = [], []
        for subset, result in zip(subsets, results):
            digest = kit.save(subset_model_name(subset, seed), result.unet,
                              meta={"subset": subset, "seed": seed, "wall_seconds": result.wall_seconds})
            final_loss = float(result.loss_curve[-min(100, len(result.loss_curve)):].mean())
            model_key = str(dg.MultiPartitionKey({"subset": subset_key(subset), "seed": str(seed)}))
            storage.warehouse().replace_rows("training_runs", [dict(
                experiment=exp.name, model="subset_model", partition_key=model_key, n_train=int(masks[subset].sum()),
                steps=exp.training.steps, batch_size=exp.training.batch_size,
                parameters=count_parameters(result.unet), final_loss=final_loss, wall_seconds=result.wall_seconds,
                digest=digest, run_id=context.run.run_id, created_at=now())],
                {"experiment": exp.name, "model": "subset_model", "partition_key": model_key})
            digests.append(digest)
            losses.append(final_loss)
        version = digests[0] if len(digests) == 1 else hashlib.sha256("".join(digests).encode()).hexdigest()
        return finish(context, storage, exp, version, {
            "subsets": str(subsets), "seed": seed, "n_train": int(masks[subsets[0]].sum()),
            "final_loss": float(np.mean(losses)), "wall_seconds": round(sum(r.wall_seconds for r in results), 1)})

    @dg.asset(
        key=key(exp, "model_outputs"),
        group_name=EVAL,
        kinds={"pytorch", "zarr", "duckdb"},
        pool=ACCELERATOR_POOL,
        deps=[key(exp, "subset_models"), key(exp, "query_set"), key(exp, "lds_subsets")],
        code_version=code_version("1", exp, "lds"),
        description=f"Each query's DDPM loss under every subset model, averaged over {lds.output_timesteps} "
                    f"timesteps x {lds.output_noises} noises shared by all models.",
    )
    def model_outputs(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
        import hashlib

        import numpy as np
        import pandas as pd

        from attribution.evaluation import query_losses
        from attribution.outputs import NoiseSchedule
        from storage.artefacts import IncompleteArtefactError, load_arrays
        from storage.models import StoredModel
        from storage.scores import save_scores
        from storage.warehouse import now

        device = setup_torch(exp)
        paths = storage.paths(exp.name)
        queries = load_arrays(paths.dataset("query_set"), "query set (materialize query_set)")[0]
        cond = ModelKit(exp, paths, device).conditioning(queries["label"])
        out = np.zeros((len(queries["images"]), lds.n_subsets, len(lds.seeds)))
        missing = []
        rows = []
        for i in range(lds.n_subsets):
            for r, seed in enumerate(lds.seeds):
                try:
                    model = StoredModel(paths.model(subset_model_name(i, seed)))
                except IncompleteArtefactError:
                    missing.append(f"{subset_key(i)}|{seed}")
                    continue
                out[:, i, r] = query_losses(model.load_unet(device), NoiseSchedule.from_scheduler(
                    model.load_scheduler()), query_inputs(queries), n_timesteps=lds.output_timesteps,
                    n_noises=lds.output_noises, seed=lds.output_seed, device=device, cond=cond)
                rows += [(exp.name, i, seed, q, str(queries["kind"][q]), float(out[q, i, r]))
                         for q in range(out.shape[0])]
        if missing:
            raise IncompleteArtefactError(f"subset_models partitions {missing} are not materialized: materialize "
                                          "them (e.g. a backfill of subset_models) before model_outputs")
        save_scores(paths.scores("model_outputs"), {"outputs": out}, {"seeds": list(lds.seeds)})
        df = pd.DataFrame(rows, columns=["experiment", "subset", "seed", "query_id", "query_kind", "output"])
        df["run_id"], df["created_at"] = context.run.run_id, now()
        storage.warehouse().replace_rows("model_outputs", df, {"experiment": exp.name})
        seed_sd = float(out.std(axis=2, ddof=1).mean()) if len(lds.seeds) > 1 else None
        return finish(context, storage, exp, hashlib.sha256(out.tobytes()).hexdigest(), {
            "shape": str(out.shape), "mean_output": float(out.mean()),
            "between_subset_sd": float(out.mean(axis=2).std(axis=1, ddof=1).mean()),
            "within_subset_seed_sd": seed_sd})

    method_scores = [key(exp, f"scores_{n}") for n in exp.attribution.methods]

    @dg.asset(
        key=key(exp, "lds"),
        group_name=EVAL,
        kinds={"numpy", "duckdb"},
        pool=WAREHOUSE_POOL,
        deps=[key(exp, "model_outputs"), key(exp, "lds_subsets"), *method_scores],
        code_version=code_version("1", exp, "lds", "attribution"),
        description="Linear datamodeling score of every method on the test subsets (Spearman of predicted vs "
                    "actual output, mean over queries, bootstrap 95% CI), lambda chosen on the selection subsets "
                    "only, and the noise ceiling a perfect predictor could reach given the seed-to-seed variance.",
    )
    def lds_scores(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
        import hashlib

        import pandas as pd

        from attribution.images import bar_chart
        from storage.warehouse import now

        table, sweep = evaluate_lds(exp, storage)
        version = hashlib.sha256(table.to_json(double_precision=15).encode()).hexdigest()  # values only
        created = now()
        for df in (table, sweep):
            df["experiment"], df["run_id"], df["created_at"] = exp.name, context.run.run_id, created
        wh = storage.warehouse()
        wh.replace_rows("lds", table, {"experiment": exp.name})
        wh.replace_rows("lds_lambda_sweep", sweep, {"experiment": exp.name})
        shown = table[table.query_set != "all"]
        chart = bar_chart(shown, "method", "value", "ci_low", "ci_high", "query_set", ceiling="noise_ceiling",
                          title=f"LDS ({exp.name}, {int(table.n_subsets.iloc[0])} test subsets)")
        context.log.info("\n" + table.to_string(index=False))
        md = pd.DataFrame(table[["method", "query_set", "value", "ci_low", "ci_high", "noise_ceiling",
                                 "kernel_lambda"]]).round(4).to_markdown(index=False)
        return finish(context, storage, exp, version, {
            "lds_chart": png_markdown(chart, "LDS per method with 95% CI; dashed: noise ceiling"),
            "lds_table": dg.MetadataValue.md(md),
        })

    return [lds_subsets, subset_models, model_outputs, lds_scores]


def evaluate_lds(exp: Experiment, storage):
    """-> (lds table, lambda sweep table) as DataFrames (without lineage columns)."""
    import numpy as np
    import pandas as pd

    from attribution.lds import choose_lambda, lds_with_ci, noise_ceiling
    from storage.artefacts import load_arrays
    from storage.datasets import load_image_dataset
    from storage.scores import load_scores

    from .scores import compute_scores

    lds = exp.lds
    paths = storage.paths(exp.name)
    train, _ = load_image_dataset(paths.dataset("train_images"))
    queries = load_arrays(paths.dataset("query_set"))[0]
    subsets = load_arrays(paths.dataset("lds_subsets"))[0]
    outputs = load_scores(paths.scores("model_outputs"), ("outputs",))[0]["outputs"].astype(np.float64)
    masks, sel, test = subsets["masks"], subsets["selection"], subsets["test"]
    actual = outputs.mean(axis=2)
    query_sets = {"generated": queries["kind"] == "generated", "heldout": queries["kind"] == "heldout",
                  "all": np.ones(len(queries["kind"]), bool)}
    ceilings = {qs: (noise_ceiling(outputs[m][:, test, :])["spearman"] if len(lds.seeds) > 1 and m.any() else None)
                for qs, m in query_sets.items()}
    rows, sweep_rows = [], []
    for name, method in exp.attribution.methods.items():
        lam = None
        if method.kind in ("trak", "journey_trak") and method.scorer in KERNEL_SCORERS:
            by_lambda, factor_of = {}, {}
            for factor in lds.lambda_factors:
                arrays, value = compute_scores(paths, explained_model(exp), name, method, factor, train, queries)
                by_lambda[value], factor_of[value] = arrays["scores"], factor
            lam, sweep = choose_lambda(by_lambda, masks[sel], actual[:, sel])
            scores = by_lambda[lam]
            sweep_rows += [dict(method=name, kernel_lambda=v, lambda_factor=factor_of[v], selection_lds=s)
                           for v, s in sweep.items()]
        else:
            scores = load_scores(paths.scores(name))[0]["scores"]
        for qs, m in query_sets.items():
            if not m.any():
                continue
            res = lds_with_ci(scores[m], masks[test], actual[m][:, test], n_boot=lds.bootstrap, seed=0)
            rows.append(dict(method=name, kind=method.kind, spec=method.model_dump_json(exclude_defaults=True),
                             kernel_lambda=lam, query_set=qs, value=res.mean, ci_low=res.ci_low,
                             ci_high=res.ci_high, noise_ceiling=ceilings[qs], n_subsets=res.n_subsets,
                             n_queries=res.n_queries, n_seeds=len(lds.seeds)))
    return pd.DataFrame(rows), pd.DataFrame(sweep_rows)
