"""Where every artefact lives. The root is a local directory or any fsspec URL (s3://, gs://, memory://); nothing
else in the project builds a path by hand."""
from __future__ import annotations

import os
import re

DEFAULT_ROOT = "artefacts"
ROOT_ENV = "DIFFATTR_ROOT"


def default_root() -> str:
    return os.environ.get(ROOT_ENV, DEFAULT_ROOT)


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def join(url: str, *parts: str) -> str:
    for p in parts:
        if not re.fullmatch(r"[A-Za-z0-9_.=+-]+(/[A-Za-z0-9_.=+-]+)*", p):
            raise ValueError(f"artefact path component {p!r} has characters outside [A-Za-z0-9_.=+-/]")
    return "/".join([url.rstrip("/"), *parts])


def filesystem(url: str):
    import fsspec

    return fsspec.core.url_to_fs(url)


class ExperimentPaths:
    """The layout of one experiment under the artefact root."""

    def __init__(self, root: str, experiment: str):
        self.root = root
        self.experiment = experiment
        self.base = join(root, experiment)

    def dataset(self, name: str) -> str:
        return join(self.base, "data", f"{name}.npz")

    def model(self, name: str) -> str:
        return join(self.base, "models", name)

    def features(self, spec_id: str) -> str:
        return join(self.base, "features", f"{spec_id}.zarr")

    def scores(self, name: str) -> str:
        return join(self.base, "scores", f"{name}.zarr")

    def result(self, name: str) -> str:
        """Small result arrays with JSON metadata (a model's generated images and global properties, group values)."""
        return join(self.base, "results", f"{name}.npz")

    def inbox(self, *parts: str) -> str:
        """Drop-folder for new query images (see pipelines/operations.py): inbox/, inbox/accepted, inbox/rejected."""
        return join(self.base, "inbox", *parts)

    def figure(self, name: str) -> str:
        return join(self.base, "figures", f"{name}.png")
