import numpy as np
import pytest
import zarr

from storage.artefacts import IncompleteArtefactError
from storage.scores import load_scores, save_scores


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_round_trip(tmp_path, kind):
    url = str(tmp_path / "s.zarr") if kind == "local" else f"memory://scores-{tmp_path.name}/s.zarr"
    s = np.arange(12, dtype=np.float32).reshape(3, 4)
    per = np.ones((3, 2, 4), np.float32)
    save_scores(url, {"scores": s, "per_step": per}, {"lambda": 0.5})
    arrays, attrs = load_scores(url, ("scores", "per_step"))
    np.testing.assert_array_equal(arrays["scores"], s)
    np.testing.assert_array_equal(arrays["per_step"], per)
    assert attrs["lambda"] == 0.5 and attrs["complete"] is True


def test_unfinished_matrix_is_refused_and_nan_never_saved(tmp_path):
    url = str(tmp_path / "s.zarr")
    save_scores(url, {"scores": np.zeros((2, 2))}, {})
    group = zarr.open_group(url, mode="r+")
    del group.attrs["complete"]  # what a crash before the last write leaves
    with pytest.raises(IncompleteArtefactError, match="never finished"):
        load_scores(url)
    with pytest.raises(ValueError, match="NaN or inf: not saved"):
        save_scores(str(tmp_path / "bad.zarr"), {"scores": np.array([[np.nan]])}, {})
    assert not (tmp_path / "bad.zarr").exists()
    with pytest.raises(IncompleteArtefactError, match="materialize the scores asset first"):
        load_scores(str(tmp_path / "missing.zarr"))
