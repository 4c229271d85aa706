"""Score matrices (queries x train, and Journey-TRAK's queries x steps x train) as a zarr group.

The group's `complete` attribute is written after every array, so a crash mid-write leaves a group that readers
refuse instead of a silently truncated matrix.
"""
from __future__ import annotations

import numpy as np

from .artefacts import IncompleteArtefactError
from .paths import is_local, local_path

FORMAT = "diffattr-scores/1"


def _store(url: str):
    return local_path(url) if is_local(url) else url


def save_scores(url: str, arrays: dict[str, np.ndarray], attrs: dict) -> None:
    import zarr

    arrays = {name: np.asarray(values, dtype=np.float32) for name, values in arrays.items()}
    for name, values in arrays.items():
        if not np.all(np.isfinite(values)):
            raise ValueError(f"score array {name!r} for {url} contains NaN or inf: not saved")
    group = zarr.open_group(_store(url), mode="w")
    for name, values in arrays.items():
        arr = group.create_array(name, shape=values.shape, dtype="float32",
                                 chunks=(min(256, max(1, values.shape[0])), *values.shape[1:]))
        arr[...] = values
    group.attrs.update({**attrs, "format": FORMAT})
    group.attrs["complete"] = True


def load_scores(url: str, names: tuple[str, ...] = ("scores",)) -> tuple[dict[str, np.ndarray], dict]:
    import zarr

    try:
        group = zarr.open_group(_store(url), mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
        raise IncompleteArtefactError(f"no score matrix at {url}: materialize the scores asset first") from e
    attrs = dict(group.attrs)
    if not attrs.get("complete"):
        raise IncompleteArtefactError(f"score matrix at {url} was never finished: materialize it again")
    return {n: group[n][...] for n in names}, attrs
