"""Feature stores must round-trip bit for bit, resume after interruptions, and refuse mixing."""

import multiprocessing
import uuid

import fsspec
import numpy as np
import pytest
import zarr

from storage.features import (
    FeatureStore,
    FeatureStoreError,
    compute_missing_shards,
    spec_mismatch,
)

SPEC = {
    "output_fn": "loss",
    "timesteps": [10, 500, 990],
    "projector": {"kind": "rademacher", "k": 8, "seed": 0},
    "model_digest": "abc123",
}


def shard_values(shard: int, rows: slice, dim: int) -> np.ndarray:
    """Deterministic per-shard features, so any process can recompute the expected array."""
    rng = np.random.default_rng(shard)
    return rng.standard_normal((rows.stop - rows.start, dim)).astype(np.float32)


def expected_array(n_rows: int, dim: int, shard_rows: int) -> np.ndarray:
    starts = range(0, n_rows, shard_rows)
    return np.concatenate(
        [shard_values(i, slice(s, min(s + shard_rows, n_rows)), dim) for i, s in enumerate(starts)]
    )


@pytest.fixture
def memory_url():
    name = f"/feat-{uuid.uuid4().hex}"
    yield f"memory://{name}/feat.zarr"
    fs = fsspec.filesystem("memory")
    if fs.exists(name):
        fs.rm(name, recursive=True)


@pytest.fixture(params=["path", "file-url", "memory"])
def url(request, tmp_path, memory_url):
    if request.param == "path":
        return str(tmp_path / "sub" / "feat.zarr")
    if request.param == "file-url":
        return (tmp_path / "sub" / "feat.zarr").as_uri()
    return memory_url


def test_write_all_shards_and_read_back_bit_for_bit(url):
    rng = np.random.default_rng(0)
    source = rng.standard_normal((23, 7)).astype(np.float32)
    source[0, :3] = [-0.0, np.float32(1e-45), np.finfo(np.float32).max]  # sign, subnormal, extreme
    store = FeatureStore.create_or_open(url, SPEC, n_rows=23, dim=7, shard_rows=5)
    assert store.n_shards == 5
    assert store.shard_slice(4) == slice(20, 23)
    assert store.missing_shards() == [0, 1, 2, 3, 4]

    for shard in range(store.n_shards):
        store.write_shard(shard, source[store.shard_slice(shard)])

    assert store.is_complete()
    out = FeatureStore.open(url, expected_spec=SPEC).read()
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, source)
    assert np.signbit(out[0, 0])
    np.testing.assert_array_equal(store.read(slice(3, 17, 2)), source[3:17:2])
    np.testing.assert_array_equal(store.read(np.array([22, 0, -1, 5])), source[[22, 0, -1, 5]])
    mask = np.arange(23) % 3 == 0
    np.testing.assert_array_equal(store.read(mask), source[mask])
    shards = list(store.iter_shards())
    assert [s for s, _ in shards] == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(np.concatenate([v for _, v in shards]), source)


def test_float64_input_is_stored_as_float32(tmp_path):
    store = FeatureStore.create_or_open(str(tmp_path / "f.zarr"), SPEC, 2, 3, 2)
    values = np.array([[0.1, 0.2, 0.3], [1, 2, 3]], dtype=np.float64)
    store.write_shard(0, values)
    np.testing.assert_array_equal(store.read(), values.astype(np.float32))


def test_interrupted_run_resumes_only_missing_shards(tmp_path):
    url = str(tmp_path / "feat.zarr")
    calls = []

    def crashing(shard, rows):
        if len(calls) == 2:
            raise RuntimeError("simulated interruption")
        calls.append(shard)
        return shard_values(shard, rows, 4)

    first = FeatureStore.create_or_open(url, SPEC, n_rows=25, dim=4, shard_rows=5)
    with pytest.raises(RuntimeError, match="simulated interruption"):
        compute_missing_shards(first, crashing)
    assert calls == [0, 1]

    resumed = FeatureStore.create_or_open(url, SPEC, n_rows=25, dim=4, shard_rows=5)
    assert resumed.missing_shards() == [2, 3, 4]
    computed, progress = [], []

    def counting(shard, rows):
        computed.append(shard)
        return shard_values(shard, rows, 4)

    assert compute_missing_shards(resumed, counting, on_shard=progress.append) == [2, 3, 4]
    assert computed == progress == [2, 3, 4]
    assert compute_missing_shards(resumed, counting) == []

    clean = FeatureStore.create_or_open(str(tmp_path / "clean.zarr"), SPEC, 25, 4, 5)
    assert compute_missing_shards(clean, lambda s, r: shard_values(s, r, 4)) == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(resumed.read(), clean.read())
    np.testing.assert_array_equal(resumed.read(), expected_array(25, 4, 5))


def test_read_of_incomplete_store_names_missing_shards(tmp_path):
    url = str(tmp_path / "feat.zarr")
    store = FeatureStore.create_or_open(url, SPEC, n_rows=20, dim=3, shard_rows=5)
    store.write_shard(0, shard_values(0, store.shard_slice(0), 3))
    store.write_shard(2, shard_values(2, store.shard_slice(2), 3))

    missing = r"shards \[1, 3\] of 4 are missing.*rerun the feature asset"
    with pytest.raises(FeatureStoreError, match=missing):
        FeatureStore.open(url).read()
    with pytest.raises(FeatureStoreError, match=r"shards \[3\] of 4"):
        store.read(np.array([0, 17]))
    with pytest.raises(FeatureStoreError, match=r"shards \[1\] of 4"):
        store.read(slice(4, 6))
    with pytest.raises(FeatureStoreError, match=r"\[1, 3\]"):
        next(store.iter_shards())
    with pytest.raises(FeatureStoreError, match=r"\[1, 3\]"):
        store.digest()
    np.testing.assert_array_equal(store.read(slice(10, 15)), shard_values(2, slice(10, 15), 3))
    assert not store.is_complete()


def test_crash_between_data_write_and_marker_leaves_shard_missing(tmp_path):
    url = str(tmp_path / "feat.zarr")
    store = FeatureStore.create_or_open(url, SPEC, n_rows=10, dim=3, shard_rows=5)
    zarr.open_array(url, mode="r+")[0:5] = shard_values(0, slice(0, 5), 3)  # data, no marker

    assert store.missing_shards() == [0, 1]
    with pytest.raises(FeatureStoreError, match=r"shards \[0\] of 2"):
        store.read(slice(0, 5))
    assert compute_missing_shards(store, lambda s, r: shard_values(s, r, 3)) == [0, 1]
    np.testing.assert_array_equal(store.read(), expected_array(10, 3, 5))


def test_changed_dim_is_refused_naming_the_key(tmp_path):
    url = str(tmp_path / "feat.zarr")
    FeatureStore.create_or_open(url, SPEC, n_rows=10, dim=8, shard_rows=5)
    wider = {**SPEC, "projector": {**SPEC["projector"], "k": 16}}
    with pytest.raises(FeatureStoreError) as err:
        FeatureStore.create_or_open(url, wider, n_rows=10, dim=16, shard_rows=5)
    message = str(err.value)
    assert url in message
    assert "dim: stored=8 wanted=16" in message
    assert "spec.projector.k: stored=8 wanted=16" in message
    assert "new store path" in message and "delete the old store" in message
    assert "n_rows" not in message and "shard_rows" not in message


def test_changed_nested_spec_value_is_refused(tmp_path):
    url = str(tmp_path / "feat.zarr")
    FeatureStore.create_or_open(url, SPEC, n_rows=10, dim=8, shard_rows=5)
    reseeded = {**SPEC, "projector": {**SPEC["projector"], "seed": 1}}
    with pytest.raises(FeatureStoreError, match=r"spec\.projector\.seed: stored=0 wanted=1"):
        FeatureStore.create_or_open(url, reseeded, n_rows=10, dim=8, shard_rows=5)
    with pytest.raises(FeatureStoreError, match=r"spec\.projector\.seed: stored=0 wanted=1"):
        FeatureStore.open(url, expected_spec=reseeded)
    with pytest.raises(FeatureStoreError, match=r"shard_rows: stored=5 wanted=4"):
        FeatureStore.create_or_open(url, SPEC, n_rows=10, dim=8, shard_rows=4)
    as_tuple = {**SPEC, "timesteps": tuple(SPEC["timesteps"])}  # same spec once in JSON
    assert FeatureStore.create_or_open(url, as_tuple, n_rows=10, dim=8, shard_rows=5).spec == SPEC


def test_spec_mismatch_lines():
    stored = {"a": 1, "b": {"c": [1, 2], "d": "x"}, "gone": True}
    wanted = {"a": 1, "b": {"c": [1, 3], "d": "x", "e": None}}
    assert spec_mismatch(stored, wanted) == [
        "b.c: stored=[1,2] wanted=[1,3]",
        "b.e: stored=<missing> wanted=null",
        "gone: stored=true wanted=<missing>",
    ]
    assert spec_mismatch(stored, stored) == []


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e39])
def test_non_finite_values_are_refused(tmp_path, bad):
    store = FeatureStore.create_or_open(str(tmp_path / "feat.zarr"), SPEC, 10, 3, 5)
    values = np.zeros((5, 3))
    values[2, 1] = bad
    with pytest.raises(FeatureStoreError, match="shard 1 .*1 non-finite"):
        store.write_shard(1, values)
    assert store.missing_shards() == [0, 1]


def test_wrong_shape_dtype_or_shard_is_refused(tmp_path):
    store = FeatureStore.create_or_open(str(tmp_path / "feat.zarr"), SPEC, 12, 3, 5)
    with pytest.raises(FeatureStoreError, match=r"shard 0 .*shape \(4, 3\), expected \(5, 3\)"):
        store.write_shard(0, np.zeros((4, 3)))
    with pytest.raises(FeatureStoreError, match=r"shard 1 .*shape \(5, 4\), expected \(5, 3\)"):
        store.write_shard(1, np.zeros((5, 4)))
    with pytest.raises(FeatureStoreError, match=r"shard 2 .*shape \(5, 3\), expected \(2, 3\)"):
        store.write_shard(2, np.zeros((5, 3)))
    with pytest.raises(FeatureStoreError, match="shard 0 .*not castable"):
        store.write_shard(0, np.full((5, 3), "x"))
    with pytest.raises(FeatureStoreError, match="shard 3 out of range"):
        store.write_shard(3, np.zeros((2, 3)))
    assert store.missing_shards() == [0, 1, 2]


def test_open_missing_or_read_only(tmp_path, memory_url):
    for url in (str(tmp_path / "absent.zarr"), memory_url):
        with pytest.raises(FeatureStoreError, match=f"no feature store at {url}"):
            FeatureStore.open(url)
    url = str(tmp_path / "feat.zarr")
    FeatureStore.create_or_open(url, SPEC, n_rows=5, dim=2, shard_rows=5)
    with pytest.raises(FeatureStoreError, match="read-only"):
        FeatureStore.open(url).write_shard(0, np.zeros((5, 2)))


def test_other_zarr_array_is_not_a_feature_store(tmp_path):
    url = str(tmp_path / "plain.zarr")
    zarr.create_array(url, shape=(2, 2), dtype="float32")
    with pytest.raises(FeatureStoreError, match="not a feature store"):
        FeatureStore.open(url)


def _write_shards(url: str, shards: list[int]) -> None:
    store = FeatureStore.create_or_open(url, SPEC, n_rows=46, dim=6, shard_rows=4)
    for shard in shards:
        store.write_shard(shard, shard_values(shard, store.shard_slice(shard), 6))


def test_concurrent_writers_of_different_shards(tmp_path):
    url = str(tmp_path / "feat.zarr")
    store = FeatureStore.create_or_open(url, SPEC, n_rows=46, dim=6, shard_rows=4)
    ctx = multiprocessing.get_context("spawn")
    workers = [
        ctx.Process(target=_write_shards, args=(url, list(range(w, 12, 4)))) for w in range(4)
    ]
    for p in workers:
        p.start()
    for p in workers:
        p.join(timeout=60)
    assert [p.exitcode for p in workers] == [0, 0, 0, 0]

    assert store.is_complete()
    np.testing.assert_array_equal(store.read(), expected_array(46, 6, 4))


def test_digest_tracks_content_not_sharding(tmp_path, memory_url):
    source = expected_array(12, 3, 5)

    def filled(url, values, shard_rows=5):
        store = FeatureStore.create_or_open(url, SPEC, n_rows=12, dim=3, shard_rows=shard_rows)
        compute_missing_shards(store, lambda s, rows: values[rows])
        return store

    digest = filled(str(tmp_path / "a.zarr"), source).digest()
    assert len(digest) == 64
    assert filled(memory_url, source).digest() == digest
    assert filled(str(tmp_path / "resharded.zarr"), source, shard_rows=4).digest() == digest

    changed = source.copy()
    changed[7, 1] = np.nextafter(changed[7, 1], np.float32(np.inf))
    assert filled(str(tmp_path / "b.zarr"), changed).digest() != digest
    other_spec = {**SPEC, "model_digest": "z"}
    other = FeatureStore.create_or_open(str(tmp_path / "c.zarr"), other_spec, 12, 3, 5)
    compute_missing_shards(other, lambda s, rows: source[rows])
    assert other.digest() != digest


def test_failed_data_write_is_not_marked_complete(tmp_path):
    store = FeatureStore.create_or_open(str(tmp_path / "feat.zarr"), SPEC, 10, 3, 5)

    class FullDisk:
        def __setitem__(self, rows, values):
            raise OSError("disk full")

    store._array = FullDisk()  # the marker must only follow a successful data write
    with pytest.raises(OSError, match="disk full"):
        store.write_shard(1, np.zeros((5, 3)))
    assert store.missing_shards() == [0, 1]
