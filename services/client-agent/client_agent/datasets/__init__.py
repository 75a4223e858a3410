"""A site's data: loading it as the job describes, and splitting it (nothing here downloads).

::

    load_dataset(source, label_column, schema)   sklearn:NAME | file.csv | file.npz | image folder
    ├── tabular   CSV with named feature and label columns, NPZ (x, y)
    ├── images    one sub-folder per class: PNG, JPEG, DICOM, resized to the input shape
    └── bundled   scikit-learn's datasets; PNG folders and DICOM files made for tests
    schema        the job's contract (fedhe.data_schema): input shape, feature columns, class list
    dataset       Dataset, split, partition_iid, partition_dirichlet

Every problem with a site's files is named (the file and the row and column, or the image) in
one ``fedhe.errors.DataProblem`` (code ``data_problem``) that lists them all
(``problems.DataProblems``), so a site admin fixes everything in one pass.
"""

from client_agent.datasets.bundled import BUNDLED, digits_as_images, load_bundled, write_dicom, write_image_folder
from client_agent.datasets.dataset import Dataset, partition_dirichlet, partition_iid, split
from client_agent.datasets.images import load_image_folder, read_image
from client_agent.datasets.loading import load_dataset
from client_agent.datasets.problems import DataProblems
from client_agent.datasets.tabular import load_csv, load_npz, save_csv
from fedhe.data_schema import ClassList, DataSchema

__all__ = [
    "BUNDLED",
    "ClassList",
    "DataProblems",
    "DataSchema",
    "Dataset",
    "digits_as_images",
    "load_bundled",
    "load_csv",
    "load_dataset",
    "load_image_folder",
    "load_npz",
    "partition_dirichlet",
    "partition_iid",
    "read_image",
    "save_csv",
    "split",
    "write_dicom",
    "write_image_folder",
]
