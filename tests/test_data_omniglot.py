"""Omniglot loader on a generated miniature of the official layout."""

import pytest
import torch

from bilevel.data import (
    DatasetError,
    DatasetNotFoundError,
    EpisodeSampler,
    list_omniglot_characters,
    load_omniglot,
)
from bilevel.data.omniglot import omniglot_report_row

Image = pytest.importorskip("PIL.Image")
ImageDraw = pytest.importorskip("PIL.ImageDraw")

ALPHABETS = ("Greek", "Latin")
CHARACTERS = ("character01", "character02", "character03")


def draw_character(path, column):
    """105x105 1-bit image like Omniglot's: white, with a black vertical bar at ``column``."""
    image = Image.new("L", (105, 105), 255)
    ImageDraw.Draw(image).rectangle([column, 10, column + 20, 95], fill=0)
    image.convert("1").save(path)


@pytest.fixture
def omniglot_root(tmp_path):
    for subset, alphabets in (
        ("images_background", ALPHABETS),
        ("images_evaluation", ("Tengwar",)),
    ):
        for a, alphabet in enumerate(alphabets):
            for c, character in enumerate(CHARACTERS[: 3 if subset == "images_background" else 2]):
                directory = tmp_path / subset / alphabet / character
                directory.mkdir(parents=True)
                for k in range(4):
                    draw_character(directory / f"{a}{c}_{k:02d}.png", column=10 + 25 * c)
    return tmp_path


def test_loads_classes_with_inverted_scaled_images(omniglot_root):
    classes = load_omniglot(omniglot_root, background=True)
    assert sorted(classes) == list(range(6))
    for images in classes.values():
        assert images.shape == (4, 1, 28, 28) and images.dtype == torch.float32
        assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    # character01 bar spans columns 10..30 of 105 -> about 3..8 of 28; background stays 0.
    first = classes[0][0, 0]
    assert float(first[14, 5]) > 0.9
    assert float(first[14, 20]) < 0.1 and float(first[0, 0]) < 0.1
    # character03 (class 2) has its bar further right.
    assert float(classes[2][0, 0][14, 18]) > 0.9 and float(classes[2][0, 0][14, 5]) < 0.1


def test_class_order_and_subsets(omniglot_root):
    listing = list_omniglot_characters(omniglot_root)
    assert [(a, c) for a, c, _ in listing] == [(a, c) for a in ALPHABETS for c in CHARACTERS]
    assert all(len(paths) == 4 for _, _, paths in listing)
    evaluation = load_omniglot(omniglot_root, background=False, image_size=14, first_class_id=6)
    assert sorted(evaluation) == [6, 7]
    assert evaluation[6].shape == (4, 1, 14, 14)


def test_root_from_environment_and_python_subdir(omniglot_root, tmp_path_factory, monkeypatch):
    parent = tmp_path_factory.mktemp("env")
    (parent / "omniglot").symlink_to(omniglot_root, target_is_directory=True)
    monkeypatch.setenv("BILEVEL_DATA_DIR", str(parent))
    assert len(load_omniglot(None)) == 6
    nested = tmp_path_factory.mktemp("nested")
    (nested / "python").symlink_to(omniglot_root, target_is_directory=True)
    assert len(load_omniglot(nested, background=False)) == 2


def test_missing_root_explains_layout_and_manual_placement(tmp_path, monkeypatch):
    with pytest.raises(DatasetNotFoundError) as info:
        load_omniglot(tmp_path / "absent")
    message = str(info.value)
    assert str(tmp_path / "absent" / "images_background") in message
    assert "ROOT/images_background/<Alphabet>/<characterNN>/*.png" in message
    assert "cannot be installed from a package registry" in message
    assert "images_background.zip" in message and "images_evaluation.zip" in message
    monkeypatch.delenv("BILEVEL_DATA_DIR", raising=False)
    with pytest.raises(DatasetNotFoundError, match="BILEVEL_DATA_DIR is not set"):
        load_omniglot(None)


def test_empty_layout_and_incomplete_extraction(tmp_path):
    (tmp_path / "images_background").mkdir()
    with pytest.raises(DatasetNotFoundError, match="no <Alphabet>/<character>/ directories"):
        load_omniglot(tmp_path)
    empty_character = tmp_path / "images_background" / "Greek" / "character01"
    empty_character.mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"character01: no \.png images"):
        load_omniglot(tmp_path)


def test_corrupt_png_names_the_file(omniglot_root):
    bad = omniglot_root / "images_background" / "Latin" / "character02" / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"bad\.png: cannot be read as an image"):
        load_omniglot(omniglot_root)


def test_report_row(omniglot_root, tmp_path_factory):
    row = omniglot_report_row(omniglot_root)
    assert row["status"] == "found" and row["examples"] == 24
    assert row["location"] == str(omniglot_root)
    assert omniglot_report_row(tmp_path_factory.mktemp("none"))["status"] == "missing"


def test_sampler_on_omniglot(omniglot_root):
    classes = load_omniglot(omniglot_root)
    batch = EpisodeSampler(classes, n_way=3, k_shot=1, q_query=3, meta_batch=2, seed=0).sample(0)
    assert batch["support_x"].shape == (2, 3, 1, 28, 28)
    assert batch["query_x"].shape == (2, 9, 1, 28, 28)
