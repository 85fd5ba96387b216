"""The refinement network R (docs/method.md 1.3): raw task predictions -> scene logits.

One small ResNet ("PostEncoder") per task prediction, a global max-pool of each to a vector,
then an MLP. At the paper preset: (B, 40|1|3, 128, 128) -> 3 x (B, 192) -> (B, 27).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mgm_fast.config import ModelConfig
from mgm_fast.models.layers import (
    BatchNorm2d,
    Conv2d,
    counts_batches_once,
    init_resnet_,
    make_layer,
    use_batch_norm_impl,
    use_conv_impl,
)
from mgm_fast.models.multitask import TASKS, check_tasks, task_out_channels


class PostEncoder(nn.Module):
    """Stem (conv 5x5 s2 no bias, BN, ReLU, max-pool 3x3 s2), ``layer1..layerK`` with stride 2
    in every layer (layer1 included), then a global max-pool.

    The released code max-pools the final 4x4 map with a 4x4 window; a global max-pool is the
    same at 128x128 and keeps other image sizes working.

    Shapes: (B, in_channels, H, W) -> (B, widths[-1]).
    """

    def __init__(
        self, in_channels: int, stem_width: int, widths: Sequence[int], blocks: Sequence[int]
    ) -> None:
        super().__init__()
        self.conv1 = Conv2d(in_channels, stem_width, 5, 2, 2, bias=False)
        self.bn1 = BatchNorm2d(stem_width)
        prev = stem_width
        self.num_layers = len(widths)
        for i, (width, n) in enumerate(zip(widths, blocks)):
            setattr(self, f"layer{i + 1}", make_layer(prev, width, n, 2))
            prev = width
        self.out_features = prev
        init_resnet_(self)

    @counts_batches_once
    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(self.bn1(self.conv1(x), relu=True), 3, 2, 1)
        for i in range(self.num_layers):
            x = getattr(self, f"layer{i + 1}")(x)
        return x.amax(dim=(2, 3))


class RefinementNet(nn.Module):
    """Scene classifier on the multi-task network's raw outputs.

    ``encoders`` (ModuleDict "seg" / "depth" / "normal", inputs num_seg_classes / 1 / 3
    channels), concatenation, ``fc1`` -> ReLU -> ``fc2`` -> (B, num_scenes) logits, then a ReLU
    on the logits iff ``cfg.refine_logit_relu`` (the released behaviour, docs/method.md B2).
    Raw predictions go in: no softmax on the segmentation logits.
    """

    def __init__(self, cfg: ModelConfig, tasks: Sequence[str] = TASKS) -> None:
        super().__init__()
        self.tasks = check_tasks(tasks)
        in_ch = task_out_channels(cfg)
        self.encoders = nn.ModuleDict(
            {
                t: PostEncoder(in_ch[t], cfg.refine_stem_width, cfg.refine_widths, cfg.refine_blocks)
                for t in self.tasks
            }
        )
        self.fc1 = nn.Linear(len(self.tasks) * cfg.refine_widths[-1], cfg.refine_hidden)
        self.fc2 = nn.Linear(cfg.refine_hidden, cfg.num_scenes)
        self.logit_relu = cfg.refine_logit_relu
        use_batch_norm_impl(self, cfg.batch_norm_impl)
        use_conv_impl(self, cfg.conv_impl)

    @counts_batches_once
    def forward(
        self, seg: Tensor | None = None, depth: Tensor | None = None, normal: Tensor | None = None
    ) -> Tensor:
        """seg (B, num_seg_classes, H, W), depth (B, 1, H, W), normal (B, 3, H, W) float ->
        (B, num_scenes) float logits. Only the configured tasks are needed (pass the others as
        None); ``refine(**multitask(x))`` works directly."""
        given = {"seg": seg, "depth": depth, "normal": normal}
        feats = []
        for t in self.tasks:
            if given[t] is None:
                raise ValueError(f"RefinementNet built for tasks {self.tasks} got no {t!r} input")
            feats.append(self.encoders[t](given[t]))
        logits = self.fc2(F.relu(self.fc1(torch.cat(feats, dim=1))))
        return F.relu(logits) if self.logit_relu else logits
