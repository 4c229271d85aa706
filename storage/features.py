"""Sharded, resumable stores of projected gradient features for TRAK-style attribution.

A store is an ``(n_rows, dim)`` float32 zarr v3 array at ``url`` (a local path or any
fsspec URL), chunked so that one chunk is exactly one row shard. The array attributes
hold the feature spec (output function, timesteps, projector, k, seed, model digest,
...) and the geometry; reopening with a different spec is refused, so features computed
under different settings are never mixed in one array.

Completion markers: a shard counts as complete only when the empty object
``<url>/.done/<shard>`` exists. ``write_shard`` writes the chunk first and the marker
second, so a crash in between costs a recompute but never leaves a shard marked complete
without its data. One marker object per shard (rather than a list in the attributes)
means that several processes writing different shards of the same store never rewrite
each other's state: each process only creates its own chunk and marker objects. The
attributes are written once, at creation, and never modified afterwards, so they hold no
``complete_shards`` list: ``missing_shards()`` lists the markers instead.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Callable, Iterator

import fsspec
import numpy as np
import zarr
import zarr.errors

FORMAT = "diffattr-features/1"
_MISSING = object()


class FeatureStoreError(ValueError):
    """A feature store is missing, inconsistent with the wanted spec, or incomplete."""


def _canonical(value) -> str:
    """Sorted, compact JSON: the form specs are stored, compared and hashed in."""
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise FeatureStoreError(f"feature spec is not JSON-serialisable: {exc}") from exc


def _normalised(spec: dict) -> dict:
    """The spec as it reads back from JSON (tuples become lists, keys strings)."""
    return json.loads(_canonical(spec))


def spec_mismatch(stored: dict, wanted: dict) -> list[str]:
    """Human-readable ``"key: stored=... wanted=..."`` lines, nested dict keys dotted."""
    stored, wanted = _normalised(stored), _normalised(wanted)
    lines: list[str] = []

    def show(value) -> str:
        return "<missing>" if value is _MISSING else _canonical(value)

    def walk(a, b, prefix: str) -> None:
        for key in sorted(set(a) | set(b)):
            name = f"{prefix}{key}"
            x, y = a.get(key, _MISSING), b.get(key, _MISSING)
            if isinstance(x, dict) and isinstance(y, dict):
                walk(x, y, name + ".")
            elif x is _MISSING or y is _MISSING or _canonical(x) != _canonical(y):
                lines.append(f"{name}: stored={show(x)} wanted={show(y)}")

    walk(stored, wanted, "")
    return lines


class FeatureStore:
    """One feature array plus its per-shard completion markers."""

    def __init__(self, url: str, array: zarr.Array, read_only: bool):
        attrs = dict(array.attrs)
        if attrs.get("format") != FORMAT:
            raise FeatureStoreError(
                f"{url} is a zarr array but not a feature store (format={attrs.get('format')!r}, "
                f"expected {FORMAT!r}); use a new store path or delete the old store"
            )
        self.url = url
        self.spec: dict = attrs["spec"]
        self.n_rows: int = attrs["n_rows"]
        self.dim: int = attrs["dim"]
        self.shard_rows: int = attrs["shard_rows"]
        self._array = array
        self._read_only = read_only
        self._fs, path = fsspec.core.url_to_fs(url)
        self._done_dir = posixpath.join(path, ".done")

    @staticmethod
    def _zarr_location(url: str) -> str:
        """Local URLs go to zarr as plain paths: its LocalStore creates parent directories."""
        fs, path = fsspec.core.url_to_fs(url)
        return path if "file" in fs.protocol else url

    @classmethod
    def _open_array(cls, url: str, mode: str) -> zarr.Array:
        try:
            return zarr.open_array(cls._zarr_location(url), mode=mode)
        except (FileNotFoundError, zarr.errors.BaseZarrError) as exc:
            raise FeatureStoreError(f"no feature store at {url}: {exc}") from exc

    @classmethod
    def create_or_open(
        cls, url: str, spec: dict, n_rows: int, dim: int, shard_rows: int
    ) -> FeatureStore:
        """Create the store, or reopen it to resume if its spec and geometry match exactly."""
        url = str(url)
        for name, value in (("n_rows", n_rows), ("dim", dim), ("shard_rows", shard_rows)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise FeatureStoreError(f"{name} must be a positive integer, got {value!r}")
        wanted = {"spec": _normalised(spec), "n_rows": int(n_rows), "dim": int(dim),
                  "shard_rows": int(shard_rows)}
        fs, path = fsspec.core.url_to_fs(url)
        if not fs.exists(posixpath.join(path, "zarr.json")):
            # Markers left by a half-deleted old store would vouch for chunks that are gone.
            done_dir = posixpath.join(path, ".done")
            if fs.exists(done_dir):
                fs.rm(done_dir, recursive=True)
            try:
                array = zarr.create_array(
                    cls._zarr_location(url), shape=(wanted["n_rows"], wanted["dim"]),
                    chunks=(wanted["shard_rows"], wanted["dim"]), dtype="float32",
                    fill_value=np.nan, attributes={**wanted, "format": FORMAT},
                )
                return cls(url, array, read_only=False)
            except zarr.errors.ContainsArrayError:
                pass  # another process created it first: open and verify like any existing store
        store = cls(url, cls._open_array(url, "r+"), read_only=False)
        stored = {"spec": store.spec, "n_rows": store.n_rows, "dim": store.dim,
                  "shard_rows": store.shard_rows}
        store._refuse_mismatch(spec_mismatch(stored, wanted))
        return store

    @classmethod
    def open(cls, url: str, expected_spec: dict | None = None) -> FeatureStore:
        """Open an existing store read-only, refusing it if its spec is not ``expected_spec``."""
        url = str(url)
        store = cls(url, cls._open_array(url, "r"), read_only=True)
        if expected_spec is not None:
            store._refuse_mismatch(spec_mismatch({"spec": store.spec}, {"spec": expected_spec}))
        return store

    def _refuse_mismatch(self, lines: list[str]) -> None:
        if lines:
            raise FeatureStoreError(
                f"feature store {self.url} was built with different settings:\n  "
                + "\n  ".join(lines)
                + "\nUse a new store path for the new settings, or delete the old store."
            )

    @property
    def n_shards(self) -> int:
        return -(-self.n_rows // self.shard_rows)

    def shard_slice(self, shard: int) -> slice:
        """Rows of ``shard``; the last shard may be short."""
        if not 0 <= shard < self.n_shards:
            raise FeatureStoreError(
                f"shard {shard} out of range for {self.url} ({self.n_shards} shards)"
            )
        start = shard * self.shard_rows
        return slice(start, min(start + self.shard_rows, self.n_rows))

    def _done(self) -> set[int]:
        # Other processes add markers; never trust a cached listing.
        self._fs.invalidate_cache(self._done_dir)
        try:
            names = self._fs.ls(self._done_dir, detail=False)
        except FileNotFoundError:
            return set()
        return {int(b) for b in map(posixpath.basename, names) if b.isdigit()}

    def missing_shards(self) -> list[int]:
        done = self._done()
        return [s for s in range(self.n_shards) if s not in done]

    def is_complete(self) -> bool:
        return not self.missing_shards()

    def write_shard(self, shard: int, values: np.ndarray) -> None:
        """Validate and write one shard's data, then mark it complete (in that order)."""
        if self._read_only:
            raise FeatureStoreError(f"feature store {self.url} was opened read-only")
        rows = self.shard_slice(shard)
        values = np.asarray(values)
        if values.dtype.kind not in "biuf":
            raise FeatureStoreError(
                f"shard {shard} of {self.url}: dtype {values.dtype} is not castable to float32"
            )
        with np.errstate(over="ignore"):  # float64 overflow to inf is caught just below
            values = values.astype(np.float32, copy=False)
        expected = (rows.stop - rows.start, self.dim)
        if values.shape != expected:
            raise FeatureStoreError(
                f"shard {shard} of {self.url}: shape {values.shape}, expected {expected}"
            )
        if not np.isfinite(values).all():
            bad = int((~np.isfinite(values)).sum())
            raise FeatureStoreError(
                f"shard {shard} of {self.url}: {bad} non-finite values (NaN/inf in float32)"
            )
        self._array[rows] = values
        self._fs.makedirs(self._done_dir, exist_ok=True)
        self._fs.pipe_file(posixpath.join(self._done_dir, str(shard)), b"")

    def _refuse_incomplete(self, shards) -> None:
        missing = sorted(set(shards) - self._done())
        if missing:
            raise FeatureStoreError(
                f"feature store {self.url} is incomplete: shards {missing} of {self.n_shards} "
                "are missing; rerun the feature asset to resume computing them"
            )

    def read(self, rows: slice | np.ndarray | None = None) -> np.ndarray:
        """Rows as float32, refusing any row that lies in an incomplete shard."""
        if rows is None:
            rows = slice(None)
        if isinstance(rows, slice):
            index = np.arange(*rows.indices(self.n_rows))
            self._refuse_incomplete(np.unique(index // self.shard_rows).tolist())
            return np.asarray(self._array[rows], dtype=np.float32)
        index = np.asarray(rows)
        if index.dtype == bool:
            if index.shape != (self.n_rows,):
                raise IndexError(
                    f"boolean row mask of shape {index.shape}, expected ({self.n_rows},)"
                )
            index = np.flatnonzero(index)
        index = index.astype(np.int64, copy=False)
        if index.ndim != 1:
            raise IndexError(f"row indices must be 1-D, got shape {index.shape}")
        index = np.where(index < 0, index + self.n_rows, index)
        if index.size and (index.min() < 0 or index.max() >= self.n_rows):
            raise IndexError(f"row index out of range for {self.n_rows} rows")
        self._refuse_incomplete(np.unique(index // self.shard_rows).tolist())
        return np.asarray(self._array.oindex[index, :], dtype=np.float32)

    def iter_shards(self) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(shard, values)`` one shard at a time, so memory stays bounded."""
        self._refuse_incomplete(range(self.n_shards))
        for shard in range(self.n_shards):
            yield shard, np.asarray(self._array[self.shard_slice(shard)], dtype=np.float32)

    def digest(self) -> str:
        """sha256 of the spec, shape and little-endian data: a data version for the features.

        Independent of ``shard_rows``, so the same features stored with another sharding
        digest the same.
        """
        h = hashlib.sha256()
        header = {"format": FORMAT, "spec": self.spec, "n_rows": self.n_rows, "dim": self.dim}
        h.update(_canonical(header).encode())
        for _, values in self.iter_shards():
            h.update(values.astype("<f4", copy=False).tobytes())
        return h.hexdigest()


def compute_missing_shards(
    store: FeatureStore,
    compute: Callable[[int, slice], np.ndarray],
    on_shard: Callable[[int], None] | None = None,
) -> list[int]:
    """Compute and write every shard still missing, in order; return those computed now.

    Completed shards are skipped, so rerunning after an interruption resumes where it
    stopped. It takes every missing shard: processes sharing a store should instead split
    the shards between them and call ``write_shard`` for their own.
    """
    computed = []
    for shard in store.missing_shards():
        store.write_shard(shard, compute(shard, store.shard_slice(shard)))
        computed.append(shard)
        if on_shard is not None:
            on_shard(shard)
    return computed
