"""Datasets that need no download (scikit-learn's bundled ones) and files made from them for tests.

``sklearn:breast_cancer``, ``sklearn:digits``, ``sklearn:wine`` and ``sklearn:iris`` ship
inside scikit-learn. ``write_image_folder`` turns digits into the PNG folders a site would
have; ``write_dicom`` writes a minimal, valid DICOM file with a rescale slope and intercept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from client_agent.datasets.dataset import Dataset
from fedhe.errors import InvalidRequest

BUNDLED = ("breast_cancer", "digits", "wine", "iris")
# load_digits' pixels are 0..16 grey levels.
_DIGITS_MAX = 16.0


def load_bundled(name: str) -> Dataset:
    """One of scikit-learn's bundled datasets (rows x features)."""
    from sklearn import datasets as sk

    loaders = {
        "breast_cancer": sk.load_breast_cancer,
        "digits": sk.load_digits,
        "wine": sk.load_wine,
        "iris": sk.load_iris,
    }
    if name not in loaders:
        raise InvalidRequest(f"unknown bundled dataset {name!r}; choose one of {', '.join(BUNDLED)}")
    bunch = loaders[name]()
    return Dataset(np.asarray(bunch.data, dtype=np.float64), np.asarray(bunch.target, dtype=np.int64))


def digits_as_images() -> Dataset:
    """scikit-learn's digits as 8 x 8 x 1 images with 0-255 grey levels (as a PNG would hold them)."""
    digits = load_bundled("digits")
    images = np.round(digits.x.reshape(-1, 8, 8, 1) * (255.0 / _DIGITS_MAX))
    return Dataset(images.astype(np.float32), digits.y)


def write_image_folder(dataset: Dataset, root: Path, class_names: list[str]) -> list[Path]:
    """Write 8-bit images (rows x H x W x 1 or 3, values 0-255) as ``root/<class>/<row>.png``."""
    from PIL import Image

    written = []
    for row, (image, label) in enumerate(zip(dataset.x, dataset.y, strict=True)):
        folder = root / class_names[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.clip(np.round(image), 0, 255).astype(np.uint8)
        path = folder / f"{row:05d}.png"
        Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels).save(path)
        written.append(path)
    return written


def write_dicom(
    path: Path,
    stored: NDArray[Any],
    *,
    slope: float = 1.0,
    intercept: float = 0.0,
    photometric: str = "MONOCHROME2",
) -> Path:
    """A single-frame greyscale DICOM (CT image storage) of int16 ``stored`` values with a rescale."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = pydicom.Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = CTImageStorage
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.Modality = "CT"
    dataset.PatientID = "synthetic"
    pixels = np.asarray(stored, dtype=np.int16)
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = photometric
    dataset.BitsAllocated = 16
    dataset.BitsStored = 16
    dataset.HighBit = 15
    dataset.PixelRepresentation = 1
    dataset.RescaleSlope = f"{slope:g}"
    dataset.RescaleIntercept = f"{intercept:g}"
    dataset.PixelData = pixels.tobytes()
    dataset.save_as(path, enforce_file_format=True)
    return path
