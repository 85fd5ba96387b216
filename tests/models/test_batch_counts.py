"""BatchNorm2d whose network advances the batch counters in one op (models/layers.py): the same
buffers and outputs as nn.BatchNorm2d, one increment per call (a layer called twice counts
twice), momentum=None counted by the layer itself, and one foreach op per network forward."""

from __future__ import annotations

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


def test_one_foreach_op_instead_of_one_add_per_call():
    net = _Counted(BatchNorm2d)
    x = torch.randn(2, 4, 3, 5)
    counter = DispatchCounter()
    with counter:
        net(x)
    ops = counter.ops["other"]
    assert ops["aten._foreach_add_"] == 1
    assert ops["aten.add_"] == 1  # only the momentum=None layer, which needs its count at once


def test_eval_mode_and_standalone_layers_behave_as_nn_batchnorm():
    net = _Counted(BatchNorm2d).eval()
    net(torch.randn(2, 4, 3, 5))
    assert int(net.a.num_batches_tracked) == 0
    layer = BatchNorm2d(4)
    layer(torch.randn(2, 4, 3, 5))
    assert int(layer.num_batches_tracked) == 1
