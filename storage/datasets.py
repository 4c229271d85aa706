"""Image datasets on the artefact root: one .npz per split (images, labels, groups, original index)."""
from __future__ import annotations

import numpy as np

from .artefacts import load_arrays, save_arrays


def save_image_dataset(url: str, ds, index: np.ndarray) -> None:
    save_arrays(url, {"images": ds.images, "labels": ds.labels, "groups": ds.groups, "index": np.asarray(index)},
                {"class_names": list(ds.class_names), "source": ds.source})


def load_image_dataset(url: str):
    """-> (ImageDataset, original row index of each image in the source dataset)."""
    from attribution.data import ImageDataset

    arrays, meta = load_arrays(url, "dataset (materialize training_set first)")
    ds = ImageDataset(images=arrays["images"], labels=arrays["labels"], groups=arrays["groups"],
                      class_names=tuple(meta["class_names"]), source=meta["source"])
    return ds, arrays["index"]
