"""BatchNorm2d whose network advances the batch counters in one op (models/layers.py): the same
buffers, outputs and gradients as nn.BatchNorm2d, one increment per call (a layer called twice
counts twice), momentum=None counted by the layer itself, one foreach op per network forward,
and one ATen op per call (no empty "reserve" tensor)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mgm_fast.models.layers import BatchNorm2d, counts_batches_once
from mgm_fast.stepcost import DispatchCounter


class _Net(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.a, self.b, self.c = norm(4), norm(4), norm(4, momentum=None)

    def body(self, x):
        return self.c(self.b(self.a(x)) + self.a(x))  # a is called twice


class _Counted(_Net):
    forward = counts_batches_once(_Net.body)


class _Plain(_Net):
    forward = _Net.body


def test_same_buffers_and_outputs_as_nn_batchnorm():
    torch.manual_seed(0)
    ours, plain = _Counted(BatchNorm2d), _Plain(nn.BatchNorm2d)
    plain.load_state_dict(ours.state_dict())
    for _ in range(3):
        x = torch.randn(2, 4, 3, 5)
        torch.testing.assert_close(ours(x), plain(x), rtol=0, atol=0)
    for (name, b), (_, p) in zip(ours.state_dict().items(), plain.state_dict().items()):
        torch.testing.assert_close(b, p, rtol=0, atol=0, msg=name)
    assert int(ours.a.num_batches_tracked) == 6 and int(ours.c.num_batches_tracked) == 3
    assert all(m._counted_calls is None for m in ours.modules() if isinstance(m, BatchNorm2d))


def test_same_gradients_as_nn_batchnorm_in_both_layouts():
    torch.manual_seed(1)
    ours, plain = _Counted(BatchNorm2d), _Plain(nn.BatchNorm2d)
    for layer in (ours.a, ours.b, ours.c):  # non-trivial affine parameters
        nn.init.normal_(layer.weight)
        nn.init.normal_(layer.bias)
    plain.load_state_dict(ours.state_dict())
    for memory_format in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(3, 4, 5, 6).contiguous(memory_format=memory_format)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        g = torch.randn(3, 4, 5, 6)
        y1, y2 = ours(x1), plain(x2)
        torch.testing.assert_close(y1, y2, rtol=0, atol=0)
        grads1 = torch.autograd.grad(y1, [x1, *ours.parameters()], g)
        grads2 = torch.autograd.grad(y2, [x2, *plain.parameters()], g)
        for a, b in zip(grads1, grads2):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_one_value_per_channel_is_refused_as_by_nn_batchnorm():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        _Counted(BatchNorm2d)(torch.randn(1, 4, 1, 1))


def test_one_foreach_op_instead_of_one_add_per_call():
    net = _Counted(BatchNorm2d)
    x = torch.randn(2, 4, 3, 5)
    counter = DispatchCounter()
    with counter:
        net(x)
    ops = counter.ops["other"]
    assert ops["aten._foreach_add_"] == 1
    assert ops["aten.add_"] == 1  # only the momentum=None layer, which needs its count at once
    # one op per deferred call; only the momentum=None layer goes through F.batch_norm's wrapper
    assert ops["aten._batch_norm_with_update"] == 3 and ops["aten.empty"] == 1


def test_eval_mode_and_standalone_layers_behave_as_nn_batchnorm():
    net = _Counted(BatchNorm2d).eval()
    net(torch.randn(2, 4, 3, 5))
    assert int(net.a.num_batches_tracked) == 0
    layer = BatchNorm2d(4)
    layer(torch.randn(2, 4, 3, 5))
    assert int(layer.num_batches_tracked) == 1
