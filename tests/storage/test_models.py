import numpy as np
import pytest
import torch

from attribution.experiment import ModelSpec
from attribution.models import build_scheduler, build_unet
from attribution.runtime import state_dict_digest
from storage.artefacts import IncompleteArtefactError, atomic_directory, load_arrays, read_marker, save_arrays
from storage.models import StoredModel, save_model

SPEC = ModelSpec(block_out_channels=[8, 16], norm_num_groups=4)


def tiny_unet(seed=0):
    return build_unet(SPEC, sample_size=8, channels=1, seed=seed)


@pytest.mark.parametrize("root", ["local", "memory"])
def test_model_round_trip(tmp_path, root):
    url = str(tmp_path / "m") if root == "local" else f"memory://models-{tmp_path.name}/m"
    unet = tiny_unet()
    ckpts = [{k: v + i for k, v in unet.state_dict().items()} for i in range(2)]
    record = {"last_timesteps": np.arange(6, dtype=np.int32).reshape(2, 3)}
    digest = save_model(url, unet, build_scheduler(SPEC), checkpoints=ckpts, record=record, meta={"a": 1})
    m = StoredModel(url)
    assert m.digest == digest == state_dict_digest(unet.state_dict())
    assert m.meta == {"a": 1}
    loaded = m.load_unet()
    for k, v in unet.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert m.n_checkpoints() == 2
    assert torch.equal(m.load_checkpoint(1)["conv_in.weight"], ckpts[1]["conv_in.weight"])
    np.testing.assert_array_equal(m.load_record()["last_timesteps"], record["last_timesteps"])
    assert m.load_scheduler().config.num_train_timesteps == 1000
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(loaded(x, torch.tensor([3, 500])).sample, unet(x, torch.tensor([3, 500])).sample)


def test_crash_mid_save_leaves_no_valid_looking_model(tmp_path, monkeypatch):
    url = str(tmp_path / "m")
    unet = tiny_unet()

    def exploding_save(self, *a, **k):
        raise RuntimeError("simulated crash while writing checkpoints")

    monkeypatch.setattr("safetensors.torch.save_file", exploding_save)
    with pytest.raises(RuntimeError, match="simulated crash"):
        save_model(url, unet, build_scheduler(SPEC), checkpoints=[unet.state_dict()])
    assert not (tmp_path / "m").exists()
    assert not any(p.name.startswith(".m.tmp") for p in tmp_path.iterdir()), "staging directory left behind"
    with pytest.raises(IncompleteArtefactError, match="materialize it again"):
        StoredModel(url)


def test_crash_while_replacing_keeps_the_previous_model(tmp_path):
    url = str(tmp_path / "m")
    first = save_model(url, tiny_unet(0), build_scheduler(SPEC))
    with pytest.raises(RuntimeError):
        with atomic_directory(url, {"digest": "new"}) as staging:
            (staging / "unet").mkdir()
            raise RuntimeError("killed")
    assert StoredModel(url).digest == first


def test_directory_without_marker_is_refused(tmp_path):
    d = tmp_path / "half"
    (d / "unet").mkdir(parents=True)
    (d / "unet" / "config.json").write_text("{}")
    with pytest.raises(IncompleteArtefactError, match="no _COMPLETE.json"):
        read_marker(str(d), "model")


def test_remote_upload_writes_marker_last(tmp_path, monkeypatch):
    """On an object store the marker is the last object put, so a partial upload is never 'complete'."""
    import fsspec

    fs = fsspec.filesystem("memory")
    order = []
    real_put = type(fs).put_file

    def recording_put(self, lpath, rpath, **kw):
        order.append(rpath.rsplit("/", 1)[-1])
        return real_put(self, lpath, rpath, **kw)

    monkeypatch.setattr(type(fs), "put_file", recording_put)
    save_model(f"memory://order-{tmp_path.name}/m", tiny_unet(), build_scheduler(SPEC))
    assert order[-1] == "_COMPLETE.json" and "diffusion_pytorch_model.safetensors" in order


def test_arrays_round_trip_and_atomic_replace(tmp_path):
    url = str(tmp_path / "d" / "x.npz")
    save_arrays(url, {"a": np.arange(3), "s": np.array(["x", "yy"])}, {"k": [1, 2]})
    arrays, meta = load_arrays(url)
    np.testing.assert_array_equal(arrays["a"], np.arange(3))
    assert arrays["s"].tolist() == ["x", "yy"] and meta == {"k": [1, 2]}
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["x.npz"]
    with pytest.raises(IncompleteArtefactError, match="materialize it first"):
        load_arrays(str(tmp_path / "missing.npz"))


def test_user_image_model_from_torchscript(tmp_path):
    from attribution.properties import build_context, evaluate_property, inception_score
    from storage.models import load_image_model

    class FeaturesAndLogits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(64, 3)

        def forward(self, x):
            f = x.flatten(1)
            return f, self.head(f)

    torch.manual_seed(0)
    module = FeaturesAndLogits()
    torch.jit.script(module).save(str(tmp_path / "encoder.pt"))
    model = load_image_model(str(tmp_path / "encoder.pt"))
    images = np.random.default_rng(0).uniform(-1, 1, (10, 1, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(model.embed(images), images.reshape(10, -1), rtol=1e-6)
    with torch.no_grad():
        probs = torch.softmax(module.head(torch.from_numpy(images).flatten(1)).double(), 1).numpy()
    np.testing.assert_allclose(model.predict_proba(images), probs, rtol=1e-5)
    ctx = build_context(model.embed, model.predict_proba, images, n_clusters=3)
    assert evaluate_property("inception_score", images, ctx) == pytest.approx(inception_score(probs), rel=1e-5)
    assert evaluate_property("fid", images, ctx) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(FileNotFoundError, match="shapley.encoder"):
        load_image_model(str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a TorchScript module"):
        load_image_model(str(tmp_path / "junk.pt"))
