"""Reference losses (the plain-PyTorch twins of the loss ops, and the scene CE) against hand
computations on tiny inputs (docs/method.md section 2)."""

import math

import pytest
import torch

from mgm_fast.losses import scene_ce
from mgm_fast.ops.gan_losses import hinge_d_reference, hinge_g_reference, instance_noise
from mgm_fast.ops.multitask_loss import depth_l1, multitask_loss_reference, normal_l1, seg_ce
from mgm_fast.ops.ntxent import ntxent_loss_reference


def _seg_example():
    # pixel 0: logits (0, 0), label 0 -> -log(1/2) = ln 2
    # pixel 1: logits (ln 3, 0), label 1 -> p = 1/4 -> ln 4
    logits = torch.tensor([[[[0.0, math.log(3.0)]], [[0.0, 0.0]]]])  # (1, 2, 1, 2)
    target = torch.tensor([[[0, 1]]])
    return logits, target


def test_seg_ce_released_mean_over_all_pixels():
    logits, target = _seg_example()
    assert seg_ce(logits, target).item() == pytest.approx(1.5 * math.log(2.0), rel=1e-6)


def test_seg_ce_ignore_index_excluded_from_sum_and_count():
    logits, target = _seg_example()
    target[0, 0, 1] = 255
    assert seg_ce(logits, target, ignore_index=255).item() == pytest.approx(math.log(2.0), rel=1e-6)
    target[:] = 255
    out = seg_ce(logits, target, ignore_index=255)
    assert out.item() == 0.0 and torch.isfinite(out)


def test_seg_ce_shape_error_names_tensor():
    logits, _ = _seg_example()
    with pytest.raises(ValueError, match="seg_ce target"):
        seg_ce(logits, torch.zeros(1, 2, 1, dtype=torch.long))


def test_depth_l1_released_and_valid():
    pred = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2)
    target = torch.ones(1, 1, 2, 2)
    mask = torch.tensor([1.0, 1.0, 0.0, 0.0]).view(1, 1, 2, 2)
    assert depth_l1(pred, target).item() == pytest.approx(1.5)
    assert depth_l1(pred, target, mask).item() == pytest.approx(0.25)  # (0 + 1) / 4
    assert depth_l1(pred, target, mask.bool(), reduction="valid").item() == pytest.approx(0.5)
    assert depth_l1(pred, target, torch.zeros_like(mask), reduction="valid").item() == 0.0
    with pytest.raises(ValueError, match="reduction"):
        depth_l1(pred, target, reduction="sum")


def test_normal_l1_masks_and_reductions():
    pred = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 2.0]]).view(1, 3, 1, 2)
    target = torch.zeros(1, 3, 1, 2)
    # |err| per element: channel0 (1, 0), channel1 (0, 0), channel2 (0, 2); total 3 over 6
    assert normal_l1(pred, target).item() == pytest.approx(0.5)
    mask1 = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)  # keeps pixel 0 only -> error 1
    assert normal_l1(pred, target, mask1).item() == pytest.approx(1 / 6)
    assert normal_l1(pred, target, mask1, reduction="valid").item() == pytest.approx(1 / 3)
    mask3 = torch.tensor([[0.5, 0.0], [1.0, 1.0], [0.0, 1.0]]).view(1, 3, 1, 2)  # soft PNG-style mask
    assert normal_l1(pred, target, mask3).item() == pytest.approx((0.5 + 2.0) / 6)
    assert normal_l1(pred, target, mask3, reduction="valid").item() == pytest.approx(2.5 / 3.5)
    with pytest.raises(ValueError, match="normal_l1 mask"):
        normal_l1(pred, target, torch.ones(1, 2, 1, 2))


def test_multitask_loss_is_the_three_losses():
    torch.manual_seed(1)
    seg = torch.randn(2, 5, 3, 4)
    lab = torch.randint(0, 5, (2, 3, 4))
    dp, dt = torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4)
    np_, nt = torch.randn(2, 3, 3, 4), torch.randn(2, 3, 3, 4)
    out = multitask_loss_reference(seg, dp, np_, lab, dt, nt)
    assert torch.equal(out[0], seg_ce(seg, lab))
    assert torch.equal(out[1], depth_l1(dp, dt))
    assert torch.equal(out[2], normal_l1(np_, nt))


def test_scene_ce_hand_value():
    assert scene_ce(torch.zeros(1, 3), torch.tensor([2])).item() == pytest.approx(math.log(3.0))


def test_ntxent_hand_value_orthogonal_views():
    # views identical and the two images orthogonal: positive cos 1, negatives cos 0
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    expected = math.log(math.exp(2.0) + 2.0) - 2.0  # tau 0.5
    assert ntxent_loss_reference(z, z.clone(), temperature=0.5).item() == pytest.approx(expected, rel=1e-6)


def test_ntxent_batch_one_has_only_the_positive():
    z1, z2 = torch.randn(1, 4), torch.randn(1, 4)
    assert ntxent_loss_reference(z1, z2).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("batch", [3, 32, 33])
def test_ntxent_matches_row_by_row_loop(batch):
    z1, z2 = torch.randn(batch, 8, dtype=torch.float64), torch.randn(batch, 8, dtype=torch.float64)
    tau = 0.5
    u = torch.cat([z1, z2])
    u = u / u.norm(dim=1, keepdim=True)
    total = 0.0
    for i in range(2 * batch):
        pos = (i + batch) % (2 * batch)
        sims = [float(u[i] @ u[k]) / tau for k in range(2 * batch)]
        denom = sum(math.exp(s) for k, s in enumerate(sims) if k != i)
        total += -math.log(math.exp(sims[pos]) / denom)
    assert ntxent_loss_reference(z1, z2, tau).item() == pytest.approx(total / (2 * batch), rel=1e-5)


def test_hinge_losses_hand_values():
    d_real = torch.tensor([2.0, 0.5])
    d_fake = torch.tensor([-2.0, 0.5])
    # real: relu(-1)=0, relu(0.5)=0.5 -> 0.25 ; fake: relu(-1)=0, relu(1.5)=1.5 -> 0.75
    assert hinge_d_reference(d_real, d_fake).item() == pytest.approx(1.0)
    assert hinge_g_reference(torch.tensor([1.0, 3.0])).item() == pytest.approx(-2.0)


def test_instance_noise_std_and_determinism():
    x = torch.zeros(64, 3, 32, 32)
    a = instance_noise(x, 0.01, torch.Generator().manual_seed(3))
    b = instance_noise(x, 0.01, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert a.std().item() == pytest.approx(0.01, rel=0.02)
    assert a.mean().abs().item() < 1e-3
