"""Data sets, label maps and robust image decoding (see ``datasets.py`` for the on-disk layouts; the per-data-set
label-map constructors are in ``labelmaps.py``)."""

from __future__ import annotations

from transfgu.data.datasets import (
    DATASETS,
    DatasetError,
    DatasetSpec,
    ImageRecord,
    RecordList,
    dataset_info,
    dataset_spec,
    list_records,
    load_sample,
)
from transfgu.data.io import DecodeError, load_label, load_rgb, resize_image, resize_label
from transfgu.data.labelmaps import IGNORE_INDEX, LabelMap, LabelMapError

__all__ = [
    "DATASETS",
    "IGNORE_INDEX",
    "DatasetError",
    "DatasetSpec",
    "DecodeError",
    "ImageRecord",
    "LabelMap",
    "LabelMapError",
    "RecordList",
    "dataset_info",
    "dataset_spec",
    "list_records",
    "load_label",
    "load_rgb",
    "load_sample",
    "resize_image",
    "resize_label",
]
