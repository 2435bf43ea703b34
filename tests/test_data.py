"""Datasets -> normalised tensor splits.

digits is scikit-learn's real data. MNIST, Fashion-MNIST and CIFAR-10 cannot be downloaded here, so
small files are written in their real on-disk formats (IDX, CIFAR pickles) and loaded through
torchvision, the same code path the real files take.
"""

from __future__ import annotations

import gzip
import hashlib
import pickle
import struct

import numpy as np
import pytest
import torch
import torchvision.datasets as tvd
from sklearn.datasets import load_digits

import pipeline.training.data
from pipeline.training.data import DatasetNotFound

pytestmark = pytest.mark.usefixtures("fresh_splits_cache")

N_TRAIN, N_TEST = 60, 20  # 6 / 2 examples per class: enough for a stratified split


# -- writers for the real on-disk formats ------------------------------------------------------


def idx_images(images: np.ndarray) -> bytes:
    """IDX3: magic 2051 (unsigned byte, 3 dims), big-endian sizes, then the pixels."""
    n, rows, cols = images.shape
    return struct.pack(">IIII", 2051, n, rows, cols) + images.astype(np.uint8).tobytes()


def idx_labels(labels: np.ndarray) -> bytes:
    """IDX1: magic 2049 (unsigned byte, 1 dim), the count, then the labels."""
    return struct.pack(">II", 2049, len(labels)) + labels.astype(np.uint8).tobytes()


def fake_mnist_arrays(seed: int):
    rng = np.random.default_rng(seed)
    x_tr = rng.integers(0, 256, size=(N_TRAIN, 28, 28), dtype=np.uint8)
    x_te = rng.integers(0, 256, size=(N_TEST, 28, 28), dtype=np.uint8)
    y_tr = np.arange(N_TRAIN) % 10
    y_te = rng.permutation(np.arange(N_TEST) % 10)
    return x_tr, y_tr, x_te, y_te


def idx_files(arrays) -> dict[str, bytes]:
    x_tr, y_tr, x_te, y_te = arrays
    return {"train-images-idx3-ubyte": idx_images(x_tr),
            "train-labels-idx1-ubyte": idx_labels(y_tr),
            "t10k-images-idx3-ubyte": idx_images(x_te),
            "t10k-labels-idx1-ubyte": idx_labels(y_te)}


def test_idx_file_names_match_torchvision_resources():
    """Guards the fixtures: torchvision looks for the resource names without .gz."""
    for cls in (tvd.MNIST, tvd.FashionMNIST):
        expected = {url.removesuffix(".gz") for url, _ in cls.resources}
        assert expected == set(idx_files(fake_mnist_arrays(0)))


def unnormalise(x: torch.Tensor, splits) -> np.ndarray:
    raw = x * splits.std.view(1, -1, 1, 1) + splits.mean.view(1, -1, 1, 1)
    return raw.numpy()


def assert_pixels_round_trip(splits, x_tr, y_tr, x_te, y_te):
    """Test split: same images in the same order. Train + val: exactly the training images,
    each once, each with its own label."""
    x_tr, x_te = x_tr[:, None], x_te[:, None]  # (N, 1, H, W), as the splits hold them
    assert np.abs(unnormalise(splits.x_test, splits) - x_te).max() < 1e-3
    np.testing.assert_array_equal(splits.y_test.numpy(), y_te)
    by_pixels = {img.tobytes(): label for img, label in zip(x_tr, y_tr)}
    seen = []
    for x, y in ((splits.x_train, splits.y_train), (splits.x_val, splits.y_val)):
        raw = unnormalise(x, splits)
        restored = np.rint(raw).astype(np.uint8)
        assert np.abs(raw - restored).max() < 1e-3
        for img, label in zip(restored, y.numpy()):
            key = img.tobytes()
            assert by_pixels[key] == label
            seen.append(key)
    assert sorted(seen) == sorted(by_pixels)


def check_tensor_splits(splits, shape, n_total_train, n_test):
    assert splits.input_shape == shape
    assert len(splits.x_train) + len(splits.x_val) == n_total_train
    assert len(splits.x_test) == n_test
    for x in (splits.x_train, splits.x_val, splits.x_test):
        assert x.dtype == torch.float32 and x.is_contiguous()
    for y in (splits.y_train, splits.y_val, splits.y_test):
        assert y.dtype == torch.int64 and y.is_contiguous()


# -- digits --------------------------------------------------------------------------------------


def test_digits_split_sizes_add_up(fresh_splits_cache):
    s = fresh_splits_cache("digits")
    assert len(s.x_train) + len(s.x_val) + len(s.x_test) == 1797
    assert s.input_shape == (1, 8, 8)
    assert s.classes == tuple(str(i) for i in range(10))
    assert len(s.x_val) == pytest.approx(0.2 * (len(s.x_train) + len(s.x_val)), abs=1)
    check_tensor_splits(s, (1, 8, 8), len(s.x_train) + len(s.x_val), len(s.x_test))


def test_digits_validation_is_stratified(fresh_splits_cache):
    s = fresh_splits_cache("digits", val_fraction=0.25)
    trainval = torch.cat([s.y_train, s.y_val]).bincount(minlength=10).numpy()
    in_val = s.y_val.bincount(minlength=10).numpy()
    expected = trainval * len(s.y_val) / trainval.sum()
    assert np.all(np.abs(in_val - expected) <= 1), (in_val, expected)


def test_digits_splits_are_deterministic_per_data_seed(fresh_splits_cache):
    a = fresh_splits_cache("digits", data_seed=3)
    fresh_splits_cache.cache_clear()
    b = fresh_splits_cache("digits", data_seed=3)
    assert a is not b
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_val, b.y_val)
    c = fresh_splits_cache("digits", data_seed=4)
    assert not torch.equal(a.y_val, c.y_val)


def test_digits_test_split_is_the_same_for_every_data_seed(fresh_splits_cache):
    a = fresh_splits_cache("digits", data_seed=0)
    b = fresh_splits_cache("digits", data_seed=1)
    assert not torch.equal(a.mean, b.mean)  # different training subsets, different statistics
    assert torch.equal(a.y_test, b.y_test)
    np.testing.assert_allclose(unnormalise(a.x_test, a), unnormalise(b.x_test, b), atol=1e-4)


def test_digits_normalisation_uses_training_statistics_only(fresh_splits_cache):
    s = fresh_splits_cache("digits")
    # Normalised train data has mean 0 / std 1 per channel only if the statistics are its own.
    assert s.x_train.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert s.x_train.std().item() == pytest.approx(1.0, abs=1e-5)
    # The restored training images are real digits images (0..16 integers), ...
    raw_train = unnormalise(s.x_train, s)
    restored = np.rint(raw_train)
    assert np.abs(raw_train - restored).max() < 1e-3
    real = {img.astype(np.float32).tobytes() for img in load_digits().images}
    assert all(img[0].astype(np.float32).tobytes() in real for img in restored)
    # ... and the stored statistics are theirs, not those of all the data.
    assert s.mean.item() == pytest.approx(restored.mean(), abs=1e-4)
    assert s.std.item() == pytest.approx(restored.std(ddof=1), abs=1e-4)
    everything = load_digits().images
    assert abs(everything.mean() - restored.mean()) > 1e-3  # the check above can tell them apart
    assert s.mean.item() != pytest.approx(everything.mean(), abs=1e-4)


def test_n_per_class_gives_exactly_n_of_each_class(fresh_splits_cache):
    s = fresh_splits_cache("digits", n_per_class=7)
    assert s.y_train.bincount(minlength=10).tolist() == [7] * 10
    full = fresh_splits_cache("digits")
    assert torch.equal(s.y_val, full.y_val)  # subsetting the training split leaves val alone
    assert s.x_train.mean().item() == pytest.approx(0.0, abs=1e-5)  # stats of the subset


def test_n_per_class_larger_than_a_class_is_an_error(fresh_splits_cache):
    with pytest.raises(ValueError, match="n_per_class=500"):
        fresh_splits_cache("digits", n_per_class=500)


def test_unknown_dataset_name(fresh_splits_cache):
    with pytest.raises(ValueError, match="unknown dataset"):
        fresh_splits_cache("imagenet")


# -- MNIST and Fashion-MNIST through torchvision ---------------------------------------------------


@pytest.mark.parametrize("name, folder, tv_class", [("mnist", "MNIST", tvd.MNIST),
                                                    ("fashion-mnist", "FashionMNIST",
                                                     tvd.FashionMNIST)])
def test_idx_datasets_load_from_data_dir(tmp_path, fresh_splits_cache, name, folder, tv_class):
    arrays = fake_mnist_arrays(seed=len(name))
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    for fname, content in idx_files(arrays).items():
        (raw / fname).write_bytes(content)

    s = fresh_splits_cache(name, data_dir=str(tmp_path))

    check_tensor_splits(s, (1, 28, 28), N_TRAIN, N_TEST)
    assert s.classes == tuple(tv_class.classes)
    assert s.x_train.shape[1:] == (1, 28, 28)
    assert_pixels_round_trip(s, *arrays)


def test_fashion_mnist_falls_back_to_the_debian_package(tmp_path, monkeypatch, fresh_splits_cache):
    arrays = fake_mnist_arrays(seed=11)
    debian = tmp_path / "usr-share-datasets" / "fashion-mnist"
    debian.mkdir(parents=True)
    for fname, content in idx_files(arrays).items():
        (debian / f"{fname}.gz").write_bytes(gzip.compress(content))
    cache = tmp_path / "cache"
    monkeypatch.setattr(pipeline.training.data, "DEBIAN_FASHION_MNIST", debian)
    monkeypatch.setenv("PIPELINE_DATA_CACHE", str(cache))

    s = fresh_splits_cache("fashion-mnist")

    assert_pixels_round_trip(s, *arrays)
    extracted = sorted(p.name for p in (cache / "FashionMNIST" / "raw").iterdir())
    assert extracted == sorted(idx_files(arrays))  # no .part left over


# -- CIFAR-10 in its real pickle format ------------------------------------------------------------

CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
               "truck"]


def write_cifar(root, monkeypatch, per_batch=10):
    """Five training batches and a test batch as CIFAR's pickled dicts, and torchvision's md5
    list pointed at these files (its integrity check then runs for real)."""
    folder = root / tvd.CIFAR10.base_folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(5)
    md5 = {}

    def dump(fname, obj):
        (folder / fname).write_bytes(pickle.dumps(obj, protocol=2))
        md5[fname] = hashlib.md5((folder / fname).read_bytes()).hexdigest()

    batches = {}
    for fname in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = rng.permutation(np.arange(per_batch) % 10).tolist()
        batches[fname] = (data, labels)
        dump(fname, {"batch_label": fname, "labels": labels, "data": data,
                     "filenames": [f"{fname}_{i}.png" for i in range(per_batch)]})
    dump("batches.meta", {"label_names": CIFAR_NAMES, "num_cases_per_batch": per_batch,
                          "num_vis": 3072})
    monkeypatch.setattr(tvd.CIFAR10, "train_list",
                        [[f"data_batch_{i}", md5[f"data_batch_{i}"]] for i in range(1, 6)])
    monkeypatch.setattr(tvd.CIFAR10, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(tvd.CIFAR10, "meta", {"filename": "batches.meta", "key": "label_names",
                                              "md5": md5["batches.meta"]})
    return batches


def test_cifar10_loads_channels_first_from_the_real_pickles(tmp_path, monkeypatch,
                                                            fresh_splits_cache):
    batches = write_cifar(tmp_path, monkeypatch)
    train = [batches[f"data_batch_{i}"] for i in range(1, 6)]
    # The pickles store each image as 1024 red, 1024 green, then 1024 blue values.
    x_tr = np.concatenate([d for d, _ in train]).reshape(-1, 3, 32, 32)
    y_tr = np.concatenate([lbl for _, lbl in train])
    x_te = batches["test_batch"][0].reshape(-1, 3, 32, 32)
    y_te = np.array(batches["test_batch"][1])

    s = fresh_splits_cache("cifar10", data_dir=str(tmp_path))

    check_tensor_splits(s, (3, 32, 32), 50, 10)
    assert s.classes == tuple(CIFAR_NAMES)
    assert s.mean.shape == (3,) and s.std.shape == (3,)
    per_channel_mean = s.x_train.mean(dim=(0, 2, 3))
    assert torch.allclose(per_channel_mean, torch.zeros(3), atol=1e-5)
    assert np.abs(unnormalise(s.x_test, s) - x_te).max() < 1e-3
    np.testing.assert_array_equal(s.y_test.numpy(), y_te)
    by_pixels = {img.tobytes(): label for img, label in zip(x_tr, y_tr)}
    restored = np.rint(unnormalise(torch.cat([s.x_train, s.x_val]), s)).astype(np.uint8)
    labels = torch.cat([s.y_train, s.y_val]).numpy()
    assert sorted(img.tobytes() for img in restored) == sorted(by_pixels)
    assert all(by_pixels[img.tobytes()] == label for img, label in zip(restored, labels))


def test_cifar10_with_a_wrong_checksum_is_not_loaded(tmp_path, monkeypatch, fresh_splits_cache):
    write_cifar(tmp_path, monkeypatch)
    with open(tmp_path / tvd.CIFAR10.base_folder / "data_batch_3", "ab") as f:
        f.write(b"corrupt")
    with pytest.raises(DatasetNotFound):
        fresh_splits_cache("cifar10", data_dir=str(tmp_path))


# -- a dataset that is not there -------------------------------------------------------------------


@pytest.mark.parametrize("name, how", [("mnist", "MNIST/raw"),
                                       ("fashion-mnist", "dataset-fashion-mnist"),
                                       ("cifar10", "cifar-10-batches-py")])
def test_missing_dataset_says_where_it_looked_and_how_to_get_it(tmp_path, fresh_splits_cache,
                                                                name, how):
    data_dir = tmp_path / "datasets"
    data_dir.mkdir()
    with pytest.raises(DatasetNotFound) as info:
        fresh_splits_cache(name, data_dir=str(data_dir))
    message = str(info.value)
    assert str(data_dir) in message
    assert "To get it" in message and how in message
    assert list(data_dir.iterdir()) == []  # nothing created where we only looked


def test_missing_dataset_does_not_create_a_missing_data_dir(tmp_path, fresh_splits_cache):
    data_dir = tmp_path / "not-there"
    with pytest.raises(DatasetNotFound, match="not-there"):
        fresh_splits_cache("mnist", data_dir=str(data_dir))
    assert not data_dir.exists()


def test_one_cached_load_whatever_the_form_of_the_call(fresh_splits_cache):
    """The study's dataset check (positional, defaults partly left out) and its trials
    (splits_for, every argument) share one load."""
    from pipeline.config import TrainConfig
    from pipeline.training.data import splits_for

    first = fresh_splits_cache("digits", None, 0, 0.2, None)
    assert splits_for(TrainConfig(dataset="digits")) is first
    assert fresh_splits_cache("digits") is first
    assert fresh_splits_cache(name="digits", merge_val=False, resize=None) is first


# -- the data cache: scikit-learn's digits and stratified splits, kept on disk -------------------

SPLITS_IN_A_PROCESS = """
import hashlib, sys
from pipeline.training.data import load_splits
s = load_splits("digits", data_seed=2, n_per_class=30)
digest = hashlib.sha256(b"".join(t.numpy().tobytes() for t in (
    s.x_train, s.y_train, s.x_val, s.y_val, s.x_test, s.y_test))).hexdigest()
print(digest, "sklearn" in sys.modules, "scipy.stats" in sys.modules)
"""


def splits_in_a_process(cache) -> tuple[str, bool, bool]:
    import os
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", SPLITS_IN_A_PROCESS], check=True, text=True,
                         capture_output=True, env={**os.environ, "PIPELINE_DATA_CACHE": str(cache)})
    digest, sklearn, scipy_stats = out.stdout.split()
    return digest, sklearn == "True", scipy_stats == "True"


def test_a_process_that_finds_the_cache_never_imports_scikit_learn_and_splits_alike(tmp_path):
    """The first process imports scikit-learn to load digits and split it, and keeps both; the
    next one reads them and gets the same tensors without importing it (1.6 s of start-up)."""
    cold = splits_in_a_process(tmp_path / "cache")
    warm = splits_in_a_process(tmp_path / "cache")
    assert cold[1:] == (True, True)
    assert warm == (cold[0], False, False)


def test_the_cached_split_is_scikit_learns_and_a_torn_file_is_made_again(tmp_path, monkeypatch):
    from sklearn.model_selection import train_test_split

    from pipeline.training.data import _stratified_split

    monkeypatch.setenv("PIPELINE_DATA_CACHE", str(tmp_path))
    y = np.repeat(np.arange(5), [7, 11, 13, 17, 19])
    expected = train_test_split(np.arange(len(y)), test_size=0.3, stratify=y, random_state=4)
    for attempt in ("made", "read", "torn, made again"):
        if attempt.startswith("torn"):
            (kept,) = (tmp_path / "splits").iterdir()
            kept.write_bytes(kept.read_bytes()[:40])  # a crash mid-write, without the rename
        keep, held = _stratified_split(y, 0.3, 4)
        assert np.array_equal(keep, expected[0]) and np.array_equal(held, expected[1]), attempt
    assert [p.suffix for p in (tmp_path / "splits").iterdir()] == [".npz"]  # no .part left
    other = _stratified_split(y, 0.3, 5)  # another seed: another split, another file
    assert not np.array_equal(other[1], expected[1])
    assert len(list((tmp_path / "splits").iterdir())) == 2


def test_a_cache_that_cannot_be_written_costs_time_only_and_leaves_no_part_file(tmp_path,
                                                                                 monkeypatch):
    from pipeline.training import data

    def disk_full(file, **arrays):
        file.write(b"PK partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setenv("PIPELINE_DATA_CACHE", str(tmp_path))
    monkeypatch.setattr(data.np, "savez", disk_full)
    y = np.repeat(np.arange(3), 10)
    keep, held = data._stratified_split(y, 0.2, 0)  # still split, only not kept
    assert len(keep) + len(held) == len(y) and sorted(np.bincount(y[held])) == [2, 2, 2]
    assert list(tmp_path.rglob("*.*")) == []
