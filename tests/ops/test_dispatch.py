"""The backend dispatcher: auto picks the first supporting backend, forced ones never fall back."""

import pytest
import torch

from mgm_fast import _native
from mgm_fast.ops._dispatch import (
    REGISTRY,
    Backend,
    BackendUnavailable,
    FusedOp,
    argument_list,
    cpp_backend,
    cuda_backend,
    define_op,
    device_constant,
    native_function,
    reference_backend,
    triton_auto_exclusion,
    triton_backend,
)
from mgm_fast.stepcost import DispatchCounter


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


def test_a_call_is_bound_once_and_every_backend_sees_the_same_inputs():
    seen = []

    def check(inputs):
        seen.append(inputs)
        return ["not this one"]

    op = FusedOp("toy", "scales its input")
    op.register(Backend("reference", lambda x, scale=2.0, *, bias=0.0: scale * x + bias, devices=("cpu",)))
    op.register(Backend("cpp", lambda x, scale=2.0, *, bias=0.0: x, devices=("cpu",), extra_check=check))
    op.register(Backend("triton", lambda x, scale=2.0, *, bias=0.0: x, devices=("cpu",), extra_check=check))
    x = torch.ones(2)
    assert op.select("auto", x, bias=1.0).name == "reference"
    assert len(seen) == 2 and seen[0] is seen[1]
    assert dict(seen[0]) == {"x": x, "scale": 2.0, "bias": 1.0} and seen[0].tensors == [x]


def test_binding_errors_name_the_op():
    op = _op()
    with pytest.raises(TypeError, match=r"toy: takes 1 positional arguments, got 2"):
        op.select("auto", torch.ones(2), torch.ones(2))
    with pytest.raises(TypeError, match="toy: unexpected argument 'y'"):
        op.select("auto", torch.ones(2), y=1)
    with pytest.raises(TypeError, match="toy: missing argument 'x'"):
        op.select("auto")
    with pytest.raises(TypeError, match="toy: argument 'x' given twice"):
        op.select("auto", torch.ones(2), x=torch.ones(2))


def test_argument_list_binds_in_plain_python():
    def reference(a, b=1, *, c=2):
        return a + b + c

    arguments = argument_list(reference, "sum3")
    assert arguments.bind((5,), {"c": 3}) == {"a": 5, "b": 1, "c": 3}
    assert list(arguments.bind((), {"c": 0, "a": 1})) == ["a", "b", "c"]  # the list's order
    with pytest.raises(TypeError, match="sum3: takes 2 positional arguments, got 3"):
        arguments.bind((1, 2, 3), {})


def test_backend_declarations_fill_in_their_kind():
    ref = reference_backend(lambda x: x)
    assert ref.name == "reference" and "cpu" in ref.devices and torch.float64 in ref.dtypes
    cpp = cpp_backend(lambda x: x)
    assert (cpp.name, cpp.devices, cpp.dtypes, cpp.availability) == ("cpp", ("cpu",), (torch.float32,), _native.cpp_reason)
    cuda = cuda_backend(lambda x: x)
    assert (cuda.name, cuda.devices, cuda.availability) == ("cuda", ("cuda",), _native.cuda_reason)
    triton = triton_backend(lambda x: x)
    assert triton.name == "triton" and triton.auto_exclusion is triton_auto_exclusion
    with pytest.raises(ValueError, match="needs a reference backend"):
        define_op("toy_without_reference", "", [cpp])
    assert "toy_without_reference" not in REGISTRY


def test_native_function_is_picked_by_device():
    if _native.extension() is None:
        pytest.skip("C++ extension not built")
    assert native_function("multitask_loss_{device}", "cpu") is _native.extension().multitask_loss_cpu


def test_a_remembered_selection_is_forgotten_with_the_run_record():
    """With a selection_key, eager calls remember their selection; reset_run_record (a new run
    in the same process) forgets it with the exclusions and resolutions, so the next call
    selects again and records its resolution for the new run."""
    op = _op()
    op.selection_key = lambda x: (x.shape, x.dtype, x.device)
    checked = []
    op.check = checked.append
    op(torch.ones(2))
    op(torch.ones(2))
    assert len(checked) == 1 and op.resolutions["cpu float32"]["backend"] == "cpp"
    op.exclude("cpp", "failed its self-test here")
    op.reset_run_record()
    assert op.resolutions == {} and op.exclusions == {}
    op(torch.ones(2))
    assert len(checked) == 2 and op.resolutions["cpu float32"]["backend"] == "cpp"


# ---------------------------------------------------------------------------------------------
# device_constant: constants from host numbers are uploaded once, not in every step


def test_device_constant_is_made_once_per_values_dtype_and_device():
    a = device_constant((0.299, 0.587, 0.114), torch.float32, "cpu")
    assert torch.equal(a, torch.tensor([0.299, 0.587, 0.114], dtype=torch.float32)) and a.device.type == "cpu"
    assert device_constant((0.299, 0.587, 0.114), torch.float32, torch.device("cpu")) is a  # no new upload
    assert device_constant((0.299, 0.587, 0.114), torch.float64, "cpu") is not a  # the dtype is part of the key
    assert device_constant((0.299, 0.587, 0.115), torch.float32, "cpu") is not a
    counter = DispatchCounter()
    with counter:
        device_constant((0.299, 0.587, 0.114), torch.float32, "cpu")
    assert counter.total_ops() == 0  # served from the cache: nothing dispatched, no upload


def test_device_constant_first_made_in_inference_mode_serves_autograd_later():
    with torch.inference_mode():
        c = device_constant(((1.0, 2.0), (3.0, 4.0)), torch.float32, "cpu")
    assert not c.is_inference()
    w = torch.ones(2, 2, requires_grad=True)
    (device_constant(((1.0, 2.0), (3.0, 4.0)), torch.float32, "cpu") * w).sum().backward()  # saves c
    assert torch.equal(w.grad, torch.tensor([[1.0, 2.0], [3.0, 4.0]]))


def test_device_constant_traces_into_a_compiled_graph():
    def f(x):
        return x * device_constant((1.0, 2.0, 3.0), torch.float32, x.device)

    x = torch.randn(4, 3)
    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    assert torch.equal(out, x * torch.tensor([1.0, 2.0, 3.0]))
