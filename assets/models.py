"""Model assets: the base diffusion model every attribution method explains."""
import dagster as dg

from attribution.experiment import Experiment
from storage.resources import StorageResource

from .common import code_version, finish, key, png_markdown, setup_torch

GROUP = "models"
PREVIEW_SEED = 7  # fixed generator seeds for the sample grid, so grids of different models are comparable


def build(exp: Experiment) -> list[dg.AssetsDefinition]:
    t = exp.training

    @dg.asset(
        key=key(exp, "base_model"),
        group_name=GROUP,
        kinds={"pytorch", "diffusers"},
        deps=[key(exp, "training_set")],
        code_version=code_version("1", exp, "data", "model", "training"),
        description=f"DDPM UNet trained on the training set ({t.steps} steps, batch {t.batch_size}, AdamW, "
                    f"{t.lr_schedule} LR decay{', EMA ' + str(t.ema_decay) if t.ema_decay else ''}); saves "
                    f"{t.checkpoints} checkpoints and each sample's last training timestep per checkpoint.",
    )
    def base_model(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
        import numpy as np

        from attribution.images import image_grid, line_chart
        from attribution.models import build_scheduler, count_parameters
        from attribution.sampling import ddim_sample, image_seeds
        from attribution.training import train_ddpm
        from storage.datasets import load_image_dataset
        from storage.models import save_model
        from storage.warehouse import now

        device = setup_torch(exp)
        paths = storage.paths(exp.name)
        train, _ = load_image_dataset(paths.dataset("train_images"))
        context.log.info(f"training on {len(train)} images of shape {train.shape} for {t.steps} steps ({device})")
        result = train_ddpm(train.images, exp.model, t, device=device,
                            progress=lambda s, loss: context.log.info(f"step {s}/{t.steps}: loss {loss:.4f}"))
        scheduler = build_scheduler(exp.model)
        n_params = count_parameters(result.unet)
        record = {
            "loss_curve": result.loss_curve,
            "last_timesteps": result.last_timesteps,
            "checkpoint_steps": np.asarray(result.checkpoint_steps),
            "checkpoint_lrs": np.asarray(result.checkpoint_lrs),
        }
        digest = save_model(paths.model("base_model"), result.unet, scheduler, checkpoints=result.checkpoints,
                            record=record, meta={"experiment": exp.name, "parameters": n_params,
                                                 "wall_seconds": result.wall_seconds})
        final_loss = float(result.loss_curve[-min(100, len(result.loss_curve)):].mean())
        storage.warehouse().replace_rows("training_runs", [dict(
            experiment=exp.name, model="base_model", partition_key=None, n_train=len(train), steps=t.steps,
            batch_size=t.batch_size, parameters=n_params, final_loss=final_loss, wall_seconds=result.wall_seconds,
            digest=digest, run_id=context.run.run_id, created_at=now())],
            {"experiment": exp.name, "model": "base_model", "partition_key": None})
        samples = ddim_sample(result.unet, scheduler.config, image_seeds(PREVIEW_SEED, 32), train.shape,
                              steps=exp.queries.sampling_steps, device=device)
        return finish(context, storage, exp, digest, {
            "parameters": n_params,
            "steps": t.steps,
            "wall_seconds": round(result.wall_seconds, 1),
            "final_loss": final_loss,
            "checkpoints": dg.MetadataValue.json({"steps": result.checkpoint_steps,
                                                  "lrs": [float(x) for x in result.checkpoint_lrs]}),
            "loss_curve": png_markdown(line_chart(result.loss_curve, "training loss", "step", "DDPM loss",
                                                  smooth=max(1, t.steps // 50)), "loss curve"),
            "samples": png_markdown(image_grid([samples.images[:16], samples.images[16:]], scale=3),
                                    "generated samples"),
            "digest": digest,
            "path": paths.model("base_model"),
        })

    return [base_model]
