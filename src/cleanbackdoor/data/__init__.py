"""Image sets (uint8 arrays + labels) and the loaders of real on-disk formats.

Modules, one job each: :mod:`.imageset` (the ImageSet/Splits types), :mod:`.catalog` (dataset names ->
splits, format detection), :mod:`.digits`, :mod:`.cifar` (pickled batches, restricted unpickler), :mod:`.idx`
(MNIST IDX files), :mod:`.folder` (class-per-folder image trees), :mod:`.archive` (tar archives, the dataset
cache), :mod:`.subset` (class-balanced subsets); multi-label: :mod:`.voc` (PASCAL VOC XML), :mod:`.coco` (COCO
instances JSON), :mod:`.yolo` (YOLO label folders), :mod:`.mosaic` (composed mosaics of single-label images).
Nothing here downloads anything.
"""

from cleanbackdoor.data.archive import extract_archive
from cleanbackdoor.data.catalog import DATASETS, load_dataset, source_fingerprint
from cleanbackdoor.data.cifar import RestrictedUnpickler, load_cifar10, load_cifar100
from cleanbackdoor.data.coco import load_coco, load_coco_splits
from cleanbackdoor.data.digits import load_digits
from cleanbackdoor.data.folder import load_folder_splits, load_image_folder
from cleanbackdoor.data.idx import load_mnist_idx, read_idx
from cleanbackdoor.data.imageset import ImageSet, Splits
from cleanbackdoor.data.mosaic import compose_mosaics, mosaic_splits
from cleanbackdoor.data.subset import select_classes, stratified_subset
from cleanbackdoor.data.voc import load_voc, load_voc_splits
from cleanbackdoor.data.yolo import load_yolo, load_yolo_splits

__all__ = [
    "DATASETS",
    "ImageSet",
    "RestrictedUnpickler",
    "Splits",
    "compose_mosaics",
    "extract_archive",
    "load_cifar10",
    "load_cifar100",
    "load_coco",
    "load_coco_splits",
    "load_dataset",
    "load_digits",
    "load_folder_splits",
    "load_image_folder",
    "load_mnist_idx",
    "load_voc",
    "load_voc_splits",
    "load_yolo",
    "load_yolo_splits",
    "mosaic_splits",
    "read_idx",
    "select_classes",
    "source_fingerprint",
    "stratified_subset",
]
