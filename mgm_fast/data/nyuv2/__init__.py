"""NYUv2 labelled release -> a dataset ``python -m mgm_fast.train`` reads: ``prepare-nyuv2``.

``python -m mgm_fast.data prepare-nyuv2 nyu_depth_v2_labeled.mat --splits splits.mat --out DIR``

The conversion reads the labelled MATLAB file (:mod:`~mgm_fast.data.nyuv2.readers`), maps its
raw labels and scene types through the shipped tables (:mod:`~mgm_fast.data.nyuv2.tables`),
computes surface normals from the depth (:mod:`~mgm_fast.data.nyuv2.normals`) and writes the
samples in a layout the loaders read (:mod:`~mgm_fast.data.nyuv2.prepare`, which also documents
the crop, the resizing and the output). This package re-exports their public names.
"""

from mgm_fast.data.nyuv2.normals import KINECT_RGB, Intrinsics, compute_normals
from mgm_fast.data.nyuv2.prepare import (
    MANIFEST_NAME,
    TOOLBOX_CROP,
    format_prepare_summary,
    parse_size,
    prepare_nyuv2,
)
from mgm_fast.data.nyuv2.readers import LabelledFile, read_mat_v5, read_splits
from mgm_fast.data.nyuv2.tables import NYUTables, load_tables

__all__ = [
    "KINECT_RGB",
    "MANIFEST_NAME",
    "TOOLBOX_CROP",
    "Intrinsics",
    "LabelledFile",
    "NYUTables",
    "compute_normals",
    "format_prepare_summary",
    "load_tables",
    "parse_size",
    "prepare_nyuv2",
    "read_mat_v5",
    "read_splits",
]
