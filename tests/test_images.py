"""Tests of fedtl.shared.images: 8-bit files as they are, 16-bit PNG/TIFF scaled from their detected bit depth."""

import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin, TiffImagePlugin
from sklearn.datasets import load_digits

from fedtl.shared.errors import DataError
from fedtl.shared.images import choose_bit_depth, load_image_file, read_image_file, scale_to_uint8


@pytest.fixture(scope="module")
def digits8():
    """Real 8-bit images: sklearn digits 0..16 scaled to 0..255."""
    return np.round(load_digits().images[:20] * (255.0 / 16.0)).astype(np.uint8)


def widen(image: np.ndarray, bits: int) -> np.ndarray:
    """Oracle of a detector export: 8-bit values stretched to `bits` bits, stored as uint16."""
    return np.round(image.astype(np.float64) * (2**bits - 1) / 255).astype(np.uint16)


def save16(path: Path, values: np.ndarray, *, sbit: int | None = None) -> Path:
    """A 16-bit greyscale PNG (Pillow mode I;16), with an sBIT chunk when given."""
    info = None
    if sbit is not None:
        info = PngImagePlugin.PngInfo()
        info.add(b"sBIT", bytes([sbit]))
    Image.fromarray(values.astype(np.uint16)).save(path, pnginfo=info)
    return path


def save_rgb16_png(path: Path, values: np.ndarray) -> Path:
    """A 16-bit RGB PNG written by hand (Pillow cannot write one): IHDR, one zlib IDAT, filter 0 rows."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    height, width, _ = values.shape
    rows = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    )
    return path


@pytest.mark.parametrize("bits", [10, 12, 14, 16])
def test_16_bit_png_of_any_depth_decodes_back_to_the_8_bit_image(tmp_path, digits8, bits):
    path = save16(tmp_path / "x.png", widen(digits8[3], bits))
    decoded = read_image_file(path)
    assert decoded.container == "16-bit PNG" and decoded.deep and decoded.declared_bits is None
    assert choose_bit_depth([decoded]) == bits
    np.testing.assert_array_equal(load_image_file(path), digits8[3])


def test_12_bit_values_are_no_longer_crushed_to_a_few_levels(tmp_path, digits8):
    path = save16(tmp_path / "x.png", widen(digits8[5], 12))
    image = load_image_file(path)
    crushed = np.round(widen(digits8[5], 12) * (255.0 / 65535.0))  # the old decoder: always / 257
    assert crushed.max() <= 16 and image.max() == digits8[5].max() == 255


def test_the_bit_depth_is_chosen_per_data_set_so_a_dark_image_is_not_brightened(tmp_path, digits8):
    bright = read_image_file(save16(tmp_path / "bright.png", widen(digits8[0], 12)))
    dark_values = widen(digits8[1] // 8, 12)  # a dim image of the same 12-bit set: its maximum is under 1024
    dark = read_image_file(save16(tmp_path / "dark.png", dark_values))
    assert choose_bit_depth([dark]) == 10 and choose_bit_depth([bright, dark]) == 12
    expected = np.round(dark_values * (255.0 / 4095.0)).astype(np.uint8)
    np.testing.assert_array_equal(scale_to_uint8(dark, choose_bit_depth([bright, dark])), expected)


def test_8_bit_values_in_a_16_bit_container_are_kept(tmp_path, digits8):
    path = save16(tmp_path / "x.png", digits8[2].astype(np.uint16))
    np.testing.assert_array_equal(load_image_file(path), digits8[2])
    deep = np.array([[0, 65535], [32768, 257]], np.uint16)  # full 16-bit range: scaled by 255/65535
    Image.fromarray(deep).save(tmp_path / "deep.tif")
    np.testing.assert_array_equal(load_image_file(tmp_path / "deep.tif"), [[0, 255], [128, 1]])


def test_a_declared_depth_wins_and_a_false_one_is_refused(tmp_path, digits8):
    dim = widen(digits8[4] // 4, 12)  # 12-bit data whose largest value fits in 10 bits
    declared = read_image_file(save16(tmp_path / "s.png", dim, sbit=12))
    assert declared.declared_bits == 12
    np.testing.assert_array_equal(scale_to_uint8(declared, bits=10), np.round(dim * (255.0 / 4095.0)))
    lying = save16(tmp_path / "lie.png", widen(digits8[4], 12), sbit=10)
    with pytest.raises(
        DataError, match=rf"{re.escape(str(lying))} declares 10 significant bits .* holds the value 4095"
    ):
        read_image_file(lying)
    ifd = TiffImagePlugin.ImageFileDirectory_v2()
    ifd[281] = 4095  # MaxSampleValue
    Image.fromarray(dim).save(tmp_path / "t.tif", tiffinfo=ifd)
    tiff = read_image_file(tmp_path / "t.tif")
    assert tiff.container == "16-bit TIFF" and tiff.declared_bits == 12


def test_16_bit_colour_png_is_refused_when_pillow_would_keep_too_few_levels(tmp_path, digits8):
    rgb = np.stack([digits8[6], digits8[7], 255 - digits8[8]], axis=-1)
    full = save_rgb16_png(tmp_path / "full.png", rgb.astype(np.uint16) * 257)
    np.testing.assert_array_equal(load_image_file(full), rgb)  # the high byte of a full-range value is exact
    twelve = save_rgb16_png(tmp_path / "twelve.png", widen(rgb, 12))
    with pytest.raises(
        DataError,
        match=r"twelve.png is a 16-bit colour PNG; Pillow reads only the high byte .* reaches 15, so at most 16",
    ):
        load_image_file(twelve)


def test_float_images_in_the_unit_range_and_bad_files(tmp_path, digits8):
    unit = (digits8[9] / 255.0).astype(np.float32)
    Image.fromarray(unit, mode="F").save(tmp_path / "unit.tif")
    np.testing.assert_array_equal(load_image_file(tmp_path / "unit.tif"), digits8[9])
    with pytest.raises(DataError, match=r"image file .*gone.png does not exist"):
        read_image_file(tmp_path / "gone.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n no")
    with pytest.raises(DataError, match=r"cannot decode image file .*bad.png.*fix: re-export or remove"):
        read_image_file(tmp_path / "bad.png")
