"""Image-folder site data: one sub-folder per class, PNG/JPEG (Pillow) and DICOM (pydicom).

``root/<class>/<file>``: each sub-folder's name must be one of the job's classes (mapped like
any label, ``fedhe.datasets.schema``); files whose names start with a dot are skipped, any
other file that is not ``.png``, ``.jpg``, ``.jpeg`` or ``.dcm`` is refused, as are files
directly under ``root``. Every image becomes float32 H x W x C at the job's input shape:

* PNG/JPEG: EXIF orientation applied; 8-bit images keep their 0-255 values, 16-bit and
  float greyscale keep theirs; C = 1 takes luminance, C = 3 RGB (greyscale is repeated);
* DICOM: one frame; the modality LUT (RescaleSlope/RescaleIntercept) is applied, so CT
  pixels are Hounsfield units; MONOCHROME1 (where larger means darker) is negated so larger
  is always brighter; greyscale is repeated to 3 channels when C = 3;
* resized to H x W with bilinear interpolation on the float values (aspect ratio not kept).

No scaling to 0-1: the model's normalisation layer does that with the federation's pooled
statistics. Any unreadable image raises one ``DataProblem`` naming the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedhe.datasets.dataset import Dataset
from fedhe.datasets.schema import DataSchema
from fedhe.errors import DataProblem

PILLOW_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
DICOM_SUFFIXES = frozenset({".dcm"})


def _pillow_pixels(path: Path, channels: int) -> NDArray[Any]:
    from PIL import Image, ImageOps

    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened)
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            grey: NDArray[Any] = np.asarray(image, dtype=np.float32)
            return grey[..., np.newaxis]
        converted = image.convert("L" if channels == 1 else "RGB")
        pixels: NDArray[Any] = np.asarray(converted, dtype=np.float32)
    return pixels[..., np.newaxis] if pixels.ndim == 2 else pixels


def _dicom_pixels(path: Path) -> NDArray[Any]:
    import pydicom
    from pydicom.pixels.processing import apply_modality_lut

    dataset = pydicom.dcmread(path)
    if int(getattr(dataset, "NumberOfFrames", 1) or 1) != 1:
        raise DataProblem(f"{path}: multi-frame DICOM is not supported; export one frame per file")
    pixels: NDArray[Any] = np.asarray(apply_modality_lut(dataset.pixel_array, dataset), dtype=np.float32)
    if getattr(dataset, "PhotometricInterpretation", "") == "MONOCHROME1":
        pixels = -pixels
    return pixels[..., np.newaxis] if pixels.ndim == 2 else pixels


def _resized(pixels: NDArray[Any], shape: tuple[int, ...]) -> NDArray[Any]:
    """H x W x C float32 at ``shape``, channels repeated from greyscale or reduced to luminance."""
    from PIL import Image

    height, width, channels = shape
    if pixels.shape[2] == 1 and channels == 3:
        pixels = np.repeat(pixels, 3, axis=2)
    elif pixels.shape[2] == 3 and channels == 1:
        pixels = (pixels @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[..., np.newaxis]
    elif pixels.shape[2] != channels:
        raise ValueError(f"has {pixels.shape[2]} channels, the job's model takes {channels}")
    if pixels.shape[:2] == (height, width):
        return pixels.astype(np.float32)
    planes = [
        np.asarray(Image.fromarray(np.ascontiguousarray(pixels[:, :, c]), mode="F").resize((width, height)))
        for c in range(channels)
    ]
    resized: NDArray[Any] = np.stack(planes, axis=2).astype(np.float32)
    return resized


def read_image(path: Path, shape: tuple[int, ...]) -> NDArray[Any]:
    """One image file as float32 at ``shape`` (H, W, C); any failure names the file."""
    suffix = path.suffix.lower()
    try:
        if suffix in DICOM_SUFFIXES:
            pixels = _dicom_pixels(path)
        elif suffix in PILLOW_SUFFIXES:
            pixels = _pillow_pixels(path, shape[2])
        else:
            raise DataProblem(f"{path}: not an image fedhe reads (use .png, .jpg, .jpeg or .dcm)")
        image = _resized(pixels, shape)
    except DataProblem:
        raise
    except Exception as exc:  # Pillow and pydicom raise many types for a bad file; all mean the same here
        raise DataProblem(f"{path}: cannot read image: {exc}") from exc
    if not np.isfinite(image).all():
        raise DataProblem(f"{path}: image has missing or infinite pixel values")
    return image


def load_image_folder(root: Path, schema: DataSchema) -> Dataset:
    """Every image under ``root/<class>/`` as rows of the job's input shape (module docstring: rules)."""
    if not schema.is_image:
        raise DataProblem(f"{root} is an image folder, but the job's model takes inputs of shape {schema.input_shape}")
    images: list[NDArray[Any]] = []
    labels: list[int] = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            raise DataProblem(f"{entry}: images must sit in one sub-folder per class, not directly in {root}")
        label = schema.classes.index(entry.name, f"{root}: sub-folder {entry.name!r}")
        for file in sorted(entry.rglob("*")):
            if file.is_dir() or any(part.startswith(".") for part in file.relative_to(entry).parts):
                continue
            images.append(read_image(file, schema.input_shape))
            labels.append(label)
    if not images:
        raise DataProblem(f"{root} holds no images")
    return Dataset(np.stack(images), np.asarray(labels, dtype=np.int64))
