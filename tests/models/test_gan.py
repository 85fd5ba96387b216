"""Generator, discriminator and their blocks."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mgm_fast.config import preset
from mgm_fast.models.gan import (
    DiscBlock,
    Discriminator,
    GenBlock,
    Generator,
    OptBlock,
)
from mgm_fast.models.layers import SNConv2d, SNEmbedding, SNLinear
from mgm_fast.ops.genblock import genblock_reference


def _randomize_cbn(module):
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("embed.weight"):
                p.normal_(0.5, 0.3)


def test_paper_generator_and_discriminator_shapes_on_meta():
    cfg = preset("paper").model
    with torch.device("meta"):
        g = Generator(cfg)
        d = Discriminator(cfg)
        y = torch.zeros(2, dtype=torch.long)
        img = g(torch.empty(2, 128), y)
        out = d(img, y)
    assert img.shape == (2, 3, 128, 128) and out.shape == (2,)
    assert g.attn_after == 3 and g.self_attn.channels == 256
    assert d.attn_after == 1 and d.self_attn.channels == 128
    assert [getattr(g, f"block{k}").out_channels for k in range(1, 6)] == [1024, 512, 256, 128, 64]
    assert [getattr(d, f"block{k}").downsample for k in range(1, 6)] == [True] * 4 + [False]
    assert g.bn.momentum == 1e-4 and g.bn.affine
    assert g.block1.cond_bn1.bn.momentum == 0.001


@pytest.mark.parametrize("image_size, attn", [(32, 16), (64, 32), (256, 32)])
def test_small_gan_shapes_and_range(small_cfg, image_size, attn):
    cfg = small_cfg(image_size, attn_resolution=attn, g_conv_dim=4, d_conv_dim=8)
    g, d = Generator(cfg), Discriminator(cfg)
    y = torch.randint(0, cfg.num_scenes, (3,))
    img = g(torch.randn(3, cfg.z_dim), y)
    assert img.shape == (3, 3, image_size, image_size) and img.dtype == torch.float32
    assert img.abs().max() <= 1.0
    out = d(img, y)
    assert out.shape == (3,) and torch.isfinite(out).all()


def test_genblock_impl_is_validated():
    with pytest.raises(ValueError, match=r"accepted values: \['reference', 'auto'"):
        GenBlock(8, 8, 3, impl="opencl")
    cfg = preset("tiny").model
    cfg.genblock_impl = "opencl"
    with pytest.raises(ValueError, match="opencl"):
        Generator(cfg)


def test_genblock_matches_hand_computation():
    block = GenBlock(8, 6, num_classes=4)
    _randomize_cbn(block)
    x = torch.randn(3, 8, 5, 4)
    y = torch.tensor([3, 0, 3])
    out = block(x, y)
    assert out.shape == (3, 6, 10, 8)
    block.eval()  # fixed u, v: the ones the training forward just used

    def cbn(layer, t):  # training-mode batch statistics, by hand
        mean = t.mean(dim=(0, 2, 3), keepdim=True)
        var = t.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        gamma, beta = layer.embed.weight[y].chunk(2, dim=1)
        return gamma[:, :, None, None] * (t - mean) / torch.sqrt(var + 1e-5) + beta[:, :, None, None]

    def conv(layer, t, pad):
        return F.conv2d(t, layer.sn_weight(), layer.bias, padding=pad)

    up = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # nearest x2
    h = F.relu(cbn(block.cond_bn1, x)).repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    h = conv(block.snconv2d2, F.relu(cbn(block.cond_bn2, conv(block.snconv2d1, h, 1))), 1)
    expected = h + conv(block.snconv2d0, up, 0)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_genblock_reference_is_the_forward():
    block = GenBlock(8, 8, num_classes=2).eval()
    x, y = torch.randn(2, 8, 4, 4), torch.tensor([0, 1])
    torch.testing.assert_close(block(x, y), genblock_reference(x, y, block), rtol=0, atol=0)


def test_generator_attention_placement_errors(small_cfg):
    with pytest.raises(ValueError, match="generator block output resolution"):
        Generator(small_cfg(64, attn_resolution=4))
    with pytest.raises(ValueError, match="discriminator stage output resolution"):
        Discriminator(small_cfg(64, attn_resolution=64))


def test_gan_init_xavier_and_cbn_identity():
    cfg = preset("tiny").model
    g, d = Generator(cfg), Discriminator(cfg)
    for net in (g, d):
        for name, m in net.named_modules():
            if isinstance(m, (SNConv2d, SNLinear, SNEmbedding)):
                w = m.weight_orig
                fan_out = w.shape[0] * w[0, 0].numel() if w.dim() == 4 else w.shape[0]
                fan_in = w[0].numel()
                bound = math.sqrt(6.0 / (fan_in + fan_out))
                assert w.abs().max() <= bound + 1e-7, name
                if w.numel() >= 2000:  # uniform(-bound, bound) has std bound / sqrt(3)
                    assert abs(w.std().item() / (bound / math.sqrt(3)) - 1) < 0.1, name
                bias = getattr(m, "bias", None)
                assert bias is None or torch.equal(bias, torch.zeros_like(bias)), name
    emb = g.block2.cond_bn2.embed.weight
    c = emb.shape[1] // 2
    assert torch.equal(emb[:, :c], torch.ones_like(emb[:, :c]))
    assert torch.equal(emb[:, c:], torch.zeros_like(emb[:, c:]))
    assert g.self_attn.sigma.item() == 0.0 and d.self_attn.sigma.item() == 0.0


def test_opt_block_by_hand():
    block = OptBlock(3, 8).eval()
    x = torch.randn(2, 3, 8, 6)
    w1, w2, w0 = (getattr(block, f"snconv2d{i}").sn_weight() for i in (1, 2, 0))
    h = F.conv2d(
        F.relu(F.conv2d(x, w1, block.snconv2d1.bias, padding=1)), w2, block.snconv2d2.bias, padding=1
    )
    expected = F.avg_pool2d(h, 2) + F.conv2d(F.avg_pool2d(x, 2), w0, block.snconv2d0.bias)
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


class _ReleasedStyleDiscBlock(nn.Module):
    """The released block's forward, with its in-place ReLU aliasing the shortcut input."""

    def __init__(self, ours: DiscBlock) -> None:
        super().__init__()
        self.ours = ours
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x, downsample):
        x = x.clone()  # keep the caller's tensor intact
        x0 = x
        x = self.relu(x)  # also rewrites x0
        x = self.ours.snconv2d2(self.relu(self.ours.snconv2d1(x)))
        if downsample:
            x = F.avg_pool2d(x, 2)
        if downsample or self.ours.learnable_shortcut:
            x0 = self.ours.snconv2d0(x0)
            if downsample:
                x0 = F.avg_pool2d(x0, 2)
        return x + x0


@pytest.mark.parametrize("c_in, c_out, down", [(4, 8, True), (8, 8, False), (8, 8, True), (4, 8, False)])
def test_disc_block_shortcut_after_relu_matches_released_inplace_semantics(c_in, c_out, down):
    block = DiscBlock(c_in, c_out, downsample=down, shortcut_after_relu=True).eval()
    x = torch.randn(2, c_in, 6, 6)
    expected = _ReleasedStyleDiscBlock(block)(x, down)
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)
    # The textbook variant differs exactly by the shortcut input.
    block.shortcut_after_relu = False
    textbook = block(x)
    short = x if not block.learnable_shortcut else block.snconv2d0(x)
    a = F.relu(x)
    main = block.snconv2d2(F.relu(block.snconv2d1(a)))
    if down:
        main, short = F.avg_pool2d(main, 2), F.avg_pool2d(short, 2)
    torch.testing.assert_close(textbook, main + short, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(textbook, expected)


def test_unused_last_shortcut_never_changes_the_output(small_cfg):
    # A plan whose last (non-downsampling) block keeps the width, as at the paper size.
    mults = (1, 2, 4, 8, 8)
    kept = Discriminator(small_cfg(64, d_channel_mults=mults, d_keep_unused_shortcut=True))
    dropped = Discriminator(small_cfg(64, d_channel_mults=mults, d_keep_unused_shortcut=False))
    last = f"block{kept.num_blocks}"
    assert hasattr(getattr(kept, last), "snconv2d0") and not hasattr(getattr(dropped, last), "snconv2d0")
    missing, unexpected = dropped.load_state_dict(kept.state_dict(), strict=False)
    assert missing == [] and all(k.startswith(f"{last}.snconv2d0.") for k in unexpected)
    assert len(unexpected) == 4  # bias, weight_orig, weight_u, weight_v
    unused = getattr(kept, last).snconv2d0
    u0 = unused.weight_u.clone()
    x = torch.randn(4, 3, 64, 64)
    y = torch.tensor([0, 1, 2, 5])
    for _ in range(2):  # training mode: power iterations everywhere else, batch-stat free D
        out_kept, out_dropped = kept(x, y), dropped(x, y)
        torch.testing.assert_close(out_kept, out_dropped, rtol=0, atol=0)
    out_kept.sum().backward()
    assert unused.weight_orig.grad is None
    assert torch.equal(unused.weight_u, u0)


def test_discriminator_projection_structure():
    cfg = preset("tiny").model
    d = Discriminator(cfg).eval()
    with torch.no_grad():
        d.self_attn.sigma.fill_(0.5)
    x = torch.randn(2, 3, 64, 64)
    h = d.features(x)
    assert h.shape == (2, cfg.d_mults[-1] * cfg.d_conv_dim) and (h >= 0).all()
    y1, y2 = torch.tensor([0, 1]), torch.tensor([3, 4])
    emb = d.sn_embedding1.sn_weight()
    expected = (h * (emb[y1] - emb[y2])).sum(1)  # only the projection term depends on y
    torch.testing.assert_close(d(x, y1) - d(x, y2), expected, rtol=1e-4, atol=1e-4)
    linear = F.linear(h, d.snlinear1.sn_weight(), d.snlinear1.bias).squeeze(1)
    torch.testing.assert_close(d(x, y1), linear + (h * emb[y1]).sum(1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["reference", "auto"])
def test_channels_last_networks_convert_their_nchw_input_once(impl):
    """Converted to channels_last, the generator turns its 4x4 seed and the discriminator its
    images into channels_last at entry, so every GenBlock and SN convolution after sees
    channels_last (no conversion per convolution) -- except the self-attention's output
    projection, whose input the attention op produces as (B, C, N). Values are the same."""
    cfg = dataclasses.replace(preset("tiny").model, genblock_impl=impl)
    torch.manual_seed(0)
    g, d = Generator(cfg).eval(), Discriminator(cfg).eval()
    z, y = torch.randn(2, cfg.z_dim), torch.tensor([0, 1])
    with torch.no_grad():
        nchw_image = g(z, y)
        nchw_score = d(nchw_image, y)
    g, d = g.to(memory_format=torch.channels_last), d.to(memory_format=torch.channels_last)
    inputs = {}

    def record(name):
        def hook(module, args):
            inputs.setdefault(name, args[0])

        return hook

    hooks = [m.register_forward_pre_hook(record(name))
             for net, prefix in ((g, "g"), (d, "d")) for name, m in net.named_modules(prefix=prefix)
             if isinstance(m, (GenBlock, SNConv2d)) and not name.endswith("snconv1x1_attn")]  # fmt: skip
    with torch.no_grad():
        image = g(z, y)
        score = d(image, y)
    for hook in hooks:
        hook.remove()
    assert image.is_contiguous(memory_format=torch.channels_last)
    # the fused GenBlocks keep the NCHW weights their kernels read; the reference path converts
    fused_weights = [m.snconv2d1.weight_orig for m in g.modules() if isinstance(m, GenBlock)]
    assert all(w.is_contiguous() == (impl != "reference") for w in fused_weights)
    spatial = {name: x for name, x in inputs.items() if x.dim() == 4 and x.shape[2] > 1}
    assert "g.block1" in spatial and "d.opt_block1.snconv2d1" in spatial
    assert [n for n, x in spatial.items() if not x.is_contiguous(memory_format=torch.channels_last)] == []
    torch.testing.assert_close(image, nchw_image, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(score, nchw_score, rtol=1e-4, atol=1e-4)
