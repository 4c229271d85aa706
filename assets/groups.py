"""Group attribution assets (DESIGN 1.5 and 2): Shapley values of data contributors for global properties F of the
model, from coalition models obtained by retraining, fine-tuning or sparsified fine-tuning (sFT), judged by the
group LDS on retrained held-out coalitions and by removing the top / bottom groups and retraining.

Every model of the game (null, full, pruned, each coalition) is scored the same way: `shapley.n_images` images
from the same generator seeds, and each property of `shapley.properties` computed on them.
"""
import dagster as dg

from attribution.experiment import Experiment
from storage.resources import StorageResource

from .common import ACCELERATOR_POOL, WAREHOUSE_POOL, code_version, finish, key, png_markdown, setup_torch
from .modeling import ModelKit, explained_model, generation_labels, training_inputs

SFT = "sparsified_finetune"
DIRECTIONS = ("top", "bottom")


def coalition_plan(exp: Experiment):
    """Fixed by the spec alone (numpy, no data): the coalition models can be static partitions."""
    from attribution.groups import plan_coalitions

    sh = exp.shapley
    return plan_coalitions(len(sh.groups), sh.n_coalitions, sh.banzhaf_coalitions, sh.lds_coalitions,
                           sh.coalition_seed)


def partition_key(method: str, cid: str) -> str:
    return f"{method}__{cid}"


def result_name(method: str, cid: str) -> str:
    return f"coalitions/{partition_key(method, cid)}"


def coalition_partition_keys(exp: Experiment, plan) -> list[str]:
    """Every (method, coalition) model; the group LDS's held-out coalitions are always retrained (ground truth)."""
    from attribution.groups import coalition_id

    keys = [partition_key(m, cid) for m in exp.shapley.methods for cid in plan.model_coalitions(m)]
    if "retrain" not in exp.shapley.methods:
        keys += [partition_key("retrain", coalition_id(mask)) for mask in plan.lds]
    return keys


def _purposes(plan, cid: str) -> str:
    from attribution.groups import coalition_id

    sets = {"kernel": plan.kernel, "loo": plan.loo, "banzhaf": plan.banzhaf, "lds": plan.lds}
    found = [name for name, masks in sets.items() if cid in {coalition_id(m) for m in masks}]
    return "+".join(found) or ("full" if set(cid[1:]) == {"1"} else "")


class GameScorer:
    """Generates the fixed image set with a model and computes every property of the experiment on it."""

    def __init__(self, exp: Experiment, paths, device: str):
        from attribution.properties import build_context, load_property
        from storage.datasets import load_image_dataset
        from storage.models import load_classifier, load_image_model

        self.exp, self.paths, self.device = exp, paths, device
        sh = exp.shapley
        for p in sh.properties:
            load_property(p)  # an unknown property fails here, before any image is generated
        if sh.encoder:
            model = load_image_model(sh.encoder)
            embed, proba = model.embed, model.predict_proba
        else:
            from attribution.encoder import embed as classifier_embed
            from attribution.encoder import predict_proba

            clf = load_classifier(paths.model("image_encoder"))
            embed, proba = (lambda x: classifier_embed(clf, x)), (lambda x: predict_proba(clf, x))
        reference, _ = load_image_dataset(paths.dataset("heldout_images"))
        self.shape = reference.shape
        self.labels = generation_labels(exp, load_image_dataset(paths.dataset("train_images"))[0].labels,
                                        sh.n_images)
        self.kit = ModelKit(exp, paths, device)
        self.context = build_context(embed, proba, reference.images, sh.reference_clusters)

    def __call__(self, unet):
        from attribution.properties import evaluate_property
        from attribution.sampling import image_seeds

        sh = self.exp.shapley
        images = self.kit.decode(self.kit.sample(unet, image_seeds(sh.image_seed, sh.n_images), self.labels,
                                                 self.shape, steps=sh.sampling_steps).images)
        return images, {p: evaluate_property(p, images, self.context) for p in sh.properties}


def record_game_model(context, storage, exp: Experiment, *, name: str, method: str, cid: str, purpose: str,
                      n_train: int, steps: int, parameters: int, wall_seconds: float, images, values: dict) -> dict:
    """Store a model's generated images and property values, one coalition_runs row per property; -> metadata."""
    import numpy as np

    from attribution.images import image_grid
    from storage.artefacts import save_arrays
    from storage.warehouse import now

    paths = storage.paths(exp.name)
    meta = dict(method=method, coalition=cid, purpose=purpose, n_train=n_train, steps=steps, parameters=parameters,
                wall_seconds=wall_seconds, properties=values)
    save_arrays(paths.result(name), {"images": images.astype(np.float32)}, meta)
    created = now()
    storage.warehouse().replace_rows("coalition_runs", [
        dict(experiment=exp.name, method=method, coalition=cid, purpose=purpose, n_groups=cid.count("1"),
             n_train=n_train, steps=steps, parameters=parameters, wall_seconds=wall_seconds, property=p, value=v,
             run_id=context.run.run_id, created_at=created) for p, v in values.items()],
        {"experiment": exp.name, "method": method, "coalition": cid, "purpose": purpose})
    context.log.info(f"{method} {cid} ({n_train} images, {wall_seconds:.1f} s): "
                     + ", ".join(f"{p}={v:.4f}" for p, v in values.items()))
    return {"coalition": cid, "n_train": n_train, "steps": steps, "parameters": parameters,
            "wall_seconds": round(wall_seconds, 2), **{f"F_{p}": v for p, v in values.items()},
            "samples": png_markdown(image_grid([images[:16]], scale=3), "generated images (fixed seeds)")}


def game_values(paths, method: str, cid: str) -> dict:
    from storage.artefacts import load_arrays

    return load_arrays(paths.result(result_name(method, cid)),
                       f"property values of the {method} model of coalition {cid} (materialize it first)")[1]["properties"]


def build(exp: Experiment) -> list[dg.AssetsDefinition]:
    sh = exp.shapley
    if not sh.enabled:
        return []
    from attribution.groups import coalition_id

    G = len(sh.groups)
    plan = coalition_plan(exp)
    empty, full = coalition_id([False] * G), coalition_id([True] * G)
    scored = [key(exp, "image_encoder"), *[key(exp, n) for n in training_inputs(exp)]]

    @dg.asset(
        key=key(exp, "contributor_groups"),
        group_name="data",
        kinds={"numpy"},
        deps=[key(exp, "training_set")],
        code_version=code_version("1", exp, "data", "shapley"),
        description=f"The {G} data contributors ({', '.join(sh.groups)}) and every coalition the game evaluates: "
                    f"{len(plan.kernel)} Shapley-kernel samples, {G} leave-one-out, {len(plan.banzhaf)} uniform "
                    f"(Banzhaf), {len(plan.lds)} held-out half coalitions (group LDS).",
    )
    def contributor_groups(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
        import hashlib

        import numpy as np

        from attribution.groups import build_groups
        from storage.artefacts import save_arrays
        from storage.datasets import load_image_dataset

        paths = storage.paths(exp.name)
        train, _ = load_image_dataset(paths.dataset("train_images"))
        groups = build_groups(train.groups, sh.groups)  # GroupError names an empty or unknown group
        arrays = {"membership": groups.membership, "kernel": plan.kernel, "banzhaf": plan.banzhaf,
                  "loo": plan.loo, "lds": plan.lds}
        save_arrays(paths.result("contributor_groups"), arrays, {"groups": list(groups.names)})
        version = hashlib.sha256(b"".join(np.ascontiguousarray(a).tobytes() for a in arrays.values())).hexdigest()
        return finish(context, storage, exp, version, {
            "group_sizes": dg.MetadataValue.md("| group | images |\n|---|---|\n" + "\n".join(
                f"| {g} | {n} |" for g, n in zip(groups.names, groups.sizes))),
            **{f"models_{m}": len(plan.model_coalitions(m)) for m in sh.methods},
            "lds_coalitions": len(plan.lds)})

    @dg.asset(
        key=key(exp, "null_model"),
        group_name="models",
        kinds={"pytorch", "diffusers"},
        pool=ACCELERATOR_POOL,
        deps=scored,
        code_version=code_version("1", exp, "model", "training", "shapley", "lora"),
        description="The empty coalition, v(empty): " + ("the base model with the training seed's fresh LoRA "
                    "adapter (no update yet)." if exp.lora.enabled else "the untrained model (the training seed's "
                    "initial weights)."),
    )
    def null_model(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
        from attribution.models import count_parameters

        device = setup_torch(exp)
        paths = storage.paths(exp.name)
        scorer = GameScorer(exp, paths, device)
        unet = scorer.kit.initial(scorer.shape, exp.training.seed)
        digest = scorer.kit.save("null_model", unet)
        images, values = scorer(unet)
        return finish(context, storage, exp, digest, record_game_model(
            context, storage, exp, name=result_name("null", empty), method="null", cid=empty, purpose="null",
            n_train=0, steps=0, parameters=count_parameters(unet), wall_seconds=0.0, images=images, values=values))

    @dg.asset(
        key=key(exp, "full_model"),
        group_name="models",
        kinds={"pytorch"},
        pool=ACCELERATOR_POOL,
        deps=[key(exp, explained_model(exp)), *scored],
        code_version=code_version("1", exp, "shapley"),
        description="The full coalition under retraining: the base model (the same recipe on every group), scored "
                    "on the global properties, v(full).",
    )
    def full_model(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
        from attribution.models import count_parameters
        from storage.models import StoredModel

        from storage.datasets import load_image_dataset

        device = setup_torch(exp)
        paths = storage.paths(exp.name)
        base = StoredModel(paths.model(explained_model(exp)))
        unet = base.load_unet(device)
        images, values = GameScorer(exp, paths, device)(unet)
        return finish(context, storage, exp, base.digest, record_game_model(
            context, storage, exp, name=result_name("retrain", full), method="retrain", cid=full, purpose="full",
            n_train=len(load_image_dataset(paths.dataset("train_images"))[0]), steps=exp.training.steps,
            parameters=count_parameters(unet), wall_seconds=float(base.meta.get("wall_seconds", 0.0)),
            images=images, values=values))

    assets = [contributor_groups, null_model, full_model]
    if SFT in sh.methods:
        assets.append(_pruned_model(exp, scored))
    assets += [_coalition_models(exp, plan, scored), _group_values(exp, plan, empty, full)]
    if sh.lds_coalitions:
        assets.append(_group_lds(exp, plan))
    if sh.counterfactual_methods:
        assets += _group_counterfactual(exp, full, scored)
    return assets


def _pruned_model(exp: Experiment, scored: list) -> dg.AssetsDefinition:
    sh = exp.shapley
    what, how = (("LoRA ranks", "per layer, by the norm of each rank-1 update") if exp.lora.enabled else
                 ("channels", "structured, L2 magnitude, torch-pruning"))

    @dg.asset(
        key=key(exp, "pruned_model"),
        group_name="models",
        kinds={"pytorch", "diffusers"},
        pool=ACCELERATOR_POOL,
        deps=[key(exp, explained_model(exp)), *scored],
        code_version=code_version("1", exp, "shapley"),
        description=f"sFT's starting point: the {explained_model(exp)} with {sh.prune_ratio:.0%} of its {what} "
                    f"pruned ({how}), then fine-tuned on the full data for "
                    f"{sh.pruned_finetune.steps} steps. Pruned once; every coalition fine-tunes a copy.",
    )
    def pruned_model(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
        import time

        from attribution.models import count_parameters
        from storage.datasets import load_image_dataset

        device = setup_torch(exp)
        scorer = GameScorer(exp, storage.paths(exp.name), device)
        kit, paths = scorer.kit, scorer.kit.paths
        train, _ = load_image_dataset(paths.dataset("train_images"))
        unet = kit.load(explained_model(exp))
        start = time.perf_counter()
        report = kit.prune(unet, sh.prune_ratio)
        prune_seconds = time.perf_counter() - start
        removed = 1 - report["params_after"] / report["params_before"]
        context.log.info(f"pruned {report['params_before']} -> {report['params_after']} {what} parameters "
                         f"({removed:.1%} removed); recovering for {sh.pruned_finetune.steps} steps")
        result = kit.train(kit.inputs("train", train), train.labels, sh.pruned_finetune, init=unet)
        digest = kit.save("pruned_model", result.unet, pruned=True,
                          meta={"prune": report, "recovery_seconds": result.wall_seconds})
        images, values = scorer(result.unet)
        meta = record_game_model(
            context, storage, exp, name="pruned_model", method=SFT, cid="pruned", purpose="pruned",
            n_train=len(train), steps=sh.pruned_finetune.steps, parameters=count_parameters(result.unet),
            wall_seconds=prune_seconds + result.wall_seconds, images=images, values=values)
        return finish(context, storage, exp, digest, {
            **meta, "parameters_before": report["params_before"], "parameters_removed": round(removed, 4)})

    return pruned_model


def _coalition_models(exp: Experiment, plan, scored: list) -> dg.AssetsDefinition:
    sh = exp.shapley
    keys = coalition_partition_keys(exp, plan)
    deps = [key(exp, "contributor_groups"), *scored]
    if "finetune" in sh.methods:
        deps.append(key(exp, explained_model(exp)))
    if SFT in sh.methods:
        deps.append(key(exp, "pruned_model"))

    @dg.asset(
        key=key(exp, "coalition_models"),
        group_name="models",
        kinds={"pytorch", "diffusers"},
        pool=ACCELERATOR_POOL,
        partitions_def=dg.StaticPartitionsDefinition(keys),
        deps=deps,
        code_version=code_version("1", exp, "model", "training", "shapley", "lora"),
        description="One model per (method, coalition) of the game: retrained from scratch, the full model "
                    f"fine-tuned ({sh.finetune.steps} steps), or the pruned model fine-tuned (sFT) on the coalition's "
                    "groups; scored on the global properties. Wall time per model is recorded (coalition_runs).",
    )
    def coalition_models(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
        from attribution.groups import Groups, parse_coalition_id
        from attribution.models import count_parameters
        from storage.artefacts import load_arrays
        from storage.datasets import load_image_dataset

        device = setup_torch(exp)
        method, cid = context.partition_key.split("__")
        scorer = GameScorer(exp, storage.paths(exp.name), device)
        kit, paths = scorer.kit, scorer.kit.paths
        train, _ = load_image_dataset(paths.dataset("train_images"))
        arrays, meta = load_arrays(paths.result("contributor_groups"), "contributor groups (materialize "
                                   "contributor_groups)")
        rows = Groups(tuple(meta["groups"]), arrays["membership"]).rows(parse_coalition_id(cid, len(sh.groups)))
        if method == "retrain":
            init, spec = None, exp.training
        else:
            init = kit.load("pruned_model" if method == SFT else explained_model(exp))
            spec = sh.finetune
        context.log.info(f"{method} on coalition {cid}: {len(rows)} images, {spec.steps} steps")
        result = kit.train(kit.inputs("train", train)[rows], train.labels[rows], spec, init=init)
        digest = kit.save(f"coalitions/{context.partition_key}", result.unet, pruned=method == SFT,
                          meta={"method": method, "coalition": cid, "wall_seconds": result.wall_seconds})
        images, values = scorer(result.unet)
        return finish(context, storage, exp, digest, record_game_model(
            context, storage, exp, name=result_name(method, cid), method=method, cid=cid,
            purpose=_purposes(plan, cid), n_train=len(rows), steps=spec.steps,
            parameters=count_parameters(result.unet), wall_seconds=result.wall_seconds, images=images,
            values=values))

    return coalition_models


def _group_values(exp: Experiment, plan, empty: str, full: str) -> dg.AssetsDefinition:
    sh = exp.shapley

    @dg.asset(
        key=key(exp, "group_values"),
        group_name="attribution",
        kinds={"numpy", "duckdb"},
        pool=WAREHOUSE_POOL,
        deps=[key(exp, "coalition_models"), key(exp, "null_model"), key(exp, "full_model"),
              *[key(exp, f"scores_{a}") for a in sh.aggregate]],
        code_version=code_version("1", exp, "shapley"),
        description="Each contributor's value for each property: constrained KernelSHAP per coalition method (with "
                    "bootstrap intervals and a convergence curve), leave-one-out, Banzhaf when configured, and the "
                    f"per-sample scores of {', '.join(sh.aggregate) or 'no method'} aggregated per group "
                    f"({sh.aggregate_how}) as no-retraining baselines.",
    )
    def group_values(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
        import hashlib

        import pandas as pd

        from attribution.images import bar_chart, multi_line_chart
        from storage.artefacts import save_arrays
        from storage.warehouse import now

        paths = storage.paths(exp.name)
        values, convergence = estimate_group_values(exp, plan, paths, empty, full)
        save_arrays(paths.result("group_values"),
                    {f"{e}__{p}": df.value.to_numpy() for (p, e), df in values.groupby(["property", "estimator"])},
                    {"groups": sh.groups})
        created = now()
        for df in (values, convergence):
            df["experiment"], df["run_id"], df["created_at"] = exp.name, context.run.run_id, created
        wh = storage.warehouse()
        wh.replace_rows("group_values", values, {"experiment": exp.name})
        wh.replace_rows("shapley_convergence", convergence, {"experiment": exp.name})
        primary = sh.properties[0]
        shown = values[(values.property == primary) & values.estimator.str.startswith("shapley_")]
        chart = bar_chart(shown, "group_name", "value", "ci_low", "ci_high", "estimator",
                          title=f"Shapley values of {primary} ({exp.name}; 95% bootstrap CI)")
        conv = convergence[(convergence.property == primary) & (convergence.method == sh.methods[0])]
        curve = conv.pivot(index="n_coalitions", columns="group_name", values="value")
        timing = wh.query("SELECT method, count(DISTINCT coalition) AS models, round(avg(wall_seconds), 2) AS "
                          "mean_wall_s FROM diffattr.coalition_runs WHERE experiment = ? AND purpose NOT IN "
                          "('null', 'pruned') GROUP BY method ORDER BY method", [exp.name])
        table = values[values.property == primary].pivot(index="group_name", columns="estimator", values="value")
        context.log.info("\n" + table.round(4).to_string())
        return finish(context, storage, exp, hashlib.sha256(values.value.to_numpy().tobytes()).hexdigest(), {
            "shapley_chart": png_markdown(chart, "group Shapley values with 95% bootstrap intervals"),
            "convergence": png_markdown(multi_line_chart(curve, f"KernelSHAP ({sh.methods[0]}) vs coalitions",
                                                         "coalitions", "value"), "estimate vs number of coalitions"),
            "values": dg.MetadataValue.md(pd.DataFrame(table).round(4).to_markdown()),
            "seconds_per_model": dg.MetadataValue.md(timing.to_markdown(index=False)),
        })

    return group_values


def estimate_group_values(exp: Experiment, plan, paths, empty: str, full: str):
    """-> (values, convergence) DataFrames without lineage columns."""
    import warnings

    import numpy as np
    import pandas as pd

    from attribution.groups import coalition_id
    from attribution.shapley import (aggregate_per_sample, banzhaf_from_samples, kernel_shap, kernel_shap_bootstrap,
                                     kernel_shap_convergence, leave_one_out)
    from storage.artefacts import load_arrays
    from storage.datasets import load_image_dataset
    from storage.scores import load_scores

    sh = exp.shapley
    null = game_values(paths, "null", empty)

    def v(method: str, mask) -> dict:
        cid = coalition_id(mask)
        return null if cid == empty else game_values(paths, method, cid)

    rows, conv_rows = [], []
    m = len(plan.kernel)
    checkpoints = sorted({int(c) for c in np.linspace(min(len(sh.groups), m), m, 8).round() if c >= 2})
    for method in sh.methods:
        v1 = v(method, [True] * len(sh.groups))
        kernel = [v(method, mask) for mask in plan.kernel]
        loo = [v(method, mask) for mask in plan.loo]
        banzhaf = [v(method, mask) for mask in plan.banzhaf]
        for p in sh.properties:
            y = np.array([k[p] for k in kernel])
            phi = kernel_shap(plan.kernel, y, null[p], v1[p])
            low, high = kernel_shap_bootstrap(plan.kernel, y, null[p], v1[p], n_boot=sh.bootstrap, seed=0)
            rows += _rows(sh.groups, p, f"shapley_{method}", method, phi, low, high, m)
            with warnings.catch_warnings():  # early checkpoints may see fewer than G directions (pinv fallback)
                warnings.simplefilter("ignore", RuntimeWarning)
                curve = kernel_shap_convergence(plan.kernel, y, null[p], v1[p], checkpoints)
            conv_rows += [dict(property=p, method=method, n_coalitions=c, group_name=g, value=float(val))
                          for c, est in zip(checkpoints, curve) for g, val in zip(sh.groups, est)]
            rows += _rows(sh.groups, p, f"loo_{method}", method,
                          leave_one_out(v1[p], np.array([x[p] for x in loo])), n=len(loo))
            if banzhaf:
                rows += _rows(sh.groups, p, f"banzhaf_{method}", method,
                              banzhaf_from_samples(plan.banzhaf, np.array([x[p] for x in banzhaf])), n=len(banzhaf))
    if sh.aggregate:
        train, _ = load_image_dataset(paths.dataset("train_images"))
        kinds = load_arrays(paths.dataset("query_set"))[0]["kind"]
        generated = kinds == "generated" if (kinds == "generated").any() else np.ones(len(kinds), bool)
        for a in sh.aggregate:
            scores = load_scores(paths.scores(a))[0]["scores"][generated]
            agg = aggregate_per_sample(scores, train.groups, sh.groups, sh.aggregate_how)
            for p in sh.properties:  # no retraining, so one value per group whatever the property
                rows += _rows(sh.groups, p, f"{sh.aggregate_how}_{a}", "per_sample", agg)
    return pd.DataFrame(rows), pd.DataFrame(conv_rows)


def _rows(groups, prop: str, estimator: str, method: str, phi, low=None, high=None, n: int = 0) -> list[dict]:
    import numpy as np
    from scipy.stats import rankdata

    ranks = rankdata(-np.asarray(phi), method="min").astype(int)
    return [dict(property=prop, estimator=estimator, method=method, group_name=g, value=float(phi[i]),
                 ci_low=None if low is None else float(low[i]), ci_high=None if high is None else float(high[i]),
                 rank=int(ranks[i]), n_coalitions=n) for i, g in enumerate(groups)]


def _group_lds(exp: Experiment, plan) -> dg.AssetsDefinition:
    sh = exp.shapley

    @dg.asset(
        key=key(exp, "group_lds"),
        group_name="evaluation",
        kinds={"numpy", "duckdb"},
        pool=WAREHOUSE_POOL,
        deps=[key(exp, "group_values"), key(exp, "coalition_models")],
        code_version=code_version("1", exp, "shapley"),
        description=f"Group LDS of every estimator: Spearman between the sum of its group values over each of "
                    f"{len(plan.lds)} held-out coalitions of half the groups and F of the model retrained on that "
                    "coalition (bootstrap 95% CI over coalitions).",
    )
    def group_lds(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
        import hashlib

        import numpy as np
        import pandas as pd

        from attribution.groups import coalition_id
        from attribution.images import bar_chart
        from attribution.lds import group_lds_with_ci
        from storage.artefacts import load_arrays
        from storage.warehouse import now

        paths = storage.paths(exp.name)
        values = load_arrays(paths.result("group_values"), "group values (materialize group_values)")[0]
        retrained = [game_values(paths, "retrain", coalition_id(mask)) for mask in plan.lds]
        rows = []
        for name, phi in values.items():
            estimator, prop = name.split("__")
            outputs = np.array([r[prop] for r in retrained])
            value, low, high = group_lds_with_ci(phi, plan.lds, outputs, n_boot=sh.bootstrap, seed=0)
            rows.append(dict(property=prop, estimator=estimator, value=value, ci_low=low, ci_high=high,
                             n_coalitions=len(plan.lds)))
        table = pd.DataFrame(rows).sort_values(["property", "value"], ascending=[True, False])
        table["experiment"], table["run_id"], table["created_at"] = exp.name, context.run.run_id, now()
        storage.warehouse().replace_rows("group_lds", table, {"experiment": exp.name})
        context.log.info("\n" + table[["property", "estimator", "value", "ci_low", "ci_high"]].to_string(index=False))
        chart = bar_chart(table, "estimator", "value", "ci_low", "ci_high", "property",
                          title=f"Group LDS ({exp.name}, {len(plan.lds)} retrained half coalitions)")
        md = pd.DataFrame(table[["property", "estimator", "value", "ci_low", "ci_high"]]).round(4)
        return finish(context, storage, exp, hashlib.sha256(table.value.to_numpy().tobytes()).hexdigest(), {
            "group_lds_chart": png_markdown(chart, "group LDS per estimator with 95% CI"),
            "group_lds": dg.MetadataValue.md(md.to_markdown(index=False))})

    return group_lds


def _removed_groups(values: dict, estimator: str, prop: str, fraction: float, direction: str) -> list[int]:
    """Indices of the top (highest value) or bottom groups, round(fraction * G) of them (at least one)."""
    import numpy as np

    phi = values[f"{estimator}__{prop}"]
    k = max(1, round(fraction * len(phi)))
    order = np.argsort(-phi, kind="stable")
    return sorted(order[:k].tolist() if direction == "top" else order[-k:].tolist())


def _group_counterfactual(exp: Experiment, full: str, scored: list) -> list[dg.AssetsDefinition]:
    sh = exp.shapley
    primary = sh.properties[0]
    keys = [f"{e}__{d}" for e in sh.counterfactual_methods for d in DIRECTIONS]

    @dg.asset(
        key=key(exp, "group_counterfactual_models"),
        group_name="models",
        kinds={"pytorch", "diffusers"},
        pool=ACCELERATOR_POOL,
        partitions_def=dg.StaticPartitionsDefinition(keys),
        deps=[key(exp, "group_values"), key(exp, "contributor_groups"), *scored],
        code_version=code_version("1", exp, "model", "training", "shapley", "lora"),
        description=f"The base recipe retrained without the top or the bottom {sh.counterfactual_fraction:.0%} of "
                    f"groups by each estimator's value for {primary}; scored on the global properties.",
    )
    def group_counterfactual_models(context: dg.AssetExecutionContext,
                                    storage: StorageResource) -> dg.MaterializeResult:
        import numpy as np

        from attribution.groups import Groups, coalition_id
        from attribution.models import count_parameters
        from storage.artefacts import load_arrays
        from storage.datasets import load_image_dataset

        device = setup_torch(exp)
        estimator, direction = context.partition_key.split("__")
        scorer = GameScorer(exp, storage.paths(exp.name), device)
        kit, paths = scorer.kit, scorer.kit.paths
        train, _ = load_image_dataset(paths.dataset("train_images"))
        values = load_arrays(paths.result("group_values"), "group values (materialize group_values)")[0]
        arrays, meta = load_arrays(paths.result("contributor_groups"))
        removed = _removed_groups(values, estimator, primary, sh.counterfactual_fraction, direction)
        mask = np.ones(len(sh.groups), bool)
        mask[removed] = False
        rows = Groups(tuple(meta["groups"]), arrays["membership"]).rows(mask)
        context.log.info(f"{estimator}, {direction}: removing groups {[sh.groups[g] for g in removed]}, retraining "
                         f"on {len(rows)} images")
        result = kit.train(kit.inputs("train", train)[rows], train.labels[rows])
        digest = kit.save(f"group_counterfactual/{context.partition_key}", result.unet, meta={"removed": removed})
        images, values_f = scorer(result.unet)
        return finish(context, storage, exp, digest, record_game_model(
            context, storage, exp, name=f"group_counterfactual/{context.partition_key}", method="retrain",
            cid=coalition_id(mask), purpose=f"counterfactual_{direction}:{estimator}", n_train=len(rows),
            steps=exp.training.steps, parameters=count_parameters(result.unet), wall_seconds=result.wall_seconds,
            images=images, values=values_f))

    @dg.asset(
        key=key(exp, "group_counterfactual"),
        group_name="evaluation",
        kinds={"numpy", "duckdb"},
        pool=WAREHOUSE_POOL,
        deps=[key(exp, "group_counterfactual_models"), key(exp, "full_model")],
        code_version=code_version("1", exp, "shapley"),
        description="Change of every property when the top or the bottom groups are removed and the model "
                    "retrained: a good estimator's top groups cost the most.",
    )
    def group_counterfactual(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
        import hashlib
        import json

        import pandas as pd

        from attribution.images import image_grid
        from storage.artefacts import load_arrays
        from storage.warehouse import now

        paths = storage.paths(exp.name)
        base_images, base_meta = load_arrays(paths.result(result_name("retrain", full)))
        full_values = base_meta["properties"]
        rows, grid = [], [base_images["images"][:12]]
        for pk in keys:
            estimator, direction = pk.split("__")
            arrays, meta = load_arrays(paths.result(f"group_counterfactual/{pk}"),
                                       "counterfactual model (materialize group_counterfactual_models)")
            removed = [sh.groups[i] for i in range(len(sh.groups)) if meta["coalition"][1 + i] == "0"]
            grid.append(arrays["images"][:12])
            rows += [dict(estimator=estimator, removed=direction, groups_removed=json.dumps(removed),
                          n_train=meta["n_train"], property=p, value=v, full_value=full_values[p],
                          change=v - full_values[p]) for p, v in meta["properties"].items()]
        table = pd.DataFrame(rows)
        table["experiment"], table["run_id"], table["created_at"] = exp.name, context.run.run_id, now()
        storage.warehouse().replace_rows("group_counterfactual", table, {"experiment": exp.name})
        shown = table[["estimator", "removed", "groups_removed", "property", "value", "change"]]
        context.log.info("\n" + shown.to_string(index=False))
        return finish(context, storage, exp, hashlib.sha256(table.value.to_numpy().tobytes()).hexdigest(), {
            "changes": dg.MetadataValue.md(pd.DataFrame(shown).round(4).to_markdown(index=False)),
            "samples": png_markdown(image_grid(grid, scale=3), "rows: full model, then each of "
                                    + ", ".join(keys) + " (same seeds)")})

    return [group_counterfactual_models, group_counterfactual]
