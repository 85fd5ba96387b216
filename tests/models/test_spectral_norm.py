"""Our spectral-norm layers against ``torch.nn.utils.spectral_norm`` (the released code's)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm

from mgm_fast import _native
from mgm_fast.models.layers import (
    SNConv2d,
    SNEmbedding,
    SNLinear,
    SpectralNormLayer,
    refreshes_spectral_norm,
    spectral_norm_layers,
    spectral_norm_weights,
)
from mgm_fast.stepcost import DispatchCounter

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


# -------------------------------------------------------------------------------------------
# The batched refresh of a whole network against torch's spectral_norm on plain layers.


class _Stack(nn.Module):
    """Five SN layers of different shapes and iteration counts, used like a discriminator:
    conv3x3 -> ReLU -> conv1x1 (stride 2) -> sum pool -> linear -> ReLU -> linear head plus the
    projection on an embedding. x (B, 5, 6, 6), y (B,) int64 in [0, 5) -> (B,)."""

    def __init__(self, conv3, conv1, hidden, head, embed):
        super().__init__()
        self.conv3, self.conv1, self.hidden, self.head, self.embed = conv3, conv1, hidden, head, embed

    def forward(self, x, y):
        h = self.conv1(F.relu(self.conv3(x))).sum(dim=(2, 3))
        h = F.relu(self.hidden(h))
        return self.head(h).squeeze(1) + (h * self.embed(y)).sum(dim=1)


class _RefreshedStack(_Stack):
    forward = refreshes_spectral_norm(_Stack.forward)


def _torch_twin(layer):
    """The plain layer with torch's spectral_norm holding the same weights and vectors."""
    if isinstance(layer, SNConv2d):
        plain = nn.Conv2d(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            layer.stride,
            layer.padding,
            bias=layer.bias is not None,
        )
    elif isinstance(layer, SNLinear):
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    else:
        plain = nn.Embedding(layer.num_embeddings, layer.embedding_dim)
    with torch.no_grad():
        plain.weight.copy_(layer.weight_orig)
        if getattr(layer, "bias", None) is not None:
            plain.bias.copy_(layer.bias)
    plain = spectral_norm(plain, n_power_iterations=layer.n_power_iterations)
    with torch.no_grad():
        plain.weight_u.copy_(layer.weight_u)
        plain.weight_v.copy_(layer.weight_v)
    return plain


def _stacks(dtype=torch.float64):
    """(ours with the batched refresh, torch's spectral_norm twin), same weights and vectors."""
    torch.manual_seed(7)
    ours = _RefreshedStack(
        SNConv2d(5, 7, 3, padding=1),
        SNConv2d(7, 4, 1, stride=2, bias=False, n_power_iterations=2),
        SNLinear(4, 6, n_power_iterations=3),
        SNLinear(6, 1),
        SNEmbedding(5, 6),
    )
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_()  # generic matrices and biases, not the default init
    ref = _Stack(*(_torch_twin(m) for m in (ours.conv3, ours.conv1, ours.hidden, ours.head, ours.embed)))
    return ours.to(dtype), ref.to(dtype)


def _inputs(dtype=torch.float64):
    return torch.randn(3, 5, 6, 6, dtype=dtype), torch.randint(0, 5, (3,))


def _compare_stacks(ours, ref, rtol, atol):
    params, ref_params = dict(ours.named_parameters()), dict(ref.named_parameters())
    assert params.keys() == ref_params.keys()
    for name, p in params.items():
        torch.testing.assert_close(
            p.grad, ref_params[name].grad, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}"
        )
    buffers, ref_buffers = dict(ours.named_buffers()), dict(ref.named_buffers())
    assert buffers.keys() == ref_buffers.keys()
    for name, b in buffers.items():
        torch.testing.assert_close(
            b, ref_buffers[name], rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}"
        )


def _sgd(*modules):
    with torch.no_grad():
        for module in modules:
            for p in module.parameters():
                p -= 0.1 * p.grad
                p.grad = None


@pytest.mark.parametrize("mode", ["train", "eval", "one_layer_eval"])
def test_network_refresh_matches_torch_fp64(mode):
    """Two forwards (D(real), D(fake)) before one backward, several steps: outputs, gradients of
    every parameter and of the input, and u/v after each step match torch's spectral_norm."""
    ours, ref = _stacks()
    if mode == "eval":
        ours(*_inputs())  # one training forward first: u, v of a real iteration
        ref(*_inputs())
        ours.eval()
        ref.eval()
    elif mode == "one_layer_eval":
        ours.conv1.eval()
        ref.conv1.eval()
    initial = {n: b.clone() for n, b in ours.named_buffers()}
    for _ in range(3):
        (xa, ya), (xb, yb) = _inputs(), _inputs()
        xa_ours, xa_ref = xa.clone().requires_grad_(), xa.clone().requires_grad_()
        out_a, out_b = ours(xa_ours, ya), ours(xb, yb)
        ref_a, ref_b = ref(xa_ref, ya), ref(xb, yb)
        torch.testing.assert_close(out_a, ref_a, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out_b, ref_b, rtol=1e-12, atol=1e-12)
        ca, cb = torch.randn_like(out_a), torch.randn_like(out_b)
        ((out_a * ca).sum() + (out_b * cb).square().sum()).backward()
        ((ref_a * ca).sum() + (ref_b * cb).square().sum()).backward()
        _compare_stacks(ours, ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(xa_ours.grad, xa_ref.grad, rtol=1e-10, atol=1e-12)
        _sgd(ours, ref)  # the next iteration sees new matrices
    for name, b in ours.named_buffers():
        frozen = mode == "eval" or (mode == "one_layer_eval" and name.startswith("conv1."))
        if frozen or name == "head.weight_u":  # eval mode; a one-row weight has u = +-1 for good
            assert torch.equal(b, initial[name]), name
        else:
            assert not torch.equal(b, initial[name]), name
    assert all(m._prepared_weight is None for m in ours.modules() if isinstance(m, SpectralNormLayer))


def test_network_refresh_matches_torch_fp32():
    """The same in float32, at fp32 rounding (sigma comes from |W v| here, from u . (W v) in torch)."""
    ours, ref = _stacks(torch.float32)
    for _ in range(3):
        (xa, ya), (xb, yb) = _inputs(torch.float32), _inputs(torch.float32)
        out, out_ref = (
            ours(xa, ya).sum() + ours(xb, yb).square().sum(),
            ref(xa, ya).sum() + ref(xb, yb).square().sum(),
        )
        torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
        out.backward()
        out_ref.backward()
        _compare_stacks(ours, ref, rtol=1e-4, atol=1e-5)
        _sgd(ours, ref)


@pytest.mark.skipif(_native.cpp_reason() is not None, reason="C++ extension unavailable")
@pytest.mark.parametrize("channels_last", [False, True])
def test_network_refresh_cpp_backend_matches_torch_fp32(channels_last):
    """The network's refresh on the cpp backend (one kernel call for the group's iteration, one
    for its weight gradients; a channels_last conv weight read in place): outputs, gradients and
    u/v follow torch's spectral_norm at fp32 rounding over several steps."""
    ours, ref = _stacks(torch.float32)
    ours.spectral_norm_impl = "cpp"
    if channels_last:
        ours.conv3.weight_orig.data = ours.conv3.weight_orig.data.contiguous(memory_format=torch.channels_last)
    for _ in range(3):
        (xa, ya), (xb, yb) = _inputs(torch.float32), _inputs(torch.float32)
        out = ours(xa, ya).sum() + ours(xb, yb).square().sum()
        out_ref = ref(xa, ya).sum() + ref(xb, yb).square().sum()
        torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
        out.backward()
        out_ref.backward()
        _compare_stacks(ours, ref, rtol=1e-4, atol=1e-5)
        _sgd(ours, ref)


def test_network_refresh_under_bf16_autocast_iterates_in_fp32():
    """Under CPU autocast (bf16) the power iteration and sigma stay fp32: u, v equal those of an
    fp32 run bit for bit, the weights handed to the layers are fp32, and values and gradients
    follow torch's spectral_norm under the same autocast to bf16 precision."""
    ours, ref = _stacks(torch.float32)
    plain, _ = _stacks(torch.float32)
    x, y = _inputs(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        weights = spectral_norm_weights(spectral_norm_layers(ours))
    assert all(w.dtype == torch.float32 for w in weights)
    with torch.no_grad():
        for p, q in zip(ours.parameters(), plain.parameters()):
            q.copy_(p)
        for p, q in zip(ours.buffers(), plain.buffers()):
            q.copy_(p)
        for p, q in zip(ours.buffers(), ref.buffers()):
            q.copy_(p)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, out_ref = ours(x, y), ref(x, y)
    with torch.no_grad():
        plain(x, y)  # the same step without autocast
    for (name, b), b_plain in zip(ours.named_buffers(), plain.buffers()):
        assert b.dtype == torch.float32 and torch.equal(b, b_plain), name
    torch.testing.assert_close(out.float(), out_ref.float(), rtol=2e-2, atol=2e-2)
    out.float().sum().backward()
    out_ref.float().sum().backward()
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad, q.grad, rtol=5e-2, atol=5e-2 * q.grad.abs().max().item(), msg=name)


def test_refresh_runs_one_iteration_per_forward_and_layers_take_it():
    ours, _ = _stacks()
    layers = spectral_norm_layers(ours)
    assert layers == [ours.conv3, ours.conv1, ours.hidden, ours.head, ours.embed]
    counter = DispatchCounter()
    with counter:
        ours(*_inputs())
    ops = counter.ops["other"]
    # One W^T u and one W v per layer and iteration (1 + 2 + 3 + 1 + 1 = 8 iterations); sigma
    # from |W v|, no third product; norms batched.
    assert ops["aten.mv"] == 2 * 8
    assert ops["aten.dot"] == 0 and ops["aten.linalg_vector_norm"] == 0
    assert all(m._prepared_weight is None for m in layers)


def test_refresh_skips_idle_layers_and_a_failed_forward_leaves_nothing_prepared():
    ours, _ = _stacks()

    class Idle(_RefreshedStack):
        def idle_spectral_norm_layers(self):
            return [self.head]

        @refreshes_spectral_norm
        def forward(self, x, y):
            self.conv3(x)
            raise RuntimeError("stop")

    idle = Idle(ours.conv3, ours.conv1, ours.hidden, ours.head, ours.embed)
    assert spectral_norm_layers(idle) == [ours.conv3, ours.conv1, ours.hidden, ours.embed]
    head_u, conv1_u = ours.head.weight_u.clone(), ours.conv1.weight_u.clone()
    with pytest.raises(RuntimeError, match="stop"):
        idle(*_inputs())
    assert torch.equal(ours.head.weight_u, head_u)  # idle: never iterated
    assert not torch.equal(ours.conv1.weight_u, conv1_u)  # refreshed before the failure
    assert all(m._prepared_weight is None for m in spectral_norm_layers(ours))
    # A layer called on its own afterwards runs its own iteration.
    before, storage = ours.conv1.weight_u.clone(), ours.conv1.weight_u.data_ptr()
    ours.conv1(torch.randn(1, 7, 4, 4, dtype=torch.float64))
    assert not torch.equal(ours.conv1.weight_u, before) and ours.conv1.weight_u.data_ptr() == storage


def test_power_iteration_writes_the_buffers_in_place():
    """u and v are updated in their own storage (CUDA graph replays need fixed addresses), and
    the GAN pattern (two forwards, one backward) still differentiates through each forward's own
    vectors: the result equals torch's spectral_norm twin."""
    ours, twin = _stacks()
    layers = spectral_norm_layers(ours)
    storage = [(m.weight_u.data_ptr(), m.weight_v.data_ptr()) for m in layers]
    for _ in range(2):
        ours.zero_grad(set_to_none=True)
        twin.zero_grad(set_to_none=True)
        (xa, ya), (xb, yb) = _inputs(), _inputs()
        (ours(xa, ya).square().mean() + ours(xb, yb).mean()).backward()
        (twin(xa, ya).square().mean() + twin(xb, yb).mean()).backward()
        _compare_stacks(ours, twin, rtol=1e-10, atol=1e-12)
    assert [(m.weight_u.data_ptr(), m.weight_v.data_ptr()) for m in layers] == storage


def test_network_refresh_compiled_fullgraph():
    """The refresh and its autograd.Function trace into one graph (no break), and the GAN
    pattern (two forwards, one backward) matches eager."""
    torch._dynamo.reset()
    eager, _ = _stacks()
    compiled, _ = _stacks()
    step = torch.compile(compiled, fullgraph=True)
    for _ in range(2):
        (xa, ya), (xb, yb) = _inputs(), _inputs()
        loss = eager(xa, ya).square().mean() + eager(xb, yb).mean()
        loss_compiled = step(xa, ya).square().mean() + step(xb, yb).mean()
        loss.backward()
        loss_compiled.backward()
        torch.testing.assert_close(loss_compiled, loss, rtol=1e-12, atol=1e-12)
        for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12, msg=name)
        for (name, b), c in zip(eager.named_buffers(), compiled.buffers()):
            torch.testing.assert_close(c, b, rtol=1e-12, atol=1e-12, msg=name)
        _sgd(eager, compiled)


def test_nested_refreshing_networks_iterate_once_per_forward():
    ours, ref = _stacks()

    class Outer(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        @refreshes_spectral_norm
        def forward(self, x, y):
            return self.inner(x, y)

    outer, x = Outer(ours), _inputs()
    torch.testing.assert_close(outer(*x), ref(*x), rtol=1e-12, atol=1e-12)
    for (name, b), b_ref in zip(ours.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b, b_ref, rtol=1e-12, atol=1e-12, msg=name)
