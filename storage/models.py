"""Model store: diffusers `save_pretrained` layout (safetensors), written atomically.

    <model>/unet/                      final weights (EMA when training used EMA); a pruned UNet (sFT) keeps the
                                       unpruned template config and a plain state dict whose shapes carry its widths
    <model>/scheduler/                 noise schedule
    <model>/checkpoints/ckpt_XXXX.safetensors   raw training weights at each checkpoint (TracIn)
    <model>/record.npz                 training record (loss curve, per-checkpoint last timesteps, lrs, ...)
    <model>/_COMPLETE.json             written last: digest and metadata; its absence means "not a model"

A LoRA model (attribution.lora) stores no UNet: `<model>/adapter/` holds the adapter in peft's format
(storage.adapters) and the marker names its base model {path, digest}; its checkpoints hold the adapter tensors
only. Loading it loads the base model first and refuses a base whose weights changed since.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .adapters import check_base, read_adapter, write_adapter
from .artefacts import atomic_directory, local_copy, read_marker

PRUNED_WEIGHTS = "pruned_unet.safetensors"
ADAPTER_DIR = "adapter"


def save_model(url: str, unet, scheduler, *, checkpoints: list[dict] | None = None,
               record: dict[str, np.ndarray] | None = None, meta: dict | None = None, pruned: bool = False,
               base: str | None = None) -> str:
    """Save a model directory atomically and return the weights digest (its data version).

    pruned=True for a channel-pruned UNet: its diffusers config still describes the unpruned template, so
    save_pretrained would write weights that from_pretrained cannot load. `base`: the stored base model a LoRA
    model's adapter was trained on (required for one; a rank-pruned adapter needs no `pruned`)."""
    from safetensors.torch import save_file

    from attribution.runtime import state_dict_digest

    marker = {"meta": meta or {}, "pruned": pruned}
    adapter = bool(getattr(unet, "peft_config", None))  # set by attribution.lora.add_lora
    if adapter and base is None:
        raise ValueError(f"{url}: a LoRA model is saved as its adapter: name the stored base model (base=...)")
    if not adapter:
        marker["digest"] = state_dict_digest(unet.state_dict())
    with atomic_directory(url, marker) as tmp:
        if adapter:
            info = write_adapter(tmp / ADAPTER_DIR, unet, base_path=base, base_digest=StoredModel(base).digest)
            marker.update(digest=info["digest"], adapter=info)
        elif pruned:
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
    return marker["digest"]


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

    @property
    def base(self) -> "StoredModel | None":
        """The base model of a LoRA model (None for a full model)."""
        adapter = self.marker.get("adapter")
        return StoredModel(adapter["base"]["path"]) if adapter else None

    def load_unet(self, device: str = "cpu", checkpoint: int | None = None):
        """The model (UNet2DModel, UNet2DConditionModel, or its base with the LoRA adapter attached), with the
        weights of training checkpoint `checkpoint` when given."""
        from attribution.models import use_classic_attention

        base = self.base
        if base is not None:
            unet = base.load_unet()
            check_base(self.marker["adapter"], base.digest, self.url)
            with local_copy(self.url) as d:
                read_adapter(Path(d) / ADAPTER_DIR, unet, self.url)
        else:
            with local_copy(self.url) as d:
                cls = _unet_class(d / "unet")
                if self.marker.get("pruned"):
                    from safetensors.torch import load_file

                    from attribution.pruning import load_pruned_state

                    unet = cls.from_config(cls.load_config(d / "unet"))
                    load_pruned_state(unet, load_file(d / "unet" / PRUNED_WEIGHTS))
                else:
                    unet = cls.from_pretrained(d / "unet", local_files_only=True)
        if checkpoint is not None:
            state = self.load_checkpoint(checkpoint)
            result = unet.load_state_dict(state, strict=base is None)
            if result.unexpected_keys:
                raise ValueError(f"checkpoint {checkpoint} of {self.url} has tensors the model lacks: "
                                 f"{result.unexpected_keys[:5]}")
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


def _unet_class(unet_dir: Path):
    """UNet2DModel or UNet2DConditionModel, from the saved config's class name."""
    import diffusers

    name = json.loads((Path(unet_dir) / "config.json").read_text()).get("_class_name", "UNet2DModel")
    if name not in ("UNet2DModel", "UNet2DConditionModel"):
        raise ValueError(f"{unet_dir}: unsupported model class {name!r} (UNet2DModel or UNet2DConditionModel)")
    return getattr(diffusers, name)


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
