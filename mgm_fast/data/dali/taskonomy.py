"""DALI adapter of the Taskonomy layout (:mod:`mgm_fast.data.taskonomy`: its task table, label,
depth, mask and scene rules are used here as they are)."""

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
from mgm_fast.data.sample import RGB8_SCALE, DataError
from mgm_fast.data.taskonomy import (
    DEPTH_UNITS_PER_METRE,
    MASK_TASKS,
    MASK_THRESHOLD,
    NUM_PLACES,
    NUM_SEG_RAW,
    REQUIRED,
    TASK_FIELDS,
    TaskonomyDataset,
    depth_zbuffer_valid,
    mask_file,
    scene_from_scores,
    segment_semantic_classes,
)


class TaskonomyAdapter(FormatAdapter):
    """Taskonomy views: rgb, segment_semantic (8-bit), depth_zbuffer (16-bit) and normal PNGs,
    class_scene .npy, and the optional mask_valid / mask PNG."""

    dataset_type = TaskonomyDataset
    fields = TASK_FIELDS

    def __init__(self, dataset):
        super().__init__(dataset)
        has = {any(t in r[3] for t in MASK_TASKS) for r in dataset.records}
        self.has_mask = has == {True}
        self.mixed_masks = len(has) > 1

    def check_supported(self) -> None:
        if self.mixed_masks:
            raise DataError(
                f"{self.ds.root}: some buildings have a validity-mask task and others not; the DALI loader "
                "needs it in all selected buildings or in none (choose with buildings=)"
            )

    def check_first(self, i: int) -> None:
        # DALI decodes to a fixed bit depth (8-bit labels, 16-bit depth) and would rescale a file
        # of the other depth; the PNG header says which it is (the dataset checks PIL's mode)
        files = self.all_files(i)
        for task, want in (("segment_semantic", 8), ("depth_zbuffer", 16)):
            if self.wants(*(("seg",) if task == "segment_semantic" else ("depth", "depth_mask"))):
                depth = _png_bit_depth(files[task])
                if depth != want:
                    self.fail(i, f"{task} is a {depth}-bit PNG; the DALI loader reads {want}-bit {task} PNGs")

    def all_files(self, i: int) -> dict[str, str]:
        paths = self.ds.files(i)
        out = {t: str(paths[t]) for t in REQUIRED}
        if self.ds.use_scenes:
            out["class_scene"] = str(paths["class_scene"])
        if self.has_mask:
            out["mask"] = str(mask_file(paths))
        return out

    def readers(self) -> dict[str, Modality]:
        types = dali_modules()[2]
        mods = {
            "rgb": Modality("image", types.RGB),
            # labels and depth are checked at full resolution in DALI: decoded on the host
            "segment_semantic": Modality("image", types.ANY_DATA, cpu_decode=True),
            "depth_zbuffer": Modality(
                "image", types.ANY_DATA, types.UINT16, cpu_decode=True, cast=types.INT32
            ),
            "normal": Modality("image", types.RGB),
        }
        if self.has_mask:
            mods["mask"] = Modality("image", types.RGB)
        if self.ds.use_scenes:
            mods["class_scene"] = Modality("npy", pad=False)  # (365,) scores, kept as read
        return mods

    def modalities(self) -> dict[str, Modality]:
        self.check_supported()
        return super().modalities()

    def dali_checks(self, name, node, ctx) -> dict:
        if name == "segment_semantic":
            return {"seg_flag": ctx.flag(node >= NUM_SEG_RAW)}
        if name == "class_scene" and ctx.npy_float["class_scene"]:
            return {"scene_flag": ctx.flag(ctx.nonfinite(node))}
        return {}

    def finish(self, out, ids, device) -> dict:
        ds = self.ds
        self.check_flags(
            out,
            ids,
            {
                "seg_flag": f"segment_semantic value outside 0..{NUM_SEG_RAW - 1}",
                "scene_flag": "class_scene has non-finite values",
            },
        )
        channels = {"segment_semantic": (1,), "depth_zbuffer": (1,), "normal": (3, 4)}
        present = [k for k in REQUIRED if k in out]
        for j, i in enumerate(ids):
            for name in present:
                c = int(out[f"{name}_shape"][j, 2])
                if name in channels and c not in channels[name]:
                    self.fail(i, f"{name} has {c} channel(s), expected {channels[name]}")
            if "mask" in out:
                for name in ("depth_zbuffer", "normal"):
                    if name in out and not torch.equal(out["mask_shape"][j, :2], out[f"{name}_shape"][j, :2]):
                        self.fail(i, f"mask differs in size from {name}")
        self.check_same_size({k: out[f"{k}_shape"] for k in present}, ids)

        res = {}
        mask = None
        if "mask" in out:
            m = to_device(self.resize(out["mask"], out["mask_shape"], ids, "mask"), device)
            mask = pil_luma(m) > MASK_THRESHOLD
        if self.wants("rgb"):
            res["rgb"] = self.colour_to_sample(out, device, scale=RGB8_SCALE)
        if self.wants("seg"):
            raw = self.resize(out["segment_semantic"], out["segment_semantic_shape"], ids, "segment_semantic")
            seg = segment_semantic_classes(raw[..., 0].to(torch.int64), ds.background_as_ignore)
            res["seg"] = to_device(seg, device)
        if self.wants("depth", "depth_mask"):
            z = self.resize(out["depth_zbuffer"], out["depth_zbuffer_shape"], ids, "depth_zbuffer")[..., 0]
            z = to_device(z, device)
            depth = z.to(torch.float32) / DEPTH_UNITS_PER_METRE  # exact: 16-bit / 512
            dmask = depth_zbuffer_valid(z, depth, ds.max_depth)
            if mask is not None:
                dmask &= mask
            res["depth"] = torch.where(dmask, depth, 0.0)[:, None]
            res["depth_mask"] = dmask[:, None]
        if self.wants("normal", "normal_mask"):
            raw = to_device(self.resize(out["normal"], out["normal_shape"], ids, "normal"), device)
            normal, nmask = decode_normals_8bit_batch(raw)
            if mask is not None:
                nmask = nmask & mask[:, None]
                normal = torch.where(nmask, normal, 0.0)
            res["normal"], res["normal_mask"] = normal, nmask
        if self.wants("scene"):
            if ds.use_scenes:
                probs, shp = out["class_scene"], out["class_scene_shape"]
                for j, i in enumerate(ids):
                    if sorted(int(v) for v in shp[j]) not in ([NUM_PLACES], [1, NUM_PLACES]):
                        self.fail(
                            i, f"class_scene has shape {tuple(shp[j].tolist())}, expected ({NUM_PLACES},)"
                        )
                scene = self._scenes(probs.reshape(len(ids), NUM_PLACES), ids)
            else:
                scene = torch.full((len(ids),), -1, dtype=torch.int64)
            res["scene"] = to_device(scene, device)
        return select_keys(res, self.keys, [self.sample_id(i) for i in ids])

    def _scenes(self, probs: torch.Tensor, ids: list[int]) -> torch.Tensor:
        """(B, 365) host scores -> int64 (B,) labels by the dataset's rule
        (:func:`~mgm_fast.data.taskonomy.scene_from_scores`); a view outside ``scene_classes``
        in "drop" mode (its file changed after indexing) goes to the dataset for its error."""
        scene = torch.from_numpy(scene_from_scores(probs.numpy(), self.ds.keep, self.ds.scene_other))
        dropped = torch.nonzero(scene < 0)
        if len(dropped):
            self.fail(ids[int(dropped[0, 0])], "scene is outside scene_classes (the file changed?)")
        return scene


def _png_bit_depth(path: str) -> int | None:
    """Bits per channel from a PNG's IHDR chunk (None when the file is not a PNG)."""
    try:
        with open(path, "rb") as f:
            head = f.read(26)
    except OSError:
        return None
    if len(head) < 26 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    return head[24]
