"""Method recipes against independent computations: the feature rows a method stores are what DESIGN 1.1-1.3 say."""
import numpy as np
import pytest
import torch

from attribution.experiment import MethodSpec, ModelSpec, TrainingSpec
from attribution.methods import (
    Featurizer, check_compatible, feature_recipes, feature_spec, journey_query_inputs, trak_scores,
)
from attribution.models import build_scheduler, build_unet
from attribution.outputs import NoiseSchedule, get_output_function
from attribution.scoring import similarity_scores
from attribution.timesteps import noise, sample_noise

SPEC = ModelSpec(block_out_channels=[8, 16], norm_num_groups=4)


@pytest.fixture(scope="module")
def model():
    unet = build_unet(SPEC, 8, 1, seed=0)
    return unet, NoiseSchedule.from_scheduler(build_scheduler(SPEC))


def featurizer(model, recipe, projector="identity", k=None):
    unet, schedule = model
    return Featurizer(unet, schedule, recipe, projector=projector, proj_dim=k or 0, proj_seed=0, noise_seed=3)


def images(n, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n, 1, 8, 8)).astype(np.float32)


def autograd_grad(unet, schedule, output, x, t, eps):
    """Reference: plain autograd on one sample, one timestep."""
    unet.zero_grad()
    tt = torch.tensor([t])
    x_t = schedule.add_noise(torch.from_numpy(x)[None], eps[None], tt)
    val = get_output_function(output)(unet(x_t, tt).sample, eps[None], tt, schedule).sum()
    grads = torch.autograd.grad(val, [p for p in unet.parameters()])
    return torch.cat([g.reshape(-1) for g in grads])


@pytest.mark.parametrize("output", ["loss", "square"])
def test_trak_features_are_timestep_averaged_gradients_with_common_noise(model, output):
    unet, schedule = model
    recipe = feature_recipes("m", MethodSpec(kind="trak", output=output, K=4), 1)[0]
    x = images(3)
    rows = featurizer(model, recipe).rows(x, np.array([10, 11, 12]))
    for i in range(3):
        ref = torch.stack([autograd_grad(unet, schedule, output, x[i], t, noise(3, t, (1, 8, 8)))
                           for t in (0, 250, 500, 750)]).mean(0)
        torch.testing.assert_close(torch.from_numpy(rows[i]), ref, rtol=1e-4, atol=1e-6 * ref.abs().max().item())


def test_tracin_train_uses_recorded_timestep_and_retrac_normalizes(model):
    unet, schedule = model
    tracin, retrac = (feature_recipes("m", MethodSpec(kind=k), 2)[2] for k in ("tracin", "retrac"))  # ckpt 1 train
    assert tracin.role == retrac.role == "train" and tracin.checkpoint == 1
    x, ids, t = images(3), np.array([0, 1, 2]), np.array([40, -1, 900])
    a = featurizer(model, tracin).rows(x, ids, t)
    b = featurizer(model, retrac).rows(x, ids, t)
    ref = autograd_grad(unet, schedule, "loss", x[2], 900, sample_noise(3, 2, 900, (1, 8, 8)))
    torch.testing.assert_close(torch.from_numpy(a[2]), ref, rtol=1e-4, atol=1e-6 * ref.abs().max().item())
    assert not a[1].any() and not b[1].any(), "a sample not yet trained at the checkpoint contributes nothing"
    np.testing.assert_allclose(np.linalg.norm(b[[0, 2]], axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(b[0], a[0] / np.linalg.norm(a[0]), rtol=1e-4, atol=1e-7)


def test_retrac_query_normalizes_each_timestep_before_averaging(model):
    unet, schedule = model
    q = feature_recipes("m", MethodSpec(kind="retrac", K=3, noise_draws=1), 1)[1]
    row = featurizer(model, q).rows(images(1), np.array([-1]))[0]
    per_t = [autograd_grad(unet, schedule, "loss", images(1)[0], t, sample_noise(3, -1, t, (1, 8, 8)))
             for t in (0, 333, 666)]
    ref = torch.stack([g / g.norm() for g in per_t]).mean(0)
    torch.testing.assert_close(torch.from_numpy(row), ref, rtol=1e-4, atol=1e-7)


def test_features_do_not_depend_on_threads_batch_or_shard(model):
    recipe = feature_recipes("m", MethodSpec(kind="trak", output="square", K=10), 1)[0]
    f = featurizer(model, recipe, projector="countsketch", k=128)
    x, ids = images(16), np.arange(16)
    full = np.concatenate([f.rows(x[b:b + 8], ids[b:b + 8]) for b in (0, 8)])
    shard = f.rows(x[8:], ids[8:])  # the second shard computed alone, in another call
    np.testing.assert_array_equal(full[8:], shard)
    torch.set_num_threads(2)
    try:
        two = np.concatenate([f.rows(x[b:b + 8], ids[b:b + 8]) for b in (0, 8)])
    finally:
        torch.set_num_threads(1)
    np.testing.assert_array_equal(full, two)
    unet, schedule = model  # projection threads (row slices side by side) change nothing either
    threaded = Featurizer(unet, schedule, recipe, projector="countsketch", proj_dim=128, proj_seed=0, noise_seed=3,
                          threads=3)
    assert threaded.projector.threads == 3
    np.testing.assert_array_equal(full, np.concatenate([threaded.rows(x[b:b + 8], ids[b:b + 8]) for b in (0, 8)]))


def test_journey_query_rows():
    x0_hat = np.stack([np.full((4, 1, 2, 2), i, np.float32) for i in range(2)])  # 2 generated, 4 steps
    imgs = np.arange(3 * 4, dtype=np.float32).reshape(3, 1, 2, 2)  # 2 generated + 1 held-out
    x, t, S = journey_query_inputs(x0_hat, np.array([900, 600, 300, 0]), imgs, n_generated=2)
    assert S == 4 and x.shape == (12, 1, 2, 2) and t.tolist() == [900, 600, 300, 0] * 3
    np.testing.assert_array_equal(x[4:8], x0_hat[1])
    np.testing.assert_array_equal(x[8:], np.repeat(imgs[2:], 4, axis=0))


def test_recipes_per_method():
    assert [r.role for r in feature_recipes("d", MethodSpec(kind="trak", output="square"), 5)] == ["train", "query"]
    tr = feature_recipes("t", MethodSpec(kind="tracin", checkpoints=[0, 4]), 5)
    assert [(r.role, r.checkpoint) for r in tr] == [("train", 0), ("query", 0), ("train", 4), ("query", 4)]
    j = feature_recipes("j", MethodSpec(kind="journey_trak", timesteps="random"), 5)
    assert (j[0].timesteps, j[0].noise, j[1].timesteps) == ("random", "per_sample", "trajectory")
    assert feature_recipes("p", MethodSpec(kind="pixel"), 5) == []
    with pytest.raises(ValueError, match=r"checkpoints \[7\] do not exist"):
        feature_recipes("t", MethodSpec(kind="tracin", checkpoints=[7]), 5)


def test_mismatched_feature_specs_are_refused():
    r = feature_recipes("d", MethodSpec(kind="trak"), 1)
    common = dict(num_params=10, noise_seed=0, data_hash="h", n_rows=5)
    train = feature_spec(r[0], model_digest="A", projector={"name": "countsketch", "k": 64}, **common)
    assert check_compatible(train, feature_spec(r[1], model_digest="A",
                                                projector={"name": "countsketch", "k": 64}, **common)) is None
    with pytest.raises(ValueError, match=r"model_digest: train='A' query='B'[\s\S]*rematerialize"):
        check_compatible(train, feature_spec(r[1], model_digest="B", projector={"name": "countsketch", "k": 64},
                                             **common))
    with pytest.raises(ValueError, match=r"projector"):
        check_compatible(train, feature_spec(r[1], model_digest="A", projector={"name": "countsketch", "k": 32},
                                             **common))


def test_planted_near_duplicate_is_top_proponent_for_dtrak_and_pixel():
    """A query's near-copy planted in the training set must be its top proponent."""
    from attribution.data import load_digits
    from attribution.training import train_ddpm

    digits = load_digits().images
    train = digits[:96].copy()
    query = digits[500:501]
    planted = 37
    train[planted] = np.clip(query[0] + np.random.default_rng(0).normal(0, 0.02, query[0].shape), -1, 1)
    result = train_ddpm(train, SPEC, TrainingSpec(steps=150, batch_size=32, lr=2e-3, warmup_steps=10,
                                                  checkpoints=1))
    schedule = NoiseSchedule.from_scheduler(build_scheduler(SPEC))
    recipes = feature_recipes("dtrak", MethodSpec(kind="trak", output="square", K=10), 1)
    feats = [Featurizer(result.unet, schedule, r, projector="countsketch", proj_dim=512, proj_seed=0, noise_seed=0)
             .rows(x, ids) for r, x, ids in ((recipes[0], train, np.arange(96)), (recipes[1], query, np.array([-1])))]
    scores, lam = trak_scores(MethodSpec(kind="trak", output="square"), feats[0], feats[1], lambda_factor=0.1)
    assert lam > 0 and int(np.argmax(scores[0])) == planted
    pix = similarity_scores(train.reshape(96, -1), query.reshape(1, -1), "cosine")
    assert int(np.argmax(pix[0])) == planted
