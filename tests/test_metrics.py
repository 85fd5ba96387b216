"""Evaluation metrics against hand-computed cases, streaming / distributed invariance and no host sync."""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.distributed as dist

from mgm_fast.metrics import (
    HIGHER,
    LOWER,
    METRIC_DIRECTIONS,
    DepthMetrics,
    MultiTaskEvaluator,
    NormalMetrics,
    SceneMetrics,
    SegMetrics,
    delta_m,
    format_table,
    mean_std,
    mean_std_table,
)

# -------------------------------------------------------------------------------------------
# Helpers.


def _normals_at(angles_deg, scale=1.0):
    """Targets (0, 0, 1) and predictions at the given angles from them, as (1, 3, 1, N)."""
    n = len(angles_deg)
    target = torch.zeros(1, 3, 1, n, dtype=torch.float64)
    target[:, 2] = 1.0
    pred = torch.zeros(1, 3, 1, n, dtype=torch.float64)
    for i, a in enumerate(angles_deg):
        r = math.radians(a)
        pred[0, 0, 0, i] = scale * math.sin(r)
        pred[0, 2, 0, i] = scale * math.cos(r)
    return pred, target


def _random_batch(b=2, c=5, s=4, h=6, w=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    seg = torch.randint(-1, c, (b, h, w), generator=g)
    depth = torch.rand(b, 1, h, w, generator=g) * 5 + 0.1
    depth_mask = torch.rand(b, 1, h, w, generator=g) > 0.2
    depth = torch.where(depth_mask, depth, 0)
    normal = torch.nn.functional.normalize(torch.randn(b, 3, h, w, generator=g), dim=1)
    normal_mask = torch.rand(b, 1, h, w, generator=g) > 0.2
    normal = torch.where(normal_mask, normal, 0)
    scene = torch.randint(-1, s, (b,), generator=g)
    batch = {
        "seg": seg,
        "depth": depth,
        "depth_mask": depth_mask,
        "normal": normal,
        "normal_mask": normal_mask,
        "scene": scene,
    }
    preds = {
        "seg": torch.randn(b, c, h, w, generator=g),
        "depth": torch.rand(b, 1, h, w, generator=g) * 5,
        "normal": torch.randn(b, 3, h, w, generator=g) * 2,
        "scene": torch.randn(b, s, generator=g),
    }
    return preds, batch


def _cat(dicts):
    return {k: torch.cat([d[k] for d in dicts]) for k in dicts[0]}


def _assert_metrics_close(a, b, rel=1e-9, abs_=1e-12):
    assert a.keys() == b.keys()
    for k in a:
        if math.isnan(a[k]):
            assert math.isnan(b[k]), k
        else:
            assert b[k] == pytest.approx(a[k], rel=rel, abs=abs_), k


# -------------------------------------------------------------------------------------------
# Segmentation.

# 2x3 image, C = 4 classes, one ignored pixel (predicted 3), class 3 absent from the labelled
# pixels of both prediction and target. (target, pred) pairs of the 5 labelled pixels:
# (0,0) (0,1) (1,1) / (1,0) (2,0)
#   confusion rows=target: t0 -> [1, 1, 0, 0], t1 -> [1, 1, 0, 0], t2 -> [1, 0, 0, 0]
#   TP = [1, 1, 0, 0], FP = [2, 1, 0, 0], FN = [1, 1, 1, 0]
#   IoU = [1/4, 1/3, 0, NaN] -> mIoU(present) = (1/4 + 1/3 + 0) / 3 = 7/36; pix acc = 2/5
SEG_TARGET = torch.tensor([[[0, 0, 1], [1, -1, 2]]])
SEG_PRED = torch.tensor([[[0, 1, 1], [0, 3, 0]]])


def test_seg_hand_case_labels():
    m = SegMetrics(4)
    m.update(SEG_PRED, SEG_TARGET)
    expected_cm = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    assert torch.equal(m.confusion_matrix, expected_cm)
    iou = m.per_class_iou()
    assert iou[:3].tolist() == pytest.approx([1 / 4, 1 / 3, 0.0])
    assert math.isnan(iou[3])
    out = m.compute()
    assert out["miou"] == pytest.approx(7 / 36)
    assert out["pix_acc"] == pytest.approx(2 / 5)


def test_seg_miou_over_all_is_mtan_convention():
    m = SegMetrics(4, miou_over="all")
    m.update(SEG_PRED, SEG_TARGET)
    assert math.isnan(m.compute()["miou"])  # class 3 absent: 0/0, as MTAN's ConfMatrix
    m3 = SegMetrics(3, miou_over="all")  # every class occurs -> both conventions agree
    pred = SEG_PRED.clamp(max=2)
    m3.update(pred, SEG_TARGET)
    present = SegMetrics(3)
    present.update(pred, SEG_TARGET)
    assert m3.compute() == present.compute()
    with pytest.raises(ValueError, match="miou_over"):
        SegMetrics(3, miou_over="some")


def test_seg_logits_and_predicted_only_class():
    # class 3 predicted on a labelled pixel but never in the target: present, IoU 0
    pred = SEG_PRED.clone()
    pred[0, 1, 2] = 3  # the (t=2, p=0) pixel becomes (t=2, p=3)
    logits = torch.nn.functional.one_hot(pred, 4).permute(0, 3, 1, 2).float()
    m = SegMetrics(4)
    m.update(logits, SEG_TARGET)
    # IoU: c0 = 1 / (1 + 1 + 1) = 1/3, c1 = 1/3, c2 = 0/1, c3 = 0/1
    assert m.compute()["miou"] == pytest.approx((1 / 3 + 1 / 3) / 4)
    assert m.compute()["pix_acc"] == pytest.approx(2 / 5)


def test_seg_out_of_range_prediction_is_a_miss_not_a_false_positive():
    m = SegMetrics(2)
    m.update(torch.tensor([[[0, 7, -3]]]), torch.tensor([[[0, 0, 1]]]))
    # c0: TP 1, FN 1 (the 7), FP 0; c1: TP 0, FN 1, FP 0
    assert m.per_class_iou().tolist() == pytest.approx([1 / 2, 0.0])
    assert m.compute()["pix_acc"] == pytest.approx(1 / 3)


def test_seg_custom_ignore_index_and_empty():
    m = SegMetrics(3, ignore_index=255)
    out = m.compute()
    assert math.isnan(out["miou"]) and math.isnan(out["pix_acc"])
    m.update(torch.tensor([[[0, 1]]]), torch.tensor([[[0, 255]]]))
    assert m.compute() == {"miou": 1.0, "pix_acc": 1.0}


def test_seg_shape_errors():
    m = SegMetrics(4)
    with pytest.raises(ValueError, match="channels"):
        m.update(torch.zeros(1, 3, 2, 3), SEG_TARGET)
    with pytest.raises(ValueError, match="shape"):
        m.update(SEG_PRED, SEG_TARGET[:, :1])
    with pytest.raises(ValueError, match="integer labels"):
        m.update(SEG_PRED.float(), SEG_TARGET)


def test_seg_matches_mtan_confmatrix_formula():
    g = torch.Generator().manual_seed(1)
    c = 5
    pred = torch.randint(0, c, (3, 16, 16), generator=g)
    target = torch.randint(-1, c, (3, 16, 16), generator=g)
    k = (target >= 0) & (target < c)
    h = torch.bincount(c * target[k] + pred[k], minlength=c * c).reshape(c, c).double()
    iu = h.diag() / (h.sum(1) + h.sum(0) - h.diag())
    m = SegMetrics(c, miou_over="all")
    m.update(pred, target)
    out = m.compute()
    assert out["miou"] == pytest.approx(float(iu.mean()))
    assert out["pix_acc"] == pytest.approx(float(h.diag().sum() / h.sum()))


# -------------------------------------------------------------------------------------------
# Depth.

# valid = mask & d > 0: (d=2, p=3) (d=4, p=3) (d=1, p=1) (d=5, p=6); excluded: d=0 with mask True,
# d=3 with mask False (p=100).
#   abs = (1 + 1 + 0 + 1) / 4 = 0.75; rel = (1/2 + 1/4 + 0 + 1/5) / 4 = 0.2375
DEPTH_T = torch.tensor([[[[2.0, 0.0, 4.0], [1.0, 3.0, 5.0]]]])
DEPTH_P = torch.tensor([[[[3.0, 9.0, 3.0], [1.0, 100.0, 6.0]]]])
DEPTH_M = torch.tensor([[[[True, True, True], [True, False, True]]]])


def test_depth_hand_case():
    m = DepthMetrics()
    m.update(DEPTH_P, DEPTH_T, DEPTH_M)
    out = m.compute()
    assert out["abs_err"] == pytest.approx(0.75)
    assert out["rel_err"] == pytest.approx(0.2375)
    no_mask = DepthMetrics()  # mask=None: d > 0 only, so d=3 / p=100 counts
    no_mask.update(DEPTH_P, DEPTH_T)
    assert no_mask.compute()["abs_err"] == pytest.approx((3 + 97) / 5)


def test_depth_pixel_vs_batch_reduction():
    second_p = torch.tensor([[[[3.0, 1.0]]]])
    second_t = torch.tensor([[[[1.0, 0.0]]]])  # one valid pixel: abs 2, rel 2
    empty_p, empty_t = torch.ones(1, 1, 1, 2), torch.zeros(1, 1, 1, 2)  # no valid pixel
    pixel, batch = DepthMetrics("pixel"), DepthMetrics("batch")
    for m in (pixel, batch):
        m.update(DEPTH_P, DEPTH_T, DEPTH_M)
        m.update(second_p, second_t)
        m.update(empty_p, empty_t)
    assert pixel.compute()["abs_err"] == pytest.approx((3 + 2) / 5)
    assert pixel.compute()["rel_err"] == pytest.approx((0.95 + 2) / 5)
    # MTAN: mean of per-batch means (the empty batch is skipped)
    assert batch.compute()["abs_err"] == pytest.approx((0.75 + 2) / 2)
    assert batch.compute()["rel_err"] == pytest.approx((0.2375 + 2) / 2)


def test_depth_empty_is_nan():
    m = DepthMetrics()
    m.update(torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))
    out = m.compute()
    assert math.isnan(out["abs_err"]) and math.isnan(out["rel_err"])
    with pytest.raises(ValueError, match="reduction"):
        DepthMetrics("image")


# -------------------------------------------------------------------------------------------
# Normals.

ANGLES = [0.0, 90.0, 180.0, 10.0, 20.0, 45.0]
# sorted 0, 10, 20, 45, 90, 180: mean 345/6 = 57.5, median (20 + 45)/2 = 32.5,
# < 11.25: {0, 10} = 2/6, < 22.5: {0, 10, 20} = 3/6, < 30: 3/6


@pytest.mark.parametrize("keep_angles", [False, True])
def test_normals_hand_case(keep_angles):
    pred, target = _normals_at([*ANGLES, 33.0], scale=3.0)  # unnormalised predictions
    mask = torch.ones(1, 1, 1, 7, dtype=torch.bool)
    mask[..., 6] = False  # the 33° pixel is invalid
    m = NormalMetrics(keep_angles=keep_angles)
    m.update(pred, target, mask)
    out = m.compute()
    assert out["mean"] == pytest.approx(57.5, abs=1e-9)
    assert out["median"] == pytest.approx(32.5, abs=1e-9)  # bins hold equal angles: exact
    assert out["within_11.25"] == pytest.approx(2 / 6)
    assert out["within_22.5"] == pytest.approx(3 / 6)
    assert out["within_30"] == pytest.approx(3 / 6)


def test_normals_float32_unnormalised_and_zero_prediction():
    pred, target = _normals_at([10.0, 20.0, 45.0], scale=0.25)
    pred, target = pred.float(), target.float()
    pred[0, :, 0, 2] = 0  # zero prediction -> 90°
    m = NormalMetrics()
    m.update(pred, target)  # mask=None: target non-zero
    out = m.compute()
    assert out["mean"] == pytest.approx((10 + 20 + 90) / 3, abs=1e-4)
    assert out["median"] == pytest.approx(20.0, abs=1e-4)
    # strict "<": an angle exactly at a threshold is not within it (90° is exact: dot = 0)
    p2, t2 = _normals_at([90.0, 89.0])
    p2[0, 2, 0, 0] = 0.0
    m2 = NormalMetrics(thresholds=(90.0,))
    m2.update(p2, t2)
    assert m2.compute()["within_90"] == pytest.approx(0.5)


def test_normals_median_moderate_set_against_torch():
    g = torch.Generator().manual_seed(3)
    hist, exact = NormalMetrics(), NormalMetrics(keep_angles=True)
    coarse = NormalMetrics(median_bins=180)  # 1° bins
    angles = []
    for _ in range(6):
        f64 = {"generator": g, "dtype": torch.float64}  # float64: angles exact to ~1e-12
        target = torch.nn.functional.normalize(torch.randn(4, 3, 32, 32, **f64), dim=1)
        pred = target + 0.6 * torch.randn(4, 3, 32, 32, **f64)
        mask = torch.rand(4, 1, 32, 32, generator=g) > 0.1
        for m in (hist, exact, coarse):
            m.update(pred, target, mask)
        cos = (torch.nn.functional.normalize(pred, dim=1) * target).sum(1).clamp(-1, 1)
        angles.append(torch.rad2deg(torch.acos(cos))[mask[:, 0]])
    a = torch.cat(angles).double()
    n = a.numel()
    srt = a.sort().values
    np_median = float((srt[(n - 1) // 2] + srt[n // 2]) / 2)  # numpy's median
    assert exact.compute()["median"] == pytest.approx(np_median, abs=1e-9)
    assert abs(hist.compute()["median"] - np_median) < hist.bin_width
    assert abs(hist.compute()["median"] - float(torch.median(a))) < hist.bin_width
    assert abs(coarse.compute()["median"] - np_median) < 1.0
    out = hist.compute()
    assert out["mean"] == pytest.approx(float(a.mean()), rel=1e-6)
    assert out["within_22.5"] == pytest.approx(float((a < 22.5).double().mean()), abs=1e-6)
    # odd count too
    odd = NormalMetrics()
    p, t = _normals_at([5.0, 7.0, 40.0, 41.0, 100.0])
    odd.update(p, t)
    assert odd.compute()["median"] == pytest.approx(40.0, abs=1e-9)


def test_normals_mask_shapes_and_errors():
    pred, target = _normals_at([10.0, 50.0])
    m = NormalMetrics()
    m.update(pred, target, torch.tensor([[[True, False]]]))  # (B, H, W) mask
    assert m.compute()["mean"] == pytest.approx(10.0)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        m.update(pred[:, :2], target[:, :2])
    empty = NormalMetrics()
    assert all(math.isnan(v) for v in empty.compute().values())


# -------------------------------------------------------------------------------------------
# Scene.


def test_scene_hand_case():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 3.0], [5.0, 0.0, 0.0]])
    target = torch.tensor([0, 2, 1, -1])  # 2 of 3 labelled images right; -1 unknown
    m = SceneMetrics(3)
    m.update(logits, target)
    assert m.compute()["acc"] == pytest.approx(2 / 3)
    assert torch.equal(m.confusion_matrix, torch.tensor([[1, 0, 0], [0, 0, 1], [0, 0, 1]]))
    m.update(torch.tensor([1, 9]), torch.tensor([1, 1]))  # labels; 9 is out of range -> wrong
    assert m.compute()["acc"] == pytest.approx(3 / 5)
    with pytest.raises(ValueError, match="classes"):
        m.update(torch.zeros(2, 4), torch.tensor([0, 1]))


# -------------------------------------------------------------------------------------------
# Streaming, evaluator, reset, device.


@pytest.mark.parametrize("keep_angles", [False, True])
def test_streaming_equals_one_big_update(keep_angles):
    # (depth_reduction="batch" is per-update by definition, so it is not streaming-invariant)
    parts = [_random_batch(seed=s) for s in range(4)]
    kw = {"num_seg_classes": 5, "num_scenes": 4, "keep_angles": keep_angles}
    tasks = ("seg", "depth", "normal", "scene")
    streamed, whole = MultiTaskEvaluator(tasks, **kw), MultiTaskEvaluator(tasks, **kw)
    for p, b in parts:
        streamed.update(p, b)
    whole.update(_cat([p for p, _ in parts]), _cat([b for _, b in parts]))
    _assert_metrics_close(streamed.compute(), whole.compute())
    assert streamed.metrics["seg"].confusion_matrix.equal(whole.metrics["seg"].confusion_matrix)


def test_evaluator_names_directions_reset():
    ev = MultiTaskEvaluator(("scene", "normal", "seg", "depth"), num_seg_classes=5, num_scenes=4)
    assert ev.tasks == ("seg", "depth", "normal", "scene")
    preds, batch = _random_batch()
    ev.update(preds, batch)
    out = ev.compute()
    assert tuple(out) == ev.metric_names == tuple(METRIC_DIRECTIONS)
    assert all(isinstance(v, float) for v in out.values())
    ev.reset()
    assert all(math.isnan(v) for v in ev.compute().values())
    with pytest.raises(KeyError, match="scene"):
        ev.update({k: v for k, v in preds.items() if k != "scene"}, batch)
    with pytest.raises(ValueError, match="num_seg_classes"):
        MultiTaskEvaluator(("seg",))
    with pytest.raises(ValueError, match="tasks"):
        MultiTaskEvaluator(("seg", "edges"), num_seg_classes=3)


def test_evaluator_matches_single_accumulators():
    preds, batch = _random_batch(seed=7)
    ev = MultiTaskEvaluator(("seg", "depth", "normal"), num_seg_classes=5)
    ev.update(preds, batch)
    seg, depth, normal = SegMetrics(5), DepthMetrics(), NormalMetrics()
    seg.update(preds["seg"], batch["seg"])
    depth.update(preds["depth"], batch["depth"], batch["depth_mask"])
    normal.update(preds["normal"], batch["normal"], batch["normal_mask"])
    expected = {f"seg/{k}": v for k, v in seg.compute().items()}
    expected |= {f"depth/{k}": v for k, v in depth.compute().items()}
    expected |= {f"normal/{k}": v for k, v in normal.compute().items()}
    assert ev.compute() == expected


# -------------------------------------------------------------------------------------------
# No host synchronisation in update.


def _forbid(*_a, **_k):
    raise AssertionError("host synchronisation in update()")


def test_update_never_reads_values_back(monkeypatch):
    preds, batch = _random_batch(seed=11)
    evs = [
        MultiTaskEvaluator(("seg", "depth", "normal", "scene"), num_seg_classes=5, num_scenes=4),
        MultiTaskEvaluator(
            ("seg", "depth", "normal", "scene"),
            num_seg_classes=5,
            num_scenes=4,
            keep_angles=True,
            depth_reduction="batch",
        ),
    ]
    for ev in evs:
        ev.update(preds, batch)  # first update may move state; later ones are checked too
    original_getitem = torch.Tensor.__getitem__

    def getitem(self, idx):
        items = idx if isinstance(idx, tuple) else (idx,)
        if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items):
            raise AssertionError("boolean-mask indexing (a nonzero) in update()")
        return original_getitem(self, idx)

    with monkeypatch.context() as mp:
        for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "nonzero"):
            mp.setattr(torch.Tensor, name, _forbid)
        mp.setattr(torch.Tensor, "masked_select", _forbid)
        mp.setattr(torch.Tensor, "__getitem__", getitem)
        for name in ("nonzero", "masked_select", "bincount", "unique", "median"):
            mp.setattr(torch, name, _forbid)
        for ev in evs:
            for _ in range(2):
                ev.update(preds, batch)
        # the guard itself works
        with pytest.raises(AssertionError):
            torch.ones(2).item()
    for ev in evs:
        assert all(isinstance(v, float) for v in ev.compute().values())


@pytest.mark.gpu
def test_update_has_no_cuda_sync():
    preds, batch = _random_batch(b=4, h=32, w=32, seed=5)
    preds = {k: v.cuda() for k, v in preds.items()}
    batch = {k: v.cuda() for k, v in batch.items()}
    for kw in ({}, {"keep_angles": True, "depth_reduction": "batch"}):
        ev = MultiTaskEvaluator(("seg", "depth", "normal", "scene"), num_seg_classes=5, num_scenes=4, **kw)
        ev.to("cuda")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                ev.update(preds, batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        gpu = ev.compute()
        cpu = MultiTaskEvaluator(("seg", "depth", "normal", "scene"), num_seg_classes=5, num_scenes=4, **kw)
        for _ in range(3):
            cpu.update({k: v.cpu() for k, v in preds.items()}, {k: v.cpu() for k, v in batch.items()})
        _assert_metrics_close(cpu.compute(), gpu, rel=1e-5, abs_=1e-4)


# -------------------------------------------------------------------------------------------
# Distributed.


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def gloo_group():
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_reduce_without_distributed_is_noop():
    preds, batch = _random_batch()
    ev = MultiTaskEvaluator(("seg", "depth", "normal", "scene"), num_seg_classes=5, num_scenes=4)
    ev.update(preds, batch)
    before = ev.compute()
    assert ev.reduce_() is ev
    assert ev.compute() == before
    ev.update(preds, batch)  # nothing was reduced: updates stay allowed


@pytest.mark.parametrize("keep_angles", [False, True])
def test_single_process_gloo_reduce_keeps_values(gloo_group, keep_angles):
    ev = MultiTaskEvaluator(
        ("seg", "depth", "normal", "scene"), num_seg_classes=5, num_scenes=4, keep_angles=keep_angles
    )
    for s in range(3):
        ev.update(*_random_batch(seed=s))
    before = ev.compute()
    ev.reduce_()
    assert ev.compute() == before
    with pytest.raises(RuntimeError, match="twice"):
        ev.reduce_()
    with pytest.raises(RuntimeError, match="reset"):
        ev.update(*_random_batch())
    ev.reset()
    ev.update(*_random_batch(seed=0))
    ev.reduce_()  # allowed again after reset


# -------------------------------------------------------------------------------------------
# Δm.


def test_delta_m_hand_example_mixed_directions():
    base = {"seg/miou": 50.0, "depth/abs_err": 0.4}
    # mIoU 40 vs 50 -> -20 %; abs err 0.5 vs 0.4 -> -25 % (worse); mean -22.5
    assert delta_m({"seg/miou": 40.0, "depth/abs_err": 0.5}, base) == pytest.approx(-22.5)
    # better on both: +20 % and +25 %
    assert delta_m({"seg/miou": 60.0, "depth/abs_err": 0.3}, base) == pytest.approx(22.5)
    assert delta_m(base, base) == 0.0


def test_delta_m_metric_vs_task_average():
    base = {"seg/miou": 50.0, "seg/pix_acc": 50.0, "depth/abs_err": 0.4}
    new = {"seg/miou": 40.0, "seg/pix_acc": 60.0, "depth/abs_err": 0.5}  # -20, +20, -25 %
    assert delta_m(new, base) == pytest.approx((-20 + 20 - 25) / 3)
    assert delta_m(new, base, average="task") == pytest.approx((0 - 25) / 2)
    # LibMTL count_improvement docstring example (weight 1 = higher is better), x100
    dirs = {"A/0": HIGHER, "A/1": LOWER, "B/0": HIGHER}
    libmtl = ((-3 / 96 + -1 / 98) / 2 + 0.3 / 0.2) / 2 * 100
    assert delta_m(
        {"A/0": 93, "A/1": 99, "B/0": 0.5}, {"A/0": 96, "A/1": 98, "B/0": 0.2}, dirs, average="task"
    ) == pytest.approx(libmtl)


def test_delta_m_key_handling():
    base = {"seg/miou": 0.5, "depth/abs_err": 0.4}
    with pytest.raises(KeyError, match="baseline lacks"):
        delta_m({"seg/miou": 0.4, "normal/mean": 20.0}, base)
    with pytest.raises(KeyError, match="keys="):
        delta_m({"seg/miou": 0.4}, base)
    assert delta_m({"seg/miou": 0.4, "scene/acc": 0.9}, base, keys=["seg/miou"]) == pytest.approx(-20.0)
    with pytest.raises(KeyError, match="metrics lacks"):
        delta_m({"seg/miou": 0.4}, base, keys=["depth/abs_err"])
    with pytest.raises(KeyError, match="direction"):
        delta_m({"x": 1.0}, {"x": 2.0})
    with pytest.raises(ValueError, match="is 0"):
        delta_m({"seg/miou": 0.4}, {"seg/miou": 0.0})
    with pytest.raises(ValueError, match="finite"):
        delta_m({"seg/miou": math.nan}, {"seg/miou": 0.5})


# -------------------------------------------------------------------------------------------
# Tables.


def test_format_table_markdown_and_json():
    rows = {
        "ST": {"seg/miou": 0.5, "depth/abs_err": 0.4, "delta_m": 0.0},
        "MGM": {"seg/miou": 0.5432, "depth/abs_err": 0.38766},
    }
    md = format_table(rows)
    lines = md.strip().splitlines()
    assert lines[0] == "| method | seg/miou ↑ | depth/abs_err ↓ | delta_m |"
    assert "| MGM | 0.5432 | 0.3877 | – |" in md
    assert "| ST | 0.5000 | 0.4000 | 0.0000 |" in md
    md_pct = format_table(rows, {**METRIC_DIRECTIONS, "delta_m": HIGHER}, percent=True, digits=2)
    assert "seg/miou (%) ↑" in md_pct and "delta_m ↑" in md_pct and "| MGM | 54.32 | 0.39 | – |" in md_pct
    import json

    data = json.loads(format_table({"A": {"seg/miou": math.nan, "normal/mean": 21.0}}, fmt="json"))
    assert data["rows"]["A"] == {"seg/miou": None, "normal/mean": 21.0}
    assert data["directions"] == {"seg/miou": HIGHER, "normal/mean": LOWER}


def test_mean_std_table():
    runs = {
        "MT": [
            {"seg/miou": 0.5, "normal/mean": 20.0},
            {"seg/miou": 0.6, "normal/mean": 22.0},
            {"seg/miou": 0.7, "normal/mean": 24.0},
        ],
        "single": [{"seg/miou": 0.4, "normal/mean": 30.0}],
    }
    st = mean_std(runs["MT"])
    assert st["seg/miou"][0] == pytest.approx(0.6) and st["seg/miou"][1] == pytest.approx(0.1)
    assert st["normal/mean"][1] == pytest.approx(2.0)  # sample std (n - 1)
    md = mean_std_table(runs)
    assert md.splitlines()[0] == "| method | n | seg/miou ↑ | normal/mean ↓ |"
    assert "| MT | 3 | 0.6000 ± 0.1000 | 22.0000 ± 2.0000 |" in md
    assert "| single | 1 | 0.4000 | 30.0000 |" in md
    with pytest.raises(ValueError, match="different metrics"):
        mean_std([{"a": 1.0}, {"b": 2.0}])
