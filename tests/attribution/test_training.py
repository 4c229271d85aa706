import numpy as np
import pytest
import torch

from attribution.experiment import parse_experiment
from attribution.sampling import ddim_sample, image_seeds
from attribution.training import checkpoint_steps, lr_factor, train_ddpm
from tests.conftest import tiny_experiment_dict


@pytest.fixture(scope="module")
def setup():
    exp = parse_experiment(tiny_experiment_dict())
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, size=(40, 1, 8, 8)).astype(np.float32)
    return exp, images


def test_same_seed_gives_identical_weights_and_other_seed_differs(setup):
    exp, images = setup
    a = train_ddpm(images, exp.model, exp.training)
    b = train_ddpm(images, exp.model, exp.training)
    for (ka, va), (kb, vb) in zip(a.unet.state_dict().items(), b.unet.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    np.testing.assert_array_equal(a.loss_curve, b.loss_curve)
    np.testing.assert_array_equal(a.last_timesteps, b.last_timesteps)
    c = train_ddpm(images, exp.model, exp.training, seed=1)
    assert not torch.equal(a.unet.state_dict()["conv_in.weight"], c.unet.state_dict()["conv_in.weight"])


def test_checkpoints_and_last_timesteps_record(setup):
    exp, images = setup
    r = train_ddpm(images, exp.model, exp.training)
    assert r.checkpoint_steps == [10, 20, 30] == checkpoint_steps(exp.training)
    assert len(r.checkpoints) == 3 and r.last_timesteps.shape == (3, len(images))
    # 10 steps x 16 = 160 draws over 40 images: every sample has been trained by the first checkpoint
    assert (r.last_timesteps >= 0).all() and (r.last_timesteps < exp.model.num_train_timesteps).all()
    # each checkpoint's TracIn weight is the mean lr over the steps since the previous checkpoint
    bounds = [0] + r.checkpoint_steps
    for (a, b), lr in zip(zip(bounds, bounds[1:]), r.checkpoint_lrs):
        expected = np.mean([exp.training.lr * lr_factor(s, exp.training) for s in range(a, b)])
        assert lr == pytest.approx(expected)
    assert lr_factor(exp.training.steps - 1, exp.training) == pytest.approx(0.0, abs=1e-12)  # cosine ends at 0
    assert r.checkpoint_lrs[-1] > 0  # ... yet the last checkpoint still carries weight
    # the final checkpoint holds the raw (non-EMA) weights, the returned model the EMA weights
    assert not torch.equal(r.checkpoints[-1]["conv_in.weight"], r.unet.state_dict()["conv_in.weight"])


def test_last_timestep_matches_a_replay_of_the_random_stream(setup):
    """Replays the documented random streams to check which timestep each sample saw last."""
    from attribution.runtime import stable_seed

    exp, images = setup
    spec = exp.training.model_copy(update={"ema_decay": None, "steps": 7, "checkpoints": 1})
    r = train_ddpm(images, exp.model, spec)
    order = torch.Generator().manual_seed(stable_seed("order", spec.seed))
    noise = torch.Generator().manual_seed(stable_seed("noise", spec.seed))
    stream = torch.cat([torch.randperm(len(images), generator=order) for _ in range(4)])
    expected = np.full(len(images), -1)
    for s in range(7):
        idx = stream[s * 16:(s + 1) * 16]
        t = torch.randint(0, 1000, (16,), generator=noise)
        torch.randn((16, 1, 8, 8), generator=noise)
        expected[idx.numpy()] = t.numpy()
    np.testing.assert_array_equal(r.last_timesteps[0], expected)


def test_lr_schedule_shapes(setup):
    exp, _ = setup
    spec = exp.training.model_copy(update={"steps": 100, "warmup_steps": 10})
    assert lr_factor(0, spec) == pytest.approx(0.1)
    assert lr_factor(9, spec) == pytest.approx(1.0)
    assert lr_factor(54, spec) == pytest.approx(0.5, abs=0.02)
    assert lr_factor(99, spec) == pytest.approx(0.0, abs=1e-12)
    lin = spec.model_copy(update={"lr_schedule": "linear"})
    assert lr_factor(54, lin) == pytest.approx(1 - 45 / 90)


def test_ddim_sampling_is_per_image_deterministic(setup):
    from attribution.models import build_scheduler

    exp, images = setup
    r = train_ddpm(images, exp.model, exp.training.model_copy(update={"steps": 3}))
    cfg = build_scheduler(exp.model).config
    seeds = image_seeds(3, 5)
    full = ddim_sample(r.unet, cfg, seeds, (1, 8, 8), steps=4, batch_size=5, record_trajectory=True)
    part = ddim_sample(r.unet, cfg, seeds[2:3], (1, 8, 8), steps=4, batch_size=1)
    np.testing.assert_allclose(full.images[2], part.images[0], atol=1e-5)
    assert full.x0_hat.shape == (5, 4, 1, 8, 8) and len(full.timesteps) == 4
    assert full.images.min() >= -1 and full.images.max() <= 1
    np.testing.assert_array_equal(full.x0_hat[:, -1].clip(-1, 1), full.x0_hat[:, -1])
