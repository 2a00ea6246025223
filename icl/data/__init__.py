"""Benchmark datasets: readers for the text-to-image ReID annotation formats."""

from icl.data.readers import (
    FORMATS,
    DatasetError,
    FormatSpec,
    ImageRecord,
    ReidDataset,
    carve_val_split,
    detect_format,
    read_dataset,
)

__all__ = [
    "FORMATS",
    "DatasetError",
    "FormatSpec",
    "ImageRecord",
    "ReidDataset",
    "carve_val_split",
    "detect_format",
    "read_dataset",
]
