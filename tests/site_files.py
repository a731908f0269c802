"""Real site files for tests: PNG images, DICOM files (pydicom) and CSV manifests."""

import csv
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid


def save_png(path: Path, array: np.ndarray) -> Path:
    """Write a uint8 (H,W) or (H,W,3) array as PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def write_dicom(
    path: Path,
    stored: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    rescale: tuple[float, float] | None = None,
    window: tuple | None = None,
    voi_function: str | None = None,
    frames: int = 1,
    pixels: bool = True,
) -> Path:
    """Write a real uncompressed (Explicit VR Little Endian) DICOM file: 16-bit grey or 8-bit RGB."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(path)])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    colour = photometric == "RGB"
    ds.Rows, ds.Columns = stored.shape[-3:-1] if colour else stored.shape[-2:]
    ds.SamplesPerPixel = 3 if colour else 1
    ds.PhotometricInterpretation = photometric
    bits = 8 if colour else 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    if colour:
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if voi_function is not None:
        ds.VOILUTFunction = voi_function
    if pixels:
        ds.PixelData = stored.astype(np.uint8 if colour else np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def write_csv(path: Path, rows: list[list[str]], header=("path", "label")) -> Path:
    """Write a CSV manifest with `header` and `rows`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        if header is not None:
            writer.writerow(header)
        writer.writerows(rows)
    return path
