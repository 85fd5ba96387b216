"""Conditional BN, self-attention and the ResNet basic block."""

import pytest
import torch
import torch.nn.functional as F

from mgm_fast.models.layers import BasicBlock, ConditionalBatchNorm2d, SelfAttention, make_layer


def _randomize_cbn(cbn):
    with torch.no_grad():
        cbn.embed.weight.normal_(0.5, 0.5)


def test_cbn_train_mode_matches_hand_computation():
    cbn = ConditionalBatchNorm2d(6, num_classes=4)
    _randomize_cbn(cbn)
    x = torch.randn(5, 6, 7, 3) * 2 + 1
    y = torch.tensor([0, 3, 3, 1, 2])
    out = cbn(x, y)
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    normed = (x - mean) / torch.sqrt(var + 1e-5)
    gamma = cbn.embed.weight[y, :6][:, :, None, None]
    beta = cbn.embed.weight[y, 6:][:, :, None, None]
    torch.testing.assert_close(out, gamma * normed + beta, rtol=1e-5, atol=1e-5)


def test_cbn_running_stats_use_released_momentum():
    cbn = ConditionalBatchNorm2d(4, num_classes=3)
    assert cbn.bn.momentum == 0.001 and cbn.bn.eps == 1e-5 and not cbn.bn.affine
    x = torch.randn(8, 4, 5, 5) * 3 + 2
    cbn(x, torch.zeros(8, dtype=torch.long))
    m = 0.001
    mean = x.mean(dim=(0, 2, 3))
    var_unbiased = x.var(dim=(0, 2, 3), unbiased=True)
    torch.testing.assert_close(cbn.bn.running_mean, m * mean, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(cbn.bn.running_var, (1 - m) + m * var_unbiased, rtol=1e-5, atol=1e-7)
    # A configurable momentum is honoured.
    assert ConditionalBatchNorm2d(4, 3, momentum=0.1).bn.momentum == 0.1


def test_cbn_eval_mode_uses_running_stats_and_init_is_identity_affine():
    cbn = ConditionalBatchNorm2d(3, num_classes=5)
    assert torch.equal(cbn.embed.weight[:, :3], torch.ones(5, 3))
    assert torch.equal(cbn.embed.weight[:, 3:], torch.zeros(5, 3))
    with torch.no_grad():
        cbn.bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        cbn.bn.running_var.copy_(torch.tensor([4.0, 0.25, 1.0]))
    cbn.eval()
    x = torch.randn(2, 3, 4, 4)
    expected = (x - cbn.bn.running_mean[:, None, None]) / torch.sqrt(cbn.bn.running_var[:, None, None] + 1e-5)
    torch.testing.assert_close(cbn(x, torch.tensor([1, 4])), expected, rtol=1e-5, atol=1e-6)


def _attention_by_hand(sa, x):
    """SAGAN attention written with einsum over explicit positions (eval mode: fixed SN)."""
    b, c, h, w = x.shape

    def conv(layer, t):
        return F.conv2d(t, layer.sn_weight(), layer.bias)

    theta = conv(sa.snconv1x1_theta, x).flatten(2)  # (b, c/8, N)
    phi = F.max_pool2d(conv(sa.snconv1x1_phi, x), 2).flatten(2)  # (b, c/8, N/4)
    g = F.max_pool2d(conv(sa.snconv1x1_g, x), 2).flatten(2)  # (b, c/2, N/4)
    scores = torch.einsum("bkn,bkm->bnm", theta, phi)
    attn = scores.softmax(dim=-1)  # each query position sums to 1 over the N/4 keys
    o = torch.einsum("bcm,bnm->bcn", g, attn).reshape(b, c // 2, h, w)
    return x + sa.sigma * conv(sa.snconv1x1_attn, o)


def test_self_attention_identity_at_init_and_shapes():
    sa = SelfAttention(32)
    assert sa.sigma.shape == (1,) and sa.sigma.item() == 0.0
    assert sa.snconv1x1_theta.weight_orig.shape == (4, 32, 1, 1)
    assert sa.snconv1x1_phi.weight_orig.shape == (4, 32, 1, 1)
    assert sa.snconv1x1_g.weight_orig.shape == (16, 32, 1, 1)
    assert sa.snconv1x1_attn.weight_orig.shape == (32, 16, 1, 1)
    x = torch.randn(2, 32, 6, 4)
    out = sa(x)
    assert torch.equal(out, x)
    # sigma still gets a gradient at 0, so the attention can switch on.
    (out * torch.randn_like(out)).sum().backward()
    assert sa.sigma.grad is not None and sa.sigma.grad.abs().item() > 0


def test_self_attention_matches_hand_computation():
    sa = SelfAttention(16).eval()
    with torch.no_grad():
        sa.sigma.fill_(0.7)
    x = torch.randn(3, 16, 8, 6)
    torch.testing.assert_close(sa(x), _attention_by_hand(sa, x), rtol=1e-5, atol=1e-5)


def test_self_attention_rejects_bad_shapes():
    with pytest.raises(ValueError, match="divisible by 8"):
        SelfAttention(12)
    with pytest.raises(ValueError, match="even"):
        SelfAttention(8)(torch.randn(1, 8, 5, 4))


def test_basic_block_shortcut_and_shapes():
    plain = BasicBlock(8, 8, 1)
    assert plain.downsample is None
    x = torch.randn(2, 8, 9, 9)
    assert plain(x).shape == (2, 8, 9, 9)
    down = BasicBlock(8, 12, 2)
    assert down.downsample[0].weight.shape == (12, 8, 1, 1) and down.downsample[0].bias is None
    assert down.downsample[0].stride == (2, 2)
    assert down(x).shape == (2, 12, 5, 5)
    assert (down(x) >= 0).all()  # ends with a ReLU
    widen = BasicBlock(8, 12, 1)
    assert widen.downsample is not None and widen(x).shape == (2, 12, 9, 9)
    layer = make_layer(8, 16, 3, 2)
    assert len(layer) == 3 and layer[0].downsample is not None and layer[1].downsample is None


def test_basic_block_identity_path_by_hand():
    block = BasicBlock(4, 4, 1).eval()
    x = torch.randn(1, 4, 5, 5)
    h = F.relu(block.bn1(block.conv1(x)))
    expected = F.relu(block.bn2(block.conv2(h)) + x)
    torch.testing.assert_close(block(x), expected)
