import gzip
import struct
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from ftdeploy.config import DataConfig
from ftdeploy.data import build_datasets, datasets
from ftdeploy.errors import DataError
from ftdeploy.preprocessing import Preprocessing, preprocess

SPEC = Preprocessing(16, 16, 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def test_digits_is_the_real_bundled_set_with_a_stratified_seeded_split():
    splits = build_datasets(DataConfig(name="digits"), SPEC)
    assert len(splits.train) + len(splits.val) == 1797
    assert len(splits.val) == 360 and splits.classes == [str(i) for i in range(10)]
    counts = Counter(splits.val.labels)
    assert min(counts.values()) >= 35 and max(counts.values()) <= 37  # stratified: ~36 per class
    again = build_datasets(DataConfig(name="digits"), SPEC)
    assert again.val.labels == splits.val.labels
    assert np.array_equal(again.val[0][0], splits.val[0][0])
    other = build_datasets(DataConfig(name="digits", split_seed=1), SPEC)
    assert other.val.labels != splits.val.labels
    x, y = splits.train[0]
    assert tuple(x.shape) == (3, 16, 16) and 0 <= y < 10


def make_folder(root, corrupt=False):
    """Two classes of real PNG/JPEG files in the modes users' folders contain."""
    rng = np.random.default_rng(0)
    for cls, colour in (("cat", 40), ("dog", 210)):
        (root / cls).mkdir(parents=True)
        for i in range(6):
            arr = (colour + rng.normal(0, 10, (20, 24, 3))).clip(0, 255).astype(np.uint8)
            img = Image.fromarray(arr)
            mode = ["RGB", "L", "RGBA", "P", "LA", "RGB"][i]
            img = img.convert(mode)
            img.save(root / cls / (f"{i}.jpg" if mode == "RGB" else f"{i}.png"))
    if corrupt:
        (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")
    return root


def test_imagefolder_converts_every_mode_and_splits(tmp_path):
    splits = build_datasets(DataConfig(name="imagefolder", root=make_folder(tmp_path / "d"), val_fraction=0.25), SPEC)
    assert splits.classes == ["cat", "dog"]
    assert len(splits.train) == 9 and len(splits.val) == 3
    for ds in (splits.train, splits.val):
        for i in range(len(ds)):
            x, y = ds[i]
            assert tuple(x.shape) == (3, 16, 16)
            # dark cats, bright dogs: the label must follow the folder the file came from
            assert (x.mean().item() > 0) == (y == 1)


def test_imagefolder_separate_val_folder(tmp_path):
    make_folder(tmp_path / "train")
    make_folder(tmp_path / "val")
    splits = build_datasets(DataConfig(name="imagefolder", root=tmp_path / "train", val_root=tmp_path / "val"), SPEC)
    assert len(splits.train) == 12 and len(splits.val) == 12


def test_corrupt_image_is_named_or_skipped_and_counted(tmp_path):
    root = make_folder(tmp_path / "d", corrupt=True)
    with pytest.raises(DataError, match=r"broken\.png.*on_corrupt=skip"):
        build_datasets(DataConfig(name="imagefolder", root=root), SPEC)
    splits = build_datasets(DataConfig(name="imagefolder", root=root, on_corrupt="skip"), SPEC)
    assert [p.endswith("broken.png") for p in splits.skipped] == [True]
    assert len(splits.train) + len(splits.val) == 12


def test_missing_folder_and_unknown_dataset_say_what_to_do(tmp_path):
    with pytest.raises(DataError, match="does not exist.*root/<class>"):
        build_datasets(DataConfig(name="imagefolder", root=tmp_path / "nope"), SPEC)
    with pytest.raises(DataError, match="unknown dataset 'digit'.*did you mean 'digits'"):
        build_datasets(DataConfig(name="digit"), SPEC)
    with pytest.raises(DataError, match="unknown torchvision dataset 'CIFAR11'.*CIFAR10"):
        build_datasets(DataConfig(name="torchvision:CIFAR11"), SPEC)


def test_torchvision_dataset_offline_without_files_explains(tmp_path):
    with pytest.raises(DataError, match="not found.*data.download=true"):
        build_datasets(DataConfig(name="torchvision:CIFAR10", root=tmp_path), SPEC)
    with pytest.raises(DataError, match="could not download CIFAR10"):
        build_datasets(DataConfig(name="torchvision:CIFAR10", root=tmp_path, download=True), SPEC)


def write_idx(path, array):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") if str(path).endswith(".gz") else open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_torchvision_dataset_reads_local_files(tmp_path):
    """MNIST's loader on real digits written in MNIST's own file format: torchvision's real code path."""
    from sklearn.datasets import load_digits

    d = load_digits()
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = (d.images * 255 / 16).astype(np.uint8)
    write_idx(raw / "train-images-idx3-ubyte", images[:100])
    write_idx(raw / "train-labels-idx1-ubyte", d.target[:100])
    write_idx(raw / "t10k-images-idx3-ubyte", images[100:130])
    write_idx(raw / "t10k-labels-idx1-ubyte", d.target[100:130])
    splits = build_datasets(DataConfig(name="torchvision:MNIST", root=tmp_path), SPEC)
    assert len(splits.train) == 100 and len(splits.val) == 30
    assert splits.train.labels == d.target[:100].tolist()
    assert splits.classes[0].startswith("0")
    assert tuple(splits.val[0][0].shape) == (3, 16, 16)


def test_preprocessing_composites_alpha_on_white_and_normalizes():
    spec = Preprocessing(4, 4, 3, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    transparent = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert np.allclose(preprocess(transparent, spec), 1.0)  # white -> (1 - 0.5) / 0.5
    gray = preprocess(Image.new("L", (8, 6), 0), Preprocessing(4, 4, 1, (0.5,), (0.5,)))
    assert gray.shape == (1, 4, 4) and np.allclose(gray, -1.0)


def test_registry_refuses_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        datasets.register("digits")(lambda cfg, spec: None)


def test_every_dataset_pickles_for_spawned_dataloader_workers(tmp_path):
    """DataLoader workers started with spawn receive the dataset pickled: no lambdas inside."""
    import pickle

    for cfg in (DataConfig(name="digits"), DataConfig(name="imagefolder", root=make_folder(tmp_path / "d")),
                DataConfig(name="synthetic", num_samples=20, augment=True)):
        splits = build_datasets(cfg, SPEC)
        for ds in (splits.train, splits.val):
            again = pickle.loads(pickle.dumps(ds))
            assert again.labels == ds.labels
            if not cfg.augment:
                assert np.array_equal(again[0][0], ds[0][0])


def test_fashion_mnist_reads_its_idx_files_and_brings_its_own_test_split(tmp_path):
    """Idx files made here (the suite never needs Debian's package)."""
    from ftdeploy.data import FASHION_CLASSES

    rng = np.random.default_rng(0)
    train_images, train_labels = rng.integers(0, 255, (40, 28, 28)), np.arange(40) % 10
    test_images, test_labels = rng.integers(0, 255, (10, 28, 28)), np.arange(10)[::-1]
    for name, array in (("train-images-idx3-ubyte.gz", train_images), ("train-labels-idx1-ubyte.gz", train_labels),
                        ("t10k-images-idx3-ubyte.gz", test_images), ("t10k-labels-idx1-ubyte.gz", test_labels)):
        write_idx(tmp_path / name, array)
    spec = Preprocessing(28, 28, 1, (0.5,), (0.5,))
    cfg = DataConfig(name="fashion_mnist", root=tmp_path, val_fraction=0.25, test_fraction=0.5)
    splits = build_datasets(cfg, spec)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (30, 10, 10)  # its own test split, not val's
    assert splits.classes == FASHION_CLASSES and splits.test.labels == test_labels.tolist()
    first = (test_images[0] / 255 - 0.5) / 0.5
    assert np.allclose(splits.test[0][0][0], first, atol=1e-6)  # the official test images, as they are
    assert sorted(splits.train.labels + splits.val.labels) == sorted(train_labels.tolist())
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b not gzip")
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz"):
        build_datasets(cfg, spec)
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        build_datasets(cfg.model_copy(update={"root": tmp_path / "empty"}), spec)
