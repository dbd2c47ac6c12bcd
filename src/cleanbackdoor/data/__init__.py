"""Image sets (uint8 arrays + labels) and the loaders of real on-disk formats.

Modules, one job each: :mod:`.imageset` (the ImageSet/Splits types), :mod:`.catalog` (dataset names ->
splits, format detection), :mod:`.digits`, :mod:`.cifar` (pickled batches, restricted unpickler), :mod:`.idx`
(MNIST IDX files), :mod:`.folder` (class-per-folder image trees), :mod:`.archive` (tar archives, the dataset
cache), :mod:`.subset` (class-balanced subsets). Nothing here downloads anything.
"""

from cleanbackdoor.data.archive import extract_archive
from cleanbackdoor.data.catalog import DATASETS, load_dataset
from cleanbackdoor.data.cifar import RestrictedUnpickler, load_cifar10, load_cifar100
from cleanbackdoor.data.digits import load_digits
from cleanbackdoor.data.folder import load_folder_splits, load_image_folder
from cleanbackdoor.data.idx import load_mnist_idx, read_idx
from cleanbackdoor.data.imageset import ImageSet, Splits
from cleanbackdoor.data.subset import stratified_subset

__all__ = [
    "DATASETS",
    "ImageSet",
    "RestrictedUnpickler",
    "Splits",
    "extract_archive",
    "load_cifar10",
    "load_cifar100",
    "load_dataset",
    "load_digits",
    "load_folder_splits",
    "load_image_folder",
    "load_mnist_idx",
    "read_idx",
    "stratified_subset",
]
