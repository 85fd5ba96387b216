"""DALI adapter of the released folder layout (:mod:`mgm_fast.data.folder`: its modality table,
label rule and mask threshold are used here as they are)."""

from __future__ import annotations

import torch

from mgm_fast.data.dali.adapter import (
    FormatAdapter,
    Modality,
    dali_modules,
    decode_normals_8bit_batch,
    pil_luma,
    select_keys,
    to_device,
)
from mgm_fast.data.folder import MASK_THRESHOLD, MODALITY_FIELDS, FolderDataset, apply_label_offset
from mgm_fast.data.sample import RGB8_SCALE, labels_outside


class FolderAdapter(FormatAdapter):
    """Released folder layout: rgb/ PNG|JPEG, ss/ and de/ .npy, nm|sn/ PNG, optional msk/ PNG."""

    dataset_type = FolderDataset
    fields = MODALITY_FIELDS

    def readers(self) -> dict[str, Modality]:
        types = dali_modules()[2]
        mods = {"rgb": Modality("image", types.RGB), "normals": Modality("image", types.RGB)}
        if self.ds.has_mask:
            mods["msk"] = Modality("image", types.RGB)  # PIL's luma is applied in torch, exactly
        mods["ss"] = Modality("npy")
        mods["de"] = Modality("npy")
        return mods

    def dali_checks(self, name, node, ctx) -> dict:
        fn, dmath, types = ctx.fn, ctx.dmath, ctx.types
        if name == "ss":  # decode_labels + check_labels of the dataset, at the file's resolution
            bad = None
            if ctx.npy_float["ss"]:
                bad = ctx.nonfinite(node) | (dmath.floor(node) != node)
            v = fn.cast(node, dtype=types.INT64)
            out = labels_outside(v + int(self.ds.label_offset), int(self.ds.num_seg_classes))
            if self.ds.ignore_value is not None:
                out = out & (v != int(self.ds.ignore_value))
            return {"ss_flag": ctx.flag(out if bad is None else bad | out)}
        if name == "de" and ctx.npy_float["de"] and not self.ds.allow_invalid_depth:
            d = fn.cast(node, dtype=types.FLOAT)  # sanitize_depth checks the float32 values
            return {"de_flag": ctx.flag(ctx.nonfinite(d) | (d < 0))}
        return {}

    def dali_cast(self, name, mod, ctx):
        # labels are checked above (in range or the ignore value): int32 holds them; depth
        # becomes float32 as in sanitize_depth (an integer depth file is left for the error)
        if name == "ss":
            return ctx.types.INT32
        if name == "de" and ctx.npy_float["de"]:
            return ctx.types.FLOAT
        return None

    def finish(self, out, ids, device) -> dict:
        ds = self.ds
        self.check_flags(
            out, ids, {"ss_flag": "label out of range", "de_flag": "depth has NaN, inf or negative values"}
        )
        hws = {}
        if "rgb" in out:
            hws["rgb"] = out["rgb_shape"]
        if "ss" in out:
            ss, hws["ss"] = self.squeeze_2d(out["ss"], out["ss_shape"], ids, "label map")
        if "de" in out:
            if not out["de"].dtype.is_floating_point:
                self.fail(ids[0], f"depth has dtype {out['de'].dtype}; expected float metres")
            de, hws["de"] = self.squeeze_2d(out["de"], out["de_shape"], ids, "depth map")
        if "normals" in out:
            hws["normals"] = out["normals_shape"]
            for j, i in enumerate(ids):
                c = int(out["normals_shape"][j, 2])
                if c not in (3, 4):
                    self.fail(i, f"normal map has {c} channel(s); expected 8-bit RGB")
                if "msk" in out and not torch.equal(out["msk_shape"][j, :2], out["normals_shape"][j, :2]):
                    self.fail(i, "mask and normal map differ in size")
        self.check_same_size(hws, ids)

        res = {}
        if self.wants("rgb"):
            res["rgb"] = self.colour_to_sample(out, device, scale=RGB8_SCALE)
        if self.wants("seg"):  # host labels: gather, then offset / ignore on the output pixels
            raw = self.resize(ss, hws["ss"], ids, "ss").to(torch.int64)
            res["seg"] = to_device(apply_label_offset(raw, ds.label_offset, ds.ignore_value), device)
        if self.wants("depth", "depth_mask"):
            depth = to_device(self.resize(de, hws["de"], ids, "de"), device).to(torch.float32)
            dmask = torch.isfinite(depth) & (depth > 0)
            res["depth"] = torch.where(dmask, depth, 0.0)[:, None]
            res["depth_mask"] = dmask[:, None]
        if self.wants("normal", "normal_mask"):
            raw = to_device(self.resize(out["normals"], out["normals_shape"], ids, "normals"), device)
            normal, nmask = decode_normals_8bit_batch(raw)
            if "msk" in out:
                m = to_device(self.resize(out["msk"], out["msk_shape"], ids, "msk"), device)
                nmask = nmask & (pil_luma(m) > MASK_THRESHOLD)[:, None]
                normal = torch.where(nmask, normal, 0.0)
            res["normal"], res["normal_mask"] = normal, nmask
        if self.wants("scene"):
            res["scene"] = to_device(torch.tensor([ds.records[i][0] for i in ids], dtype=torch.int64), device)
        return select_keys(res, self.keys, [self.sample_id(i) for i in ids])
