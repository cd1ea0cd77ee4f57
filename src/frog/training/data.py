"""Datasets as normalized tensors: load, split into train/val/test, normalize (docs/cli.md, "Training networks").

Every loader returns a :class:`Dataset` of three :class:`Split` s, each holding images ``x`` of shape
(N, C, H, W), float32, already normalized, and labels ``y`` of shape (N,), int64.

- ``digits``: scikit-learn's embedded 8x8 digits (no files needed), split 60/20/20 by a permutation.
- ``mnist``, ``fashion-mnist``: the four IDX files (plain or ``.gz``), parsed here with numpy.
- ``cifar10``: the python-pickle batches ``data_batch_1`` .. ``data_batch_5`` and ``test_batch``.

For the file datasets the validation set is taken out of the training set by a fixed permutation
(seed ``split_seed``): 10000 images when the training set has at least 20000, else one sixth; the test
set is the dataset's own test set. Indices inside each split stay in file order. Nothing is cached on
disk. torchvision is never needed, and imported only for ``download=True``.
"""

from __future__ import annotations

import gzip
import io
import pickle
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from ..checks import check_int

DATASETS = ("digits", "fashion-mnist", "mnist", "cifar10")


class MissingData(ValueError):
    """The dataset's folder or files are not there (as opposed to files that are there but broken)."""

DEFAULT_DIRS: dict[str, str] = {"fashion-mnist": "/usr/share/datasets/fashion-mnist"}

# Normalization constants of the authors' code (per channel; mean and std of [0, 1]-scaled pixels).
_MNIST_STATS = ((0.1307,), (0.3081,))
_FASHION_STATS = ((0.2860,), (0.3530,))
_CIFAR_STATS = (
    (125.3 / 255, 123.0 / 255, 113.9 / 255),
    (63.0 / 255, 62.1 / 255, 66.7 / 255),
)
_NUM_CLASSES = 10
_VAL_SIZE = 10000  # validation images taken from a training set of at least _VAL_MIN_TRAIN
_VAL_MIN_TRAIN = 20000

_IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions (N, H, W)
_IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension (N,)
_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
# torchvision's layout: root/<folder>/raw/<idx files>
_TORCHVISION_FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
_LABELS = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST", "cifar10": "CIFAR-10"}

_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = "test_batch"
_CIFAR_SUBDIR = "cifar-10-batches-py"

_DIGITS_SIZES = (1077, 360, 360)  # train, val, test of the 1797 images


@dataclass(frozen=True)
class Split:
    """One part of a dataset, already normalized.

    x: (N, C, H, W) float32 images. y: (N,) int64 class labels in [0, num_classes).
    """

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass(frozen=True)
class Dataset:
    """A dataset split into train, validation and test parts.

    input_shape is (C, H, W) of one image; every split's x has shape (N, *input_shape).
    """

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    input_shape: tuple[int, int, int]


def subset(data: Dataset, images: int) -> Dataset:
    """``data`` cut to the first ``images`` images of each split (all of a smaller split)."""
    if images < 1:
        raise ValueError(f"images must be >= 1, got {images}")

    def cut(split: Split) -> Split:
        return Split(split.x[:images], split.y[:images])

    return replace(data, train=cut(data.train), val=cut(data.val), test=cut(data.test))


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    *,
    split_seed: int = 0,
    download: bool = False,
) -> Dataset:
    """Load dataset ``name`` (one of :data:`DATASETS`) split into train/val/test and normalized.

    data_dir: the folder with the files (ignored for ``digits``); ``None`` uses
    :data:`DEFAULT_DIRS` where the dataset has one. split_seed: seed of the permutation that picks
    the validation images (and, for ``digits``, all three splits). download: fetch the files into
    data_dir with torchvision first (needs torchvision; ``digits`` needs no files).

    Raises ValueError for an unknown name, a missing folder or file, or a malformed file; the
    message names the path and what was expected.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if name == "digits":
        return _load_digits(split_seed)
    folder = _data_folder(name, data_dir)
    if download:
        _download(name, folder)
    if name == "cifar10":
        return _load_cifar10(folder, split_seed)
    return _load_idx_dataset(name, folder, split_seed)


def batches(
    split: Split,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Minibatches (x, y) of ``split``: x (B, C, H, W), y (B,), B = batch_size except the last.

    Every sample appears exactly once per pass; the last partial batch is included. shuffle=True
    draws the order with ``torch.randperm(N, generator=generator)`` (same generator state, same
    order); shuffle=False keeps the split's order. Batches are moved to ``device`` when given.
    """
    check_int("batch_size", batch_size, 1)
    n = len(split.y)
    if split.x.shape[0] != n:
        raise ValueError(f"split has {split.x.shape[0]} images but {n} labels")
    order: torch.Tensor | None = None
    if shuffle:
        gen_device = generator.device if generator is not None else torch.device("cpu")
        order = torch.randperm(n, generator=generator, device=gen_device).to(split.x.device)
    return _iter_batches(split, batch_size, order, device)


def _iter_batches(
    split: Split, batch_size: int, order: torch.Tensor | None, device: torch.device | str | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    n = len(split.y)
    for start in range(0, n, batch_size):
        if order is None:
            x, y = split.x[start : start + batch_size], split.y[start : start + batch_size]
        else:
            idx = order[start : start + batch_size]
            x, y = split.x[idx], split.y[idx]
        if device is not None:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        yield x, y


# ----------------------------------------------------------------------------------------------
# splitting and normalization


def _permutation(n: int, seed: int) -> torch.Tensor:
    """A fixed permutation of range(n) from ``seed`` (CPU generator, reproducible)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))


def validation_size(n_train: int) -> int:
    """Validation images taken from a training set of n_train: 10000 from >= 20000, else n_train // 6."""
    return _VAL_SIZE if n_train >= _VAL_MIN_TRAIN else n_train // 6


def _train_val_indices(n: int, seed: int, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted train and validation indices: validation is the last validation_size(n) of a permutation."""
    n_val = validation_size(n)
    if n_val < 1:
        raise ValueError(f"the training set in {where} has only {n} images; at least 6 are needed")
    perm = _permutation(n, seed)
    return perm[: n - n_val].sort().values, perm[n - n_val :].sort().values


def _normalize_uint8(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 (N, C, H, W) holding (p / 255 - mean[c]) / std[c]."""
    x = torch.from_numpy(np.asarray(images, dtype=np.float32))  # a fresh, writable copy
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return x.div_(255.0).sub_(m).div_(s)


def _make_dataset(
    name: str,
    train: tuple[np.ndarray, torch.Tensor],
    test: tuple[np.ndarray, torch.Tensor],
    stats: tuple[Sequence[float], Sequence[float]],
    split_seed: int,
    where: str,
) -> Dataset:
    """Split uint8 training images (N, C, H, W) and labels (N,) into train/val, then normalize all parts.

    Indexing the uint8 images before converting them to float keeps loading fast (4x less memory traffic).
    """
    (x_train, y_train), (x_test, y_test) = train, test
    tr, va = _train_val_indices(len(y_train), split_seed, where)
    tr_np, va_np = tr.numpy(), va.numpy()
    return Dataset(
        name=name,
        train=Split(_normalize_uint8(x_train[tr_np], *stats), y_train[tr]),
        val=Split(_normalize_uint8(x_train[va_np], *stats), y_train[va]),
        test=Split(_normalize_uint8(x_test, *stats), y_test),
        num_classes=_NUM_CLASSES,
        input_shape=(int(x_train.shape[1]), int(x_train.shape[2]), int(x_train.shape[3])),
    )


# ----------------------------------------------------------------------------------------------
# digits


def _load_digits(split_seed: int) -> Dataset:
    """scikit-learn's 1797 8x8 digits, values 0..16 scaled to [0, 1], split 1077/360/360 by permutation,
    normalized with the scalar mean and (population) std of the train split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.as_tensor(np.asarray(bunch.images), dtype=torch.float32).div_(16.0).unsqueeze(1)
    labels = torch.as_tensor(np.asarray(bunch.target), dtype=torch.int64)
    n_train, n_val, n_test = _DIGITS_SIZES
    if len(labels) != n_train + n_val + n_test:
        raise ValueError(f"scikit-learn's digits have {len(labels)} images, expected {sum(_DIGITS_SIZES)}")
    perm = _permutation(len(labels), split_seed)
    parts = (perm[:n_train], perm[n_train : n_train + n_val], perm[n_train + n_val :])
    idx_tr, idx_va, idx_te = (p.sort().values for p in parts)
    x_tr = images[idx_tr]
    mean, std = x_tr.mean(), x_tr.std(correction=0)

    def split(idx: torch.Tensor) -> Split:
        return Split((images[idx] - mean) / std, labels[idx])

    return Dataset(
        name="digits",
        train=split(idx_tr),
        val=split(idx_va),
        test=split(idx_te),
        num_classes=_NUM_CLASSES,
        input_shape=(1, 8, 8),
    )


# ----------------------------------------------------------------------------------------------
# folders and files


def _data_folder(name: str, data_dir: str | Path | None) -> Path:
    if data_dir is None:
        default = DEFAULT_DIRS.get(name)
        if default is None:
            raise MissingData(
                f"{_LABELS[name]} has no default data folder; pass --data-dir (data_dir=) pointing at "
                f"the folder with {_expected_text(name)}"
            )
        data_dir = default
    return Path(data_dir).expanduser()


def _expected_text(name: str) -> str:
    if name == "cifar10":
        return ", ".join((*_CIFAR_TRAIN, _CIFAR_TEST)) + f" (or a {_CIFAR_SUBDIR}/ folder with them)"
    files = ", ".join(f"{f}[.gz]" for f in _IDX_FILES)
    return f"{files} (or a {_TORCHVISION_FOLDERS[name]}/raw/ folder with them)"


def _candidates(name: str, folder: Path) -> list[Path]:
    if name == "cifar10":
        return [folder, folder / _CIFAR_SUBDIR]
    return [folder, folder / _TORCHVISION_FOLDERS[name] / "raw"]


def _find_file(folder: Path, stem: str, allow_gz: bool) -> Path | None:
    """folder/stem, else folder/stem.gz where allowed (a plain file wins: it loads faster)."""
    for candidate in (folder / stem, folder / f"{stem}.gz") if allow_gz else (folder / stem,):
        if candidate.is_file():
            return candidate
    return None


def _locate(name: str, folder: Path) -> list[Path]:
    """The data files of ``name`` in ``folder`` or one of its known subfolders, in _IDX_FILES or
    CIFAR (train..., test) order; ValueError naming the folder and the expected files otherwise."""
    label, expected = _LABELS[name], _expected_text(name)
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise MissingData(f"no {label} data: {folder} {what}; expected {expected} there; pass --data-dir")
    stems = (*_CIFAR_TRAIN, _CIFAR_TEST) if name == "cifar10" else _IDX_FILES
    searched: list[Path] = []
    best: tuple[Path, list[str]] | None = None
    for cand in _candidates(name, folder):
        if not cand.is_dir():
            continue
        searched.append(cand)
        found = [_find_file(cand, s, allow_gz=name != "cifar10") for s in stems]
        if all(f is not None for f in found):
            return found  # type: ignore[return-value]
        missing = [s for s, f in zip(stems, found, strict=False) if f is None]
        if best is None or len(missing) < len(best[1]):
            best = (cand, missing)
    assert best is not None  # folder itself is a directory
    cand, missing = best
    where = " or ".join(str(c) for c in searched)
    missing_in = "" if cand == folder else f" in {cand}"
    raise MissingData(
        f"no {label} data in {where}: expected {expected}; missing{missing_in}: {', '.join(missing)}; "
        "pass --data-dir"
    )


def _read_bytes(path: Path) -> bytes:
    """The (decompressed, for .gz) contents of path; ValueError naming it when unreadable."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"cannot read {path}: {e}") from e


# ----------------------------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST)


def read_idx(path: str | Path, magic: int) -> np.ndarray:
    """Parse an IDX file of unsigned bytes (plain or .gz) into a uint8 array of its dimensions.

    magic: the expected magic number, 0x00000803 for images (N, H, W) or 0x00000801 for labels (N,).
    ValueError naming the file on a wrong magic number, a truncated header or data, or extra bytes.
    """
    path = Path(path)
    raw = _read_bytes(path)
    ndim = magic & 0xFF
    kind = {_IDX_IMAGES_MAGIC: "image", _IDX_LABELS_MAGIC: "label"}.get(magic, "IDX")
    if len(raw) < 4:
        raise ValueError(f"{path} is truncated: {len(raw)} bytes, too short for the IDX magic number")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise ValueError(
            f"{path} is not an IDX {kind} file: magic number 0x{found:08x}, expected 0x{magic:08x}"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path} is truncated: {len(raw)} bytes, the header alone needs {header}")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    size = int(np.prod(dims, dtype=np.int64))
    body = len(raw) - header
    if body < size:
        raise ValueError(
            f"{path} is truncated: dimensions {dims} need {size} data bytes, found {body}"
        )
    if body > size:
        raise ValueError(f"{path} is malformed: dimensions {dims} need {size} data bytes, found {body}")
    return np.frombuffer(raw, dtype=np.uint8, count=size, offset=header).reshape(dims)


def _read_idx_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, torch.Tensor]:
    images = read_idx(images_path, _IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, _IDX_LABELS_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds {labels.shape[0]} labels"
        )
    if labels.size and int(labels.max()) >= _NUM_CLASSES:
        raise ValueError(f"{labels_path} has label {int(labels.max())}, expected labels 0..{_NUM_CLASSES - 1}")
    return images, torch.from_numpy(labels.astype(np.int64))


def _load_idx_dataset(name: str, folder: Path, split_seed: int) -> Dataset:
    tr_img, tr_lab, te_img, te_lab = _locate(name, folder)
    x_train, y_train = _read_idx_pair(tr_img, tr_lab)
    x_test, y_test = _read_idx_pair(te_img, te_lab)
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(
            f"{tr_img} holds {x_train.shape[1]}x{x_train.shape[2]} images but {te_img} holds "
            f"{x_test.shape[1]}x{x_test.shape[2]}"
        )
    stats = _MNIST_STATS if name == "mnist" else _FASHION_STATS
    return _make_dataset(
        name, (x_train[:, None], y_train), (x_test[:, None], y_test), stats, split_seed, str(tr_img.parent)
    )


# ----------------------------------------------------------------------------------------------
# CIFAR-10


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only plain containers and numpy arrays: a data file cannot run code."""

    _ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset({
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
    })

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, torch.Tensor]:
    """One CIFAR-10 batch file -> uint8 (N, 3, 32, 32) images and int64 (N,) labels."""
    raw = _read_bytes(path)
    try:
        batch = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:
        raise ValueError(f"{path} is not a CIFAR-10 python batch (pickle): {type(e).__name__}: {e}") from e
    if not isinstance(batch, dict):
        raise ValueError(f"{path} is not a CIFAR-10 python batch: holds a {type(batch).__name__}, not a dict")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise ValueError(f"{path} is not a CIFAR-10 python batch: missing the b'data' or b'labels' entry")
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: b'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: b'labels' is not a list of integers ({e})") from e
    if labels.shape != (data.shape[0],):
        raise ValueError(f"{path} holds {data.shape[0]} images but {labels.size} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= _NUM_CLASSES):
        raise ValueError(f"{path} has labels outside 0..{_NUM_CLASSES - 1}")
    return data.reshape(-1, 3, 32, 32), torch.from_numpy(labels)


def _load_cifar10(folder: Path, split_seed: int) -> Dataset:
    paths = _locate("cifar10", folder)
    parts = [_read_cifar_batch(p) for p in paths]
    x_train = np.concatenate([p[0] for p in parts[:-1]])
    y_train = torch.cat([p[1] for p in parts[:-1]])
    return _make_dataset("cifar10", (x_train, y_train), parts[-1], _CIFAR_STATS, split_seed, str(paths[0].parent))


# ----------------------------------------------------------------------------------------------
# optional download


def _download(name: str, folder: Path) -> None:
    """Fetch ``name`` into ``folder`` with torchvision (its layout, which the loaders accept)."""
    try:
        import torchvision.datasets as tvd
    except Exception as e:
        raise ValueError(
            f"download=True needs a working torchvision ({type(e).__name__}: {e}); "
            f"or place {_expected_text(name)} in {folder} yourself"
        ) from e
    cls = {"mnist": tvd.MNIST, "fashion-mnist": tvd.FashionMNIST, "cifar10": tvd.CIFAR10}[name]
    folder.mkdir(parents=True, exist_ok=True)
    for train in (True, False):
        try:
            cls(root=str(folder), train=train, download=True)
        except Exception as e:
            raise ValueError(f"downloading {_LABELS[name]} into {folder} failed: {e}") from e
