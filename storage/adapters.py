"""LoRA adapter store: peft's own format, written atomically, tied to the base model it was trained on.

    <adapter>/adapter_model.safetensors   LoRA weights under peft's names (readable by peft / diffusers tools)
    <adapter>/adapter_config.json         the LoraConfig; per-layer ranks/alphas of a rank-pruned adapter in
                                          rank_pattern / alpha_pattern
    <adapter>/_COMPLETE.json              written last: adapter digest, base model {path, digest}, metadata

An adapter is only meaningful on top of its base weights, so the marker records the base model's digest and
`load_adapter` refuses a different base when the caller names the one it has.
"""
from __future__ import annotations

import copy
from pathlib import Path

from .artefacts import atomic_directory, local_copy, read_marker

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
FORMAT = "diffattr-lora-adapter/1"


class BaseModelMismatchError(ValueError):
    """The adapter was trained on other base weights than the ones it is being loaded onto."""


def write_adapter(directory: Path, unet, *, base_path: str | None = None, base_digest: str | None = None) -> dict:
    """Write the adapter of `unet` into `directory` in peft's format; -> its marker fields (digest, base, ranks).

    `base_digest` defaults to the digest of the model's own frozen base weights (attribution.lora.
    base_weights_digest, equal to storage.models.save_model's digest of that base)."""
    from safetensors.torch import save_file

    from attribution.lora import ADAPTER, base_weights_digest, lora_state_dict
    from attribution.runtime import state_dict_digest

    if not getattr(unet, "peft_config", None) or ADAPTER not in unet.peft_config:
        raise ValueError("the model has no LoRA adapter to save (attribution.lora.add_lora first)")
    state = {k: v.contiguous() for k, v in lora_state_dict(unet).items()}
    base = {"path": None if base_path is None else str(base_path),
            "digest": base_digest or base_weights_digest(unet)}
    config = copy.deepcopy(unet.peft_config[ADAPTER])
    config.base_model_name_or_path = base["path"]
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    config.save_pretrained(str(directory))
    return {"format": FORMAT, "digest": state_dict_digest(state), "base": base,
            "ranks": {k: int(v.shape[0]) for k, v in state.items() if k.endswith("lora_A.weight")}}


def read_adapter(directory: Path, unet, what: str):
    """Attach the adapter written by write_adapter in `directory` to the clean base model `unet` (in place)."""
    from peft import LoraConfig
    from safetensors.torch import load_file

    from attribution.lora import attach_lora

    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"LoRA adapter at {what} lacks {name}")
    attach_lora(unet, LoraConfig.from_pretrained(str(directory)), state_dict=load_file(str(directory / WEIGHTS_FILE)))
    return unet


def check_base(info: dict, base_digest: str, what: str) -> None:
    stored = info.get("base", {}).get("digest")
    if stored != base_digest:
        raise BaseModelMismatchError(
            f"LoRA adapter at {what} was trained on base model {info['base'].get('path')!r} with digest "
            f"{str(stored)[:12]}…, not the given base (digest {base_digest[:12]}…): load it onto its own base "
            "model, or re-materialize the adapter after its base changed")


def save_adapter(url: str, unet, *, base_path: str | None = None, base_digest: str | None = None,
                 meta: dict | None = None) -> str:
    """Save the LoRA adapter of `unet` atomically and return its digest (the adapter's data version)."""
    marker = {"meta": meta or {}}
    with atomic_directory(url, marker) as tmp:
        marker.update(write_adapter(tmp, unet, base_path=base_path, base_digest=base_digest))
    return marker["digest"]


def adapter_info(url: str) -> dict:
    """The completion metadata of a saved adapter (digest, base reference, ranks, meta); raises if incomplete."""
    marker = read_marker(url, "LoRA adapter")
    if marker.get("format") != FORMAT:
        raise ValueError(f"{url} is not a LoRA adapter saved by storage.adapters (format {marker.get('format')!r})")
    return marker


def load_adapter(url: str, unet, *, base_digest: str | None = None):
    """Attach a saved adapter to the clean base model `unet` (in place; returned): base frozen, LoRA trainable.

    Refuses an incomplete directory, and a base mismatch when `base_digest` is given (the stored base model's
    digest, or attribution.lora.base_weights_digest(unet) to check the very weights at hand)."""
    info = adapter_info(url)
    if base_digest is not None:
        check_base(info, base_digest, url)
    with local_copy(url) as d:
        return read_adapter(Path(d), unet, url)
