"""Tests for frog.training.data: IDX and CIFAR-10 parsing, splits, normalization, errors, minibatches.

The MNIST-style and CIFAR-style files are tiny ones written here in the exact on-disk formats. Image
i of a training file carries its index in its first pixel and has label i % 10, so every loaded
sample can be traced back to the file.
"""

from __future__ import annotations

import gzip
import importlib.util
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from frog.training.data import DATASETS, DEFAULT_DIRS, Dataset, Split, batches, load_dataset, subset, validation_size

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530
CIFAR_MEAN = torch.tensor([125.3, 123.0, 113.9]) / 255
CIFAR_STD = torch.tensor([63.0, 62.1, 66.7]) / 255
IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
N_TRAIN, N_TEST, H, W = 60, 12, 4, 5  # 60 training images -> 10 validation, 50 train


# ---------------------------------------------------------------------------------------------
# writers for the on-disk formats


def idx_bytes(arr: np.ndarray, magic: int | None = None) -> bytes:
    """An IDX file of unsigned bytes: big-endian magic 0x0000080<ndim>, big-endian dims, data."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    magic = 0x00000800 | arr.ndim if magic is None else magic
    return struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write_file(path: Path, content: bytes, gz: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(content))
    else:
        path.write_bytes(content)
    return path


def traced_images(n: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """n random uint8 images whose first pixel is the image index."""
    imgs = np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)
    imgs.reshape(n, -1)[:, 0] = np.arange(n)
    return imgs


def write_mnist(folder: Path, gz: bool = False, n_train: int = N_TRAIN, n_test: int = N_TEST) -> dict[str, Path]:
    """The four IDX files of a tiny MNIST in folder; returns name -> path written."""
    train, test = traced_images(n_train, (H, W), 1), traced_images(n_test, (H, W), 2)
    contents = {
        IDX_NAMES[0]: idx_bytes(train),
        IDX_NAMES[1]: idx_bytes(np.arange(n_train) % 10),
        IDX_NAMES[2]: idx_bytes(test),
        IDX_NAMES[3]: idx_bytes(np.arange(n_test) % 10),
    }
    return {name: write_file(folder / name, c, gz) for name, c in contents.items()}


def py2_string(b: bytes) -> bytes:
    """A Python 2 str in a pickle (SHORT_BINSTRING / BINSTRING), as in the real CIFAR-10 files."""
    return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b


def py2_cifar_pickle(data: np.ndarray, labels: list[int]) -> bytes:
    """A CIFAR-10 batch pickled like the originals (Python 2 cPickle, protocol 2, numpy.core globals)."""
    arr = b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + py2_string(b"b") + b"\x87R"
    arr += b"(K\x01(" + b"".join(b"J" + struct.pack("<i", d) for d in data.shape) + b"t"
    arr += b"cnumpy\ndtype\n" + py2_string(b"u1") + b"\x89\x88\x87R(K\x03" + py2_string(b"|")
    arr += b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    arr += b"\x89" + py2_string(np.ascontiguousarray(data).tobytes()) + b"tb"
    labs = b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
    return b"\x80\x02}(" + py2_string(b"data") + arr + py2_string(b"labels") + labs + b"u."


CIFAR_PER_BATCH, CIFAR_TEST = 5, 7  # 25 training images -> 4 validation, 21 train


def write_cifar(folder: Path, py2_format: bool = False) -> None:
    """data_batch_1..5 and test_batch: dicts with b'data' uint8 (N, 3072) and b'labels'."""
    folder.mkdir(parents=True, exist_ok=True)
    train = traced_images(5 * CIFAR_PER_BATCH, (3072,), 3)
    test = traced_images(CIFAR_TEST, (3072,), 4)
    files = {f"data_batch_{i + 1}": np.arange(i * CIFAR_PER_BATCH, (i + 1) * CIFAR_PER_BATCH) for i in range(5)}
    for name, idx in files.items():
        data, labels = train[idx], [int(i) % 10 for i in idx]
        content = py2_cifar_pickle(data, labels) if py2_format else pickle.dumps(
            {b"batch_label": name.encode(), b"data": data, b"labels": labels}, protocol=2
        )
        (folder / name).write_bytes(content)
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": test, b"labels": [i % 10 for i in range(CIFAR_TEST)]}))


def pixels(x: torch.Tensor, mean, std) -> torch.Tensor:
    """Undo the normalization: the original uint8 values as int64."""
    m = torch.as_tensor(mean, dtype=torch.float64).reshape(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float64).reshape(1, -1, 1, 1)
    return ((x.double() * s + m) * 255).round().long()


def first_pixel_index(x: torch.Tensor, mean, std) -> torch.Tensor:
    return pixels(x, mean, std).reshape(len(x), -1)[:, 0]


# ---------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST (IDX)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_mnist_idx_shapes_labels_and_normalization(tmp_path: Path, gz: bool) -> None:
    write_mnist(tmp_path, gz=gz)
    ds = load_dataset("mnist", tmp_path)
    assert isinstance(ds, Dataset) and ds.name == "mnist"
    assert ds.num_classes == 10 and ds.input_shape == (1, H, W)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (50, 10, N_TEST)
    for split in (ds.train, ds.val, ds.test):
        assert split.x.dtype == torch.float32 and split.y.dtype == torch.int64
        assert split.x.shape == (len(split.y), 1, H, W) and split.x.is_contiguous()
    # every sample traces back to its file position: label and all pixels round trip
    train_imgs = torch.from_numpy(traced_images(N_TRAIN, (H, W), 1)).long()
    for split in (ds.train, ds.val):
        idx = first_pixel_index(split.x, MNIST_MEAN, MNIST_STD)
        assert torch.equal(split.y, idx % 10)
        assert torch.equal(pixels(split.x, MNIST_MEAN, MNIST_STD)[:, 0], train_imgs[idx])
        assert torch.equal(idx, idx.sort().values)  # file order kept inside a split
    test_imgs = torch.from_numpy(traced_images(N_TEST, (H, W), 2))
    assert torch.equal(ds.test.y, torch.arange(N_TEST) % 10)
    expected = (test_imgs.float() / 255 - MNIST_MEAN) / MNIST_STD
    torch.testing.assert_close(ds.test.x[:, 0], expected, rtol=0, atol=1e-6)


def test_train_and_val_partition_the_training_set(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    ds = load_dataset("mnist", tmp_path)
    tr = set(first_pixel_index(ds.train.x, MNIST_MEAN, MNIST_STD).tolist())
    va = set(first_pixel_index(ds.val.x, MNIST_MEAN, MNIST_STD).tolist())
    assert not tr & va and tr | va == set(range(N_TRAIN))


def test_split_is_deterministic_in_the_seed(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    a, b = load_dataset("mnist", tmp_path, split_seed=3), load_dataset("mnist", tmp_path, split_seed=3)
    c = load_dataset("mnist", tmp_path, split_seed=4)
    assert torch.equal(a.val.x, b.val.x) and torch.equal(a.train.y, b.train.y)
    assert not torch.equal(a.val.x, c.val.x)
    assert torch.equal(a.test.x, c.test.x)  # the test set never depends on the seed


@pytest.mark.parametrize(("name", "sub", "mean", "std"), [
    ("mnist", "MNIST", MNIST_MEAN, MNIST_STD),
    ("fashion-mnist", "FashionMNIST", FASHION_MEAN, FASHION_STD),
])
def test_torchvision_layout_and_per_dataset_statistics(tmp_path: Path, name, sub, mean, std) -> None:
    write_mnist(tmp_path / sub / "raw", gz=True)
    ds = load_dataset(name, tmp_path)
    test_imgs = torch.from_numpy(traced_images(N_TEST, (H, W), 2)).float()
    torch.testing.assert_close(ds.test.x[:, 0], (test_imgs / 255 - mean) / std, rtol=0, atol=1e-6)


def test_plain_and_gz_files_may_be_mixed(tmp_path: Path) -> None:
    paths = write_mnist(tmp_path, gz=True)
    plain = paths[IDX_NAMES[3]]
    write_file(tmp_path / IDX_NAMES[3], gzip.decompress(plain.read_bytes()), gz=False)
    plain.unlink()
    assert len(load_dataset("mnist", tmp_path).test) == N_TEST


def test_validation_size_rule() -> None:
    assert validation_size(60000) == 10000 and validation_size(50000) == 10000
    assert validation_size(20000) == 10000 and validation_size(19999) == 3333
    assert validation_size(60) == 10 and validation_size(6) == 1


# ---------------------------------------------------------------------------------------------
# errors: ValueError whose one-line message names the path


def test_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(ValueError, match="nowhere") as err:
        load_dataset("mnist", missing)
    msg = str(err.value)
    assert "\n" not in msg and str(missing) in msg and "train-images-idx3-ubyte" in msg and "--data-dir" in msg


@pytest.mark.parametrize("gone", IDX_NAMES)
def test_missing_file(tmp_path: Path, gone: str) -> None:
    write_mnist(tmp_path, gz=True)[gone].unlink()
    with pytest.raises(ValueError) as err:
        load_dataset("mnist", tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path) in msg and gone in msg.split("missing")[-1]


def test_mnist_needs_a_folder_and_unknown_names_list_the_datasets() -> None:
    assert "mnist" not in DEFAULT_DIRS
    with pytest.raises(ValueError, match="--data-dir"):
        load_dataset("mnist")
    with pytest.raises(ValueError) as err:
        load_dataset("imagenet")
    assert all(name in str(err.value) for name in DATASETS)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_bad_magic_number(tmp_path: Path, gz: bool) -> None:
    paths = write_mnist(tmp_path, gz=gz)
    labels = np.arange(N_TRAIN, dtype=np.uint8) % 10
    bad = write_file(tmp_path / IDX_NAMES[1], idx_bytes(labels, magic=0x00000803), gz=gz)
    assert bad == paths[IDX_NAMES[1]]
    with pytest.raises(ValueError, match="magic number") as err:
        load_dataset("mnist", tmp_path)
    assert str(bad) in str(err.value)


@pytest.mark.parametrize("keep", [2, 10, -7], ids=["in-magic", "in-header", "in-data"])
def test_truncated_file(tmp_path: Path, keep: int) -> None:
    target = write_mnist(tmp_path)[IDX_NAMES[0]]
    target.write_bytes(target.read_bytes()[:keep])
    with pytest.raises(ValueError, match="truncated") as err:
        load_dataset("mnist", tmp_path)
    assert str(target) in str(err.value)


def test_truncated_gzip_and_trailing_bytes(tmp_path: Path) -> None:
    paths = write_mnist(tmp_path, gz=True)
    target = paths[IDX_NAMES[2]]
    target.write_bytes(target.read_bytes()[:-30])
    with pytest.raises(ValueError) as err:
        load_dataset("mnist", tmp_path)
    assert str(target) in str(err.value)

    paths = write_mnist(tmp_path / "extra")
    target = paths[IDX_NAMES[2]]
    target.write_bytes(target.read_bytes() + b"\x00")
    with pytest.raises(ValueError, match="need") as err:
        load_dataset("mnist", tmp_path / "extra")
    assert str(target) in str(err.value)


def test_count_mismatch(tmp_path: Path) -> None:
    paths = write_mnist(tmp_path)
    write_file(tmp_path / IDX_NAMES[3], idx_bytes(np.arange(N_TEST - 1) % 10), gz=False)
    with pytest.raises(ValueError, match=f"{N_TEST} images but .* {N_TEST - 1} labels") as err:
        load_dataset("mnist", tmp_path)
    assert str(paths[IDX_NAMES[2]]) in str(err.value) and str(paths[IDX_NAMES[3]]) in str(err.value)


def test_label_out_of_range_and_image_size_mismatch(tmp_path: Path) -> None:
    paths = write_mnist(tmp_path)
    write_file(tmp_path / IDX_NAMES[1], idx_bytes(np.full(N_TRAIN, 10)), gz=False)
    with pytest.raises(ValueError, match="label 10") as err:
        load_dataset("mnist", tmp_path)
    assert str(paths[IDX_NAMES[1]]) in str(err.value)

    write_mnist(tmp_path / "sizes")
    write_file(tmp_path / "sizes" / IDX_NAMES[2], idx_bytes(np.zeros((N_TEST, H + 1, W))), gz=False)
    with pytest.raises(ValueError, match="t10k-images"):
        load_dataset("mnist", tmp_path / "sizes")


def test_too_few_training_images(tmp_path: Path) -> None:
    write_mnist(tmp_path, n_train=5)
    with pytest.raises(ValueError, match="only 5 images"):
        load_dataset("mnist", tmp_path)


def test_download_without_torchvision_is_a_clear_error(tmp_path: Path) -> None:
    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed; this test would download")
    with pytest.raises(ValueError, match="torchvision"):
        load_dataset("mnist", tmp_path, download=True)


def test_torchvision_is_not_imported() -> None:
    assert "torchvision" not in sys.modules


# ---------------------------------------------------------------------------------------------
# CIFAR-10


@pytest.mark.parametrize("py2_format", [False, True], ids=["py3-pickle", "py2-pickle"])
@pytest.mark.parametrize("sub", ["", "cifar-10-batches-py"])
def test_cifar10(tmp_path: Path, py2_format: bool, sub: str) -> None:
    write_cifar(tmp_path / sub if sub else tmp_path, py2_format)
    ds = load_dataset("cifar10", tmp_path)
    assert ds.input_shape == (3, 32, 32) and ds.num_classes == 10
    assert (len(ds.train), len(ds.val), len(ds.test)) == (21, 4, CIFAR_TEST)
    train_imgs = torch.from_numpy(traced_images(25, (3072,), 3)).long().reshape(-1, 3, 32, 32)
    seen = []
    for split in (ds.train, ds.val):
        assert split.x.dtype == torch.float32 and split.x.shape == (len(split), 3, 32, 32)
        idx = first_pixel_index(split.x, CIFAR_MEAN, CIFAR_STD)
        assert torch.equal(split.y, idx % 10)
        assert torch.equal(pixels(split.x, CIFAR_MEAN, CIFAR_STD), train_imgs[idx])  # channel layout R,G,B
        seen += idx.tolist()
    assert sorted(seen) == list(range(25))
    test_imgs = torch.from_numpy(traced_images(CIFAR_TEST, (3072,), 4)).float().reshape(-1, 3, 32, 32)
    expected = (test_imgs / 255 - CIFAR_MEAN.view(1, 3, 1, 1)) / CIFAR_STD.view(1, 3, 1, 1)
    torch.testing.assert_close(ds.test.x, expected, rtol=0, atol=1e-5)
    assert torch.equal(ds.test.y, torch.arange(CIFAR_TEST) % 10)


def test_cifar10_errors(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(ValueError, match="missing: data_batch_3") as err:
        load_dataset("cifar10", tmp_path)
    assert str(tmp_path) in str(err.value)

    bad = tmp_path / "data_batch_3"
    bad.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="not a CIFAR-10") as err:
        load_dataset("cifar10", tmp_path)
    assert str(bad) in str(err.value)

    bad.write_bytes(pickle.dumps({b"data": np.zeros((4, 3000), np.uint8), b"labels": [0] * 4}))
    with pytest.raises(ValueError, match=r"\(N, 3072\)") as err:
        load_dataset("cifar10", tmp_path)
    assert str(bad) in str(err.value)

    bad.write_bytes(pickle.dumps({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 3}))
    with pytest.raises(ValueError, match="4 images but 3 labels"):
        load_dataset("cifar10", tmp_path)


class _Evil:
    def __reduce__(self):
        return (print, ("a data file ran code",))


def test_cifar10_pickles_cannot_run_code(tmp_path: Path, capsys) -> None:
    write_cifar(tmp_path)
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": _Evil(), b"labels": []}))
    with pytest.raises(ValueError, match="builtins.print"):
        load_dataset("cifar10", tmp_path)
    assert "ran code" not in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# digits (scikit-learn, embedded) and the real Fashion-MNIST


def test_digits() -> None:
    ds = load_dataset("digits")
    assert (len(ds.train), len(ds.val), len(ds.test)) == (1077, 360, 360)
    assert ds.input_shape == (1, 8, 8) and ds.num_classes == 10
    assert ds.train.x.shape == (1077, 1, 8, 8) and ds.train.x.dtype == torch.float32
    assert ds.train.y.dtype == torch.int64
    assert abs(ds.train.x.mean().item()) < 1e-5 and abs(ds.train.x.std().item() - 1) < 1e-3
    for split in (ds.train, ds.val, ds.test):
        assert set(split.y.tolist()) == set(range(10))
    from sklearn.datasets import load_digits

    all_y = torch.cat([ds.train.y, ds.val.y, ds.test.y])
    assert torch.equal(all_y.bincount(), torch.as_tensor(load_digits().target).bincount())
    same, other = load_dataset("digits", split_seed=0), load_dataset("digits", split_seed=1)
    assert torch.equal(same.val.x, ds.val.x) and not torch.equal(other.val.y, ds.val.y)


def test_subset_keeps_the_first_images_of_each_split() -> None:
    ds = load_dataset("digits")
    small = subset(ds, 400)  # more than the 360 validation and test images: those stay whole
    assert (len(small.train), len(small.val), len(small.test)) == (400, 360, 360)
    assert torch.equal(small.train.x, ds.train.x[:400]) and torch.equal(small.train.y, ds.train.y[:400])
    assert torch.equal(small.test.y, ds.test.y)
    assert (small.input_shape, small.num_classes, small.name) == (ds.input_shape, ds.num_classes, ds.name)
    with pytest.raises(ValueError, match="images must be >= 1"):
        subset(ds, 0)


def test_fashion_mnist_installed() -> None:
    folder = Path(DEFAULT_DIRS["fashion-mnist"])
    if not folder.is_dir():
        pytest.skip(f"{folder} is missing (Debian package dataset-fashion-mnist)")
    ds = load_dataset("fashion-mnist")
    assert (len(ds.train), len(ds.val), len(ds.test)) == (50000, 10000, 10000)
    assert ds.input_shape == (1, 28, 28)
    assert ds.train.x.shape == (50000, 1, 28, 28) and ds.test.x.shape == (10000, 1, 28, 28)
    assert ds.train.x.dtype == torch.float32 and ds.train.y.dtype == torch.int64
    assert torch.equal(ds.test.y.bincount(), torch.full((10,), 1000))
    assert abs(ds.train.x.mean().item()) < 0.02 and abs(ds.train.x.std().item() - 1) < 0.02


# ---------------------------------------------------------------------------------------------
# minibatches


def toy_split(n: int = 10) -> Split:
    return Split(torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1), torch.arange(n))


def test_batches_in_order_with_partial_last_batch() -> None:
    out = list(batches(toy_split(), 3, shuffle=False))
    assert [len(y) for _, y in out] == [3, 3, 3, 1]
    assert torch.equal(torch.cat([y for _, y in out]), torch.arange(10))
    assert all(x.shape[1:] == (1, 1, 1) for x, _ in out)


def test_batches_shuffled_cover_every_sample_once_and_follow_the_seed() -> None:
    split = toy_split(50)

    def epoch(seed: int, device=None) -> torch.Tensor:
        out = list(batches(split, 8, shuffle=True, generator=torch.Generator().manual_seed(seed), device=device))
        for x, y in out:
            assert torch.equal(x.view(-1).long(), y)  # images and labels stay paired
        return torch.cat([y for _, y in out])

    order = epoch(0)
    assert torch.equal(order.sort().values, torch.arange(50)) and not torch.equal(order, torch.arange(50))
    assert torch.equal(epoch(0, device="cpu"), order)
    assert not torch.equal(epoch(1), order)
    gen = torch.Generator().manual_seed(0)
    first = torch.cat([y for _, y in batches(split, 8, shuffle=True, generator=gen)])
    second = torch.cat([y for _, y in batches(split, 8, shuffle=True, generator=gen)])
    assert torch.equal(first, order) and not torch.equal(second, first)  # the generator advances


def test_batches_rejects_bad_batch_size() -> None:
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="batch_size"):
            batches(toy_split(), bad, shuffle=False)
