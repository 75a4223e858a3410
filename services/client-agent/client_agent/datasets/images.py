"""Image-folder site data: one sub-folder per class, PNG/JPEG (Pillow) and DICOM (pydicom).

``root/<class>/<file>``: each sub-folder's name must be one of the job's classes (mapped like
any label, ``fedhe.data_schema``); files whose names start with a dot are skipped, and so,
with a warning, are the files operating systems leave beside images (``Thumbs.db``,
``desktop.ini``, ``.DS_Store``); any other file that is not ``.png``, ``.jpg``, ``.jpeg`` or
``.dcm`` is refused, as are files directly under ``root``. Every image becomes float32
H x W x C at the job's input shape:

* PNG/JPEG: EXIF orientation applied; 8-bit images keep their 0-255 values, 16-bit and
  float greyscale keep theirs; C = 1 takes luminance, C = 3 RGB (greyscale is repeated);
* DICOM: one frame; the modality LUT (RescaleSlope/RescaleIntercept) is applied, so CT
  pixels are Hounsfield units; MONOCHROME1 (where larger means darker) is negated so larger
  is always brighter; greyscale is repeated to 3 channels when C = 3;
* resized to H x W with bilinear interpolation on the float values (aspect ratio not kept).

No scaling to 0-1: the model's normalisation layer does that with the federation's pooled
statistics. Every unreadable image, unknown class folder and stray file is named in one
``DataProblem`` (``client_agent.datasets.problems``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from client_agent.datasets.dataset import Dataset
from client_agent.datasets.problems import DataProblems
from fedhe.data_schema import DataSchema
from fedhe.errors import DataProblem

PILLOW_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
DICOM_SUFFIXES = frozenset({".dcm"})
SYSTEM_FILES = frozenset({"thumbs.db", "desktop.ini", ".ds_store"})
"""Files Windows and macOS write into image folders on their own: skipped, with a warning."""


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
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels.processing import apply_modality_lut

    try:
        dataset = pydicom.dcmread(path)
    except InvalidDicomError as exc:
        # pydicom suggests force=True, which a site admin cannot pass and which would read garbage.
        raise DataProblem(
            f"{path}: not a DICOM file (no 'DICM' marker after the 128-byte preamble): export it again as a "
            "DICOM Part 10 file, or move it out of the folder"
        ) from exc
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


def _skipped(path: Path, relative: Path, problems: DataProblems) -> bool:
    """Hidden files are skipped quietly, the operating system's own files with a warning."""
    if path.name.lower() in SYSTEM_FILES:
        problems.warn(f"{path}: skipped (a file the operating system keeps, not an image)")
        return True
    return any(part.startswith(".") for part in relative.parts)


def load_image_folder(root: Path, schema: DataSchema, problems: DataProblems | None = None) -> Dataset:
    """Every image under ``root/<class>/`` as rows of the job's input shape (module docstring: rules)."""
    problems = problems if problems is not None else DataProblems()
    if not schema.is_image:
        raise problems.stop(
            f"{root} is an image folder, but the job's model takes inputs of shape {schema.input_shape}"
        )
    images: list[NDArray[Any]] = []
    labels: list[int] = []
    for entry in sorted(root.iterdir()):
        if _skipped(entry, entry.relative_to(root), problems):
            continue
        if not entry.is_dir():
            problems.add(f"{entry}: images must sit in one sub-folder per class, not directly in {root}")
            continue
        try:
            label = schema.classes.index(entry.name, f"{root}: sub-folder {entry.name!r}")
        except DataProblem as exc:
            problems.add(exc.message)
            continue
        for file in sorted(entry.rglob("*")):
            if file.is_dir() or _skipped(file, file.relative_to(entry), problems):
                continue
            try:
                images.append(read_image(file, schema.input_shape))
            except DataProblem as exc:
                problems.add(exc.message)
                continue
            labels.append(label)
    if not images and not problems.problems:
        problems.add(f"{root} holds no images")
    problems.raise_if_any()
    return Dataset(np.stack(images), np.asarray(labels, dtype=np.int64))
