"""Loading site data as the job describes it (CSV, NPZ, image folders, DICOM) and splitting it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from client_agent.datasets import (
    ClassList,
    DataProblems,
    DataSchema,
    Dataset,
    digits_as_images,
    load_bundled,
    load_dataset,
    partition_dirichlet,
    partition_iid,
    save_csv,
    split,
    write_dicom,
    write_image_folder,
)
from fedhe.errors import DataProblem, InvalidRequest

DIGIT_NAMES = [str(d) for d in range(10)]


def _tabular(features: list[str], names: list[str] | None = None, count: int = 2) -> DataSchema:
    return DataSchema(
        input_shape=(len(features),),
        classes=ClassList(count, None if names is None else tuple(names)),
        feature_columns=tuple(features),
    )


def _images(shape: tuple[int, int, int], names: list[str]) -> DataSchema:
    return DataSchema(input_shape=shape, classes=ClassList(len(names), tuple(names)))


def test_csv_and_npz_round_trip(tmp_path: Path) -> None:
    data = Dataset(np.arange(12, dtype=float).reshape(4, 3) / 7, np.array([0, 1, 1, 0]))
    save_csv(data, tmp_path / "d.csv", label_column="outcome")
    loaded = load_dataset(str(tmp_path / "d.csv"), label_column="outcome")
    np.testing.assert_array_equal(loaded.x, data.x)
    np.testing.assert_array_equal(loaded.y, data.y)
    np.savez(tmp_path / "d.npz", x=data.x, y=data.y)
    np.testing.assert_array_equal(load_dataset(str(tmp_path / "d.npz")).x, data.x)


def test_csv_reads_the_jobs_feature_columns_in_the_jobs_order_and_maps_named_labels(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text(
        "patient_id,radius,diagnosis,texture,admitted\n"
        "p1,14.2,malignant,20.1,2024-01-02\n"
        "\n"
        "p2,11.0,benign,15.5,2024-02-03\n"
    )
    schema = _tabular(["texture", "radius"], ["benign", "malignant"])
    data = load_dataset(str(tmp_path / "d.csv"), label_column="diagnosis", schema=schema)
    np.testing.assert_array_equal(data.x, [[20.1, 14.2], [15.5, 11.0]])
    np.testing.assert_array_equal(data.y, [1, 0])


def test_integer_labels_match_integer_class_names(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text("a,class\n1,4\n2,2.0\n3, 4 \n")
    data = load_dataset(str(tmp_path / "d.csv"), label_column="class", schema=_tabular(["a"], ["2", "4"]))
    np.testing.assert_array_equal(data.y, [1, 0, 1])


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("a,b,label\n1,2,no\n3,,maybe\n", r"d\.csv: row 3, column 'b': missing value"),
        ("a,b,label\n1,NA,no\n", r"row 2, column 'b': missing value"),
        ("a,b,label\n1,2,no\n1,x7,no\n", r"row 3, column 'b': 'x7' is not a finite number"),
        ("a,b,label\n1,inf,no\n", r"row 2, column 'b': 'inf' is not a finite number"),
        ("a,b,label\n1,2,yes\n", r"row 2, column 'label': label 'yes' is not one of the job's classes \(no, maybe\)"),
        ("a,b,label\n1,2,\n", r"row 2, column 'label': missing label"),
        ("a,b,label\n1,2\n", r"row 2 has 2 cells, the header 3"),
        ("a,label\n1,no\n", r"lacks the job's feature columns b"),
        ("a,b,b,label\n1,2,3,no\n", r"column names appear more than once: b"),
        ("a,b\n1,2\n", r"has no label column 'label' \(columns: a, b\)"),
        ("a,b,label\n", r"has no data rows"),
    ],
)
def test_csv_problems_name_the_file_row_and_column(tmp_path: Path, body: str, message: str) -> None:
    (tmp_path / "d.csv").write_text(body)
    with pytest.raises(DataProblem, match=message) as caught:
        load_dataset(str(tmp_path / "d.csv"), schema=_tabular(["a", "b"], ["no", "maybe"]))
    assert caught.value.code == "data_problem"


def test_without_class_names_labels_are_indices_below_num_classes(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text("a,label\n1,0\n2,3\n")
    with pytest.raises(DataProblem, match=r"row 3, column 'label': label '3' is not a class index 0\.\.2"):
        load_dataset(str(tmp_path / "d.csv"), schema=_tabular(["a"], None, count=3))


def test_bad_sources_get_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DataProblem, match="does not exist"):
        load_dataset(str(tmp_path / "missing.csv"))
    with pytest.raises(InvalidRequest, match="unknown bundled dataset"):
        load_dataset("sklearn:mnist")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataProblem, match="unsupported data file"):
        load_dataset(str(tmp_path / "d.txt"))
    with pytest.raises(DataProblem, match="needs the job's input shape"):
        load_dataset(str(tmp_path))


def test_npz_maps_string_labels_and_adds_the_channel_axis(tmp_path: Path) -> None:
    x = np.arange(2 * 8 * 8, dtype=np.uint8).reshape(2, 8, 8)
    np.savez(tmp_path / "d.npz", x=x, y=np.array(["cat", "dog"]))
    data = load_dataset(str(tmp_path / "d.npz"), schema=_images((8, 8, 1), ["dog", "cat"]))
    assert data.x.shape == (2, 8, 8, 1)
    np.testing.assert_array_equal(data.y, [1, 0])
    with pytest.raises(DataProblem, match=r"x rows have shape \(8, 8\), the job's model expects \(4, 4, 1\)"):
        load_dataset(str(tmp_path / "d.npz"), schema=_images((4, 4, 1), ["dog", "cat"]))
    np.savez(tmp_path / "e.npz", x=np.array([[1.0], [np.nan]]), y=np.array([0, 1]))
    with pytest.raises(DataProblem, match=r"e\.npz: x row 1 has a missing or infinite value"):
        load_dataset(str(tmp_path / "e.npz"), schema=_tabular(["a"]))
    np.savez(tmp_path / "f.npz", a=np.zeros(2))
    with pytest.raises(DataProblem, match="must hold arrays named 'x' and 'y'"):
        load_dataset(str(tmp_path / "f.npz"))


def test_digits_as_a_png_folder_load_back_exactly(tmp_path: Path) -> None:
    digits = digits_as_images()
    sample = digits.subset(np.arange(40))
    write_image_folder(sample, tmp_path / "digits", DIGIT_NAMES)
    loaded = load_dataset(str(tmp_path / "digits"), schema=_images((8, 8, 1), DIGIT_NAMES))
    order = np.lexsort((np.arange(40), sample.y))  # the loader walks class folders in name order
    np.testing.assert_array_equal(loaded.x, sample.x[order])
    np.testing.assert_array_equal(loaded.y, sample.y[order])
    bigger = load_dataset(str(tmp_path / "digits"), schema=_images((16, 12, 3), DIGIT_NAMES))
    assert bigger.x.shape == (40, 16, 12, 3)
    assert bigger.x.dtype == np.float32
    np.testing.assert_array_equal(bigger.x[..., 0], bigger.x[..., 2])  # greyscale repeated


def test_jpeg_rgb_images_are_read_and_reduced_to_the_jobs_channels(tmp_path: Path) -> None:
    from PIL import Image

    (tmp_path / "imgs" / "red").mkdir(parents=True)
    Image.new("RGB", (10, 6), (200, 10, 10)).save(tmp_path / "imgs" / "red" / "a.JPG")
    (tmp_path / "imgs" / ".cache").mkdir()
    (tmp_path / "imgs" / "red" / ".DS_Store").write_text("skipped")
    rgb = load_dataset(str(tmp_path / "imgs"), schema=_images((3, 5, 3), ["red", "blue"]))
    assert rgb.x.shape == (1, 3, 5, 3)
    assert rgb.x[0, 1, 2, 0] == pytest.approx(200, abs=6)
    grey = load_dataset(str(tmp_path / "imgs"), schema=_images((6, 10, 1), ["red", "blue"]))
    assert grey.x[0, 0, 0, 0] == pytest.approx(0.299 * 200 + 0.587 * 10 + 0.114 * 10, abs=6)


def test_image_folder_problems_name_the_folder_or_file(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    (root / "zebra").mkdir(parents=True)
    with pytest.raises(DataProblem, match=r"sub-folder 'zebra': label 'zebra' is not one of the job's classes"):
        load_dataset(str(root), schema=_images((4, 4, 1), ["cat", "dog"]))
    (root / "zebra").rmdir()
    (root / "cat").mkdir()
    (root / "cat" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataProblem, match=r"broken\.png: cannot read image"):
        load_dataset(str(root), schema=_images((4, 4, 1), ["cat", "dog"]))
    (root / "cat" / "broken.png").unlink()
    (root / "cat" / "notes.txt").write_text("x")
    with pytest.raises(DataProblem, match=r"notes\.txt: not an image fedhe reads"):
        load_dataset(str(root), schema=_images((4, 4, 1), ["cat", "dog"]))
    (root / "cat" / "notes.txt").unlink()
    (root / "stray.png").write_bytes(b"")
    with pytest.raises(DataProblem, match=r"stray\.png: images must sit in one sub-folder per class"):
        load_dataset(str(root), schema=_images((4, 4, 1), ["cat", "dog"]))
    (root / "stray.png").unlink()
    with pytest.raises(DataProblem, match="holds no images"):
        load_dataset(str(root), schema=_images((4, 4, 1), ["cat", "dog"]))
    with pytest.raises(DataProblem, match="is an image folder, but the job's model takes inputs of shape"):
        load_dataset(str(root), schema=_tabular(["a"]))


def test_dicom_pixels_are_rescaled_and_monochrome1_is_negated(tmp_path: Path) -> None:
    stored = np.arange(-8, 8, dtype=np.int16).reshape(4, 4) * 100
    (tmp_path / "ct" / "lesion").mkdir(parents=True)
    write_dicom(tmp_path / "ct" / "lesion" / "a.dcm", stored, slope=2.0, intercept=-1024.0)
    write_dicom(tmp_path / "ct" / "lesion" / "b.dcm", stored, slope=1.0, intercept=0.0, photometric="MONOCHROME1")
    data = load_dataset(str(tmp_path / "ct"), schema=_images((4, 4, 3), ["healthy", "lesion"]))
    np.testing.assert_array_equal(data.y, [1, 1])
    np.testing.assert_allclose(data.x[0, :, :, 1], stored * 2.0 - 1024.0)
    np.testing.assert_allclose(data.x[1, :, :, 0], -stored)
    resized = load_dataset(str(tmp_path / "ct"), schema=_images((8, 2, 1), ["healthy", "lesion"]))
    assert resized.x.shape == (2, 8, 2, 1)
    assert resized.x[0].min() >= stored.min() * 2 - 1024
    assert resized.x[0].max() <= stored.max() * 2 - 1024


def test_iid_partition_covers_every_row_once_in_equal_parts() -> None:
    parts = partition_iid(101, 4, seed=0)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(101))
    assert sorted(len(p) for p in parts) == [25, 25, 25, 26]
    with pytest.raises(InvalidRequest):
        partition_iid(3, 4, seed=0)


def test_dirichlet_partition_covers_every_row_once_and_is_skewed() -> None:
    y = load_bundled("breast_cancer").y
    parts = partition_dirichlet(y, 3, alpha=0.3, seed=0, min_size=20)
    merged = np.sort(np.concatenate(parts))
    np.testing.assert_array_equal(merged, np.arange(len(y)))
    shares = [np.mean(y[p]) for p in parts]
    assert max(shares) - min(shares) > 0.2
    assert min(len(p) for p in parts) >= 20


def test_split_holds_out_the_fraction() -> None:
    data = load_bundled("iris")
    rest, held = split(data, 0.2, seed=1)
    assert (len(rest), len(held)) == (120, 30)


WINE = _tabular(["alcohol", "malic_acid", "ash"], ["barolo", "grignolino", "barbera"], count=3)


def test_every_problem_in_a_csv_is_listed_at_once(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text(
        "alcohol,malic_acid,ash,cultivar\n"
        "14.2,1.7,2.4,barolo\n"
        "NaN,1.8,2.1,barolo\n"
        "12.3,,2.0,grignolino\n"
        "13.1,2.2,abc,merlot\n"
        "13.0,2.2\n"
    )
    with pytest.raises(DataProblem) as caught:
        load_dataset(str(tmp_path / "d.csv"), "cultivar", WINE)
    assert caught.value.detail["problems"] == [
        f"{tmp_path / 'd.csv'}: row 3, column 'alcohol': missing value",
        f"{tmp_path / 'd.csv'}: row 4, column 'malic_acid': missing value",
        f"{tmp_path / 'd.csv'}: row 5, column 'ash': 'abc' is not a finite number",
        f"{tmp_path / 'd.csv'}: row 5, column 'cultivar': label 'merlot' is not one of the job's classes "
        "(barolo, grignolino, barbera)",
        f"{tmp_path / 'd.csv'}: row 6 has 2 cells, the header 4",
    ]
    assert caught.value.message.startswith("5 problems in the site's data:\n  - ")


def test_a_semicolon_csv_with_decimal_commas_and_its_own_column_names_loads_with_a_warning(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text(
        "cultivar;sample_date;Alcohol %;malic_acid;ash\nbarolo;2020-01-01;14,2;1,7;2,4\nbarbera;2020-01-02;13;1,8;2\n",
        encoding="utf-8",
    )
    with pytest.raises(DataProblem, match=r"lacks the job's feature columns alcohol \(mapped to 'Alcohol'\)"):
        load_dataset(str(tmp_path / "d.csv"), "cultivar", WINE, columns={"alcohol": "Alcohol"})
    problems = DataProblems()
    data = load_dataset(str(tmp_path / "d.csv"), "cultivar", WINE, columns={"alcohol": "Alcohol %"}, problems=problems)
    np.testing.assert_array_equal(data.x, [[14.2, 1.7, 2.4], [13.0, 1.8, 2.0]])
    np.testing.assert_array_equal(data.y, [0, 2])
    assert problems.warnings == [
        f"{tmp_path / 'd.csv'}: columns are separated by semicolons; decimal commas read as points"
    ]


def test_a_csv_that_is_not_utf8_names_the_line_and_the_fix(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_bytes(
        "alcohol,malic_acid,ash,cultivar\n14.2,1.7,2.4,barolo\n1,2,3,gri\xf1olino\n".encode("latin-1")
    )
    with pytest.raises(DataProblem, match=r"line 3 is not UTF-8 text \(byte 0xf1\): save the file as UTF-8"):
        load_dataset(str(tmp_path / "d.csv"), "cultivar", WINE)


def test_system_files_beside_images_are_skipped_with_a_warning_and_every_bad_image_is_named(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    write_image_folder(digits_as_images().subset(np.arange(6)), root, DIGIT_NAMES)
    (root / "Thumbs.db").write_bytes(b"\x00" * 64)
    (root / "0" / "Thumbs.db").write_bytes(b"\x00" * 64)
    (root / "1" / ".DS_Store").write_bytes(b"\x00" * 64)
    problems = DataProblems()
    data = load_dataset(str(root), schema=_images((8, 8, 1), DIGIT_NAMES), problems=problems)
    assert len(data) == 6
    assert problems.warnings == [
        f"{root / name}: skipped (a file the operating system keeps, not an image)"
        for name in ("0/Thumbs.db", "1/.DS_Store", "Thumbs.db")
    ]
    (root / "0" / "broken.png").write_bytes(b"\x89PNG not really")
    (root / "2" / "scan.dcm").write_bytes(b"\x00" * 200)
    (root / "zebra").mkdir()
    with pytest.raises(DataProblem) as caught:
        load_dataset(str(root), schema=_images((8, 8, 1), DIGIT_NAMES))
    listed = caught.value.detail["problems"]
    assert len(listed) == 3
    assert listed[0].startswith(f"{root / '0' / 'broken.png'}: cannot read image")
    assert listed[1] == (
        f"{root / '2' / 'scan.dcm'}: not a DICOM file (no 'DICM' marker after the 128-byte preamble): export it "
        "again as a DICOM Part 10 file, or move it out of the folder"
    )
    assert "force" not in caught.value.message
    assert listed[2].endswith(
        "sub-folder 'zebra': label 'zebra' is not one of the job's classes (0, 1, 2, 3, 4, 5, 6, 7, 8, 9)"
    )
