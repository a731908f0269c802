"""Image files to uint8 pixels, with the bit depth of 16-bit PNG/TIFF files detected rather than assumed.

X-ray and microscopy exports often store 10-, 12- or 14-bit values in a 16-bit PNG or TIFF. Scaling such
values by 255/65535 crushes a 12-bit image to 0..16, and the model then sees noise (issue 12: held-out
accuracy 0.814 -> 0.756). The depth comes from the file where it says so (PNG sBIT chunk, TIFF
MaxSampleValue) and otherwise from the data: the smallest of BIT_DEPTHS that holds the largest value of
every 16-bit image of the data set, so all images of a set are scaled alike (a dark image is not
brightened on its own).
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from fedtl.shared.errors import DataError

__all__ = [
    "BIT_DEPTHS",
    "IMAGE_EXTENSIONS",
    "DecodedImage",
    "choose_bit_depth",
    "describe_bit_depths",
    "load_image_file",
    "read_image_file",
    "scale_to_uint8",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff")
BIT_DEPTHS = (8, 10, 12, 14, 16)  # sensor/export depths seen in 16-bit containers
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_COLOUR_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 1, 6: 3}  # colour type -> sBIT bytes that describe colour
TIFF_MAX_SAMPLE_VALUE = 281
TIFF_SMAX_SAMPLE_VALUE = 341
# Pillow decodes 16-bit colour PNGs to 8-bit RGB(A) by keeping each sample's high byte; data using fewer
# levels of that byte than this lost most of their precision and are refused rather than trained on.
MIN_HIGH_BYTE_LEVELS = 128


@dataclass(frozen=True, eq=False)
class DecodedImage:
    """One image file's pixels before scaling to 8 bits, and what the file says about their depth."""

    path: Path
    pixels: np.ndarray  # (H,W) or (H,W,3): uint8 for 8-bit files, uint16 for 16-bit containers
    container: str  # e.g. "8-bit PNG", "16-bit PNG", "16-bit TIFF"
    declared_bits: int | None = None  # significant bits the file declares (PNG sBIT, TIFF MaxSampleValue)

    @property
    def deep(self) -> bool:
        """Whether the pixels sit in a 16-bit container (their depth must be chosen before scaling)."""
        return self.pixels.dtype != np.uint8

    @property
    def max_value(self) -> int:
        """The largest pixel value (0 for an empty image)."""
        return int(self.pixels.max()) if self.pixels.size else 0


def read_image_file(path: str | Path) -> DecodedImage:
    """Decode one image file, keeping 16-bit grey values unscaled; raises DataError naming the path.

    Grey modes ('L', '1', 'LA') give uint8 (H,W); 16-bit grey ('I;16*', 'I', integral 'F' within
    0..65535) gives uint16 (H,W); 'F' values within 0..1 are read as a unit range (x 255); every other mode
    gives uint8 (H,W,3) RGB. A 16-bit colour PNG, which Pillow reads at its high byte only, is refused when
    that byte uses fewer than MIN_HIGH_BYTE_LEVELS levels (e.g. 12-bit colour data).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image file {path} does not exist or is not a file; fix: check the path")
    try:
        with Image.open(path) as image:
            image.load()  # PIL decodes lazily: corrupt or truncated data only shows here
            return _decode(image, path)
    except DataError:
        raise
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise DataError(
            f"cannot decode image file {path}: {type(exc).__name__}: {exc}; fix: re-export or remove this file"
        ) from exc


def choose_bit_depth(images: Sequence[DecodedImage]) -> int:
    """The depth of the undeclared 16-bit images of one data set: the smallest of BIT_DEPTHS holding their maximum."""
    largest = max((image.max_value for image in images if image.deep and image.declared_bits is None), default=0)
    return next(bits for bits in BIT_DEPTHS if largest < 2**bits)


def scale_to_uint8(image: DecodedImage, bits: int) -> np.ndarray:
    """`image` as uint8, its values scaled from `bits` bits (the file's declared depth wins) to 0..255."""
    if not image.deep:
        return image.pixels
    bits = image.declared_bits or bits
    if bits == 8:
        return image.pixels.astype(np.uint8)
    return np.round(image.pixels.astype(np.float64) * (255.0 / (2**bits - 1))).astype(np.uint8)


def load_image_file(path: str | Path, *, bits: int | None = None) -> np.ndarray:
    """Decode one image as uint8 (H,W) grey or (H,W,3) RGB, scaling 16-bit containers from their bit depth.

    The depth of a 16-bit file is the file's declaration, else `bits`, else the smallest of BIT_DEPTHS that
    holds this image's values (a single file cannot be compared with its data set; loaders choose the
    depth per set). Raises DataError naming the path when the file is missing, corrupt or not an image.
    """
    image = read_image_file(path)
    return scale_to_uint8(image, bits if bits is not None else choose_bit_depth([image]))


def describe_bit_depths(images: Sequence[DecodedImage], bits: int) -> str:
    """One line for a load report: how many images of each container and depth, and where the depth came from."""
    counts: Counter[str] = Counter()
    for image in images:
        if not image.deep:
            counts[image.container] += 1
        elif image.declared_bits is not None:
            counts[f"{image.declared_bits}-bit values in {image.container} (declared by the file)"] += 1
        else:
            counts[f"{bits}-bit values in {image.container} (from the data's largest value)"] += 1
    text = "; ".join(f"{what}: {n}" for what, n in sorted(counts.items()))
    if any(image.deep for image in images):
        text += "; 16-bit containers scaled by 255/(2^bits - 1)"
    return text


def _decode(image: Image.Image, path: Path) -> DecodedImage:
    """The DecodedImage of a loaded PIL image."""
    mode, fmt = image.mode, image.format or path.suffix.lstrip(".").upper()
    if mode == "L":
        return DecodedImage(path, np.array(image, dtype=np.uint8), f"8-bit {fmt}")
    if mode in ("1", "LA"):
        return DecodedImage(path, np.array(image.convert("L"), dtype=np.uint8), f"8-bit {fmt}")
    if mode in ("I", "F") or mode.startswith("I;16"):
        values = np.asarray(image, dtype=np.float64)
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if not (np.isfinite(low) and np.isfinite(high)) or low < 0 or high > 65535:
            raise DataError(
                f"image file {path} (mode {mode}) has pixel values in [{low}, {high}], outside 0..65535; "
                "fix: convert it to 8-bit grey ('L') or RGB, or to 16-bit unsigned grey"
            )
        if mode == "F" and high <= 1.0 and not np.array_equal(values, np.round(values)):
            return DecodedImage(path, np.round(values * 255.0).astype(np.uint8), f"float {fmt} in 0..1")
        declared = _declared_bits(image, path)
        return DecodedImage(path, np.round(values).astype(np.uint16), f"16-bit {fmt}", declared)
    if fmt == "PNG" and _png_header(path)[0] == 16:
        _check_high_byte(image, path)
    if mode == "RGB":
        return DecodedImage(path, np.array(image, dtype=np.uint8), f"8-bit {fmt}")
    return DecodedImage(path, np.array(image.convert("RGB"), dtype=np.uint8), f"8-bit {fmt}")  # RGBA, P, CMYK...


def _declared_bits(image: Image.Image, path: Path) -> int | None:
    """Significant bits a 16-bit grey file declares (PNG sBIT, TIFF (S)MaxSampleValue), checked against its data."""
    declared = None
    if image.format == "PNG":
        sbit = _png_sbit(path)
        declared = max(sbit) if sbit else None
    elif image.format == "TIFF":
        tags = getattr(image, "tag_v2", {})
        for tag in (TIFF_MAX_SAMPLE_VALUE, TIFF_SMAX_SAMPLE_VALUE):
            value = tags.get(tag)
            value = value[0] if isinstance(value, tuple) and value else value
            if isinstance(value, (int, float)) and 0 < value < 65535:
                declared = int(value).bit_length()
    if declared is None or not 8 <= declared < 16:
        return None  # 16 (or a nonsense value) says nothing beyond the container
    largest = int(np.asarray(image).max()) if image.size[0] * image.size[1] else 0
    if largest >= 2**declared:
        raise DataError(
            f"image file {path} declares {declared} significant bits (values up to {2**declared - 1}) but holds "
            f"the value {largest}; fix: re-export it without the bit-depth declaration (PNG sBIT / TIFF "
            "MaxSampleValue) or with the right one"
        )
    return declared


def _png_header(path: Path) -> tuple[int, int]:
    """(bit depth, colour type) from a PNG's IHDR chunk."""
    with path.open("rb") as handle:
        head = handle.read(29)
    if head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR":
        return 0, 0
    return head[24], head[25]


def _png_sbit(path: Path) -> tuple[int, ...] | None:
    """The colour bytes of a PNG's sBIT chunk (significant bits per channel), or None when it has none."""
    data = path.read_bytes()
    colour_type = data[25] if len(data) > 25 else 0
    pos = 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if kind == b"sBIT":
            body = data[pos + 8 : pos + 8 + length]
            return tuple(body[: PNG_COLOUR_CHANNELS.get(colour_type, 1)]) or None
        if kind in (b"IDAT", b"IEND"):
            return None  # sBIT must precede the image data (PNG spec 11.3.3.4)
        pos += 12 + length
    return None


def _check_high_byte(image: Image.Image, path: Path) -> None:
    """Refuse a 16-bit colour PNG whose high bytes (all Pillow keeps) use too few levels."""
    pixels = np.asarray(image)
    colour = pixels[..., :3] if pixels.ndim == 3 else pixels  # an alpha channel says nothing about depth
    high = int(colour.max()) if colour.size else 0
    if high + 1 < MIN_HIGH_BYTE_LEVELS:
        raise DataError(
            f"image file {path} is a 16-bit colour PNG; Pillow reads only the high byte of each sample, and in "
            f"this file that byte reaches {high}, so at most {high + 1} of 256 levels would remain (its values "
            "use fewer than 16 bits, e.g. 12-bit colour data); fix: save it as 8-bit RGB scaled to 0..255, or as "
            "16-bit greyscale"
        )
