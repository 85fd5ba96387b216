"""Evaluation metrics: streaming, device-resident accumulators, Δm and result tables.

The released MGM code has no evaluation code (docs/method.md section 5); these metrics follow the
standard NYUv2 multi-task protocol as coded by MTAN (``lorenmt/mtan``, ``im2im_pred/utils.py``)
and LibMTL (``examples/nyu/utils.py``, ``LibMTL/utils.py``). Every definition below names its
source and every place where the two differ.

Accumulation
    Each accumulator keeps sums, counts and histograms as tensors on the device of the inputs.
    ``update`` never synchronises with the host: no ``.item()``, no ``.cpu()``, no boolean-mask
    indexing or ``nonzero`` (which must learn an output size), no ``bincount`` (its CUDA kernel
    reads the input maximum back to size the output) and no Python branch on a tensor value.
    Invalid pixels are routed to a discarded overflow bin or zeroed with ``torch.where`` instead
    of being selected. Only ``compute()`` (and ``reduce_``) read values back.

    State lives on the device of the first update (or ``device=``/``to(device)``); targets are
    moved to the prediction's device with ``non_blocking=True``. Counts are int64, sums float64.

Definitions (pixels: B x H x W; set = everything passed to ``update`` since the last ``reset``)

===========================  ====  ============================================================
name                         dir.  definition
===========================  ====  ============================================================
``seg/miou``                 ↑     mean over classes of TP / (TP + FP + FN), from one confusion
                                   matrix over the whole set; ``miou_over`` picks the classes
``seg/pix_acc``              ↑     correct / labelled pixels over the set
``depth/abs_err``            ↓     mean |d̂ − d| over valid pixels (mask & d > 0), metres
``depth/rel_err``            ↓     mean |d̂ − d| / d over the same pixels
``normal/mean``              ↓     mean of θ = degrees(arccos(clamp(<n̂/‖n̂‖, n>, −1, 1)))
``normal/median``            ↓     median of θ (numpy convention: mean of the two middle values)
``normal/within_11.25``      ↑     fraction of valid pixels with θ < 11.25° (strict, as MTAN)
``normal/within_22.5``       ↑     fraction with θ < 22.5°
``normal/within_30``         ↑     fraction with θ < 30°
``scene/acc``                ↑     correct / labelled images (scene −1 = unknown is skipped)
===========================  ====  ============================================================

Ratios are fractions in [0, 1] (as MTAN and LibMTL return them); the table formatters can show
them in percent. A metric with nothing to average over (no labelled pixel, ...) is NaN.

Conventions and where the sources differ
    * Segmentation. MTAN (since Nov 2020, ``ConfMatrix``) and LibMTL (``SegMetric``) accumulate
      one confusion matrix over the set with ``bincount`` and report ``mean(diag / (rows + cols -
      diag))`` over *all* classes, which is NaN when a class occurs neither in the prediction
      nor in the target; MTAN's earlier code averaged per-image mIoU over the classes present
      in each image. Here ``miou_over="present"`` (default) averages over the classes with
      TP + FP + FN > 0 in the whole set (a class only predicted counts, with IoU 0), and
      ``miou_over="all"`` is the MTAN / LibMTL mean over all classes (NaN if one is absent).
      The two agree whenever every class occurs, e.g. on the 13-class NYUv2 test set; MGM's
      40-class, small-split setting needs ``"present"``. Ignored pixels (``ignore_index`` or a
      label outside [0, C)) count nowhere; a predicted label outside [0, C) counts as a miss
      for the true class and as a false positive for no class.
    * Depth. MTAN's trainer averages per-batch means with equal weight per batch
      (``avg_cost += cost / test_batch``); LibMTL weights each batch mean by its number of valid
      pixels, which equals the per-pixel mean over the set. Default ``reduction="pixel"`` is
      the latter; ``reduction="batch"`` reproduces MTAN (one ``update`` = one batch; batches
      without a valid pixel are skipped, where MTAN would divide by zero).
    * Normals. MTAN averages per-batch mean, median and fractions over batches; LibMTL
      concatenates all angles and takes numpy's mean and median over the set. Here the set-level
      (LibMTL) definition is used. MTAN does not renormalise the prediction (its models end in a
      normalisation); LibMTL and this module do. A zero prediction gives θ = 90°. Masks: the
      sample's ``normal_mask`` / ``depth_mask``; without one, MTAN's rule "target non-zero" (per
      component for normals, which avoids MTAN's ``sum(n) != 0`` dropping e.g. (0.6, −0.6, 0)).
    * θ is computed in float32 (float64 inputs stay float64), as MTAN and LibMTL do. arccos is
      ill-conditioned near 0°: float32 resolves θ ≈ 0 only to about 0.02°.

Median without keeping every angle
    ``NormalMetrics`` keeps a histogram of θ with ``median_bins`` equal bins over [0°, 180°]
    (default 18000: 0.01° bins) plus the sum of the angles in each bin. The median is read from
    the bin(s) holding the middle rank(s) and reported as the mean angle of that bin (average
    of the two bins' means for an even count). Each middle value lies in the same bin as the mean
    that stands for it, so the error is below one bin width (< 0.01° by default; up to float
    rounding of angles within ~1e-5° of a bin edge), and it is exact when the angles in the
    median bin(s) are equal. ``keep_angles=True`` instead stores every angle on the
    device (4 bytes per pixel of the set: about 290 MB for the 654 NYUv2 test images at 288x384)
    and returns the exact numpy median. Mean and fractions are exact in both modes.

Δm (multi-task performance vs single-task baselines)
    Maninis et al., "Attentive Single-Tasking of Multiple Tasks", CVPR 2019, Eq. 4, as also in
    Vandenhende et al. (TPAMI 2021, Eq. 10) and LibMTL ``count_improvement``:
    Δm = 100 / K · Σ_k (−1)^{l_k} (M_k − M_b,k) / M_b,k, l_k = 1 when lower is better, so a
    positive Δm means better than the baseline. LibMTL first averages within each task, then
    over tasks (``average="task"``); Maninis and Nash-MTL's NYUv2 code average over all K
    metrics (``average="metric"``, default). The two agree when every task has one metric. Nash-MTL's ``delta_fn`` (experiments/nyuv2/utils.py) uses
    the opposite sign (positive = worse, "Δm ↓"); negate to compare with those tables.

Distributed
    ``reduce_(process_group)`` all-reduces (sums) the state over the ranks when
    ``torch.distributed`` is initialised, and is a no-op otherwise. Call it once, after the last
    ``update`` and before ``compute``; the result then covers the union of all ranks' samples.
    A sampler that pads the last batch with repeated samples makes those samples count twice.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "FRACTION_METRICS",
    "HIGHER",
    "LOWER",
    "METRIC_DIRECTIONS",
    "NORMAL_THRESHOLDS",
    "TASK_METRICS",
    "DepthMetrics",
    "MultiTaskEvaluator",
    "NormalMetrics",
    "SceneMetrics",
    "SegMetrics",
    "delta_m",
    "format_table",
    "mean_std",
    "mean_std_table",
    "normal_angles",
]

HIGHER = 1
"""Direction of a metric where a higher value is better."""
LOWER = -1
"""Direction of a metric where a lower value is better."""

NORMAL_THRESHOLDS = (11.25, 22.5, 30.0)
"""Angle thresholds (degrees) of the ``normal/within_*`` fractions (Eigen & Fergus; MTAN)."""


def _threshold_name(t: float) -> str:
    return f"within_{t:g}"


TASK_METRICS: dict[str, tuple[str, ...]] = {
    "seg": ("miou", "pix_acc"),
    "depth": ("abs_err", "rel_err"),
    "normal": ("mean", "median", *(_threshold_name(t) for t in NORMAL_THRESHOLDS)),
    "scene": ("acc",),
}
"""Metric names each task's accumulator reports (``MultiTaskEvaluator`` prefixes ``task/``)."""

METRIC_DIRECTIONS: dict[str, int] = {
    "seg/miou": HIGHER,
    "seg/pix_acc": HIGHER,
    "depth/abs_err": LOWER,
    "depth/rel_err": LOWER,
    "normal/mean": LOWER,
    "normal/median": LOWER,
    "normal/within_11.25": HIGHER,
    "normal/within_22.5": HIGHER,
    "normal/within_30": HIGHER,
    "scene/acc": HIGHER,
}
"""``HIGHER`` (+1) or ``LOWER`` (−1) is better, for every metric name ``MultiTaskEvaluator`` reports."""

FRACTION_METRICS = frozenset(
    {"seg/miou", "seg/pix_acc", "scene/acc"} | {f"normal/{_threshold_name(t)}" for t in NORMAL_THRESHOLDS}
)
"""Metrics that are fractions in [0, 1] (shown x100 by the formatters with ``percent=True``)."""


# -------------------------------------------------------------------------------------------
# Shared machinery.


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def _check_shape(name: str, tensor: Tensor, shape: Sequence[int], what: str) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name}: expected {what} of shape {tuple(shape)}, got {tuple(tensor.shape)}")


def _float_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half / bfloat16 are promoted)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _ones_like_index(index: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.ones((), dtype=dtype, device=index.device).expand(index.shape)


def _nan_if_zero(num: float, den: float) -> float:
    return num / den if den > 0 else math.nan


class _Accumulator:
    """Base class: named state tensors on one device, reset / to / reduce_.

    Subclasses list their state in ``_STATE`` and create it in ``_zeros(device)``.
    """

    _STATE: tuple[str, ...] = ()

    def __init__(self, device: torch.device | str | None = None) -> None:
        self._device = torch.device(device) if device is not None else None
        self._reduced = False
        self.reset()

    # -- state ------------------------------------------------------------------------------
    def _zeros(self, device: torch.device) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def reset(self) -> None:
        """Forget everything accumulated (state stays on its device)."""
        for name, value in self._zeros(self._device or torch.device("cpu")).items():
            setattr(self, name, value)
        self._reduced = False

    @property
    def device(self) -> torch.device | None:
        """Device of the state (None until the first update or ``to``)."""
        return self._device

    def to(self, device: torch.device | str):
        """Move the state to ``device`` (done implicitly by the first ``update``)."""
        device = torch.device(device)
        for name in self._STATE:
            setattr(self, name, getattr(self, name).to(device))
        self._device = device
        return self

    def _prepare(self, device: torch.device) -> None:
        if self._reduced:
            raise RuntimeError(
                f"{type(self).__name__}: update() after reduce_() would mix all-reduced and local "
                "counts; call reset() first"
            )
        if self._device != device:
            self.to(device)

    # -- distributed ------------------------------------------------------------------------
    def reduce_(self, process_group=None):
        """Sum the state over all ranks of ``process_group`` (default: the world) in place.

        A no-op when ``torch.distributed`` is not initialised. Call once after the last
        ``update``; a second call (or an ``update``) before ``reset()`` raises. Every rank must
        call it (it is a collective). Returns ``self``.
        """
        if not _dist_ready():
            return self
        if self._reduced:
            raise RuntimeError(f"{type(self).__name__}: reduce_() called twice without reset()")
        for name in self._STATE:
            dist.all_reduce(getattr(self, name), op=dist.ReduceOp.SUM, group=process_group)
        self._reduced = True
        return self


def _confusion_index(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """Flat indices into a (C, C + 1) confusion matrix plus one overflow slot.

    Row = target class, column = predicted class (MTAN's ``n * target + pred`` layout); column C
    collects predictions outside [0, C); slot C * (C + 1) collects ignored targets.
    """
    c = num_classes
    t = target.reshape(-1).long()
    p = pred.reshape(-1).long()
    labelled = (t >= 0) & (t < c) & (t != ignore_index)
    col = torch.where((p >= 0) & (p < c), p, c)
    return torch.where(labelled, t * (c + 1) + col, c * (c + 1))


class _ConfusionAccumulator(_Accumulator):
    """Confusion matrix over ``num_classes`` classes kept as flat int64 counts on the device."""

    _STATE = ("_counts",)

    def __init__(self, num_classes: int, ignore_index: int = -1, device=None) -> None:
        if num_classes < 1:
            raise ValueError(f"{type(self).__name__}: num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        super().__init__(device)

    def _zeros(self, device):
        c = self.num_classes
        return {"_counts": torch.zeros(c * (c + 1) + 1, dtype=torch.int64, device=device)}

    def _add(self, pred: Tensor, target: Tensor) -> None:
        idx = _confusion_index(pred, target, self.num_classes, self.ignore_index)
        self._counts.index_add_(0, idx, _ones_like_index(idx, torch.int64))

    def _matrix_with_misses(self) -> Tensor:
        c = self.num_classes
        return self._counts[: c * (c + 1)].view(c, c + 1)

    @property
    def confusion_matrix(self) -> Tensor:
        """int64 (C, C): entry [t, p] = number of items with target t predicted as p."""
        return self._matrix_with_misses()[:, : self.num_classes]

    @property
    def labelled(self) -> Tensor:
        """0-dim int64: number of items with a valid target (including out-of-range predictions)."""
        return self._matrix_with_misses().sum()


# -------------------------------------------------------------------------------------------
# Segmentation.


class SegMetrics(_ConfusionAccumulator):
    """Semantic segmentation: mIoU and pixel accuracy from one confusion matrix over the set.

    Args:
        num_classes: C.
        ignore_index: target value of void pixels (default -1, the sample format's
            ``IGNORE_INDEX``); any target outside [0, C) is ignored as well (as MTAN).
        miou_over: ``"present"`` -- mean IoU over classes with TP + FP + FN > 0 in the set;
            ``"all"`` -- mean over all C classes, NaN if one is absent (MTAN ``ConfMatrix``,
            LibMTL ``SegMetric``). See the module docstring.
        device: where to keep the state (default: the device of the first update).

    ``update(pred, target)``: ``pred`` float logits (B, C, H, W) (argmax over C) or integer
    labels (B, H, W); ``target`` int64 (B, H, W).
    """

    MIOU_OVER = ("present", "all")

    def __init__(self, num_classes: int, ignore_index: int = -1, miou_over: str = "present", device=None):
        if miou_over not in self.MIOU_OVER:
            raise ValueError(f"SegMetrics: miou_over must be one of {self.MIOU_OVER}, got {miou_over!r}")
        self.miou_over = miou_over
        super().__init__(num_classes, ignore_index, device)

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        if pred.dim() == 4:
            if not pred.is_floating_point():
                raise ValueError(f"SegMetrics: 4-D predictions must be float logits, got {pred.dtype}")
            b, c, h, w = pred.shape
            if c != self.num_classes:
                raise ValueError(f"SegMetrics: logits have {c} channels, expected {self.num_classes}")
            labels = pred.max(dim=1).indices  # = argmax (first maximum), 3x faster on CPU
        elif pred.dim() == 3:
            if pred.is_floating_point() or pred.dtype == torch.bool:
                raise ValueError(f"SegMetrics: 3-D predictions must be integer labels, got {pred.dtype}")
            labels = pred
            b, h, w = pred.shape
        else:
            raise ValueError(
                "SegMetrics: pred must be logits (B, C, H, W) or labels (B, H, W), "
                f"got shape {tuple(pred.shape)}"
            )
        _check_shape("SegMetrics target", target, (b, h, w), "labels")
        self._prepare(labels.device)
        self._add(labels, target.to(labels.device, non_blocking=True))

    def per_class_iou(self) -> Tensor:
        """float64 (C,): TP / (TP + FP + FN) per class, NaN for a class absent from both."""
        m = self._matrix_with_misses().double()
        tp = m.diagonal()
        fn = m.sum(dim=1) - tp
        fp = m[:, : self.num_classes].sum(dim=0) - tp
        return tp / (tp + fp + fn)  # 0 / 0 = NaN for absent classes

    def compute(self) -> dict[str, float]:
        """{"miou": float, "pix_acc": float}; NaN when nothing was labelled."""
        iou = self.per_class_iou()
        if self.miou_over == "present":
            miou = torch.nanmean(iou)  # NaN when no class is present
        else:
            miou = iou.mean()
        correct = self._matrix_with_misses().diagonal().sum()
        miou_v, correct_v, labelled_v = torch.stack([miou, correct.double(), self.labelled.double()]).tolist()
        return {"miou": miou_v, "pix_acc": _nan_if_zero(correct_v, labelled_v)}


# -------------------------------------------------------------------------------------------
# Depth.


class DepthMetrics(_Accumulator):
    """Depth: mean absolute and mean relative error over valid pixels (mask & d > 0).

    Args:
        reduction: ``"pixel"`` (default) -- sums and pixel counts over the whole set (equal to
            LibMTL's ``DepthMetric``); ``"batch"`` -- mean of per-update (per-batch) means, as
            MTAN's trainer (updates without a valid pixel are skipped).
        device: where to keep the state.

    ``update(pred, target, mask=None)``: ``pred`` and ``target`` float (B, 1, H, W) metres
    (any equal shapes work), ``mask`` bool of the same shape (the sample's ``depth_mask``);
    ``mask=None`` uses ``target > 0`` alone (MTAN's "non-zero target" rule).
    """

    REDUCTIONS = ("pixel", "batch")
    _STATE = ("_abs", "_rel", "_count", "_batch_abs", "_batch_rel", "_batches")

    def __init__(self, reduction: str = "pixel", device=None) -> None:
        if reduction not in self.REDUCTIONS:
            raise ValueError(f"DepthMetrics: reduction must be one of {self.REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction
        super().__init__(device)

    def _zeros(self, device):
        f = {"dtype": torch.float64, "device": device}
        i = {"dtype": torch.int64, "device": device}
        return {
            "_abs": torch.zeros((), **f),
            "_rel": torch.zeros((), **f),
            "_count": torch.zeros((), **i),
            "_batch_abs": torch.zeros((), **f),
            "_batch_rel": torch.zeros((), **f),
            "_batches": torch.zeros((), **i),
        }

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> None:
        _check_shape("DepthMetrics target", target, pred.shape, "depth")
        if mask is not None:
            _check_shape("DepthMetrics mask", mask, pred.shape, "mask")
        self._prepare(pred.device)
        target = target.to(pred.device, non_blocking=True)
        dtype = _float_dtype(pred, target)
        p, t = pred.to(dtype), target.to(dtype)
        valid = t > 0
        if mask is not None:
            valid = valid & mask.to(pred.device, non_blocking=True).bool()
        err = torch.where(valid, (p - t).abs(), 0)
        rel = err / torch.where(valid, t, 1)
        abs_sum = err.sum(dtype=torch.float64)
        rel_sum = rel.sum(dtype=torch.float64)
        count = valid.sum()
        self._abs += abs_sum
        self._rel += rel_sum
        self._count += count
        # per-batch means (MTAN); a batch without valid pixels adds nothing
        has = count > 0
        denom = count.clamp_min(1).double()
        self._batch_abs += torch.where(has, abs_sum / denom, 0)
        self._batch_rel += torch.where(has, rel_sum / denom, 0)
        self._batches += has.long()

    def compute(self) -> dict[str, float]:
        """{"abs_err": float, "rel_err": float}; NaN without a valid pixel."""
        if self.reduction == "pixel":
            a, r, n = torch.stack([self._abs, self._rel, self._count.double()]).tolist()
        else:
            a, r, n = torch.stack([self._batch_abs, self._batch_rel, self._batches.double()]).tolist()
        return {"abs_err": _nan_if_zero(a, n), "rel_err": _nan_if_zero(r, n)}


# -------------------------------------------------------------------------------------------
# Surface normals.


def normal_angles(pred: Tensor, target: Tensor) -> Tensor:
    """Angular error θ in degrees: float (B, H, W) from (B, 3, H, W) predictions and targets.

    θ = degrees(arccos(clamp(<n̂/‖n̂‖, n>, −1, 1))) (MTAN / LibMTL ``normal_error``; LibMTL's
    renormalisation of the prediction), evaluated as ``<n̂, n> / max(‖n̂‖, 1e-12)`` (the
    ``F.normalize`` guard): a zero prediction gives 90°. Computed in float32 (float64 if an
    input is float64).
    """
    dtype = _float_dtype(pred, target)
    # per-channel arithmetic: reductions over the strided channel dim are slow on the CPU
    p0, p1, p2 = pred.to(dtype).unbind(1)
    t0, t1, t2 = target.to(dtype).unbind(1)
    norm = (p0 * p0 + p1 * p1 + p2 * p2).sqrt().clamp_min(1e-12)
    cos = ((p0 * t0 + p1 * t1 + p2 * t2) / norm).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.acos(cos))


class NormalMetrics(_Accumulator):
    """Surface normals: mean, median and fractions under 11.25° / 22.5° / 30° of θ.

    Args:
        median_bins: number of equal histogram bins over [0°, 180°] for the median (default
            18000: 0.01° bins; error < one bin width, see the module docstring).
        keep_angles: store every valid angle on the device for an exact median instead.
        thresholds: angle thresholds in degrees, counted with a strict ``θ < t``.
        device: where to keep the state.

    ``update(pred, target, mask=None)``: ``pred`` float (B, 3, H, W), any length (normalised
    here); ``target`` float (B, 3, H, W) unit normals; ``mask`` bool (B, 1, H, W) or (B, H, W)
    (the sample's ``normal_mask``); ``mask=None`` uses "target non-zero".
    """

    _STATE = ("_hist", "_bin_sum", "_within")

    def __init__(
        self,
        median_bins: int = 18000,
        keep_angles: bool = False,
        thresholds: Sequence[float] = NORMAL_THRESHOLDS,
        device=None,
    ) -> None:
        if median_bins < 1:
            raise ValueError(f"NormalMetrics: median_bins must be >= 1, got {median_bins}")
        self.median_bins = int(median_bins)
        self.keep_angles = bool(keep_angles)
        self.thresholds = tuple(float(t) for t in thresholds)
        self._angles: list[Tensor] = []
        super().__init__(device)

    @property
    def bin_width(self) -> float:
        """Histogram bin width in degrees (180 / median_bins)."""
        return 180.0 / self.median_bins

    def _zeros(self, device):
        n = self.median_bins
        return {
            # last slot: overflow bin for invalid pixels, never read
            "_hist": torch.zeros(n + 1, dtype=torch.int64, device=device),
            "_bin_sum": torch.zeros(n + 1, dtype=torch.float64, device=device),
            "_within": torch.zeros(len(self.thresholds), dtype=torch.int64, device=device),
        }

    def reset(self) -> None:
        self._angles = []
        super().reset()

    def to(self, device):
        super().to(device)
        self._angles = [a.to(device) for a in self._angles]
        return self

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> None:
        if pred.dim() != 4 or pred.shape[1] != 3:
            raise ValueError(f"NormalMetrics: pred must be (B, 3, H, W), got {tuple(pred.shape)}")
        b, _, h, w = pred.shape
        _check_shape("NormalMetrics target", target, pred.shape, "normals")
        self._prepare(pred.device)
        target = target.to(pred.device, non_blocking=True)
        if mask is None:
            valid = (target != 0).any(dim=1)
        else:
            if tuple(mask.shape) == (b, 1, h, w):
                mask = mask[:, 0]
            _check_shape("NormalMetrics mask", mask, (b, h, w), "mask (B, 1, H, W) or mask")
            valid = mask.to(pred.device, non_blocking=True).bool()
        theta = torch.where(valid, normal_angles(pred, target), 0)
        n = self.median_bins
        idx = (theta * (n / 180.0)).floor().long().clamp_(0, n - 1)
        idx = torch.where(valid, idx, n).reshape(-1)
        self._hist.index_add_(0, idx, _ones_like_index(idx, torch.int64))
        self._bin_sum.index_add_(0, idx, theta.reshape(-1).double())
        if self.thresholds:
            # Python-scalar comparisons: a threshold tensor built here would be a host-to-device copy
            self._within += torch.stack([((theta < t) & valid).sum() for t in self.thresholds])
        if self.keep_angles:
            self._angles.append(torch.where(valid, theta, math.nan).reshape(-1))

    # -- distributed: the stored angles have a different length on every rank ---------------
    def reduce_(self, process_group=None):
        if not _dist_ready():
            return self
        if self._reduced:
            raise RuntimeError("NormalMetrics: reduce_() called twice without reset()")
        if self.keep_angles:
            local = self._local_angles()
            size = torch.tensor([local.numel()], dtype=torch.int64, device=local.device)
            world = dist.get_world_size(process_group)
            sizes = [torch.zeros_like(size) for _ in range(world)]
            dist.all_gather(sizes, size, group=process_group)
            sizes_v = [int(s) for s in sizes]
            padded = torch.full((max(sizes_v),), math.nan, dtype=local.dtype, device=local.device)
            padded[: local.numel()] = local
            gathered = [torch.empty_like(padded) for _ in range(world)]
            dist.all_gather(gathered, padded, group=process_group)
            self._angles = [g[:s] for g, s in zip(gathered, sizes_v)]
        return super().reduce_(process_group)

    def _local_angles(self) -> Tensor:
        device = self._device or torch.device("cpu")
        if not self._angles:
            return torch.zeros(0, dtype=torch.float32, device=device)
        a = torch.cat([x.float() if x.dtype != torch.float64 else x for x in self._angles])
        return a[~torch.isnan(a)]

    def _median_from_hist(self, count: int) -> float:
        hist = self._hist[: self.median_bins]
        cum = hist.cumsum(0)
        ranks = torch.tensor([(count - 1) // 2, count // 2], dtype=torch.int64, device=cum.device)
        bins = torch.searchsorted(cum, ranks, right=True)  # first bin with cum > rank
        means = self._bin_sum[bins] / hist[bins].double()
        return float(means.mean())

    @staticmethod
    def _exact_median(angles: Tensor) -> float:
        n = angles.numel()
        lo = torch.kthvalue(angles, (n - 1) // 2 + 1).values
        hi = torch.kthvalue(angles, n // 2 + 1).values
        return float((lo.double() + hi.double()) / 2)

    def compute(self) -> dict[str, float]:
        """{"mean", "median", "within_11.25", "within_22.5", "within_30"}: degrees / fractions."""
        n = self.median_bins
        stats = torch.cat(
            [
                self._hist[:n].sum().double().reshape(1),
                self._bin_sum[:n].sum().reshape(1),
                self._within.double(),
            ]
        ).tolist()
        count, total, within = int(stats[0]), stats[1], stats[2:]
        out = {"mean": _nan_if_zero(total, count), "median": math.nan}
        if count > 0:
            if self.keep_angles:
                out["median"] = self._exact_median(self._local_angles())
            else:
                out["median"] = self._median_from_hist(count)
        for t, k in zip(self.thresholds, within):
            out[_threshold_name(t)] = _nan_if_zero(k, count)
        return out


# -------------------------------------------------------------------------------------------
# Scene classification.


class SceneMetrics(_ConfusionAccumulator):
    """Scene classification: accuracy and a confusion matrix over the set.

    Args:
        num_scenes: number of scene classes S.
        ignore_index: target value of images without a scene label (default -1, "unknown").
        device: where to keep the state.

    ``update(pred, target)``: ``pred`` float logits (B, S) or integer labels (B,); ``target``
    int64 (B,).
    """

    def __init__(self, num_scenes: int, ignore_index: int = -1, device=None) -> None:
        super().__init__(num_scenes, ignore_index, device)

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        if pred.dim() == 2:
            if not pred.is_floating_point():
                raise ValueError(f"SceneMetrics: 2-D predictions must be float logits, got {pred.dtype}")
            if pred.shape[1] != self.num_classes:
                raise ValueError(
                    f"SceneMetrics: logits have {pred.shape[1]} classes, expected {self.num_classes}"
                )
            labels = pred.argmax(dim=1)
        elif pred.dim() == 1 and not pred.is_floating_point():
            labels = pred
        else:
            raise ValueError(
                f"SceneMetrics: pred must be logits (B, S) or integer labels (B,), got {tuple(pred.shape)} {pred.dtype}"
            )
        _check_shape("SceneMetrics target", target, labels.shape, "scene labels")
        self._prepare(labels.device)
        self._add(labels, target.to(labels.device, non_blocking=True))

    def compute(self) -> dict[str, float]:
        """{"acc": float}: correct / labelled images (NaN if none is labelled)."""
        correct, labelled = torch.stack([self._matrix_with_misses().diagonal().sum(), self.labelled]).tolist()
        return {"acc": _nan_if_zero(correct, labelled)}


# -------------------------------------------------------------------------------------------
# All tasks together.


class MultiTaskEvaluator:
    """The accumulators of the configured tasks behind one ``update`` / ``compute``.

    Args:
        tasks: any of ``"seg"``, ``"depth"``, ``"normal"``, ``"scene"``.
        num_seg_classes: C (needed with ``"seg"``).
        num_scenes: S (needed with ``"scene"``).
        ignore_index: void label of ``seg`` and unknown label of ``scene``.
        miou_over, depth_reduction, median_bins, keep_angles: passed to the accumulators.
        device: where to keep the state (default: the device of the first predictions).

    ``update(predictions, batch)``: ``predictions`` maps task -> model output (``"seg"``
    logits (B, C, H, W) or labels (B, H, W), ``"depth"`` (B, 1, H, W), ``"normal"``
    (B, 3, H, W), ``"scene"`` logits (B, S) or labels (B,)); ``batch`` is a collated batch of the
    sample format (``seg``, ``depth`` + ``depth_mask``, ``normal`` + ``normal_mask``,
    ``scene``). Every configured task must be present in both.

    ``compute()`` returns ``{"task/metric": float}`` with the names of ``METRIC_DIRECTIONS``.
    """

    TASKS = tuple(TASK_METRICS)

    def __init__(
        self,
        tasks: Iterable[str] = ("seg", "depth", "normal"),
        num_seg_classes: int | None = None,
        num_scenes: int | None = None,
        *,
        ignore_index: int = -1,
        miou_over: str = "present",
        depth_reduction: str = "pixel",
        median_bins: int = 18000,
        keep_angles: bool = False,
        device=None,
    ) -> None:
        tasks = tuple(tasks)
        unknown = [t for t in tasks if t not in self.TASKS]
        if unknown or not tasks or len(set(tasks)) != len(tasks):
            raise ValueError(
                f"MultiTaskEvaluator: tasks must be distinct names from {self.TASKS}, got {tasks}"
            )
        self.tasks = tuple(t for t in self.TASKS if t in tasks)
        self.metrics: dict[str, _Accumulator] = {}
        if "seg" in self.tasks:
            if not num_seg_classes:
                raise ValueError("MultiTaskEvaluator: 'seg' needs num_seg_classes >= 1")
            self.metrics["seg"] = SegMetrics(num_seg_classes, ignore_index, miou_over, device)
        if "depth" in self.tasks:
            self.metrics["depth"] = DepthMetrics(depth_reduction, device)
        if "normal" in self.tasks:
            self.metrics["normal"] = NormalMetrics(median_bins, keep_angles, device=device)
        if "scene" in self.tasks:
            if not num_scenes:
                raise ValueError("MultiTaskEvaluator: 'scene' needs num_scenes >= 1")
            self.metrics["scene"] = SceneMetrics(num_scenes, ignore_index, device)

    @property
    def metric_names(self) -> tuple[str, ...]:
        """Keys ``compute()`` returns, in table order."""
        return tuple(f"{t}/{m}" for t in self.tasks for m in TASK_METRICS[t])

    @torch.no_grad()
    def update(self, predictions: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> None:
        missing = [t for t in self.tasks if t not in predictions]
        if missing:
            raise KeyError(f"MultiTaskEvaluator.update: predictions lack task(s) {missing}")
        for task, acc in self.metrics.items():
            if task not in batch:
                raise KeyError(f"MultiTaskEvaluator.update: batch lacks '{task}'")
            pred = predictions[task]
            if task in ("depth", "normal"):
                acc.update(pred, batch[task], batch.get(f"{task}_mask"))
            else:
                acc.update(pred, batch[task])

    def compute(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for task, acc in self.metrics.items():
            values = acc.compute()
            out.update({f"{task}/{m}": values[m] for m in TASK_METRICS[task]})
        return out

    def reset(self) -> None:
        for acc in self.metrics.values():
            acc.reset()

    def to(self, device):
        for acc in self.metrics.values():
            acc.to(device)
        return self

    def reduce_(self, process_group=None):
        """All-reduce every accumulator (no-op without torch.distributed). Returns ``self``."""
        for acc in self.metrics.values():
            acc.reduce_(process_group)
        return self


# -------------------------------------------------------------------------------------------
# Δm.


def delta_m(
    metrics: Mapping[str, float],
    baseline: Mapping[str, float],
    directions: Mapping[str, int] = METRIC_DIRECTIONS,
    *,
    keys: Iterable[str] | None = None,
    average: str = "metric",
) -> float:
    """Average signed relative change vs a single-task baseline, in percent (positive = better).

    Δm = 100 / K · Σ_k s_k (M_k − M_b,k) / M_b,k with s_k = +1 (``HIGHER``) or −1 (``LOWER``),
    i.e. (−1)^{l_k} with l_k = 1 when lower is better: Maninis et al., CVPR 2019, Eq. 4;
    Vandenhende et al., TPAMI 2021, Eq. 10; LibMTL ``count_improvement``. Nash-MTL's tables
    report the negative (lower = better).

    Args:
        metrics: {name: value} of the evaluated model.
        baseline: {name: value} of the single-task baselines, same units.
        directions: {name: HIGHER | LOWER}; every used name needs one.
        keys: the metric names to use. None uses all of ``metrics`` and then requires
            ``baseline`` to have exactly the same names; with ``keys`` other names of either
            dict are ignored.
        average: ``"metric"`` -- over all K metrics (Maninis; Nash-MTL's NYUv2 ``delta_fn``);
            ``"task"`` -- first within each task (the prefix before ``/``), then over tasks
            (LibMTL ``count_improvement``).

    Raises:
        KeyError: a metric is missing from the baseline (or from ``metrics`` / ``directions``),
            or the two dicts have different names and ``keys`` is not given.
        ValueError: a baseline value is 0 or a value is not finite, or an unknown ``average``.
    """
    if average not in ("metric", "task"):
        raise ValueError(f"delta_m: average must be 'metric' or 'task', got {average!r}")
    if keys is None:
        names = list(metrics)
        missing = [k for k in names if k not in baseline]
        if missing:
            raise KeyError(f"delta_m: baseline lacks metric(s) {missing}")
        extra = [k for k in baseline if k not in metrics]
        if extra:
            raise KeyError(
                f"delta_m: baseline has metric(s) {extra} that the model lacks; pass keys=[...] to "
                "choose the metrics to compare"
            )
    else:
        names = list(dict.fromkeys(keys))
        for what, d in (("metrics", metrics), ("baseline", baseline)):
            missing = [k for k in names if k not in d]
            if missing:
                raise KeyError(f"delta_m: {what} lacks metric(s) {missing}")
    if not names:
        raise ValueError("delta_m: no metrics to compare")
    no_dir = [k for k in names if k not in directions]
    if no_dir:
        raise KeyError(f"delta_m: no direction (HIGHER / LOWER) for metric(s) {no_dir}")

    groups: dict[str, list[float]] = {}
    for k in names:
        m, b, s = float(metrics[k]), float(baseline[k]), directions[k]
        if s not in (HIGHER, LOWER):
            raise ValueError(f"delta_m: direction of {k!r} must be HIGHER (1) or LOWER (-1), got {s!r}")
        if not (math.isfinite(m) and math.isfinite(b)):
            raise ValueError(f"delta_m: {k!r} is not finite (model {m}, baseline {b})")
        if b == 0:
            raise ValueError(f"delta_m: baseline {k!r} is 0; the relative change is undefined")
        group = k.split("/", 1)[0] if average == "task" else k
        groups.setdefault(group, []).append(s * (m - b) / b)
    return 100.0 * sum(sum(v) / len(v) for v in groups.values()) / len(groups)


# -------------------------------------------------------------------------------------------
# Tables.

_ARROWS = {HIGHER: "↑", LOWER: "↓"}


def _columns(rows: Iterable[Mapping[str, object]], directions: Mapping[str, int]) -> list[str]:
    seen: dict[str, None] = {}
    for r in rows:
        seen.update(dict.fromkeys(r))
    known = [k for k in directions if k in seen]
    return known + sorted(k for k in seen if k not in directions)


def _header(name: str, directions: Mapping[str, int], percent: bool) -> str:
    unit = " (%)" if percent and name in FRACTION_METRICS else ""
    arrow = _ARROWS.get(directions.get(name), "")
    return f"{name}{unit} {arrow}".rstrip()


def _scale(name: str, percent: bool) -> float:
    return 100.0 if percent and name in FRACTION_METRICS else 1.0


def _fmt(x: float, digits: int) -> str:
    return "nan" if math.isnan(x) else f"{x:.{digits}f}"


def _markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines) + "\n"


def _json_value(x: float) -> float | None:
    return x if math.isfinite(x) else None


def format_table(
    rows: Mapping[str, Mapping[str, float]],
    directions: Mapping[str, int] = METRIC_DIRECTIONS,
    *,
    digits: int = 4,
    percent: bool = False,
    fmt: str = "markdown",
) -> str:
    """One row per method: markdown with ↑ / ↓ from ``directions`` in the header, or JSON.

    Args:
        rows: {row label: {metric name: value}}; a metric a row lacks is shown as "–".
        directions: {name: HIGHER | LOWER}; names without one get no arrow.
        digits: decimals shown.
        percent: show ``FRACTION_METRICS`` x100 with "(%)" in the header.
        fmt: ``"markdown"`` or ``"json"`` ({"directions": ..., "rows": ...}, NaN -> null,
            values unscaled).

    Columns: the names of ``directions`` in its order, then any other names alphabetically.
    """
    cols = _columns(rows.values(), directions)
    if fmt == "json":
        data = {
            "directions": {c: directions[c] for c in cols if c in directions},
            "rows": {label: {k: _json_value(float(v)) for k, v in r.items()} for label, r in rows.items()},
        }
        return json.dumps(data, indent=2, ensure_ascii=False)
    if fmt != "markdown":
        raise ValueError(f"format_table: fmt must be 'markdown' or 'json', got {fmt!r}")
    header = ["method", *(_header(c, directions, percent) for c in cols)]
    body = [
        [label, *(_fmt(float(r[c]) * _scale(c, percent), digits) if c in r else "–" for c in cols)]
        for label, r in rows.items()
    ]
    return _markdown(header, body)


def mean_std(runs: Sequence[Mapping[str, float]]) -> dict[str, tuple[float, float, int]]:
    """{name: (mean, sample std (n − 1), n)} over runs; std is NaN for a single run.

    Every run must report the same metric names (a ValueError names the odd ones).
    """
    if not runs:
        raise ValueError("mean_std: no runs")
    names = list(runs[0])
    for i, r in enumerate(runs):
        if set(r) != set(names):
            diff = sorted(set(r) ^ set(names))
            raise ValueError(f"mean_std: run {i} reports different metrics than run 0: {diff}")
    out = {}
    for k in names:
        v = [float(r[k]) for r in runs]
        out[k] = (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else math.nan, len(v))
    return out


def mean_std_table(
    runs: Mapping[str, Sequence[Mapping[str, float]]],
    directions: Mapping[str, int] = METRIC_DIRECTIONS,
    *,
    digits: int = 4,
    percent: bool = False,
    fmt: str = "markdown",
) -> str:
    """Study table: one row per method with "mean ± std" cells over its runs (seeds).

    std is the sample standard deviation (n − 1); with one run the cell shows the mean only.
    A column "n" gives the number of runs. ``fmt="json"`` returns
    {"directions", "rows": {label: {name: {"mean", "std", "n"}}}}. Other arguments as
    :func:`format_table`.
    """
    stats = {label: mean_std(rs) for label, rs in runs.items()}
    cols = _columns(stats.values(), directions)
    if fmt == "json":
        data = {
            "directions": {c: directions[c] for c in cols if c in directions},
            "rows": {
                label: {
                    k: {"mean": _json_value(m), "std": _json_value(s), "n": n} for k, (m, s, n) in st.items()
                }
                for label, st in stats.items()
            },
        }
        return json.dumps(data, indent=2, ensure_ascii=False)
    if fmt != "markdown":
        raise ValueError(f"mean_std_table: fmt must be 'markdown' or 'json', got {fmt!r}")

    def cell(st: dict, c: str) -> str:
        if c not in st:
            return "–"
        m, s, n = st[c]
        f = _scale(c, percent)
        return _fmt(m * f, digits) if n < 2 else f"{_fmt(m * f, digits)} ± {_fmt(s * f, digits)}"

    header = ["method", "n", *(_header(c, directions, percent) for c in cols)]
    body = [[label, str(len(runs[label])), *(cell(st, c) for c in cols)] for label, st in stats.items()]
    return _markdown(header, body)
