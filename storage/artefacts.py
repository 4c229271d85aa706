"""Atomic artefact writes: a crash at any point leaves either the previous complete artefact or nothing that
looks complete.

Directories (models) are assembled in a local temporary directory, finished with a `_COMPLETE.json` marker, then
renamed into place on a local root or uploaded marker-last to a remote one; readers refuse a directory without the
marker. Single files (arrays, PNGs) are written to a temporary name and renamed, or put in one request remotely.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from .paths import filesystem, is_local, local_path

MARKER = "_COMPLETE.json"


class IncompleteArtefactError(FileNotFoundError):
    """An artefact is missing or was never finished; the message says which asset to (re)materialize."""


@contextmanager
def atomic_directory(url: str, meta: dict) -> Iterator[Path]:
    """Yield a local staging directory; on clean exit it becomes `url` with a completion marker holding `meta`
    (read at exit, so the block may fill in fields it computes, such as a digest)."""
    if is_local(url):
        final = Path(local_path(url))
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    else:
        staging = Path(tempfile.mkdtemp(prefix="diffattr-"))
    try:
        yield staging
        (staging / MARKER).write_text(json.dumps({**meta, "completed_at": time.time()}, sort_keys=True))
        if is_local(url):
            trash = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            if final.exists():
                final.rename(trash)
            staging.rename(final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            fs, path = filesystem(url)
            if fs.exists(path):
                fs.rm(path, recursive=True)
            files = sorted(p for p in staging.rglob("*") if p.is_file() and p.name != MARKER)
            for p in files:
                fs.put_file(str(p), f"{path}/{p.relative_to(staging).as_posix()}")
            fs.put_file(str(staging / MARKER), f"{path}/{MARKER}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def read_marker(url: str, what: str = "artefact") -> dict:
    """The completion metadata of a directory artefact; raises if it is absent (never finished)."""
    fs, path = filesystem(url)
    marker = f"{path.rstrip('/')}/{MARKER}"
    if not fs.exists(marker):
        raise IncompleteArtefactError(
            f"{what} at {url} is missing or incomplete (no {MARKER}): materialize it again")
    with fs.open(marker, "r") as f:
        return json.load(f)


@contextmanager
def local_copy(url: str) -> Iterator[Path]:
    """A local directory holding a complete directory artefact (the artefact itself when the root is local)."""
    read_marker(url)
    if is_local(url):
        yield Path(local_path(url))
        return
    fs, path = filesystem(url)
    tmp = Path(tempfile.mkdtemp(prefix="diffattr-get-"))
    try:
        fs.get(path.rstrip("/") + "/", str(tmp), recursive=True)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_bytes(url: str, data: bytes) -> None:
    fs, path = filesystem(url)
    if is_local(url):
        final = Path(local_path(url))
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.write_bytes(data)
        os.replace(tmp, final)
    else:
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, data)


def read_bytes(url: str, what: str = "artefact") -> bytes:
    fs, path = filesystem(url)
    if not fs.exists(path):
        raise IncompleteArtefactError(f"{what} at {url} does not exist: materialize it first")
    return fs.cat_file(path)


def save_arrays(url: str, arrays: dict[str, np.ndarray], meta: dict | None = None) -> None:
    """One .npz file of named arrays (+ JSON metadata), written atomically."""
    buf = io.BytesIO()
    extra = {"__meta__": np.frombuffer(json.dumps(meta or {}, sort_keys=True).encode(), dtype=np.uint8)}
    np.savez(buf, **arrays, **extra)
    write_bytes(url, buf.getvalue())


def load_arrays(url: str, what: str = "arrays") -> tuple[dict[str, np.ndarray], dict]:
    with np.load(io.BytesIO(read_bytes(url, what)), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if k != "__meta__"}
        meta = json.loads(z["__meta__"].tobytes().decode()) if "__meta__" in z.files else {}
    return arrays, meta
