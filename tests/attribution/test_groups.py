import numpy as np
import pytest
import torch

from attribution.experiment import ModelSpec, TrainingSpec
from attribution.groups import GroupError, build_groups, coalition_id, parse_coalition_id


def test_groups_membership_rows_and_ids():
    labels = np.array(["b", "a", "c", "a", "b", "c", "c"])
    g = build_groups(labels)
    assert g.names == ("a", "b", "c") and g.sizes.tolist() == [2, 2, 3]
    np.testing.assert_array_equal(g.rows(np.array([True, False, True])), [1, 2, 3, 5, 6])
    assert g.rows(np.zeros(3, bool)).size == 0
    cid = coalition_id([True, False, True])
    assert cid == "c101"
    np.testing.assert_array_equal(parse_coalition_id(cid, 3), [True, False, True])
    ordered = build_groups(labels, order=["c", "a", "b"])
    np.testing.assert_array_equal(ordered.rows(np.array([True, False, False])), [2, 5, 6])


def test_group_errors_name_the_group():
    labels = np.array(["a", "b", "a"])
    with pytest.raises(GroupError, match=r"\['z'\] have no training images"):
        build_groups(labels, order=["a", "b", "z"])
    with pytest.raises(GroupError, match=r"\['b'\] that the group list \['a'\] omits"):
        build_groups(labels, order=["a"])
    with pytest.raises(GroupError, match="repeats"):
        build_groups(labels, order=["a", "a", "b"])
    with pytest.raises(GroupError, match="not a coalition id"):
        parse_coalition_id("c10", 3)
    with pytest.raises(GroupError, match="shape"):
        build_groups(labels).rows(np.array([True]))


def test_finetuning_a_pruned_model_keeps_its_architecture_and_is_deterministic():
    """Sparsified fine-tuning trains the pruned model itself; the caller's copy is left untouched."""
    from attribution.models import build_unet, count_parameters
    from attribution.pruning import prune_unet
    from attribution.training import train_ddpm

    spec = ModelSpec(block_out_channels=[8, 16], norm_num_groups=4)
    pruned = build_unet(spec, 8, 1, seed=0)
    report = prune_unet(pruned, 0.3)
    before = {k: v.clone() for k, v in pruned.state_dict().items()}
    images = np.random.default_rng(0).uniform(-1, 1, (24, 1, 8, 8)).astype(np.float32)
    tspec = TrainingSpec(steps=6, batch_size=8, warmup_steps=1, checkpoints=1, ema_decay=None)
    a = train_ddpm(images, spec, tspec, init_model=pruned)
    b = train_ddpm(images, spec, tspec, init_model=pruned)
    assert count_parameters(a.unet) == report.params_after < report.params_before
    assert all(torch.equal(pruned.state_dict()[k], v) for k, v in before.items())
    assert all(torch.equal(a.unet.state_dict()[k], v) for k, v in b.unet.state_dict().items())
    assert not torch.equal(a.unet.state_dict()["conv_in.weight"], before["conv_in.weight"])


def test_coalition_plan_partitions_cover_every_needed_model():
    from assets.groups import coalition_partition_keys, coalition_plan
    from attribution.experiment import parse_experiment
    from attribution.groups import coalition_id

    groups = [str(g) for g in range(6)]
    exp = parse_experiment({"name": "x", "attribution": {"methods": {"dtrak": {"kind": "trak"}}}, "shapley": {
        "groups": groups, "methods": ["sparsified_finetune"], "n_coalitions": 14, "lds_coalitions": 4}})
    plan = coalition_plan(exp)
    keys = coalition_partition_keys(exp, plan)
    assert len(keys) == len(set(keys))
    for mask in [*plan.kernel, *plan.loo, [True] * 6]:
        assert f"sparsified_finetune__{coalition_id(mask)}" in keys
    lds = {f"retrain__{coalition_id(m)}" for m in plan.lds}
    assert len(lds) == 4 and lds <= set(keys)  # the ground truth is retrained even when retrain is no game method
    assert not lds & {f"retrain__{coalition_id(m)}" for m in plan.kernel}  # held out from the fitted coalitions
    assert (plan.lds.sum(axis=1) == 3).all()
    assert coalition_plan(exp).kernel.tobytes() == plan.kernel.tobytes()  # fixed by the spec alone
