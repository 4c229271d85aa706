"""Test-wide settings: one torch thread (2-vCPU machine), deterministic algorithms."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")


def pytest_configure(config):
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return
    torch.set_num_threads(1)


# The longest files (seconds on the 2-core machine, one xdist worker each: module fixtures that materialize whole
# experiments) go first, longest first, so that the workers finish together instead of one running a long file
# alone at the end (`make test` hands out whole files, in collection order, as workers become free).
LONGEST_FIRST = (
    "tests/assets/test_lora_assets.py",         # ~240
    "tests/pipelines/test_definitions.py",      # ~130
    "tests/browser/test_ui.py",                 # ~125
    "tests/assets/test_group_assets.py",        # ~90
    "tests/pipelines/test_dask.py",             # ~65
    "tests/assets/test_checks.py",              # ~45
)


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))


from contextlib import contextmanager  # noqa: E402

import pytest  # noqa: E402


def materialization_events(results) -> dict:
    """asset key string -> materialization event, over the runs of a materialize_experiment call."""
    return {e.asset_key.to_user_string(): e for r in results for e in r.get_asset_materialization_events()}


def tiny_experiment_dict(name: str = "tiny") -> dict:
    """A whole experiment that trains and samples in seconds on one CPU thread."""
    return {
        "name": name,
        "data": {"source": "digits", "train_size": 64, "split_seed": 0},
        "model": {"block_out_channels": [8, 16], "norm_num_groups": 4},
        "training": {"steps": 30, "batch_size": 16, "lr": 2e-3, "warmup_steps": 5, "checkpoints": 3, "seed": 0},
        "queries": {"n_generated": 3, "n_heldout": 2, "sampling_steps": 4, "seed": 5},
        "attribution": {"proj_dim": 32, "batch_size": 8, "shard_rows": 16, "top_k": 3,
                        "methods": {"dtrak": {"kind": "trak", "output": "square", "K": 3}, "pixel": {"kind": "pixel"}}},
        "lds": {"n_subsets": 6, "seeds": [0, 1], "n_selection": 3, "output_timesteps": 10, "output_noises": 1,
                "lambda_factors": [0.1, 1.0], "bootstrap": 50},
        "counterfactual": {"n_queries": 1, "remove": 8, "methods": ["dtrak"], "encoder_steps": 20},
    }


@contextmanager
def materialized(exp, tmp_path_factory):
    """Materialize a whole experiment once (module-scoped fixtures) -> (storage, instance, results)."""
    import dagster as dg

    from pipelines.run import materialize_experiment
    from storage.resources import StorageResource

    storage = StorageResource(root=str(tmp_path_factory.mktemp("art")))
    with dg.instance_for_test() as instance:
        yield storage, instance, materialize_experiment(exp, storage, instance, log_level="WARNING")


@pytest.fixture
def tiny_experiment():
    from attribution.experiment import parse_experiment

    return parse_experiment(tiny_experiment_dict())


@pytest.fixture
def storage(tmp_path):
    from storage.resources import StorageResource

    return StorageResource(root=str(tmp_path / "artefacts"))
