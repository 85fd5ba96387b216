"""The multi-task network (docs/method.md 1.1): shared ResNet encoder, dense task decoders and
the SimCLR projection head.

Shapes at the paper preset (128x128 input): encoder (B, 3, 128, 128) -> (B, 360, 4, 4);
every dense decoder (B, 360, 4, 4) -> (B, out, 128, 128); the projection head
(B, 360, 4, 4) -> (B, 64). In general the encoder downsamples 32x and the decoders upsample 32x.
All tensors are floating point in the parameters' dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from mgm_fast.config import ModelConfig
from mgm_fast.models.layers import (
    BatchNorm2d,
    Conv2d,
    counts_batches_once,
    in_layout_of,
    init_resnet_,
    make_layer,
    use_batch_norm_impl,
    use_conv_impl,
)

TASKS = ("seg", "depth", "normal")
"""Every dense task, in canonical order."""


def check_tasks(tasks: Sequence[str]) -> tuple[str, ...]:
    """Validate a task subset and return it in canonical order."""
    tasks = tuple(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks or len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks must be a non-empty subset of {TASKS} without repeats, got {tasks}")
    return tuple(t for t in TASKS if t in tasks)


def task_out_channels(cfg: ModelConfig) -> dict[str, int]:
    """Output channels of each dense decoder: segmentation logits, depth, normals."""
    return {"seg": cfg.num_seg_classes, "depth": 1, "normal": 3}


class Encoder(nn.Module):
    """Taskgrouping ResNet encoder E.

    Stem: conv 5x5 stride 2 (no bias), BN, ReLU, max-pool 3x3 stride 2; then ``layer1..layerK``
    of BasicBlocks (``cfg.encoder_blocks`` x ``cfg.encoder_widths``), strides 1, 2, 2, 2.

    Shapes: (B, 3, H, W) -> (B, cfg.feature_dim, H/32, W/32).
    """

    def __init__(self, cfg: ModelConfig, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = Conv2d(in_channels, cfg.stem_width, 5, 2, 2, bias=False)
        self.bn1 = BatchNorm2d(cfg.stem_width)
        prev = cfg.stem_width
        self.num_layers = len(cfg.encoder_widths)
        for i, (width, blocks) in enumerate(zip(cfg.encoder_widths, cfg.encoder_blocks)):
            setattr(self, f"layer{i + 1}", make_layer(prev, width, blocks, 1 if i == 0 else 2))
            prev = width
        self.out_channels = prev
        init_resnet_(self)

    @counts_batches_once
    def forward(self, x: Tensor) -> Tensor:
        x = in_layout_of(x, self.conv1.weight)  # NCHW images enter a channels_last network once
        x = F.max_pool2d(self.bn1(self.conv1(x), relu=True), 3, 2, 1)
        for i in range(self.num_layers):
            x = getattr(self, f"layer{i + 1}")(x)
        return x


class DenseDecoder(nn.Module):
    """Taskgrouping dense decoder: five x2 upsampling stages.

    Stage k < 4: ``upconvk`` (ConvTranspose2d k2 s2, bias), ``bn_upconvk``, ReLU,
    ``conv_decodek`` (3x3 pad 1, bias), ``bn_decodek``, ReLU. Stage 4: ``upconv4``,
    ``bn_upconv4``, ReLU, ``conv_decode4`` -> out_channels with no activation (raw logits /
    raw regression). PyTorch default initialisation, as in the released code.

    Shapes: (B, in_channels, h, w) -> (B, out_channels, 32h, 32w).
    """

    def __init__(self, in_channels: int, widths: Sequence[int], out_channels: int) -> None:
        super().__init__()
        self.num_stages = len(widths)
        prev = in_channels
        for k, width in enumerate(widths):
            last = k == self.num_stages - 1
            setattr(self, f"upconv{k}", nn.ConvTranspose2d(prev, width, 2, 2))
            setattr(self, f"bn_upconv{k}", BatchNorm2d(width))
            setattr(self, f"conv_decode{k}", Conv2d(width, out_channels if last else width, 3, 1, 1))
            if not last:
                setattr(self, f"bn_decode{k}", BatchNorm2d(width))
            prev = width
        self.out_channels = out_channels

    @counts_batches_once
    def forward(self, x: Tensor) -> Tensor:
        for k in range(self.num_stages):
            x = getattr(self, f"bn_upconv{k}")(getattr(self, f"upconv{k}")(x), relu=True)
            x = getattr(self, f"conv_decode{k}")(x)
            if k < self.num_stages - 1:
                x = getattr(self, f"bn_decode{k}")(x, relu=True)
        return x


class ProjectionHead(nn.Module):
    """SimCLR head of the released code: global average pool, then one Linear ``fc``.

    Shapes: (B, in_features, h, w) -> (B, out_features).
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, out_features)

    def forward(self, features: Tensor) -> Tensor:
        return self.fc(features.mean(dim=(2, 3)))


class MultiTaskNet(nn.Module):
    """Shared encoder + one dense decoder per task + SimCLR projection head.

    Submodules ``encoder``, ``decoders`` (ModuleDict keyed by task: "seg" -> num_seg_classes
    logits, "depth" -> 1 channel, "normal" -> 3 channels) and ``clr_head``.
    """

    def __init__(self, cfg: ModelConfig, tasks: Sequence[str] = TASKS) -> None:
        super().__init__()
        self.tasks = check_tasks(tasks)
        self.encoder = Encoder(cfg)
        out = task_out_channels(cfg)
        self.decoders = nn.ModuleDict(
            {t: DenseDecoder(cfg.feature_dim, cfg.decoder_widths, out[t]) for t in self.tasks}
        )
        self.clr_head = ProjectionHead(cfg.feature_dim, cfg.clr_dim)
        use_batch_norm_impl(self, cfg.batch_norm_impl)
        use_conv_impl(self, cfg.conv_impl)

    def features(self, x: Tensor) -> Tensor:
        """E(x): (B, 3, H, W) -> (B, feature_dim, H/32, W/32)."""
        return self.encoder(x)

    def decode(self, features: Tensor) -> dict[str, Tensor]:
        """Raw task outputs from features: {task: (B, out_channels, H, W)} in task order."""
        return {t: dec(features) for t, dec in self.decoders.items()}

    def project(self, features: Tensor) -> Tensor:
        """SimCLR projection: (B, feature_dim, h, w) -> (B, clr_dim)."""
        return self.clr_head(features)

    @counts_batches_once
    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """(B, 3, H, W) images in [-1, 1] -> {"seg": (B, num_seg_classes, H, W) logits,
        "depth": (B, 1, H, W), "normal": (B, 3, H, W)} (only the configured tasks)."""
        return self.decode(self.features(x))
