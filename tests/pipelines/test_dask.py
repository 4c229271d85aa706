"""Subset retraining through a real local Dask cluster (dagster-dask) equals the in-process run, bit for bit."""
import dagster as dg
import pytest
import yaml

from attribution.experiment import parse_experiment
from tests.conftest import tiny_experiment_dict

pytestmark = pytest.mark.slow


def test_subset_models_on_local_dask_cluster_match_in_process(tmp_path):
    import os

    from distributed import Client, LocalCluster

    from assets.evaluation import subset_model_name, subset_partitions
    from pipelines.definitions import experiment_assets
    from storage.models import StoredModel
    from storage.resources import StorageResource

    d = tiny_experiment_dict("dasky")
    d["lds"].update({"n_subsets": 6, "seeds": [0]})
    d["counterfactual"] = {"enabled": False, "encoder_steps": 20}
    d["attribution"]["methods"] = {"pixel": {"kind": "pixel"}}
    d["operations"] = {"inbox": False, "automation": False}
    exp_file = tmp_path / "dasky.yaml"
    exp_file.write_text(yaml.safe_dump(d))
    exp = parse_experiment(d)
    assets = experiment_assets(exp)
    upstream = [dg.AssetKey(["dasky", n]) for n in ("training_set", "lds_subsets")]
    subsets = dg.AssetKey(["dasky", "subset_models"])
    keys = subset_partitions(exp).get_partition_keys()[:3]

    reference = StorageResource(root=str(tmp_path / "ref"))
    distributed = StorageResource(root=str(tmp_path / "dask"))
    with dg.instance_for_test() as instance:
        for storage in (reference, distributed):
            assert dg.materialize(assets, selection=upstream, instance=instance,
                                  resources={"storage": storage}).success
        for pk in keys:
            assert dg.materialize(assets, selection=[subsets], partition_key=pk, instance=instance,
                                  resources={"storage": reference}).success
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                          dashboard_address=None) as cluster, Client(cluster) as client:
            worker_pids = set(client.run(os.getpid).values())
            job = dg.build_reconstructable_job(
                "pipelines.executors", "experiment_job",
                reconstructable_args=(str(exp_file), "dasky__subset_models_job", distributed.root,
                                      str(tmp_path / "dask" / "warehouse.duckdb"), cluster.scheduler_address))
            for pk in keys:
                result = dg.execute_job(job, instance=instance, tags={"dagster/partition": pk})
                assert result.success, pk
                ran_in = {e.pid for e in result.all_events if e.event_type_value == "STEP_SUCCESS"}
                assert ran_in and ran_in <= worker_pids, (pk, ran_in, worker_pids)  # on the cluster's workers
    for pk in keys:
        dims = pk.keys_by_dimension
        name = subset_model_name(int(dims["subset"][1:]), int(dims["seed"]))
        ref = StoredModel(reference.paths("dasky").model(name))
        got = StoredModel(distributed.paths("dasky").model(name))
        assert got.digest == ref.digest
