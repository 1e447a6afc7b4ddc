"""Omniglot from files the user has placed on disk.

Omniglot is on no package registry reachable from here, so it is never
installed or downloaded by this package: unzip ``images_background.zip`` and
``images_evaluation.zip`` from the official Omniglot repository
(github.com/brendenlake/omniglot, folder ``python/``) into a directory ROOT::

    ROOT/images_background/<Alphabet>/<characterNN>/*.png   (30 alphabets, 964 characters)
    ROOT/images_evaluation/<Alphabet>/<characterNN>/*.png   (20 alphabets, 659 characters)

``ROOT/omniglot/...`` and ``ROOT/python/...`` are accepted too. Each
character is one class. Omniglot draws black strokes on white; images are
inverted so that strokes are 1 and background 0, as few-shot models expect.

Example:
    >>> classes = load_omniglot("/data/omniglot", background=True)  # doctest: +SKIP
    >>> len(classes), classes[0].shape  # doctest: +SKIP
    (964, torch.Size([20, 1, 28, 28]))
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from .errors import DATA_DIR_ENV, DatasetError, DatasetNotFoundError

__all__ = [
    "OMNIGLOT_SUBSETS",
    "find_omniglot_subset",
    "list_omniglot_characters",
    "load_omniglot",
    "omniglot_report_row",
]

OMNIGLOT_SUBSETS = {True: "images_background", False: "images_evaluation"}

_PARENTS = (".", "omniglot", "python")

OMNIGLOT_PLACEMENT_HINT = (
    "Expected layout:\n"
    "  ROOT/images_background/<Alphabet>/<characterNN>/*.png  (background set, 964 characters)\n"
    "  ROOT/images_evaluation/<Alphabet>/<characterNN>/*.png  (evaluation set, 659 characters)\n"
    "Omniglot cannot be installed from a package registry here, so place the files yourself: "
    "get images_background.zip and images_evaluation.zip from the official Omniglot "
    "repository (github.com/brendenlake/omniglot, folder python/), unzip both into ROOT, and "
    "pass problem.data_dir=ROOT or --data-dir ROOT to bilevel run/bench/data (root=ROOT in Python), "
    f"or set {DATA_DIR_ENV} to a directory containing ROOT as omniglot/."
)


def _roots(root: str | os.PathLike | None) -> list[Path]:
    if root is not None:
        return [Path(root).expanduser()]
    env_dir = os.environ.get(DATA_DIR_ENV)
    return [Path(env_dir).expanduser()] if env_dir else []


def find_omniglot_subset(root: str | os.PathLike | None, background: bool = True) -> Path:
    """Directory of the background (or evaluation) set under ``root``.

    Args:
        root: ROOT of the layout; ``None`` uses ``$BILEVEL_DATA_DIR`` (and its
            ``omniglot/`` sub-directory).
        background: the background set (meta-training) if True, else evaluation.

    Raises:
        DatasetNotFoundError: no such directory; the message explains the layout.
    """
    subset = OMNIGLOT_SUBSETS[bool(background)]
    looked = []
    for base in _roots(root):
        for parent in _PARENTS:
            candidate = (base / parent / subset) if parent != "." else base / subset
            if candidate.is_dir():
                return candidate
            looked.append(str(candidate))
    where = "looked in: " + ", ".join(looked) if looked else f"no root given and ${DATA_DIR_ENV} is not set"
    raise DatasetNotFoundError(f"Omniglot {subset} not found ({where}).\n{OMNIGLOT_PLACEMENT_HINT}")


def list_omniglot_characters(root: str | os.PathLike | None, background: bool = True) -> list[tuple[str, str, list[Path]]]:
    """``(alphabet, character, png_paths)`` per character, sorted by alphabet then character.

    The position in this list is the character's class id in :func:`load_omniglot`.

    Raises:
        DatasetNotFoundError: the subset directory is missing or has no alphabets.
        DatasetError: a character directory holds no PNG file (incomplete unzip).
    """
    subset_dir = find_omniglot_subset(root, background)
    characters = []
    for alphabet_dir in sorted(p for p in subset_dir.iterdir() if p.is_dir()):
        for character_dir in sorted(p for p in alphabet_dir.iterdir() if p.is_dir()):
            pngs = sorted(p for p in character_dir.iterdir() if p.suffix.lower() == ".png")
            if not pngs:
                raise DatasetError(
                    f"{character_dir}: no .png images; the Omniglot files look incompletely "
                    f"extracted. Unzip {subset_dir.name}.zip again into {subset_dir.parent}.\n"
                    f"{OMNIGLOT_PLACEMENT_HINT}"
                )
            characters.append((alphabet_dir.name, character_dir.name, pngs))
    if not characters:
        raise DatasetNotFoundError(f"{subset_dir}: no <Alphabet>/<character>/ directories inside.\n{OMNIGLOT_PLACEMENT_HINT}")
    return characters


#: Omniglot images are 105 × 105; anything far larger is not an Omniglot image, and its
#: pixels are not decoded (a small PNG can declare gigapixels: a decompression bomb).
MAX_IMAGE_PIXELS = 1024 * 1024


def _read_image(path: Path, image_size: int, image_module: ModuleType) -> np.ndarray:
    try:
        with image_module.open(path) as image:
            width, height = image.size  # read from the header; no pixel is decoded yet
            if width * height > MAX_IMAGE_PIXELS:
                raise DatasetError(
                    f"{path}: declares {width} × {height} pixels, far more than an Omniglot image (105 × 105); "
                    "it was not decoded. Extract this file again from the official Omniglot zip."
                )
            gray = image.convert("L").resize((image_size, image_size), resample=image_module.Resampling.LANCZOS)
            pixels = np.asarray(gray, dtype=np.float32)
    except DatasetError:
        raise
    except (OSError, ValueError, image_module.DecompressionBombError) as error:  # UnidentifiedImageError is an OSError
        raise DatasetError(
            f"{path}: cannot be read as an image ({error}). Extract this file again from the official Omniglot zip."
        ) from error
    # Strokes are black on white: invert so that strokes are 1.
    return 1.0 - pixels / 255.0


def load_omniglot(
    root: str | os.PathLike | None,
    background: bool = True,
    image_size: int = 28,
    first_class_id: int = 0,
) -> dict[int, torch.Tensor]:
    """Load the Omniglot background or evaluation set as a class collection.

    Args:
        root: ROOT of the layout (see the module docstring); ``None`` uses
            ``$BILEVEL_DATA_DIR``.
        background: background set (30 alphabets) if True, evaluation set otherwise.
        image_size: images are resized (Lanczos) to ``image_size x image_size``.
        first_class_id: id of the first character; use ``len(background_set)``
            to merge both sets into one collection without clashes.

    Returns:
        Dict class id -> float32 ``[n_i, 1, image_size, image_size]`` in [0, 1],
        strokes near 1. Class ids follow :func:`list_omniglot_characters`.

    Raises:
        DatasetNotFoundError: the files are not there; the message says how to place them.
        DatasetError: a file is unreadable, or pillow is not installed.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    try:
        from PIL import Image
    except ImportError as error:
        raise DatasetError(f"reading Omniglot needs pillow ({error}); install it with `pip install pillow`") from error
    collection = {}
    for offset, (_, _, paths) in enumerate(list_omniglot_characters(root, background)):
        images = np.stack([_read_image(p, image_size, Image) for p in paths])
        collection[first_class_id + offset] = torch.from_numpy(images[:, None])
    return collection


def omniglot_report_row(root: str | os.PathLike | None = None) -> dict:
    """Row for :func:`bilevel.data.sources.report`: counts files, decodes none."""
    row: dict[str, Any] = {
        "name": "omniglot",
        "status": "missing",
        "examples": None,
        "location": "place files under $BILEVEL_DATA_DIR/omniglot (see load_omniglot)",
        "detail": "",
    }
    try:
        background = list_omniglot_characters(root, background=True)
    except DatasetNotFoundError as error:
        row["detail"] = str(error)
        return row
    except DatasetError as error:
        row.update(status="invalid", detail=str(error))
        return row
    row.update(
        status="found",
        location=str(find_omniglot_subset(root, True).parent),
        examples=sum(len(paths) for _, _, paths in background),
        detail=f"background: {len(background)} characters",
    )
    return row
