import json

import pytest
import torch

from attribution.lora import (add_lora, base_weights_digest, build_conditional_unet, lora_layers, lora_state_dict,
                              prune_lora_ranks)
from attribution.runtime import state_dict_digest
from storage.adapters import BaseModelMismatchError, adapter_info, load_adapter, save_adapter
from storage.artefacts import MARKER, IncompleteArtefactError


def tiny_unet(seed=0):
    return build_conditional_unet((8, 16), 1, 4, sample_size=8, channels=1, cross_attention_dim=8, seed=seed)


def trained_lora(rank=4, seed=0):
    unet = tiny_unet(seed)
    add_lora(unet, rank)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if ".lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return unet


def output(unet):
    g = torch.Generator().manual_seed(0)
    x, cond = torch.randn(2, 1, 8, 8, generator=g), torch.randn(2, 1, 8, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([5, 700]), encoder_hidden_states=cond).sample


def test_adapter_round_trips_in_peft_format_with_its_base_reference(tmp_path):
    unet = trained_lora()
    url = str(tmp_path / "adapter")
    digest = save_adapter(url, unet, base_path="models/base", meta={"group": 3})
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == [MARKER, "adapter_config.json", "adapter_model.safetensors"]
    info = adapter_info(url)
    assert info["digest"] == digest == state_dict_digest(lora_state_dict(unet))
    # the base reference is the digest of the plain base model, as storage.models.save_model records it
    assert info["base"] == {"path": "models/base", "digest": state_dict_digest(tiny_unet().state_dict())}
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 4

    fresh = tiny_unet()
    load_adapter(url, fresh, base_digest=base_weights_digest(tiny_unet()))
    saved, loaded = lora_state_dict(unet), lora_state_dict(fresh)
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    torch.testing.assert_close(output(fresh), output(unet), atol=0, rtol=0)
    assert all(p.requires_grad == (".lora_" in n) for n, p in fresh.named_parameters())


def test_pruned_ranks_round_trip(tmp_path):
    unet = trained_lora(rank=8)
    report = prune_lora_ranks(unet, 0.5)
    url = str(tmp_path / "pruned")
    save_adapter(url, unet)
    cfg = json.loads((tmp_path / "pruned" / "adapter_config.json").read_text())
    assert set(cfg["rank_pattern"].values()) == {4} and set(cfg["rank_pattern"]) == set(report.ranks_after)
    fresh = load_adapter(url, tiny_unet())
    assert {n: m.r["default"] for n, m in lora_layers(fresh).items()} == report.ranks_after
    assert {n: m.scaling["default"] for n, m in lora_layers(fresh).items()} == pytest.approx(
        {n: m.scaling["default"] for n, m in lora_layers(unet).items()})
    torch.testing.assert_close(output(fresh), output(unet), atol=1e-6, rtol=1e-6)


def test_refuses_incomplete_adapter_and_other_base(tmp_path, monkeypatch):
    import safetensors.torch

    unet = trained_lora()
    url = str(tmp_path / "adapter")

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(url, unet)
    monkeypatch.undo()
    assert not (tmp_path / "adapter").exists()  # nothing half-written is left under the final name
    with pytest.raises(IncompleteArtefactError, match="incomplete"):
        load_adapter(url, tiny_unet())

    save_adapter(url, unet)
    (tmp_path / "adapter" / MARKER).unlink()  # e.g. an interrupted copy
    with pytest.raises(IncompleteArtefactError):
        load_adapter(url, tiny_unet())

    save_adapter(url, unet, base_path="base-a")
    other = tiny_unet(seed=1)
    with pytest.raises(BaseModelMismatchError, match="base-a"):
        load_adapter(url, other, base_digest=base_weights_digest(other))
    with pytest.raises(ValueError, match="already carries"):
        load_adapter(url, trained_lora())
    with pytest.raises(ValueError, match="no LoRA adapter"):
        save_adapter(str(tmp_path / "none"), tiny_unet())
