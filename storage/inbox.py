"""The inbox of new query images: files dropped into <root>/<experiment>/inbox/ are validated once, then moved
aside so a sensor never sees them twice. Accepted images are stored as arrays under inbox/accepted/<key>.npz (the
dynamic partition the attribution asset reads); the original goes to inbox/processed/. A rejected file goes to
inbox/rejected/ with a <name>.reason.txt beside it. Nothing here raises on a bad file."""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np

from .artefacts import load_arrays, save_arrays
from .paths import ExperimentPaths, filesystem

SUBFOLDERS = ("accepted", "processed", "rejected")


@dataclass(frozen=True)
class InboxResult:
    accepted: list[str]                    # partition keys of new query images
    rejected: list[tuple[str, str]]        # (file name, reason)


def partition_key(name: str, image: np.ndarray) -> str:
    """<file stem>-<content hash>: readable, unique per content, a valid partition key and path component."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", name.rsplit(".", 1)[0])[:40] or "image"
    return f"{stem}-{hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()[:10]}"


def scan_inbox(paths: ExperimentPaths, shape: tuple[int, int, int], max_files: int = 32) -> InboxResult:
    """Validate and file away up to `max_files` new files (oldest names first)."""
    from attribution.data import QueryImageError, decode_query_image

    fs, root = filesystem(paths.inbox())
    for sub in SUBFOLDERS:
        fs.makedirs(f"{root}/{sub}", exist_ok=True)
    files = sorted(p for p in fs.ls(root, detail=False) if fs.isfile(p) and not p.rsplit("/", 1)[-1].startswith("."))
    accepted, rejected = [], []
    for path in files[:max_files]:
        name = path.rsplit("/", 1)[-1]
        suffix = "." + name.rsplit(".", 1)[-1] if "." in name else ""
        try:
            image = decode_query_image(fs.cat_file(path), suffix, shape)
        except QueryImageError as e:
            reason = str(e)
        except Exception as e:  # noqa: BLE001 - any unreadable file is rejected with its reason, never a crash
            reason = f"unexpected error reading the file: {e!r}"
        else:
            key = partition_key(name, image)
            save_arrays(paths.inbox("accepted", f"{key}.npz"), {"image": image}, {"source": name})
            fs.mv(path, f"{root}/processed/{name}")
            accepted.append(key)
            continue
        fs.mv(path, f"{root}/rejected/{name}")
        fs.pipe_file(f"{root}/rejected/{name}.reason.txt", (reason + "\n").encode())
        rejected.append((name, reason))
    return InboxResult(accepted, rejected)


def load_inbox_image(paths: ExperimentPaths, key: str) -> tuple[np.ndarray, str]:
    """-> ((C, H, W) image, original file name) of an accepted inbox partition."""
    arrays, meta = load_arrays(paths.inbox("accepted", f"{key}.npz"), f"inbox image {key} (was it accepted?)")
    return arrays["image"], meta.get("source", key)
