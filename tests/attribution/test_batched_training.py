"""train_ddpm_many must reproduce train_ddpm model by model: bit for bit with the "loop" engine, within float
reduction-order noise with the faster "wide" and "vmap" engines."""
import numpy as np
import pytest
import torch

from attribution.batched_training import train_ddpm_many, wide_supported
from attribution.experiment import ModelSpec, parse_experiment
from attribution.models import build_unet
from attribution.runtime import stable_seed
from attribution.training import train_ddpm
from tests.conftest import tiny_experiment_dict

SIZES, SEEDS = (40, 24, 12), [0, 1, 0]  # 12 < batch 16: that model trains on its whole set, padded to 16 rows


@pytest.fixture(scope="module")
def setup():
    exp = parse_experiment(tiny_experiment_dict())  # [8, 16] channels, 4 groups, 30 steps, batch 16, EMA, clipping
    rng = np.random.default_rng(0)
    sets = [rng.uniform(-1, 1, size=(n, 1, 8, 8)).astype(np.float32) for n in SIZES]
    sequential = [train_ddpm(x, exp.model, exp.training, seed=s) for x, s in zip(sets, SEEDS)]
    return exp, sets, sequential


def _max_weight_diff(a, b) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max((sa[k] - sb[k]).abs().max().item() for k in sa)


def test_loop_engine_is_bit_identical_to_sequential_training(setup):
    """Same init, batches, timesteps, noise, AdamW, clipping and EMA: nothing differs but the process layout."""
    exp, sets, sequential = setup
    many = train_ddpm_many(sets, exp.model, exp.training, SEEDS, engine="loop")
    for seq, res in zip(sequential, many):
        assert _max_weight_diff(seq.unet, res.unet) == 0.0
        np.testing.assert_array_equal(seq.loss_curve, res.loss_curve)


@pytest.mark.parametrize("engine", ["wide", "vmap"])
def test_vectorized_engines_match_sequential_training(setup, engine):
    exp, sets, sequential = setup
    many = train_ddpm_many(sets, exp.model, exp.training, SEEDS, engine=engine)
    for seq, res, x in zip(sequential, many, sets):
        # measured: loss curves within 3e-7 relative, weights within 1.1e-5 absolute (grouped vs plain convolutions)
        np.testing.assert_allclose(res.loss_curve, seq.loss_curve, rtol=1e-5)
        assert _max_weight_diff(seq.unet, res.unet) < 1e-4
        assert res.extra == {"engine": engine, "models_in_batch": 3, "batch_wall_seconds": pytest.approx(
            3 * res.wall_seconds)}
        assert res.checkpoints == [] and res.last_timesteps.shape == (0, len(x)) and not res.unet.training


def test_initial_weights_are_train_ddpms(setup):
    """A one-step run without warm-up has learning rate 0 at its only step (the cosine schedule ends at 0) and no
    EMA, so it returns the initial weights: they must be build_unet's for the model's init seed, bit for bit."""
    exp, sets, _ = setup
    spec = exp.training.model_copy(update={"steps": 1, "ema_decay": None, "warmup_steps": 0})
    many = train_ddpm_many(sets, exp.model, spec, SEEDS)
    assert many[0].extra["engine"] == "wide"
    for res, s in zip(many, SEEDS):
        init = build_unet(exp.model, sample_size=8, channels=1, seed=stable_seed("init", s)).state_dict()
        for k, v in res.unet.state_dict().items():
            assert torch.equal(v, init[k]), k


def test_attention_models_fall_back_to_the_loop_engine():
    model = ModelSpec(block_out_channels=[8, 16], norm_num_groups=4, attention=True)
    spec = parse_experiment(tiny_experiment_dict()).training.model_copy(update={"steps": 8})
    images = np.random.default_rng(1).uniform(-1, 1, size=(2, 20, 1, 8, 8)).astype(np.float32)
    assert not wide_supported(build_unet(model, 8, 1, seed=0))
    many = train_ddpm_many(list(images), model, spec, [3, 4])
    for x, s, res in zip(images, [3, 4], many):
        seq = train_ddpm(x, model, spec, seed=s)
        assert res.extra["engine"] == "loop"
        np.testing.assert_array_equal(res.loss_curve, seq.loss_curve)
        assert _max_weight_diff(seq.unet, res.unet) == 0.0
    for engine in ("wide", "vmap"):
        with pytest.raises(ValueError, match=f"engine='{engine}' does not support"):
            train_ddpm_many(list(images), model, spec, [3, 4], engine=engine)


def test_bad_input_is_a_clear_error(setup):
    exp, sets, _ = setup
    with pytest.raises(ValueError, match="3 image sets but 2 seeds"):
        train_ddpm_many(sets, exp.model, exp.training, [0, 1])
    with pytest.raises(ValueError, match="at least one"):
        train_ddpm_many([], exp.model, exp.training, [])
    with pytest.raises(ValueError, match="image set 1 must be a non-empty"):
        train_ddpm_many([sets[0], sets[0][:0]], exp.model, exp.training, [0, 1])
    with pytest.raises(ValueError, match="image set 0 must be a non-empty"):
        train_ddpm_many([sets[0][0]], exp.model, exp.training, [0])
    with pytest.raises(ValueError, match="one \\(C, H, W\\) shape"):
        train_ddpm_many([sets[0], np.zeros((5, 1, 16, 16), np.float32)], exp.model, exp.training, [0, 1])
    with pytest.raises(ValueError, match="engine"):
        train_ddpm_many(sets, exp.model, exp.training, SEEDS, engine="fast")
