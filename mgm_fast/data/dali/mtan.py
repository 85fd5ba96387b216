"""DALI adapter of MTAN's npy layout (:mod:`mgm_fast.data.mtan`: its modality table and image range
are used here as they are)."""

from __future__ import annotations

import numpy as np
import torch

from mgm_fast.data.dali.adapter import (
    FormatAdapter,
    Modality,
    normalise_normals_batch,
    select_keys,
    to_device,
)
from mgm_fast.data.mtan import IMAGE_RANGE_TOL, MODALITY_FIELDS, MTANDataset
from mgm_fast.data.sample import labels_outside


class MTANAdapter(FormatAdapter):
    """MTAN npy split: image (H, W, 3) in [0, 1], label (H, W[, 1]), depth (H, W[, 1]), normal (H, W, 3)."""

    colour = "image"
    dataset_type = MTANDataset
    fields = MODALITY_FIELDS

    def readers(self) -> dict[str, Modality]:
        return {name: Modality("npy") for name in self.fields}

    def modalities(self) -> dict[str, Modality]:
        # the dataset checks every file against the image's size, so the image is always read
        return {self.colour: Modality("npy"), **super().modalities()}

    def dali_checks(self, name, node, ctx) -> dict:
        fn, dmath, types = ctx.fn, ctx.dmath, ctx.types
        if name == "image":
            x = fn.cast(node, dtype=types.FLOAT)
            return {
                "image_flag": ctx.flag(ctx.nonfinite(x) | (x < -IMAGE_RANGE_TOL) | (x > 1 + IMAGE_RANGE_TOL))
            }
        if name == "label":
            bad = ctx.nonfinite(node) | (dmath.floor(node) != node) if ctx.npy_float["label"] else None
            v = fn.cast(node, dtype=types.INT64)
            out = labels_outside(v, int(self.ds.num_seg_classes))
            return {"label_flag": ctx.flag(out if bad is None else bad | out)}
        if name == "depth" and ctx.npy_float["depth"] and not self.ds.allow_invalid_depth:
            d = fn.cast(node, dtype=types.FLOAT)
            return {"depth_flag": ctx.flag(ctx.nonfinite(d) | (d < 0))}
        if name == "normal" and ctx.npy_float["normal"]:
            return {"normal_flag": ctx.flag(ctx.nonfinite(node))}
        return {}

    def dali_cast(self, name, mod, ctx):
        if name == "label":  # checked above: integral and in range
            return ctx.types.INT32
        if name in ("depth", "normal") and ctx.npy_float[name]:  # the dataset works in float32
            return ctx.types.FLOAT
        return None

    def dali_colour(self, node, ctx, gpu):
        # the dataset resizes np.clip(image, 0, 1) in float32; fn.resize needs an HWC layout
        x = ctx.dmath.clamp(ctx.fn.cast(node, dtype=ctx.types.FLOAT), 0.0, 1.0)
        x = ctx.fn.reshape(x, layout="HWC")
        return x.gpu() if gpu else x

    def finish(self, out, ids, device) -> dict:
        ds = self.ds
        self.check_flags(
            out,
            ids,
            {
                "image_flag": "image values outside [0, 1] or non-finite",
                "label_flag": "label map out of range or not integral",
                "depth_flag": "depth has NaN, inf or negative values",
                "normal_flag": "normals have non-finite values",
            },
        )
        img = out["image_shape"]
        hws = {}
        if "label" in out:
            label, hws["label"] = self.squeeze_2d(
                out["label"], out["label_shape"], ids, "label map", first_ok=False
            )
        if "depth" in out:
            if not out["depth"].dtype.is_floating_point:
                self.fail(ids[0], f"depth has dtype {out['depth'].dtype}, expected float")
            depth, hws["depth"] = self.squeeze_2d(
                out["depth"], out["depth_shape"], ids, "depth", first_ok=False
            )
        if "normal" in out:
            if not out["normal"].dtype.is_floating_point:
                self.fail(ids[0], f"normals have dtype {out['normal'].dtype}, expected float")
            hws["normal"] = out["normal_shape"]
        for j, i in enumerate(ids):
            if img.shape[1] != 3 or int(img[j, 2]) != 3:
                self.fail(i, "image is not (H, W, 3)")
            if "normal" in out and (out["normal_shape"].shape[1] != 3 or int(out["normal_shape"][j, 2]) != 3):
                self.fail(i, "normals are not (H, W, 3)")
            if not all(torch.equal(hw[j, :2], img[j, :2]) for hw in hws.values()):
                self.fail(i, "label / depth / normal size differs from the image")

        res = {}
        if self.wants("rgb"):
            res["rgb"] = self.colour_to_sample(out, device, scale=1.0)
        if self.wants("seg"):
            res["seg"] = to_device(self.resize(label, hws["label"], ids, "label").to(torch.int64), device)
        if self.wants("depth", "depth_mask"):
            d = to_device(self.resize(depth, hws["depth"], ids, "depth"), device).to(torch.float32)
            dmask = torch.isfinite(d) & (d > 0)
            res["depth"], res["depth_mask"] = torch.where(dmask, d, 0.0)[:, None], dmask[:, None]
        if self.wants("normal", "normal_mask"):
            n = to_device(self.resize(out["normal"], hws["normal"], ids, "normal"), device).to(torch.float32)
            res["normal"], res["normal_mask"] = normalise_normals_batch(n)
        if self.wants("scene"):
            if ds.scene_labels is None:
                scene = torch.full((len(ids),), -1, dtype=torch.int64)
            else:
                scene = torch.from_numpy(ds.scene_labels[np.asarray(ids, dtype=np.int64)])
            res["scene"] = to_device(scene, device)
        return select_keys(res, self.keys, [self.sample_id(i) for i in ids])
