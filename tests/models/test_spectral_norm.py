"""Our spectral-norm layers against ``torch.nn.utils.spectral_norm`` (the released code's)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm

from mgm_fast.models.layers import SNConv2d, SNEmbedding, SNLinear

# (ours factory, plain-layer factory, input factory)
CASES = {
    "conv3x3": (
        lambda: SNConv2d(5, 7, 3, padding=1),
        lambda: nn.Conv2d(5, 7, 3, padding=1),
        lambda: torch.randn(3, 5, 6, 5),
    ),
    "conv1x1_nobias_stride2": (
        lambda: SNConv2d(6, 4, 1, stride=2, bias=False),
        lambda: nn.Conv2d(6, 4, 1, stride=2, bias=False),
        lambda: torch.randn(2, 6, 7, 8),
    ),
    "linear": (
        lambda: SNLinear(9, 13),
        lambda: nn.Linear(9, 13),
        lambda: torch.randn(4, 9),
    ),
    "embedding": (
        lambda: SNEmbedding(6, 11),
        lambda: nn.Embedding(6, 11),
        lambda: torch.tensor([0, 5, 2, 2, 3]),
    ),
}


def _pair(name):
    make_ours, make_plain, make_input = CASES[name]
    ours = make_ours()
    with torch.no_grad():
        ours.weight_orig.normal_()  # a generic matrix, not the default init
        if getattr(ours, "bias", None) is not None:
            ours.bias.normal_()
    ref = make_plain()
    with torch.no_grad():
        ref.weight.copy_(ours.weight_orig)
        if getattr(ours, "bias", None) is not None:
            ref.bias.copy_(ours.bias)
    ref = spectral_norm(ref)
    with torch.no_grad():
        ref.weight_u.copy_(ours.weight_u)
        ref.weight_v.copy_(ours.weight_v)
    return ours, ref, make_input


def _params(module):
    return {n: p for n, p in module.named_parameters()}


@pytest.mark.parametrize("name", list(CASES))
def test_train_mode_matches_torch_over_steps(name):
    ours, ref, make_input = _pair(name)
    is_float_input = name != "embedding"
    for _ in range(4):
        x = make_input()
        x_ours = x.clone().requires_grad_(is_float_input)
        x_ref = x.clone().requires_grad_(is_float_input)
        out_ours, out_ref = ours(x_ours), ref(x_ref)
        torch.testing.assert_close(out_ours, out_ref, rtol=0, atol=1e-6)
        cot = torch.randn_like(out_ref)
        (out_ours * cot).sum().backward()
        (out_ref * cot).sum().backward()
        for pname, p in _params(ours).items():
            torch.testing.assert_close(p.grad, _params(ref)[pname].grad, rtol=0, atol=1e-6)
        if is_float_input:
            torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=0, atol=1e-6)
        # Buffers after the in-place power iteration.
        torch.testing.assert_close(ours.weight_u, ref.weight_u, rtol=0, atol=1e-6)
        torch.testing.assert_close(ours.weight_v, ref.weight_v, rtol=0, atol=1e-6)
        with torch.no_grad():  # an SGD step, so the next power iteration sees a new matrix
            for pname, p in _params(ours).items():
                q = _params(ref)[pname]
                p -= 0.1 * p.grad
                q -= 0.1 * q.grad
                p.grad = q.grad = None
    # The buffers really moved away from their initial values.
    fresh, _, _ = _pair(name)
    assert not torch.allclose(ours.weight_u, fresh.weight_u)


@pytest.mark.parametrize("name", list(CASES))
def test_eval_mode_matches_torch_and_freezes_buffers(name):
    ours, ref, make_input = _pair(name)
    ours(make_input())  # one train step first so u, v satisfy u = normalize(W v)
    ref(make_input())
    ours.eval()
    ref.eval()
    u0, v0 = ours.weight_u.clone(), ours.weight_v.clone()
    for _ in range(3):
        x = make_input()
        out_ours, out_ref = ours(x), ref(x)
        torch.testing.assert_close(out_ours, out_ref, rtol=0, atol=1e-6)
        cot = torch.randn_like(out_ref)
        (out_ours * cot).sum().backward()
        (out_ref * cot).sum().backward()
        torch.testing.assert_close(ours.weight_orig.grad, ref.weight_orig.grad, rtol=0, atol=1e-6)
    assert torch.equal(ours.weight_u, u0) and torch.equal(ours.weight_v, v0)


def test_two_forwards_one_backward_like_torch():
    # D(real) and D(fake) then one backward: the first graph keeps its own u and v.
    ours, ref, make_input = _pair("conv3x3")
    xa, xb = make_input(), make_input()
    loss_ours = ours(xa).square().mean() + ours(xb).abs().mean()
    loss_ref = ref(xa).square().mean() + ref(xb).abs().mean()
    loss_ours.backward()
    loss_ref.backward()
    torch.testing.assert_close(loss_ours, loss_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.weight_orig.grad, ref.weight_orig.grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.weight_u, ref.weight_u, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "make_ours, make_ref",
    [
        (lambda: SNConv2d(4, 8, 3, padding=1), lambda: spectral_norm(nn.Conv2d(4, 8, 3, padding=1))),
        (lambda: SNLinear(10, 3), lambda: spectral_norm(nn.Linear(10, 3))),
        (lambda: SNEmbedding(5, 12), lambda: spectral_norm(nn.Embedding(5, 12))),
    ],
)
def test_default_init_and_state_dict_match_torch(make_ours, make_ref):
    torch.manual_seed(123)
    ours = make_ours()
    torch.manual_seed(123)
    ref = make_ref()
    sd_ours, sd_ref = ours.state_dict(), ref.state_dict()
    assert list(sd_ours) == list(sd_ref)  # bias, weight_orig, weight_u, weight_v
    for key in sd_ref:
        assert torch.equal(sd_ours[key], sd_ref[key]), key
    # A state dict saved from torch's spectral_norm module loads as is.
    other = make_ours()
    other.load_state_dict(sd_ref)
    assert torch.equal(other.weight_u, ref.weight_u)


def test_sn_weight_shapes_and_unit_spectral_norm():
    layer = SNConv2d(16, 32, 3, padding=1)
    assert layer.weight_u.shape == (32,) and layer.weight_v.shape == (16 * 9,)
    for _ in range(200):  # power iteration converges to the top singular pair
        w = layer.sn_weight()
    assert w.shape == (32, 16, 3, 3)
    sigma_max = torch.linalg.matrix_norm(w.detach().reshape(32, -1), ord=2)
    assert abs(sigma_max.item() - 1.0) < 1e-3
    emb = SNEmbedding(27, 64)
    assert emb.weight_u.shape == (27,) and emb.weight_v.shape == (64,)


def test_sn_weight_is_what_forward_uses():
    layer = SNConv2d(3, 5, 3, padding=1).eval()
    x = torch.randn(2, 3, 8, 8)
    expected = F.conv2d(x, layer.sn_weight(), layer.bias, padding=1)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)


def test_two_forwards_one_backward_compiled():
    """The GAN pattern under torch.compile: the second forward's power iteration must not touch
    tensors the first saved for backward (a one-row weight made the compiled graph save the
    buffer itself, which the second forward then updated)."""
    torch._dynamo.reset()
    eager, compiled = SNLinear(9, 1), SNLinear(9, 1)
    compiled.load_state_dict(eager.state_dict())
    step = torch.compile(compiled)
    xa, xb = torch.randn(4, 9), torch.randn(4, 9)
    loss_eager = eager(xa).square().mean() + eager(xb).mean()
    loss_compiled = step(xa).square().mean() + step(xb).mean()
    loss_eager.backward()
    loss_compiled.backward()
    torch.testing.assert_close(loss_compiled, loss_eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(compiled.weight_orig.grad, eager.weight_orig.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled.weight_u, eager.weight_u, rtol=0, atol=1e-6)

