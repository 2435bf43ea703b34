"""Datasets by name -> preloaded, normalised tensors split into train / validation / test.

Everything is held in memory as tensors so that a batch is an index slice: no Dataset/DataLoader
and no per-sample Python in the training loop. Splits are stratified and deterministic:

- test: the official test split (digits has none, so a fixed stratified 20 % is held out, the
  same for every seed);
- validation: a stratified ``val_fraction`` of the training split, drawn with ``data_seed``;
- train: the rest, optionally reduced to ``n_per_class`` examples of each class; with
  ``merge_val`` (a final run), the rest and the validation split together.

Images can be resized (``resize``) before anything else, e.g. to a transfer source's size.
Normalisation (per channel) uses statistics of the final training split only.

The splits are scikit-learn's stratified ``train_test_split``, and digits is scikit-learn's
``load_digits``; importing scikit-learn (and the scipy.stats it loads) costs about 1.6 s of CPU,
in every command and every test process. So both are kept in the data cache (``cache_dir()``,
small ``.npz`` files, written atomically, keyed by scikit-learn's version and, for a split, by
the labels, fraction and seed, which are all a stratified split depends on): a process that
finds them never imports scikit-learn. A cache that cannot be written only costs that time.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.metadata
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import DATASETS, ConfigError

if TYPE_CHECKING:
    from pipeline.config import TrainConfig

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DIGITS_TEST_FRACTION = 0.2
DIGITS_TEST_SEED = 0  # fixed: the test split must not move with the search's seeds


class DatasetNotFound(RuntimeError):
    """A dataset is not on this machine; the message says where we looked and how to get it."""


@dataclass(frozen=True)
class Splits:
    """Normalised float tensors (N, C, H, W) and int64 labels for each split."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: tuple[str, ...]
    mean: torch.Tensor  # per channel, to undo normalisation for pictures
    std: torch.Tensor

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])

    @property
    def n_classes(self) -> int:
        return len(self.classes)


def cache_dir() -> Path:
    """Where extracted or downloaded datasets go when no --data-dir is given."""
    return Path(os.environ.get("PIPELINE_DATA_CACHE", Path.home() / ".cache" / "pipeline"))


# -- raw loading: each returns (x_trainval, y_trainval, x_test, y_test, classes) as uint8/int64 --


def _load_digits(name, data_dir):
    images, target, names = _digits_arrays()
    x = torch.from_numpy(images).unsqueeze(1)  # (N, 1, 8, 8), 0..16
    y = torch.from_numpy(target)
    idx_trval, idx_test = _stratified_split(target, DIGITS_TEST_FRACTION, DIGITS_TEST_SEED)
    classes = tuple(str(c) for c in names)
    return x[idx_trval], y[idx_trval], x[idx_test], y[idx_test], classes


def _sklearn_version() -> str:
    return importlib.metadata.version("scikit-learn")  # without importing it


def _cached_arrays(name: str, make) -> dict[str, np.ndarray]:
    """The arrays ``make()`` returns, kept as ``cache_dir()/name`` (see the module doc)."""
    path = cache_dir() / name
    try:
        with np.load(path) as found:
            return dict(found)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):  # absent, or torn
        pass
    arrays = make()
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".part", delete=False) as tmp:
            np.savez(tmp, **arrays)
        os.replace(tmp.name, path)  # atomic: readers see all of it or nothing
    except OSError:  # a full disk or a read-only cache: no file, and no .part left behind
        if tmp is not None:
            Path(tmp.name).unlink(missing_ok=True)
    return arrays


def _digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    def make():
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return {"images": bunch.images.astype(np.float32),
                "target": bunch.target.astype(np.int64), "names": bunch.target_names}

    found = _cached_arrays(f"digits-sklearn-{_sklearn_version()}.npz", make)
    return found["images"], found["target"], found["names"]


def _stratified_split(y: np.ndarray, test_size: float, seed: int) -> tuple[np.ndarray,
                                                                              np.ndarray]:
    """``train_test_split(arange(len(y)), test_size, stratify=y, random_state=seed)``."""
    def make():
        from sklearn.model_selection import train_test_split

        keep, held = train_test_split(np.arange(len(y)), test_size=test_size, stratify=y,
                                      random_state=seed)
        return {"keep": keep, "held": held}

    labels = hashlib.sha256(np.ascontiguousarray(y, dtype=np.int64).tobytes()).hexdigest()[:16]
    found = _cached_arrays(f"splits/{labels}-{test_size!r}-{seed}-sklearn-"
                           f"{_sklearn_version()}.npz", make)
    return found["keep"], found["held"]


def _extract_debian_fashion_mnist(target_root: Path) -> Path:
    """torchvision reads extracted IDX files from ROOT/FashionMNIST/raw; the package ships .gz."""
    raw = target_root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for gz in sorted(DEBIAN_FASHION_MNIST.glob("*-ubyte.gz")):
        out = raw / gz.name.removesuffix(".gz")
        if not out.exists():
            tmp = out.with_suffix(".part")
            with gzip.open(gz, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
            tmp.replace(out)  # atomic: a killed extraction never leaves a truncated file
    return target_root


_HOW_TO_GET = {
    "fashion-mnist": "install the Debian package (apt-get install dataset-fashion-mnist), or put "
                     "the IDX files in DIR/FashionMNIST/raw/ and pass --data-dir DIR",
    "mnist": "put the four IDX files (train-images-idx3-ubyte, ...) in DIR/MNIST/raw/ and pass "
             "--data-dir DIR",
    "cifar10": "put the extracted cifar-10-batches-py/ folder in DIR and pass --data-dir DIR",
}


def _torchvision_dataset(name: str, data_dir: str | None):
    """Find (or fetch) the dataset and return torchvision's (train, test) objects."""
    import torchvision.datasets as tvd

    cls = {"fashion-mnist": tvd.FashionMNIST, "mnist": tvd.MNIST, "cifar10": tvd.CIFAR10}[name]
    looked, errors = [], []

    def attempt(root):
        looked.append(str(root))
        try:
            return cls(str(root), train=True), cls(str(root), train=False)
        except Exception as err:  # torchvision raises RuntimeError / OSError
            errors.append(f"{type(err).__name__}: {' '.join(str(err).split())[:300]}")
            return None

    def download(root: Path):
        """Download into a scratch folder and move it into place only when complete."""
        looked.append(f"download into {root}")
        with tempfile.TemporaryDirectory() as tmp:
            try:
                cls(tmp, train=True, download=True)
            except Exception as err:  # URLError when there is no network
                errors.append(f"{type(err).__name__}: {' '.join(str(err).split())[:300]}")
                return None
            root.mkdir(parents=True, exist_ok=True)
            for item in Path(tmp).iterdir():
                if not (root / item.name).exists():
                    shutil.move(str(item), root / item.name)
        return attempt(root)

    if data_dir and (found := attempt(Path(data_dir))):
        return found
    if name == "fashion-mnist":
        if any(DEBIAN_FASHION_MNIST.glob("*-ubyte.gz")):
            if found := attempt(_extract_debian_fashion_mnist(cache_dir())):
                return found
        else:
            looked.append(f"{DEBIAN_FASHION_MNIST} (Debian package)")
    if found := attempt(cache_dir()):  # an earlier download
        return found
    if os.environ.get("PIPELINE_NO_DOWNLOAD") != "1":
        if found := download(Path(data_dir) if data_dir else cache_dir()):
            return found
    raise DatasetNotFound(
        f"dataset {name!r} not found. Looked in: {', '.join(looked)}.\n"
        f"To get it: {_HOW_TO_GET[name]}.\n(last error: {errors[-1] if errors else 'none'})"
    )


def _load_torchvision(name, data_dir):
    train, test = _torchvision_dataset(name, data_dir)

    def to_tensors(ds):
        x = torch.as_tensor(np.asarray(ds.data))
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)  # (N, C, H, W)
        return x.contiguous(), torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)

    return (*to_tensors(train), *to_tensors(test), tuple(train.classes))




def _balanced_subset(y: np.ndarray, n_per_class: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    picks = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        if len(members) < n_per_class:
            raise ConfigError(f"n_per_class={n_per_class}: class {c} of this dataset's training "
                              f"split has only {len(members)} examples; lower n_per_class or use "
                              "a larger dataset")
        picks.append(rng.choice(members, size=n_per_class, replace=False))
    return np.sort(np.concatenate(picks))


def _resize(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """Bilinear resize to size x size (antialiased when shrinking); a no-op at that size."""
    if size is None or tuple(x.shape[2:]) == (size, size):
        return x
    return F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False,
                         antialias=size < min(x.shape[2:]))


def splits_for(cfg: TrainConfig) -> Splits:
    """The splits a training configuration reads (cached, like load_splits)."""
    return load_splits(cfg.dataset, cfg.data_dir, cfg.data_seed, cfg.val_fraction,
                       cfg.n_per_class, cfg.resize, cfg.train_on == "train+val")


def load_splits(name: str = "digits", data_dir: str | None = None, data_seed: int = 0,
                val_fraction: float = 0.2, n_per_class: int | None = None,
                resize: int | None = None, merge_val: bool = False) -> Splits:
    """Load a dataset by name into normalised tensor splits (cached per process).

    ``merge_val``: the validation split joins the training split and the returned validation
    split is empty (a final run on train + validation). The test split never moves.
    The returned tensors are shared between callers: treat them as read-only.
    """
    # One cache key whatever the call's form (positional, keywords, defaults left out): the
    # study's dataset check and its first trial's splits_for load the dataset once, not twice.
    return _cached_splits(name, data_dir, data_seed, val_fraction, n_per_class, resize,
                          merge_val)


@functools.lru_cache(maxsize=4)
def _cached_splits(name, data_dir, data_seed, val_fraction, n_per_class, resize,
                   merge_val) -> Splits:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    load = _load_digits if name == "digits" else _load_torchvision  # the others: torchvision's
    x, y, x_test, y_test, classes = load(name, data_dir)
    x, x_test = _resize(x, resize), _resize(x_test, resize)
    idx_train, idx_val = _stratified_split(y.numpy(), val_fraction, data_seed)
    if merge_val:  # the same split drawn, then joined: train+val is exactly train plus val
        idx_train, idx_val = np.concatenate([idx_train, idx_val]), idx_val[:0]
    idx_train = np.sort(idx_train)
    if n_per_class is not None:
        idx_train = idx_train[_balanced_subset(y.numpy()[idx_train], n_per_class, data_seed)]
    x_train = x[idx_train].float()
    dims = (0, 2, 3)
    mean = x_train.mean(dim=dims)
    std = x_train.std(dim=dims).clamp_min(1e-6)

    def norm(t):
        return ((t.float() - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)).contiguous()

    return Splits(
        name=name,
        x_train=norm(x_train), y_train=y[idx_train].contiguous(),
        x_val=norm(x[np.sort(idx_val)]), y_val=y[np.sort(idx_val)].contiguous(),
        x_test=norm(x_test), y_test=y_test.contiguous(),
        classes=classes, mean=mean, std=std,
    )


load_splits.cache_clear = _cached_splits.cache_clear  # for tests that change what is on disk
