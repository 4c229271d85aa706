"""LDS subset models trained side by side (lds.models_per_process): partitions cover blocks of subsets, every model
is stored as its own subset model and matches training it alone, and the LDS is computed from them."""
import dagster as dg
import numpy as np
import pytest

from attribution.experiment import parse_experiment
from tests.conftest import materialized, tiny_experiment_dict

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tiny_experiment_dict("batched")
    d["lds"]["models_per_process"] = 4  # 6 subsets -> blocks s000-s003 and s004-s005
    d["counterfactual"] = {"enabled": False, "encoder_steps": 20}
    d["attribution"]["methods"] = {"dtrak": {"kind": "trak", "output": "square", "K": 3}}
    exp = parse_experiment(d)
    with materialized(exp, tmp_path_factory) as (storage, instance, results):
        yield exp, storage, instance


def test_blocks_of_subsets_train_together_and_match_training_alone(run):
    from assets.evaluation import subset_model_name
    from attribution.training import train_ddpm
    from storage.artefacts import load_arrays
    from storage.datasets import load_image_dataset
    from storage.models import StoredModel

    exp, storage, instance = run
    parts = instance.get_materialized_partitions(dg.AssetKey(["batched", "subset_models"]))
    assert parts == {"0|s000-s003", "1|s000-s003", "0|s004-s005", "1|s004-s005"}
    paths = storage.paths(exp.name)
    runs = storage.warehouse().query("SELECT partition_key FROM diffattr.training_runs WHERE experiment = ? AND "
                                     "model = 'subset_model'", [exp.name])
    assert sorted(runs.partition_key) == sorted(f"{s}|s{i:03d}" for i in range(6) for s in (0, 1))
    train, _ = load_image_dataset(paths.dataset("train_images"))
    masks = load_arrays(paths.dataset("lds_subsets"))[0]["masks"]
    alone = train_ddpm(train.images[masks[5]], exp.model, exp.training, seed=1)
    together = StoredModel(paths.model(subset_model_name(5, 1))).load_unet()
    diffs = {n: float((b - a).abs().max()) for (n, a), b in zip(alone.unet.state_dict().items(),
                                                                 together.state_dict().values())}
    # grouped convolutions reduce in another order: ~1e-5 after 30 steps (attribution/batched_training.py)
    assert 0 < max(diffs.values()) < 1e-4, max(diffs.items(), key=lambda kv: kv[1])
    lds = storage.warehouse().query("SELECT value FROM diffattr.lds WHERE experiment = ?", [exp.name])
    assert len(lds) and np.isfinite(lds.value).all()


def test_models_per_process_is_checked():
    from attribution.experiment import ExperimentError

    d = tiny_experiment_dict("bad")
    d["lds"]["models_per_process"] = 7
    with pytest.raises(ExperimentError, match="exceeds n_subsets=6"):
        parse_experiment(d)
