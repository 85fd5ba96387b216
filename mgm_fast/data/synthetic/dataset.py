"""The synthetic dataset: :class:`SyntheticScenes`, procedural scenes in the sample format
(formats and determinism in :mod:`mgm_fast.data.synthetic`)."""

from __future__ import annotations

import numpy as np
import torch

from mgm_fast.data.sample import IGNORE_INDEX
from mgm_fast.data.synthetic.render import as_tensors, empty_outputs, render_into, thread_pool
from mgm_fast.data.synthetic.scenes import (
    SCENE_CLASSES,
    SEG_CLASSES,
    SEG_PALETTE,
    Scene,
    sample_scene,
    sample_scenes,
)

__all__ = ["SyntheticScenes"]

# -------------------------------------------------------------------------------------------
# Dataset.


class SyntheticScenes(torch.utils.data.Dataset):
    """Procedural indoor scenes in the project's sample format (see :mod:`mgm_fast.data.synthetic`).

    Args:
        num_samples: dataset length.
        image_size: square output resolution in pixels (any size >= 8; 32, 64, 128, 256 are the
            usual ones). The scenes do not depend on it.
        seed: dataset seed; sample i of seed s is always the same scene.
    """

    SEG_CLASSES = SEG_CLASSES
    SCENE_CLASSES = SCENE_CLASSES
    SEG_PALETTE = SEG_PALETTE
    IGNORE_INDEX = IGNORE_INDEX

    def __init__(self, num_samples: int, image_size: int = 64, seed: int = 0):
        if int(num_samples) < 0:
            raise ValueError(f"SyntheticScenes: num_samples must be >= 0, got {num_samples}")
        if int(image_size) < 8:
            raise ValueError(f"SyntheticScenes: image_size must be >= 8 pixels, got {image_size}")
        self.num_samples = int(num_samples)
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.num_seg_classes = len(SEG_CLASSES)
        self.num_scenes = len(SCENE_CLASSES)

    def __len__(self) -> int:
        return self.num_samples

    def _index(self, i: int) -> int:
        i = int(i)
        if i < 0:
            i += self.num_samples
        if not 0 <= i < self.num_samples:
            raise IndexError(f"SyntheticScenes: index {i} out of range for {self.num_samples} samples")
        return i

    def sample_id(self, i: int) -> str:
        return f"synthetic-s{self.seed}-{self._index(i):06d}"

    def scene(self, i: int) -> Scene:
        """The resolution-independent scene description of sample i."""
        return sample_scene(self.seed, self._index(i))

    def __getitem__(self, i: int) -> dict:
        batch = self.render_batch([i])
        out = {k: v[0] for k, v in batch.items() if k != "id"}
        out["id"] = batch["id"][0]
        return out

    def __getitems__(self, indices) -> list[dict]:
        """Samples ``indices`` rendered in one batch: torch's DataLoader calls this with a whole
        batch of indices when the dataset defines it, so ``DataLoader(ds, batch_size=...)`` takes
        the fast path without a custom sampler. The samples are views into the batch tensors."""
        batch = self.render_batch(indices)
        keys = [k for k in batch if k != "id"]
        return [{**{k: batch[k][j] for k in keys}, "id": sid} for j, sid in enumerate(batch["id"])]

    def render_batch(self, indices, num_threads: int | None = None) -> dict:
        """Render samples ``indices`` at once: the batched fast path.

        Returns a dict of stacked tensors (B = len(indices)): rgb (B, 3, H, W), seg (B, H, W),
        depth / depth_mask (B, 1, H, W), normal (B, 3, H, W), normal_mask (B, 1, H, W),
        scene (B,), plus ``id``: a list of B strings. Row k equals ``self[indices[k]]``.

        ``num_threads`` (default: ``torch.get_num_threads()``, which is 1 inside DataLoader
        workers) groups of images are sampled and rendered concurrently. numpy releases the GIL
        inside its loops, so one thread's rendering overlaps another's Python scene sampling.
        The result does not depend on it.
        """
        idx = [self._index(i) for i in (indices.tolist() if hasattr(indices, "tolist") else indices)]
        if not idx:
            raise ValueError("SyntheticScenes.render_batch: no indices given")
        workers = torch.get_num_threads() if num_threads is None else int(num_threads)
        size = self.image_size
        out = empty_outputs(len(idx), size)
        scene = np.empty(len(idx), dtype=np.int64)
        # Groups small enough to keep every worker busy, large enough to amortise culling.
        group = max(8, min(64, -(-len(idx) // (2 * max(1, workers)))))
        starts = range(0, len(idx), group)

        def work(start: int) -> None:
            part = idx[start : start + group]
            scenes = sample_scenes(self.seed, part)
            scene[start : start + len(part)] = [s.scene for s in scenes]
            render_into(scenes, size, out, start)

        if workers <= 1 or len(starts) == 1:
            for start in starts:
                work(start)
        else:
            list(thread_pool(workers).map(work, starts))
        res = as_tensors(out, size)
        res["scene"] = torch.from_numpy(scene)
        res["id"] = [f"synthetic-s{self.seed}-{i:06d}" for i in idx]
        return res
