"""The LoRA setting end to end on a tiny experiment: a conditional base pretrained on some groups, a LoRA adapter
fine-tuned on the others, every method attributing w.r.t. the adapter alone, subset/counterfactual/coalition
adapters retrained on the same base, and sFT removing LoRA ranks. Checked against independent computations."""
import numpy as np
import pytest
import torch

from attribution.experiment import parse_experiment
from tests.conftest import materialization_events, materialized, tiny_experiment_dict

pytestmark = pytest.mark.slow

PRETRAIN, GROUPS = ["0", "1"], ["2", "3", "4", "5"]


def lora_experiment_dict(name="tiny_lora") -> dict:
    d = tiny_experiment_dict(name)
    d["data"].update(classes=PRETRAIN + GROUPS, train_size=100)
    d["lora"] = {"pretrain_groups": PRETRAIN, "rank": 4, "cross_attention_dim": 16, "tokens": 2,
                 "pretraining": {"steps": 20, "batch_size": 16, "warmup_steps": 2, "checkpoints": 1}}
    d["operations"] = {"inbox": False}
    d["attribution"]["methods"] = {
        "trak": {"kind": "trak", "output": "loss", "K": 2},
        "dtrak": {"kind": "trak", "output": "square", "K": 2},
        "journey_trak": {"kind": "journey_trak", "K": 2},
        "retrac": {"kind": "retrac", "K": 2},
    }
    d["shapley"] = {
        "groups": GROUPS, "properties": ["inception_score", "diversity"], "n_images": 12, "sampling_steps": 3,
        "reference_clusters": 3, "methods": ["sparsified_finetune", "finetune"], "n_coalitions": 10,
        "lds_coalitions": 3, "bootstrap": 20, "prune_ratio": 0.5, "aggregate": ["dtrak"],
        "finetune": {"steps": 6, "batch_size": 16, "warmup_steps": 2, "checkpoints": 1},
        "pruned_finetune": {"steps": 6, "batch_size": 16, "warmup_steps": 2, "checkpoints": 1},
    }
    return d


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    exp = parse_experiment(lora_experiment_dict())
    with materialized(exp, tmp_path_factory) as (storage, instance, results):
        yield exp, storage, instance, results


def lora_count(unet) -> int:
    return sum(p.numel() for n, p in unet.named_parameters() if ".lora_A." in n or ".lora_B." in n)


def test_base_is_pretrained_on_its_groups_only_and_the_adapter_on_the_rest(run):
    from storage.datasets import load_image_dataset

    exp, storage, _, results = run
    paths = storage.paths(exp.name)
    train, _ = load_image_dataset(paths.dataset("train_images"))
    pretrain, _ = load_image_dataset(paths.dataset("pretrain_images"))
    assert set(pretrain.groups) == set(PRETRAIN) and set(train.groups) == set(GROUPS) and len(train) == 100
    events = materialization_events(results)
    assert {"tiny_lora/base_model", "tiny_lora/lora_model", "tiny_lora/lds", "tiny_lora/group_lds"} <= set(events)
    checks = [c for r in results for c in r.get_asset_check_evaluations()]
    assert checks and all(c.passed for c in checks)
    stores = storage.warehouse().query("SELECT store, checkpoint FROM diffattr.feature_stores WHERE experiment = ? "
                                       "AND method = 'retrac' AND role = 'train'", [exp.name])
    assert sorted(stores.checkpoint) == [0, 1, 2]  # one per adapter checkpoint (the base saved only 1)


def test_adapter_is_stored_in_peft_format_with_its_base_and_loads_onto_it(run):
    import json

    from peft import LoraConfig
    from safetensors.torch import load_file

    from storage.models import StoredModel

    exp, storage, *_ = run
    paths = storage.paths(exp.name)
    base, lora = StoredModel(paths.model("base_model")), StoredModel(paths.model("lora_model"))
    assert lora.marker["adapter"]["base"] == {"path": paths.model("base_model"), "digest": base.digest}
    adapter_dir = paths.model("lora_model") + "/adapter"
    config = LoraConfig.from_pretrained(adapter_dir)  # peft reads it as its own
    assert config.r == 4 and set(config.target_modules) == {"to_q", "to_k", "to_v", "to_out.0"}
    weights = load_file(adapter_dir + "/adapter_model.safetensors")
    unet = lora.load_unet()
    assert sum(v.numel() for v in weights.values()) == lora_count(unet) > 0
    # the base weights under the adapter are the stored base's, bit for bit
    from attribution.lora import base_weights_digest

    assert base_weights_digest(unet) == base.digest
    # checkpoints hold the adapter only; loading one changes only LoRA tensors
    ckpt = lora.load_checkpoint(0)
    assert ckpt and all(".lora_" in k for k in ckpt)
    early = lora.load_unet(checkpoint=0)
    for (n, p), (_, q) in zip(unet.named_parameters(), early.named_parameters()):
        assert torch.equal(p, q) or ".lora_" in n
    assert json.loads(open(paths.model("lora_model") + "/_COMPLETE.json").read())["adapter"]["ranks"]


def test_features_are_gradients_wrt_lora_parameters_only(run):
    """Feature rows equal the projected per-sample gradient of the adapter, computed here with an autograd loop."""
    from attribution.methods import feature_recipes
    from attribution.outputs import NoiseSchedule, get_output_function
    from attribution.projectors import make_projector
    from attribution.timesteps import common_noise_fn, timesteps
    from assets.modeling import ModelKit
    from storage.datasets import load_image_dataset
    from storage.features import FeatureStore

    exp, storage, *_ = run
    paths = storage.paths(exp.name)
    kit = ModelKit(exp, paths)
    stored = kit.stored("lora_model")
    recipe = feature_recipes("dtrak", exp.attribution.methods["dtrak"], stored.n_checkpoints())[0]
    store = FeatureStore.open(paths.features(recipe.store_name))
    unet = stored.load_unet()
    n_lora = lora_count(unet)
    assert store.spec["num_params"] == n_lora < sum(p.numel() for p in unet.parameters()) // 10
    train, _ = load_image_dataset(paths.dataset("train_images"))
    schedule = NoiseSchedule.from_scheduler(stored.load_scheduler())
    a = exp.attribution
    names = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert len(names) and all(".lora_" in n for n in names)
    proj = make_projector(a.projector, n_lora, a.proj_dim, a.proj_seed)
    f = get_output_function("square")
    rows = [0, 57]
    t_sets = timesteps("uniform", recipe.K, schedule.num_train_timesteps, rows, seed=a.noise_seed)
    eps_fn = common_noise_fn(a.noise_seed, train.shape)
    cond = torch.from_numpy(kit.conditioning(train.labels[rows]))
    expected = []
    for i, row in enumerate(rows):
        x0 = torch.from_numpy(train.images[row:row + 1])
        total = 0
        for k in range(recipe.K):
            t = t_sets[i, k:k + 1]
            eps = eps_fn(int(t), i).unsqueeze(0)
            pred = unet(schedule.add_noise(x0, eps, t), t, encoder_hidden_states=cond[i:i + 1]).sample
            total = total + f(pred, eps, t, schedule).sum()
        grads = torch.autograd.grad(total / recipe.K, [dict(unet.named_parameters())[n] for n in names])
        expected.append(torch.cat([g.reshape(-1) for g in grads]))
    expected = proj.project(torch.stack(expected)).numpy()
    np.testing.assert_allclose(store.read()[rows], expected, rtol=2e-3, atol=2e-5 * np.abs(expected).max())


def test_subset_and_coalition_adapters_retrain_from_the_same_base(run):
    from assets.evaluation import subset_model_name
    from assets.groups import partition_key
    from storage.models import StoredModel

    exp, storage, *_ = run
    paths = storage.paths(exp.name)
    base = StoredModel(paths.model("base_model"))
    subset = StoredModel(paths.model(subset_model_name(0, 0)))
    assert subset.base.digest == base.digest
    lds = storage.warehouse().query("SELECT method, value FROM diffattr.lds WHERE experiment = ? AND "
                                    "query_set = 'all'", [exp.name])
    assert set(lds.method) == {"trak", "dtrak", "journey_trak", "retrac"} and lds.value.notna().all()
    cids = [c for c in storage.warehouse().query(
        "SELECT DISTINCT coalition FROM diffattr.coalition_runs WHERE experiment = ? AND method = "
        "'sparsified_finetune' AND purpose <> 'pruned'", [exp.name]).coalition]
    sft = StoredModel(paths.model(f"coalitions/{partition_key('sparsified_finetune', cids[0])}"))
    ft = StoredModel(paths.model(f"coalitions/{partition_key('finetune', cids[0])}"))
    assert sft.base.digest == ft.base.digest == base.digest
    ranks_sft, ranks_ft = sft.marker["adapter"]["ranks"], ft.marker["adapter"]["ranks"]
    assert set(ranks_ft.values()) == {4} and set(ranks_sft.values()) == {2}  # prune_ratio 0.5 of rank 4
    unet = sft.load_unet()
    assert lora_count(unet) == lora_count(ft.load_unet()) // 2
    values = storage.warehouse().query("SELECT estimator FROM diffattr.group_values WHERE experiment = ?",
                                       [exp.name])
    assert {"shapley_sparsified_finetune", "shapley_finetune", "sum_dtrak"} <= set(values.estimator)
    glds = storage.warehouse().query("SELECT estimator, value FROM diffattr.group_lds WHERE experiment = ?",
                                     [exp.name])
    assert "shapley_sparsified_finetune" in set(glds.estimator)


def test_null_model_is_the_base_with_a_zero_adapter(run):
    from assets.modeling import ModelKit

    exp, storage, *_ = run
    kit = ModelKit(exp, storage.paths(exp.name))
    null, base = kit.load("null_model"), kit.load("base_model")
    assert lora_count(null) > 0 and all((p == 0).all() for n, p in null.named_parameters() if ".lora_B." in n)
    x, t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([3, 800])
    cond = torch.from_numpy(kit.conditioning([2, 5]))
    with torch.no_grad():
        torch.testing.assert_close(null(x, t, encoder_hidden_states=cond).sample,
                                   base(x, t, encoder_hidden_states=cond).sample)


# ---------------------------------------------------------------------------------------------------- Stable Diffusion
STYLES = ["hokusai", "monet", "vangogh"]


@pytest.fixture(scope="module")
def sd_run(tmp_path_factory):
    """A user's path: their own RGB images in class folders and a local SD pipeline directory named in the YAML."""
    from PIL import Image

    from tests.sd_pipeline import write_tiny_sd_pipeline

    root = tmp_path_factory.mktemp("user")
    rng = np.random.default_rng(0)
    for k, style in enumerate(STYLES):
        (root / "images" / style).mkdir(parents=True)
        for i in range(10):
            pixels = np.clip(rng.normal(60 + 70 * k, 40, size=(8, 8, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "images" / style / f"{i}.png")
    sd = write_tiny_sd_pipeline(root / "pipeline")
    d = tiny_experiment_dict("tiny_sd")
    d["data"] = {"source": "image_folder", "path": str(root / "images"), "train_size": 24}
    d["lora"] = {"base_pipeline": str(sd), "rank": 2, "prompt": "a painting by {label}"}
    d["training"].update(steps=12, checkpoints=2)
    d["queries"]["n_heldout"] = 2
    d["attribution"]["methods"] = {"dtrak": {"kind": "trak", "output": "square", "K": 2},
                                   "tracin": {"kind": "tracin", "K": 2}}
    d["lds"].update(lambda_factors=[1.0], bootstrap=20)
    d["counterfactual"].update(remove=4, encoder_steps=5)
    d["shapley"] = {"groups": STYLES, "properties": ["inception_score"], "n_images": 6, "sampling_steps": 2,
                    "reference_clusters": 2, "methods": ["sparsified_finetune"], "n_coalitions": 8,
                    "lds_coalitions": 0, "bootstrap": 10, "prune_ratio": 0.5, "aggregate": ["dtrak"],
                    "finetune": {"steps": 3, "batch_size": 8, "warmup_steps": 1, "checkpoints": 1},
                    "pruned_finetune": {"steps": 3, "batch_size": 8, "warmup_steps": 1, "checkpoints": 1}}
    d["operations"] = {"inbox": False}
    exp = parse_experiment(d)
    with materialized(exp, tmp_path_factory) as (storage, instance, results):
        yield exp, storage, sd


def test_stable_diffusion_directory_as_base_trains_lora_in_latent_space(sd_run):
    from attribution.lora import base_weights_digest, encode_images_to_latents, load_sd_components
    from attribution.runtime import state_dict_digest
    from storage.artefacts import load_arrays
    from storage.datasets import load_image_dataset
    from storage.features import FeatureStore
    from storage.models import StoredModel
    from storage.scores import load_scores

    exp, storage, sd = sd_run
    paths = storage.paths(exp.name)
    parts = load_sd_components(sd)
    base, lora = StoredModel(paths.model("base_model")), StoredModel(paths.model("lora_model"))
    assert base.digest == state_dict_digest(parts.unet.state_dict())  # the user's UNet, untouched
    unet = lora.load_unet()
    assert base_weights_digest(unet) == base.digest
    assert any((p != 0).any() for n, p in unet.named_parameters() if ".lora_B." in n)  # the adapter trained
    # training inputs are the VAE latents of the user's images; prompts come from the pipeline's text encoder
    train, _ = load_image_dataset(paths.dataset("train_images"))
    latents = load_arrays(paths.dataset("train_latents"))[0]["latents"]
    np.testing.assert_allclose(latents, encode_images_to_latents(parts.vae, train.images), rtol=1e-5, atol=1e-6)
    table = load_arrays(paths.dataset("conditioning"))[0]["table"]
    assert table.shape == (3, 8, 8)
    queries = load_arrays(paths.dataset("query_set"))[0]
    assert queries["images"].shape == (5, 3, 8, 8) and queries["inputs"].shape == (5, 4, 4, 4)
    assert np.abs(queries["images"]).max() <= 1
    store = FeatureStore.open(paths.features("dtrak_train"))
    assert store.spec["num_params"] == lora_count(unet) and store.read().shape == (24, 32)
    for method in ("dtrak", "tracin"):
        scores = load_scores(paths.scores(method))[0]["scores"]
        assert scores.shape == (5, 24) and np.isfinite(scores).all()


def test_stable_diffusion_base_runs_lds_counterfactual_and_group_attribution_in_latent_space(sd_run):
    from assets.evaluation import subset_model_name
    from storage.artefacts import load_arrays
    from storage.models import StoredModel

    exp, storage, _ = sd_run
    paths = storage.paths(exp.name)
    base = StoredModel(paths.model("base_model"))
    assert StoredModel(paths.model(subset_model_name(0, 1))).base.digest == base.digest  # adapters on the SD UNet
    wh = storage.warehouse()
    lds = wh.query("SELECT method, value FROM diffattr.lds WHERE experiment = ?", [exp.name])
    assert set(lds.method) == {"dtrak", "tracin"} and np.isfinite(lds.value).all()
    regen = load_arrays(paths.dataset("counterfactual_q000__dtrak"))[0]["regenerated"]
    assert regen.shape == (3, 8, 8) and np.abs(regen).max() <= 1  # decoded from latents
    runs = wh.query("SELECT method, parameters FROM diffattr.coalition_runs WHERE experiment = ?", [exp.name])
    sft = runs[runs.method == "sparsified_finetune"].parameters
    full = runs[runs.method == "retrain"].parameters
    assert len(sft) and (sft < full.max()).all()  # rank-pruned adapters
    values = wh.query("SELECT estimator FROM diffattr.group_values WHERE experiment = ?", [exp.name])
    assert "shapley_sparsified_finetune" in set(values.estimator)
