"""Files from an untrusted source never run code: checkpoints, configurations, datasets.

A checkpoint is a pickle; these tests build checkpoints whose unpickling would write a
marker file (as a real attack would run a command) and show that every way of opening a
checkpoint refuses them and that the marker never appears.
"""

import gzip
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import bilevel as bl
from bilevel.checkpoint import CheckpointError, load_checkpoint
from bilevel.data.errors import DatasetError
from bilevel.data.idx import read_idx
from bilevel.problems import T1g

SRC = Path(bl.__file__).resolve().parent


def _write_marker(path):
    Path(path).write_text("the checkpoint ran code")


class _Payload:
    """An object whose unpickling calls ``_write_marker(marker)``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (_write_marker, (self.marker,))


class _SystemCall:
    """An object whose unpickling runs a shell command (the classic attack)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.marker}",))


def _malicious_checkpoint(path, marker, kind=_Payload, where="state"):
    """A checkpoint that looks like a bilevel checkpoint but hides code in ``where``."""
    state = bl.methods.base.State(x={"x": torch.zeros(4, dtype=torch.float64)}, y={"y": torch.zeros(4, dtype=torch.float64)})
    payload = {"format": 2, "state": state.to_dict(), "history": [], "rng": {}, "meta": {}}
    if where == "state":
        payload["state"]["extra"] = {"trap": kind(marker)}
    else:
        payload[where] = kind(marker)
    torch.save(payload, path)
    return path


@pytest.mark.parametrize("kind", [_Payload, _SystemCall])
@pytest.mark.parametrize("where", ["state", "meta", "rng"])
def test_load_checkpoint_refuses_code_and_runs_none_of_it(tmp_path, kind, where):
    marker = tmp_path / "marker"
    path = _malicious_checkpoint(tmp_path / "checkpoint.pt", marker, kind, where)
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt is not a safe bilevel checkpoint") as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)
    assert not marker.exists()


def test_solve_resume_refuses_a_malicious_checkpoint(tmp_path):
    marker = tmp_path / "marker"
    path = _malicious_checkpoint(tmp_path / "checkpoint.pt", marker)
    with pytest.raises(CheckpointError, match="not a safe bilevel checkpoint"):
        bl.solve(T1g(n=4), bl.AID(lr_upper=0.1, lr_lower=0.5), max_iters=5, resume=path)
    assert not marker.exists()


def test_bilevel_resume_refuses_a_malicious_checkpoint_with_one_line_and_exit_2(tmp_path):
    from bilevel.experiments import load_config

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = load_config("hyperclean_demo")
    config["problem"].update(n_train=100, n_val=50, n_test=100)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    marker = tmp_path / "marker"
    _malicious_checkpoint(run_dir / "checkpoint.pt", marker, _SystemCall)
    proc = subprocess.run(
        [sys.executable, "-m", "bilevel", "resume", str(run_dir), "--max-iters", "6", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "not a safe bilevel checkpoint" in lines[0]
    assert not marker.exists()


def test_checkpoints_written_by_the_library_load_under_the_restricted_unpickler(tmp_path):
    path = tmp_path / "checkpoint.pt"
    bl.solve(T1g(n=4), bl.AID(lr_upper=0.1, lr_lower=0.5), max_iters=3, checkpoint=path, meta={"config": {"seed": 1, "tags": ["a", "b"]}})
    payload = torch.load(path, weights_only=True)  # raises if anything but plain data is in it
    assert payload["format"] == bl.checkpoint.FORMAT_VERSION and payload["bilevel_version"] == bl.__version__
    assert payload["meta"]["config"] == {"seed": 1, "tags": ["a", "b"]}


def test_meta_that_is_not_plain_data_is_refused_when_writing(tmp_path):
    with pytest.raises(CheckpointError, match=r"meta\['callback'\] is a function: a checkpoint holds only tensors"):
        bl.save_checkpoint(tmp_path / "c.pt", bl.methods.base.State(x=torch.zeros(1), y=torch.zeros(1)), [], {"callback": lambda: 0})
    assert not (tmp_path / "c.pt").exists()


def test_a_format_1_checkpoint_is_still_read(tmp_path):
    """bilevel 0.1.0 stored numpy's RNG state as a tuple with a numpy array: rebuilt as data."""
    import random

    state = bl.methods.base.State(x={"x": torch.ones(2)}, y={"y": torch.zeros(3)}, k=4)
    rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    torch.save(
        {"format": 1, "state": state.to_dict(), "history": [{"iteration": 4, "time": 0.5}], "rng": rng, "meta": {"wall_time": 0.5}},
        tmp_path / "old.pt",
    )
    payload = load_checkpoint(tmp_path / "old.pt")
    assert payload["state"].k == 4 and payload["bilevel_version"] == "0.1.0"
    expected = np.random.get_state()[1].copy()
    np.random.seed(123)
    bl.checkpoint.restore_rng(payload["rng"])
    assert np.array_equal(np.random.get_state()[1], expected)


def test_a_checkpoint_of_a_newer_format_is_refused_with_its_version(tmp_path):
    torch.save({"format": 7, "bilevel_version": "9.0.0", "state": {}, "history": [], "rng": {}, "meta": {}}, tmp_path / "new.pt")
    with pytest.raises(
        CheckpointError, match=r"has checkpoint format 7 \(written by bilevel 9\.0\.0\); this bilevel .* reads formats 1, 2, 3: upgrade"
    ):
        load_checkpoint(tmp_path / "new.pt")


def test_yaml_configurations_are_read_with_a_safe_loader(tmp_path):
    from bilevel.experiments import load_config

    marker = tmp_path / "marker"
    path = tmp_path / "evil.yaml"
    path.write_text(f"!!python/object/apply:os.system ['echo pwned > {marker}']\n")
    with pytest.raises(Exception) as info:
        load_config(path)
    assert isinstance(info.value, (ValueError, yaml.YAMLError))
    assert not marker.exists()


def test_no_unsafe_deserialisation_anywhere_in_the_library():
    """No pickle, eval/exec, unsafe YAML, allow_pickle or weights_only=False in src/."""
    import importlib

    forbidden = re.compile(
        r"\bimport pickle\b|pickle\.loads?\(|\beval\(|\bexec\(|allow_pickle\s*=\s*True|weights_only\s*=\s*False"
        r"|yaml\.unsafe_load|yaml\.full_load|yaml\.FullLoader|yaml\.UnsafeLoader|marshal\.loads|shelve\.open"
    )
    yaml_load = re.compile(r"yaml\.load\((.*)")
    offenders = []
    for path in SRC.rglob("*.py"):
        module = None
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if forbidden.search(code):
                offenders.append(f"{path.relative_to(SRC)}:{number}: {line.strip()}")
            call = yaml_load.search(code)
            if call:  # yaml.load is allowed only with a loader derived from SafeLoader
                loader = re.search(r"Loader\s*=\s*([\w.]+)", call.group(1))
                name = ".".join(("bilevel", *path.relative_to(SRC).with_suffix("").parts))
                module = module or importlib.import_module(name)
                resolved = None
                if loader:
                    resolved = yaml if loader.group(1).startswith("yaml.") else module
                    for part in loader.group(1).split(".")[1 if loader.group(1).startswith("yaml.") else 0 :]:
                        resolved = getattr(resolved, part, None)
                if not (isinstance(resolved, type) and issubclass(resolved, yaml.SafeLoader)):
                    offenders.append(f"{path.relative_to(SRC)}:{number}: yaml.load without a SafeLoader: {line.strip()}")
    assert offenders == []


def _idx_header(shape, type_code=0x08):
    return bytes([0, 0, type_code, len(shape)]) + np.asarray(shape, dtype=">u4").tobytes()


def test_an_idx_header_claiming_a_trillion_images_is_refused_before_allocating(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(_idx_header((1_000_000, 1_000_000, 1)) + b"\x00" * 64)
    with pytest.raises(DatasetError, match=r"truncated: header declares shape \(1000000, 1000000, 1\)"):
        read_idx(path)


def test_a_gzip_idx_whose_header_overclaims_is_refused_without_decompressing_it(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(_idx_header((1_000_000, 1_000_000, 1)) + b"\x00" * 1024))
    with pytest.raises(DatasetError, match=r"more than a \d+-byte gzip file can hold"):
        read_idx(path)


def test_a_gzip_bomb_is_decompressed_no_further_than_its_header_declares(tmp_path, monkeypatch):
    """1 MB of declared data followed by 200 MB of zeros: only the declared part (+1 byte) is inflated."""
    import zlib

    declared = _idx_header((1000, 1000))
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    chunks = [compressor.compress(declared)]
    zeros = b"\x00" * (1 << 20)
    for _ in range(200):
        chunks.append(compressor.compress(zeros))
    chunks.append(compressor.flush())
    path = tmp_path / "bomb-idx2-ubyte.gz"
    path.write_bytes(b"".join(chunks))
    with pytest.raises(DatasetError, match=r"extra bytes follow the data"):
        read_idx(path)


def test_an_image_declaring_gigapixels_is_refused_without_decoding_it(tmp_path):
    from PIL import Image

    from bilevel.data.omniglot import _read_image

    path = tmp_path / "0101_01.png"
    Image.new("1", (6000, 6000), 1).save(path)  # 36 Mpx of white compress to a few kB
    assert path.stat().st_size < 100_000
    with pytest.raises(DatasetError, match=r"declares 6000 × 6000 pixels, far more than an Omniglot image"):
        _read_image(path, 28, Image)
