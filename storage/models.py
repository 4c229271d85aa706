"""Model store: diffusers `save_pretrained` layout (safetensors), written atomically.

    <model>/unet/                      final weights (EMA when training used EMA); a pruned UNet (sFT) keeps the
                                       unpruned template config and a plain state dict whose shapes carry its widths
    <model>/scheduler/                 noise schedule
    <model>/checkpoints/ckpt_XXXX.safetensors   raw training weights at each checkpoint (TracIn)
    <model>/record.npz                 training record (loss curve, per-checkpoint last timesteps, lrs, ...)
    <model>/_COMPLETE.json             written last: digest and metadata; its absence means "not a model"
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .artefacts import atomic_directory, local_copy, read_marker


PRUNED_WEIGHTS = "pruned_unet.safetensors"


def save_model(url: str, unet, scheduler, *, checkpoints: list[dict] | None = None,
               record: dict[str, np.ndarray] | None = None, meta: dict | None = None, pruned: bool = False) -> str:
    """Save a model directory atomically and return the weights digest (its data version).

    pruned=True for a channel-pruned UNet: its diffusers config still describes the unpruned template, so
    save_pretrained would write weights that from_pretrained cannot load."""
    from safetensors.torch import save_file

    from attribution.runtime import state_dict_digest

    digest = state_dict_digest(unet.state_dict())
    with atomic_directory(url, {"digest": digest, "meta": meta or {}, "pruned": pruned}) as tmp:
        if pruned:
            unet.save_config(tmp / "unet")
            save_file({k: v.detach().cpu().contiguous() for k, v in unet.state_dict().items()},
                      tmp / "unet" / PRUNED_WEIGHTS)
        else:
            unet.save_pretrained(tmp / "unet", safe_serialization=True)
        scheduler.save_pretrained(tmp / "scheduler")
        if checkpoints:
            (tmp / "checkpoints").mkdir()
            for i, state in enumerate(checkpoints):
                save_file({k: v.contiguous() for k, v in state.items()}, tmp / "checkpoints" / f"ckpt_{i:04d}.safetensors")
        if record:
            np.savez(tmp / "record.npz", **record)
        (tmp / "meta.json").write_text(json.dumps(meta or {}, sort_keys=True, indent=1))
    return digest


@dataclass
class StoredModel:
    """A complete model directory; loads lazily so metadata reads stay cheap."""

    url: str

    def __post_init__(self):
        self.marker = read_marker(self.url, "model")

    @property
    def digest(self) -> str:
        return self.marker["digest"]

    @property
    def meta(self) -> dict:
        return self.marker.get("meta", {})

    def load_unet(self, device: str = "cpu"):
        from diffusers import UNet2DModel

        from attribution.models import use_classic_attention

        with local_copy(self.url) as d:
            if self.marker.get("pruned"):
                from safetensors.torch import load_file

                from attribution.pruning import load_pruned_state

                unet = UNet2DModel.from_config(UNet2DModel.load_config(d / "unet"))
                load_pruned_state(unet, load_file(d / "unet" / PRUNED_WEIGHTS))
            else:
                unet = UNet2DModel.from_pretrained(d / "unet", local_files_only=True)
        use_classic_attention(unet)
        return unet.to(device).eval()

    def load_scheduler(self):
        from diffusers import DDPMScheduler

        with local_copy(self.url) as d:
            return DDPMScheduler.from_pretrained(d / "scheduler", local_files_only=True)

    def n_checkpoints(self) -> int:
        with local_copy(self.url) as d:
            return len(list((d / "checkpoints").glob("ckpt_*.safetensors"))) if (d / "checkpoints").exists() else 0

    def load_checkpoint(self, i: int) -> dict:
        from safetensors.torch import load_file

        with local_copy(self.url) as d:
            path = Path(d) / "checkpoints" / f"ckpt_{i:04d}.safetensors"
            if not path.exists():
                raise IndexError(f"model {self.url} has no checkpoint {i} ({self.n_checkpoints()} saved)")
            return load_file(path)

    def load_record(self) -> dict[str, np.ndarray]:
        with local_copy(self.url) as d:
            if not (Path(d) / "record.npz").exists():
                return {}
            with np.load(Path(d) / "record.npz") as z:
                return {k: z[k] for k in z.files}


def save_classifier(url: str, model, config: dict, meta: dict | None = None) -> str:
    """The in-domain encoder: safetensors weights + the constructor config, atomically."""
    from safetensors.torch import save_file

    from attribution.runtime import state_dict_digest

    digest = state_dict_digest(model.state_dict())
    with atomic_directory(url, {"digest": digest, "meta": meta or {}, "config": config}) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    return digest


def load_classifier(url: str):
    from safetensors.torch import load_file

    from attribution.encoder import build_classifier

    marker = read_marker(url, "image encoder (materialize image_encoder)")
    model = build_classifier(**marker["config"])
    with local_copy(url) as d:
        model.load_state_dict(load_file(Path(d) / "model.safetensors"))
    return model.eval()


def load_image_model(path: str):
    """A user's local TorchScript image model returning (features, logits), wrapped for the global properties."""
    import torch

    from attribution.encoder import ImageModel

    if not Path(path).is_file():
        raise FileNotFoundError(f"shapley.encoder: no file at {path}: export your image model with "
                                "torch.jit.script(...).save(path) (it must return (features, logits))")
    try:
        module = torch.jit.load(path, map_location="cpu")
    except RuntimeError as e:
        raise ValueError(f"shapley.encoder: {path} is not a TorchScript module ({e})") from None
    return ImageModel(module)
