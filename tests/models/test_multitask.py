"""Encoder, dense decoders, projection head and the multi-task network."""

import math

import pytest
import torch
import torch.nn.functional as F

from mgm_fast.config import preset
from mgm_fast.models import count_parameters
from mgm_fast.models.multitask import DenseDecoder, Encoder, MultiTaskNet, ProjectionHead


def test_paper_encoder_forward_shape():
    cfg = preset("paper").model
    enc = Encoder(cfg)
    feats = enc(torch.randn(2, 3, 128, 128))
    assert feats.shape == (2, 360, 4, 4) and feats.dtype == torch.float32
    assert (feats >= 0).all()  # the last BasicBlock ends with a ReLU
    widths = [getattr(enc, f"layer{i}")[0].conv1.out_channels for i in range(1, 5)]
    assert widths == [48, 96, 192, 360]
    assert [len(getattr(enc, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]
    assert [getattr(enc, f"layer{i}")[0].conv1.stride[0] for i in range(1, 5)] == [1, 2, 2, 2]
    # layer1 block 0 has a projection shortcut because the width changes 64 -> 48.
    assert enc.layer1[0].downsample is not None and enc.layer1[1].downsample is None


def test_paper_multitask_shapes_on_meta():
    cfg = preset("paper").model
    with torch.device("meta"):
        net = MultiTaskNet(cfg)
        x = torch.empty(2, 3, 128, 128)
        feats = net.features(x)
        out = net.decode(feats)
        proj = net.project(feats)
    assert feats.shape == (2, 360, 4, 4)
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "seg": (2, 40, 128, 128),
        "depth": (2, 1, 128, 128),
        "normal": (2, 3, 128, 128),
    }
    assert proj.shape == (2, 64)


def test_encoder_init_is_kaiming_fan_out():
    cfg = preset("paper").model
    enc = Encoder(cfg)
    w = enc.layer3[1].conv2.weight  # 192 x 192 x 3 x 3, fan_out = 192 * 9
    expected_std = math.sqrt(2.0 / (192 * 9))
    assert abs(w.std().item() / expected_std - 1) < 0.02
    assert abs(w.mean().item()) < 0.05 * expected_std
    assert torch.equal(enc.bn1.weight, torch.ones(64)) and torch.equal(enc.bn1.bias, torch.zeros(64))


@pytest.mark.parametrize("image_size", [32, 64, 256])
def test_small_multitask_shapes(small_cfg, image_size):
    cfg = small_cfg(image_size, attn_resolution=16 if image_size == 32 else 32)
    net = MultiTaskNet(cfg)
    x = torch.randn(2, 3, image_size, image_size)
    out = net(x)
    assert set(out) == {"seg", "depth", "normal"}
    assert out["seg"].shape == (2, cfg.num_seg_classes, image_size, image_size)
    assert out["depth"].shape == (2, 1, image_size, image_size)
    assert out["normal"].shape == (2, 3, image_size, image_size)
    feats = net.features(x)
    assert feats.shape == (2, cfg.feature_dim, image_size // 32, image_size // 32)
    assert net.project(feats).shape == (2, cfg.clr_dim)
    # Raw outputs: no activation on the last conv, so negative values occur.
    assert (out["depth"] < 0).any() and (out["depth"] > 0).any()


def test_decode_of_features_equals_forward(small_cfg):
    net = MultiTaskNet(small_cfg(64)).eval()
    x = torch.randn(2, 3, 64, 64)
    full = net(x)
    split = net.decode(net.features(x))
    for task in full:
        torch.testing.assert_close(full[task], split[task], rtol=0, atol=0)


def test_task_subsets(small_cfg):
    cfg = small_cfg(64)
    net = MultiTaskNet(cfg, tasks=("normal", "seg"))
    assert list(net.decoders) == ["seg", "normal"]  # canonical order
    out = net(torch.randn(2, 3, 64, 64))
    assert list(out) == ["seg", "normal"]
    depth_only = MultiTaskNet(cfg, tasks=("depth",))
    assert list(depth_only(torch.randn(2, 3, 64, 64))) == ["depth"]
    for bad in [(), ("seg", "seg"), ("edges",)]:
        with pytest.raises(ValueError, match="subset"):
            MultiTaskNet(cfg, tasks=bad)


def test_dense_decoder_structure_and_manual_forward():
    dec = DenseDecoder(20, (16, 12, 8, 8, 4), 5).eval()
    assert dec.upconv0.weight.shape == (20, 16, 2, 2) and dec.upconv0.bias is not None
    assert dec.conv_decode4.weight.shape == (5, 4, 3, 3)
    assert not hasattr(dec, "bn_decode4")
    x = torch.randn(1, 20, 2, 3)
    h = x
    for k in range(4):
        h = F.relu(getattr(dec, f"bn_upconv{k}")(getattr(dec, f"upconv{k}")(h)))
        h = F.relu(getattr(dec, f"bn_decode{k}")(getattr(dec, f"conv_decode{k}")(h)))
    h = dec.conv_decode4(F.relu(dec.bn_upconv4(dec.upconv4(h))))
    out = dec(x)
    assert out.shape == (1, 5, 64, 96)
    torch.testing.assert_close(out, h, rtol=0, atol=0)


def test_projection_head_is_pool_then_linear():
    head = ProjectionHead(10, 6)
    assert count_parameters(head) == 10 * 6 + 6
    f = torch.randn(3, 10, 4, 4)
    torch.testing.assert_close(head(f), head.fc(f.mean(dim=(2, 3))))
