"""The artefact root may be any fsspec URL: a whole (small) experiment materializes into memory://, nothing on disk
but the DuckDB warehouse."""
import dagster as dg
import numpy as np
import pytest

from attribution.experiment import parse_experiment
from tests.conftest import tiny_experiment_dict

pytestmark = pytest.mark.slow


def test_experiment_materializes_into_memory_filesystem(tmp_path):
    import fsspec

    from pipelines.run import materialize_experiment
    from storage.models import StoredModel
    from storage.resources import StorageResource
    from storage.scores import load_scores

    d = tiny_experiment_dict("remote")
    d["lds"] = {"enabled": False}
    d["counterfactual"] = {"enabled": False, "encoder_steps": 20}
    d["attribution"]["methods"] = {"dtrak": {"kind": "trak", "output": "square", "K": 2}}
    d["operations"] = {"inbox": False}
    exp = parse_experiment(d)
    root = f"memory://diffattr-{tmp_path.name}"
    storage = StorageResource(root=root, warehouse_path=str(tmp_path / "w.duckdb"))
    with dg.instance_for_test() as instance:
        results = materialize_experiment(exp, storage, instance, log_level="WARNING")
    assert all(r.success for r in results)
    paths = storage.paths("remote")
    fs = fsspec.filesystem("memory")
    stored = {p.split("/remote/", 1)[1].split("/")[0] for p in fs.find(f"{root}/remote")}
    assert {"data", "models", "features", "scores"} <= stored
    assert StoredModel(paths.model("base_model")).n_checkpoints() == 3
    scores = load_scores(paths.scores("dtrak"))[0]["scores"]
    assert scores.shape == (5, 64) and np.isfinite(scores).all()
    assert not list(tmp_path.glob("remote*"))  # nothing written locally besides the warehouse
    assert len(storage.warehouse().query("SELECT * FROM diffattr.top_attributions WHERE experiment = 'remote'")) > 0
