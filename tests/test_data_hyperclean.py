"""Hyper-cleaning data: splits, determinism, label corruption, cleaner metrics."""

import dataclasses

import numpy as np
import pytest
import torch

from bilevel.data import (
    DatasetError,
    HypercleanData,
    accuracy,
    cleaner_metrics,
    corrupt_labels,
    default_split,
    hyperclean_from_arrays,
    make_hyperclean_data,
    write_idx,
)


def identified_arrays(n, num_classes=10):
    """Images whose two pixels are the example's index; label = index % num_classes."""
    index = np.arange(n, dtype=np.float64)
    return np.stack([index, index], axis=1), (np.arange(n) % num_classes).astype(np.uint8)


def build(n=100, seed=0, noise_rate=0.5, n_train=40, n_val=30, n_test=20, dtype=torch.float32):
    images, labels = identified_arrays(n)
    return hyperclean_from_arrays(
        images,
        labels,
        num_classes=10,
        max_pixel=1.0,
        name="synthetic",
        noise_rate=noise_rate,
        seed=seed,
        n_train=n_train,
        n_val=n_val,
        n_test=n_test,
        dtype=dtype,
    )


def ids(features):
    return features[:, 0].round().long().tolist()


def test_split_sizes_disjointness_and_true_labels():
    data = build()
    assert data.x_train.shape == (40, 2) and data.x_val.shape == (30, 2) and data.x_test.shape == (20, 2)
    train, val, test = ids(data.x_train), ids(data.x_val), ids(data.x_test)
    assert len(set(train) | set(val) | set(test)) == 90
    assert data.y_train_true.tolist() == [i % 10 for i in train]
    assert data.y_val.tolist() == [i % 10 for i in val]
    assert data.y_test.tolist() == [i % 10 for i in test]
    for labels in (data.y_train_noisy, data.y_train_true, data.y_val, data.y_test):
        assert labels.dtype == torch.long
    assert data.clean_mask.dtype == torch.bool
    assert data.num_classes == 10 and data.noise_rate == 0.5 and data.name == "synthetic"
    assert data.num_features == 2


def test_same_seed_same_data_other_seed_other_data():
    first, again, other = build(seed=3), build(seed=3), build(seed=4)
    for field in ("x_train", "y_train_noisy", "clean_mask", "x_val", "x_test"):
        assert torch.equal(getattr(first, field), getattr(again, field))
    assert ids(first.x_train) != ids(other.x_train)
    assert not torch.equal(first.clean_mask, other.clean_mask)


@pytest.mark.parametrize(
    "noise_rate, n_train, expected",
    [(0.5, 40, 20), (0.25, 10, 2), (0.0, 40, 0), (1.0, 40, 40), (0.3, 7, 2), (0.3, 9, 3)],
)
def test_exactly_round_rate_times_n_selected(noise_rate, n_train, expected):
    data = build(noise_rate=noise_rate, n_train=n_train)
    assert int((~data.clean_mask).sum()) == expected == round(noise_rate * n_train)
    # Unselected examples keep their labels.
    assert torch.equal(data.y_train_noisy[data.clean_mask], data.y_train_true[data.clean_mask])
    assert int(data.y_train_noisy.min()) >= 0 and int(data.y_train_noisy.max()) <= 9


def test_corruption_draws_uniformly_including_true_label():
    labels = np.arange(200_000) % 10
    noisy, chosen = corrupt_labels(labels, 0.5, 10, np.random.default_rng(0))
    assert chosen.sum() == 100_000
    assert (noisy[~chosen] == labels[~chosen]).all()
    kept = np.mean(noisy[chosen] == labels[chosen])
    # Expected 1/10; the standard deviation is ~0.001, so 0.01 is a 10-sigma band.
    assert abs(kept - 0.1) < 0.01
    counts = np.bincount(noisy[chosen], minlength=10) / chosen.sum()
    assert np.all(np.abs(counts - 0.1) < 0.01)


def test_corrupt_labels_rejects_bad_rate():
    with pytest.raises(ValueError, match=r"noise_rate must lie in \[0, 1\]"):
        corrupt_labels(np.zeros(3, dtype=int), 1.5, 10, np.random.default_rng(0))


def test_not_enough_examples_is_a_clear_error():
    with pytest.raises(DatasetError, match=r"has 100 examples.*40 \+ 40 \+ 40 = 120"):
        build(n_train=40, n_val=40, n_test=40)
    with pytest.raises(
        ValueError,
        match=r"^n_train=0 must be an integer >= 1: the lower level fits the classifier on the training set, which cannot be empty$",
    ):
        build(n_train=0)


def test_to_changes_feature_dtype_only_and_instance_is_frozen():
    data = build()
    double = data.to(dtype=torch.float64)
    assert double.x_train.dtype == double.x_val.dtype == double.x_test.dtype == torch.float64
    assert double.y_train_noisy.dtype == torch.long and double.clean_mask.dtype == torch.bool
    assert data.x_train.dtype == torch.float32
    assert torch.equal(double.x_train.float(), data.x_train)
    assert isinstance(double, HypercleanData) and double.name == data.name
    with pytest.raises(dataclasses.FrozenInstanceError):
        data.noise_rate = 0.1


def test_default_splits():
    assert default_split("mnist") == (5000, 5000, 10000)
    assert default_split("fashion_mnist") == (5000, 5000, 10000)
    assert default_split("mnist5k") == (2000, 1000, 2000)
    assert default_split("digits") == (700, 400, 697)
    with pytest.raises(DatasetError, match="known datasets"):
        default_split("svhn")


def test_make_from_idx_files_scales_by_255(tmp_path, monkeypatch):
    monkeypatch.delenv("BILEVEL_DATA_DIR", raising=False)
    images = np.zeros((60, 28, 28), dtype=np.uint8)
    images[:, 0, 0] = 255
    images[:, 0, 1] = 51
    write_idx(tmp_path / "train-images-idx3-ubyte", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte", (np.arange(60) % 10).astype(np.uint8))
    data = make_hyperclean_data("mnist", noise_rate=0.2, seed=1, n_train=20, n_val=10, n_test=30, root=tmp_path)
    assert data.x_train.shape == (20, 784) and data.x_test.shape == (30, 784)
    assert torch.allclose(data.x_train[:, 0], torch.ones(20))
    assert torch.allclose(data.x_train[:, 1], torch.full((20,), 0.2))
    assert int((~data.clean_mask).sum()) == 4
    with pytest.raises(DatasetError, match=r"has 60 examples.*default for 'mnist': \(5000, 5000, 10000\)"):
        make_hyperclean_data("mnist", root=tmp_path)


def test_digits_defaults_and_scaling_by_16():
    pytest.importorskip("sklearn")
    data = make_hyperclean_data("digits", noise_rate=0.5, seed=0)
    assert data.x_train.shape == (700, 64) and data.x_val.shape == (400, 64) and data.x_test.shape == (697, 64)
    assert float(data.x_train.max()) == 1.0 and float(data.x_train.min()) == 0.0
    assert int((~data.clean_mask).sum()) == 350


def test_cleaner_metrics_hand_made():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -3.0, 5.0])
    clean = torch.tensor([1, 1, 0, 0, 1, 0])
    # predicted clean: [1, 1, 1, 0, 0, 1]; 2 true positives, 4 predicted, 3 clean.
    metrics = cleaner_metrics(logits, clean, noise_rate=0.5)
    assert metrics["precision"] == pytest.approx(0.5)
    assert metrics["recall"] == pytest.approx(2 / 3)
    assert metrics["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert metrics["paper_recall"] == pytest.approx((2 / 6) / 0.5)
    assert metrics["predicted_clean_fraction"] == pytest.approx(4 / 6)
    assert all(isinstance(v, float) for v in metrics.values())


def test_cleaner_metrics_edges():
    clean = torch.tensor([True, True, False, False])
    perfect = cleaner_metrics(torch.tensor([3.0, 1.0, -1.0, -2.0]), clean, 0.5)
    assert perfect["precision"] == perfect["recall"] == perfect["f1"] == perfect["paper_recall"] == 1.0
    nothing = cleaner_metrics(-torch.ones(4), clean, 0.5)
    assert nothing["precision"] == nothing["recall"] == nothing["f1"] == 0.0
    inverted = cleaner_metrics(torch.tensor([-1.0, -1.0, 1.0, 1.0]), clean, 0.5)
    assert inverted["f1"] == 0.0 and inverted["precision"] == 0.0
    with pytest.raises(ValueError, match="3 entries but clean_mask has 4"):
        cleaner_metrics(torch.zeros(3), clean, 0.5)


def test_accuracy():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 1.0], [5.0, 0.0, 0.0]])
    assert accuracy(logits, torch.tensor([0, 1, 0, 1])) == 0.5
    assert accuracy(logits, torch.tensor([0, 1, 2, 0])) == 1.0
    with pytest.raises(ValueError, match="must be \\[n, num_classes\\]"):
        accuracy(logits, torch.tensor([0, 1]))


@pytest.mark.parametrize(
    "split, role",
    [
        ("n_train", "the lower level fits"),
        ("n_val", "the upper objective is the loss on the validation set"),
        ("n_test", "the test accuracy"),
    ],
)
def test_empty_splits_are_rejected_naming_the_key(split, role):
    with pytest.raises(ValueError, match=rf"^{split}=0 must be an integer >= 1: {role}.*cannot be empty$"):
        build(**{split: 0})


def test_features_need_more_memory_than_available_is_one_line(monkeypatch):
    from bilevel import validation

    monkeypatch.setattr(validation, "available_memory", lambda: 999)
    with pytest.raises(MemoryError) as info:
        build(dtype=torch.float64)
    message = str(info.value)
    # 90 examples × 2 features × 8 bytes = 1440 bytes > 999
    assert message == (
        "the hyper-cleaning features (90 examples × 2 features in float64) needs about 1.4 kB but only 999 B of memory "
        "is available: reduce n_train/n_val/n_test (config: problem.n_train, ...), or use float32 (config: problem.dtype=float32)"
    )
    assert isinstance(info.value, ValueError)  # reported as one line by the command line
    build(dtype=torch.float32)  # 720 bytes fit


def test_unknown_available_memory_skips_the_check(monkeypatch):
    from bilevel import validation

    monkeypatch.setattr(validation, "available_memory", lambda: None)
    assert build().x_train.shape == (40, 2)


@pytest.mark.parametrize("max_pixel", [255.0, 16.0])
def test_uint8_features_in_float32_equal_the_float64_computation(max_pixel):
    pixels = np.arange(256 * 3) % (int(max_pixel) + 1)  # every pixel value, each example 1 pixel
    images = pixels.astype(np.uint8)[:, None]
    labels = np.arange(len(images)) % 10
    kwargs = dict(num_classes=10, max_pixel=max_pixel, name="u8", seed=0, n_train=256, n_val=256, n_test=256)
    single = hyperclean_from_arrays(images, labels, dtype=torch.float32, **kwargs)
    double = hyperclean_from_arrays(images, labels, dtype=torch.float64, **kwargs)
    assert single.x_train.dtype == torch.float32
    assert torch.equal(single.x_train, double.x_train.to(torch.float32))
