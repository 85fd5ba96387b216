"""Refinement network and the bridge ("middle net")."""

import pytest
import torch
import torch.nn.functional as F

from mgm_fast.config import preset
from mgm_fast.models import count_parameters
from mgm_fast.models.bridge import Bridge
from mgm_fast.models.refinement import PostEncoder, RefinementNet


def _inputs(cfg, batch, size):
    return {
        "seg": torch.randn(batch, cfg.num_seg_classes, size, size),
        "depth": torch.randn(batch, 1, size, size),
        "normal": torch.rand(batch, 3, size, size),
    }


def test_paper_refinement_structure():
    cfg = preset("paper").model
    with torch.device("meta"):
        net = RefinementNet(cfg)
        out = net(**{k: v.to("meta") for k, v in _inputs(cfg, 2, 128).items()})
    assert out.shape == (2, 27)
    assert net.fc1.weight.shape == (128, 576) and net.fc2.weight.shape == (27, 128)
    assert net.encoders["seg"].conv1.weight.shape == (64, 40, 5, 5)
    assert net.encoders["depth"].conv1.weight.shape == (64, 1, 5, 5)
    assert net.encoders["normal"].conv1.weight.shape == (64, 3, 5, 5)
    enc = net.encoders["seg"]
    assert [getattr(enc, f"layer{i}")[0].conv1.stride[0] for i in (1, 2, 3)] == [2, 2, 2]
    assert [len(getattr(enc, f"layer{i}")) for i in (1, 2, 3)] == [3, 4, 3]


@pytest.mark.parametrize("image_size", [32, 64, 256])
def test_refinement_shapes(small_cfg, image_size):
    cfg = small_cfg(image_size, attn_resolution=16 if image_size == 32 else 32)
    net = RefinementNet(cfg)
    out = net(**_inputs(cfg, 2, image_size))
    assert out.shape == (2, cfg.num_scenes) and out.dtype == torch.float32


def test_global_max_pool_equals_released_4x4_pool_at_128(small_cfg):
    cfg = small_cfg(128)
    enc = PostEncoder(cfg.num_seg_classes, cfg.refine_stem_width, cfg.refine_widths, cfg.refine_blocks).eval()
    x = torch.randn(2, cfg.num_seg_classes, 128, 128)
    h = F.max_pool2d(F.relu(enc.bn1(enc.conv1(x))), 3, 2, 1)
    h = enc.layer3(enc.layer2(enc.layer1(h)))
    assert h.shape[-2:] == (4, 4)
    released = F.max_pool2d(h, kernel_size=4, stride=1).flatten(1)
    torch.testing.assert_close(enc(x), released, rtol=0, atol=0)


def test_logit_relu_switch(small_cfg):
    with_relu = RefinementNet(small_cfg(64, refine_logit_relu=True)).eval()
    without = RefinementNet(small_cfg(64, refine_logit_relu=False)).eval()
    without.load_state_dict(with_relu.state_dict())
    inputs = _inputs(small_cfg(64), 4, 64)
    raw = without(**inputs)
    clamped = with_relu(**inputs)
    assert (raw < 0).any()  # otherwise the switch would not be exercised
    torch.testing.assert_close(clamped, raw.clamp_min(0), rtol=0, atol=0)


def test_refinement_task_subset_and_missing_input(small_cfg):
    cfg = small_cfg(64)
    net = RefinementNet(cfg, tasks=("depth", "normal"))
    assert list(net.encoders) == ["depth", "normal"]
    assert net.fc1.in_features == 2 * cfg.refine_widths[-1]
    inputs = _inputs(cfg, 2, 64)
    assert net(depth=inputs["depth"], normal=inputs["normal"]).shape == (2, cfg.num_scenes)
    with pytest.raises(ValueError, match="no 'normal' input"):
        net(depth=inputs["depth"])


def test_bridge_train_mode_batch_statistics():
    cfg = preset("paper").model
    bridge = Bridge(cfg.feature_dim, cfg.z_dim)
    assert count_parameters(bridge) == 360 * 128 + 128 + 2 * 128
    assert bridge.fc.weight_orig.shape == (128, 360) and bridge.fc.weight_u.shape == (128,)
    feats = torch.rand(16, 360, 4, 4)
    z = bridge(feats)
    assert z.shape == (16, 128)
    # Pool by hand, spectral-normalised linear (eval mode reuses the u, v of that forward), then
    # standardise each latent dimension with the batch statistics (BN weight 1, bias 0).
    bridge.eval()
    pre = F.linear(feats.mean(dim=(2, 3)), bridge.fc.sn_weight(), bridge.fc.bias)
    mean, var = pre.mean(0), pre.var(0, unbiased=False)
    torch.testing.assert_close(z, (pre - mean) / torch.sqrt(var + 1e-5), rtol=1e-4, atol=1e-4)
    # Eval mode uses the running statistics instead (default momentum 0.1 after one step).
    expected = (pre - 0.1 * mean) / torch.sqrt(0.9 + 0.1 * pre.var(0, unbiased=True) + 1e-5)
    torch.testing.assert_close(bridge(feats), expected, rtol=1e-4, atol=1e-5)


def test_bridge_batch_one():
    bridge = Bridge(12, 8)
    with pytest.raises(ValueError, match="batch of at least 2"):
        bridge(torch.randn(1, 12, 2, 2))
    bridge.eval()
    assert bridge(torch.randn(1, 12, 2, 2)).shape == (1, 8)
    assert bridge(torch.randn(1, 12)).shape == (1, 8)
