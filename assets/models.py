"""Model assets: the diffusion model every attribution method explains (the base model, or in the LoRA setting
a conditional base model and the LoRA adapter fine-tuned on it)."""
import dagster as dg
import numpy as np

from attribution.experiment import Experiment
from attribution.runtime import stable_seed
from storage.models import save_model
from storage.resources import StorageResource

from .common import ACCELERATOR_POOL, code_version, finish, key, png_markdown, setup_torch
from .modeling import CONDITIONING, ModelKit, generation_labels

GROUP = "models"
PREVIEW_SEED = 7  # fixed generator seeds for the sample grid, so grids of different models are comparable


def build(exp: Experiment) -> list[dg.AssetsDefinition]:
    if exp.lora.enabled:
        return [_conditional_base(exp), _trained_model(exp, "lora_model")]
    return [_trained_model(exp, "base_model")]


def _trained_model(exp: Experiment, name: str) -> dg.AssetsDefinition:
    """The model every method explains: trained from scratch, or a LoRA adapter fine-tuned on the base."""
    t = exp.training
    lora = exp.lora.enabled
    deps = [key(exp, "training_set")] + ([key(exp, "base_model")] if lora else [])
    what = (f"LoRA adapter (rank {exp.lora.rank} on {', '.join(exp.lora.target_modules)}) fine-tuned on the base "
            "model with each image's class label as conditioning" if lora else "DDPM UNet trained")

    @dg.asset(
        key=key(exp, name),
        group_name=GROUP,
        kinds={"pytorch", "diffusers"} | ({"peft"} if lora else set()),
        pool=ACCELERATOR_POOL,
        deps=deps,
        code_version=code_version("1", exp, "data", "model", "training", "lora"),
        description=f"{what} on the training set ({t.steps} steps, batch {t.batch_size}, AdamW, "
                    f"{t.lr_schedule} LR decay{', EMA ' + str(t.ema_decay) if t.ema_decay else ''}); saves "
                    f"{t.checkpoints} checkpoints and each sample's last training timestep per checkpoint.",
    )
    def trained_model(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
        from storage.datasets import load_image_dataset

        device = setup_torch(exp)
        kit = ModelKit(exp, storage.paths(exp.name), device)
        train, _ = load_image_dataset(kit.paths.dataset("train_images"))
        context.log.info(f"training on {len(train)} images of shape {train.shape} for {t.steps} steps ({device})")
        result = kit.train(kit.inputs("train", train), train.labels, t,
                           progress=lambda s, loss: context.log.info(f"step {s}/{t.steps}: loss {loss:.4f}"))
        return _store_trained(context, storage, kit, name, result, train, t)

    return trained_model


def _conditional_base(exp: Experiment) -> dg.AssetsDefinition:
    lo, t = exp.lora, exp.lora.pretraining
    sd = lo.base_pipeline is not None
    described = (f"the UNet and noise schedule of the local Stable Diffusion pipeline {lo.base_pipeline}, with "
                 f"each class label conditioned on the prompt '{lo.prompt}'" if sd else
                 f"a UNet2DConditionModel pretrained on the images of groups {lo.pretrain_groups} ({t.steps} "
                 f"steps), conditioned on a frozen seeded embedding of each class label ({lo.tokens} token(s) x "
                 f"{lo.cross_attention_dim})")

    @dg.asset(
        key=key(exp, "base_model"),
        group_name=GROUP,
        kinds={"pytorch", "diffusers"},
        pool=ACCELERATOR_POOL,
        deps=[key(exp, "training_set")],
        code_version=code_version("1", exp, "data", "model", "lora"),
        description=f"The base model the LoRA adapters are trained on: {described}.",
    )
    def base_model(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
        from attribution.lora import ClassEncoder, build_conditional_unet, encode_prompts, load_sd_components
        from storage.artefacts import save_arrays
        from storage.datasets import load_image_dataset

        device = setup_torch(exp)
        kit = ModelKit(exp, storage.paths(exp.name), device)
        train, _ = load_image_dataset(kit.paths.dataset("train_images"))
        names = train.class_names
        if sd:
            parts = load_sd_components(lo.base_pipeline)
            table = encode_prompts(parts.text_encoder, parts.tokenizer, [lo.prompt.format(label=c) for c in names])
            save_arrays(kit.paths.dataset(CONDITIONING), {"table": table}, {"classes": list(names), "source": "sd"})
            from diffusers import DDPMScheduler

            digest = save_model(kit.paths.model("base_model"), parts.unet,
                                DDPMScheduler.from_config(parts.scheduler_config),
                                meta={"experiment": exp.name, "pipeline": lo.base_pipeline})
            return finish(context, storage, exp, digest, {"pipeline": lo.base_pipeline, "digest": digest,
                                                          "parameters": sum(p.numel() for p in parts.unet.parameters())})
        table = ClassEncoder(len(names), lo.cross_attention_dim, lo.tokens, seed=lo.conditioning_seed).encode(
            np.arange(len(names)))
        save_arrays(kit.paths.dataset(CONDITIONING), {"table": table}, {"classes": list(names), "source": "embedded"})
        pretrain, _ = load_image_dataset(kit.paths.dataset("pretrain_images"))
        c, h, _ = pretrain.shape
        m = exp.model
        unet = build_conditional_unet(m.block_out_channels, m.layers_per_block, m.norm_num_groups, sample_size=h,
                                      channels=c, cross_attention_dim=lo.cross_attention_dim,
                                      seed=stable_seed("init", t.seed), head_dim=lo.head_dim,
                                      cross_attention_levels=lo.cross_attention_levels)
        context.log.info(f"pretraining the base on {len(pretrain)} images of {lo.pretrain_groups} for {t.steps} steps")
        result = kit.train(pretrain.images, pretrain.labels, t, init=unet,
                           progress=lambda s, loss: context.log.info(f"step {s}/{t.steps}: loss {loss:.4f}"))
        return _store_trained(context, storage, kit, "base_model", result, pretrain, t)

    return base_model


def _store_trained(context, storage, kit: ModelKit, name: str, result, data, spec) -> dg.MaterializeResult:
    """Save a trained model with its checkpoints and record, log the run, draw samples of every class."""
    from attribution.images import image_grid, line_chart
    from attribution.models import count_parameters
    from attribution.sampling import image_seeds
    from storage.warehouse import now

    exp = kit.exp
    n_params = count_parameters(result.unet)
    record = {
        "loss_curve": result.loss_curve,
        "last_timesteps": result.last_timesteps,
        "checkpoint_steps": np.asarray(result.checkpoint_steps),
        "checkpoint_lrs": np.asarray(result.checkpoint_lrs),
    }
    digest = kit.save(name, result.unet, checkpoints=result.checkpoints, record=record,
                      meta={"experiment": exp.name, "parameters": n_params, "wall_seconds": result.wall_seconds})
    final_loss = float(result.loss_curve[-min(100, len(result.loss_curve)):].mean())
    storage.warehouse().replace_rows("training_runs", [dict(
        experiment=exp.name, model=name, partition_key=None, n_train=len(data), steps=spec.steps,
        batch_size=spec.batch_size, parameters=n_params, final_loss=final_loss, wall_seconds=result.wall_seconds,
        digest=digest, run_id=context.run.run_id, created_at=now())],
        {"experiment": exp.name, "model": name, "partition_key": None})
    labels = generation_labels(exp, data.labels, 32)
    samples = kit.decode(kit.sample(result.unet, image_seeds(PREVIEW_SEED, 32), labels, data.shape,
                                    steps=exp.queries.sampling_steps).images)
    return finish(context, storage, exp, digest, {
        "parameters": n_params,
        "steps": spec.steps,
        "wall_seconds": round(result.wall_seconds, 1),
        "final_loss": final_loss,
        "checkpoints": dg.MetadataValue.json({"steps": result.checkpoint_steps,
                                              "lrs": [float(x) for x in result.checkpoint_lrs]}),
        "loss_curve": png_markdown(line_chart(result.loss_curve, "training loss", "step", "DDPM loss",
                                              smooth=max(1, spec.steps // 50)), "loss curve"),
        "samples": png_markdown(image_grid([samples[:16], samples[16:]], scale=3),
                                "generated samples"),
        "digest": digest,
        "path": kit.paths.model(name),
    })
