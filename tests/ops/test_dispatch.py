"""The backend dispatcher: auto picks the first supporting backend, forced ones never fall back."""

import pytest
import torch

from mgm_fast.ops._dispatch import Backend, BackendUnavailable, FusedOp


def _op():
    op = FusedOp("toy", "doubles its input")
    op.register(Backend("reference", lambda x: 2 * x, devices=("cpu", "cuda")))
    op.register(Backend("cpp", lambda x: x + x, devices=("cpu",), dtypes=(torch.float32,)))
    op.register(Backend("cuda", lambda x: x * 2, devices=("cuda",), availability=lambda: "no GPU here"))
    return op


def test_auto_takes_first_supporting_backend_in_priority_order():
    op = _op()
    assert op.select("auto", torch.ones(2)).name == "cpp"
    assert op.select("auto", torch.ones(2, dtype=torch.float16)).name == "reference"


def test_forced_backend_that_cannot_run_raises_with_reasons():
    op = _op()
    with pytest.raises(BackendUnavailable, match="no GPU here"):
        op(torch.ones(2), impl="cuda")
    with pytest.raises(BackendUnavailable, match=r"dtype torch\.float16 not supported"):
        op(torch.ones(2, dtype=torch.float16), impl="cpp")
    with pytest.raises(BackendUnavailable, match="not implemented"):
        op(torch.ones(2), impl="triton")


def test_status_lists_every_backend_kind():
    status = _op().status()
    assert status["reference"] is None and status["cpp"] is None
    assert status["cuda"] == "no GPU here" and status["triton"] == "not implemented for this op"


def test_unknown_backend_kind_rejected():
    with pytest.raises(ValueError):
        FusedOp("x", "").register(Backend("opencl", lambda x: x, devices=("cpu",)))
