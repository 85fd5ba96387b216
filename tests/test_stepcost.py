"""The step accounting tool (mgm_fast.stepcost) and the property it guards: a fast-engine step
reads nothing back to the host."""

from __future__ import annotations

import time

import pytest
import torch

from mgm_fast import stepcost
from mgm_fast.data.loader import MemoryLoader
from mgm_fast.data.sample import DataError
from mgm_fast.ops import genblock as genblock_op
from mgm_fast.ops._dispatch import value_checks, value_checks_enabled


def test_counter_counts_ops_and_every_kind_of_host_read():
    x = torch.arange(6.0)
    counter = stepcost.DispatchCounter()
    with counter:
        y = x * 2 + 1
        float(y.sum())  # _local_scalar_dense
        y.tolist()  # reads a CPU tensor without dispatching an op
        (y > 3).nonzero()  # output size depends on the values
        y.numpy()
    assert counter.total_ops() >= 5
    syncs = counter.syncs["other"]
    assert syncs["aten._local_scalar_dense"] == 1 and syncs["aten.nonzero"] == 1
    assert syncs["Tensor.tolist"] == 1 and syncs["Tensor.numpy"] == 1
    assert counter.total_syncs() == 4
    assert torch.Tensor.tolist is not None and x.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]  # unpatched


def test_counter_counts_blocking_uploads_as_syncs():
    # torch.tensor / new_tensor from host numbers: free on the CPU, a stream sync on a GPU
    x = torch.ones(3)
    counter = stepcost.DispatchCounter()
    with counter:
        torch.tensor([1.0, 2.0])
        x.new_tensor(3.0)
        x.new_full((), 3.0)  # a fill: no upload
        torch.full((2,), 0.5)
    assert counter.syncs["other"] == {"aten.lift_fresh": 2}


def test_blocking_copy_rule():
    # meta tensors stand in for a device (no GPU here): the rule reads devices and non_blocking only
    dev, host = torch.empty(3, device="meta"), torch.empty(3)
    to_copy, copy_ = torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default
    assert stepcost._is_blocking_copy(to_copy, (dev,), {"device": torch.device("cpu")})  # a read-back
    assert stepcost._is_blocking_copy(to_copy, (host,), {"device": torch.device("meta")})  # blocking upload
    assert not stepcost._is_blocking_copy(to_copy, (host,), {"device": torch.device("meta"), "non_blocking": True})
    assert not stepcost._is_blocking_copy(to_copy, (host,), {"dtype": torch.float64})  # no device change
    assert not stepcost._is_blocking_copy(to_copy, (host,), {"device": torch.device("cpu")})
    assert stepcost._is_blocking_copy(copy_, (host, dev), {})
    assert stepcost._is_blocking_copy(copy_, (dev, host), {})
    assert stepcost._is_blocking_copy(copy_, (dev, host, False), {})
    assert not stepcost._is_blocking_copy(copy_, (dev, host, True), {})
    assert not stepcost._is_blocking_copy(copy_, (host, torch.empty(3)), {})


def test_counter_sections_nest_and_restore():
    counter = stepcost.DispatchCounter()
    with counter:
        torch.ones(2) + 1
        with counter.labelled("inner"):
            torch.ones(2).sum().item()
        torch.ones(2) * 3
    assert set(counter.ops) == {"other", "inner"}
    assert counter.syncs == {"inner": {"aten._local_scalar_dense": 1}}


def _profiled_detaches(fn) -> int:
    """aten::detach calls torch's profiler records (dispatched ops only)."""
    with torch.profiler.profile() as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "aten::detach")


def test_mode_shallow_copies_are_told_apart_from_dispatched_detaches():
    x = torch.randn(4, 3, 5, 5, requires_grad=True)

    def relu_step():  # ReLU saves its output: a shallow copy at save and at unpack, no op
        torch.autograd.grad(torch.relu(x * 2).sum(), [x])

    def explicit_detaches():  # two real detach ops, one of a tensor without grad
        x.detach()
        (x * 2).detach().detach()

    for fn in (relu_step, explicit_detaches):
        counter = stepcost.DispatchCounter()
        with counter:
            fn()
        dispatched = counter.ops.get("other", {}).get("aten.detach", 0)
        assert dispatched == _profiled_detaches(fn), fn.__name__
    counter = stepcost.DispatchCounter()
    with counter:
        relu_step()
    assert counter.mode_copies["other"] == 2 and "aten.detach" not in counter.ops["other"]
    counter = stepcost.DispatchCounter()
    with counter:
        explicit_detaches()
    assert counter.ops["other"]["aten.detach"] == 3 and not counter.mode_copies


@pytest.mark.parametrize("method", ["mgm", "phase-a", "mgm-light"])
def test_fast_engine_step_reads_nothing_back(method):
    cost = stepcost.count_step(method, batch=4, warmup=1)
    assert cost.syncs == 0, f"host syncs (read-backs, blocking uploads) in a fast {method} step: {cost.syncs_by_section}"
    # channels_last end to end: images, the generator's seed and the attention output are
    # converted where they enter, so no convolution takes an NCHW input
    assert cost.nchw_convolutions == 0
    assert cost.ops > 500  # the counter saw the step
    if method == "mgm":
        assert {"supervised_step", "refine_step/real", "simclr_step/synth", "d_step", "g_step"} <= set(
            cost.ops_by_section)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["phase-a", "mgm", "mgm-light"])
def test_fast_engine_eager_cuda_step_has_no_synchronising_call(method):
    # what the counts above stand for, checked by the CUDA runtime (the compiled CUDA-graph step:
    # tests/engine/test_compiled_step.py)
    ctx, step_fn, batches = stepcost.prepare(method, "fast", "cuda", "tiny", 4, ["--compile", "off"])
    for _ in range(2):
        step_fn(ctx, *next(batches))
    stepcost._finish(ctx)
    args = next(batches)  # fetched outside: the step's calls are checked, not the loader's
    with stepcost.cuda_sync_errors():
        step_fn(ctx, *args)
    stepcost._finish(ctx)


def test_cuda_sync_errors_restores_the_debug_mode(monkeypatch):
    modes = ["warn"]
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: {"warn": 1}[modes[-1]])
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: modes.append(mode))
    with pytest.raises(RuntimeError, match="inside"), stepcost.cuda_sync_errors():
        assert modes[-1] == "error"
        raise RuntimeError("inside")
    assert modes == ["warn", "error", 1]


def test_reference_engine_reads_losses_back_every_sub_step():
    # the released .item() per sub-step: the counter must see what the fast engine avoids
    cost = stepcost.count_step("mt", engine="reference", batch=4, warmup=1)
    assert cost.syncs_by_op.get("aten._local_scalar_dense", 0) >= 3
    # the reference engine runs NCHW: the layout count sees every convolution of the step
    assert cost.nchw_convolutions == dict(cost.top_ops)["aten.convolution"] > 0


def test_nchw_convolution_rule_skips_layout_ambiguous_inputs():
    nchw = torch.randn(2, 3, 4, 4)
    assert stepcost.is_nchw_convolution(nchw)
    assert not stepcost.is_nchw_convolution(nchw.contiguous(memory_format=torch.channels_last))
    assert not stepcost.is_nchw_convolution(torch.randn(2, 1, 4, 4))  # one channel: both layouts
    assert not stepcost.is_nchw_convolution(torch.randn(2, 3, 1, 1))  # one pixel: both layouts
    counter = stepcost.DispatchCounter()
    weight = torch.randn(5, 3, 3, 3)
    with counter:
        torch.nn.functional.conv2d(nchw, weight)
        torch.nn.functional.conv2d(nchw.contiguous(memory_format=torch.channels_last),
                                   weight.contiguous(memory_format=torch.channels_last))
    assert counter.nchw_convolutions["other"] == 1


def test_check_values_restores_the_in_step_label_check():
    with value_checks(True), pytest.raises(ValueError, match="outside"):
        genblock_op.genblock(*_genblock_args(label=5), impl="reference")  # 3 classes
    with pytest.raises(ValueError, match="outside"):  # default: CPU tensors are checked
        genblock_op.genblock(*_genblock_args(label=5), impl="reference")
    assert value_checks_enabled(torch.device("cpu")) and not value_checks_enabled(torch.device("meta"))
    with value_checks(False):
        assert not value_checks_enabled(torch.device("cpu"))
        counter = stepcost.DispatchCounter()
        args = _genblock_args(label=1)  # made outside: torch.tensor of the labels is an upload
        with counter:
            genblock_op.genblock(*args, impl="reference")
        assert counter.total_syncs() == 0 and counter.total_ops() > 10
    with value_checks(True):
        assert value_checks_enabled(torch.device("meta"))
    assert value_checks_enabled(torch.device("cpu")) and not value_checks_enabled(torch.device("meta"))


def _genblock_args(label: int):
    b, cin, cout, classes = 2, 4, 4, 3
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, cin, 4, 4, generator=g)
    y = torch.tensor([0, label])
    return (x, y, torch.randn(classes, 2 * cin, generator=g), torch.randn(cout, cin, 3, 3, generator=g),
            torch.zeros(cout), torch.randn(classes, 2 * cout, generator=g), torch.randn(cout, cout, 3, 3, generator=g),
            torch.zeros(cout), torch.randn(cout, cin, 1, 1, generator=g), torch.zeros(cout),
            torch.zeros(cin), torch.ones(cin), torch.zeros(cout), torch.ones(cout))


class _Labels(torch.utils.data.Dataset):
    def __init__(self, scenes, seg_value=0):
        self.scenes, self.seg_value = scenes, seg_value

    def __len__(self):
        return len(self.scenes)

    def sample_id(self, i):
        return f"s{i}"

    def __getitem__(self, i):
        return {"rgb": torch.zeros(3, 4, 4), "seg": torch.full((4, 4), self.seg_value, dtype=torch.int64),
                "depth": torch.zeros(1, 4, 4), "depth_mask": torch.ones(1, 4, 4, dtype=torch.bool),
                "normal": torch.zeros(3, 4, 4), "normal_mask": torch.ones(1, 4, 4, dtype=torch.bool),
                "scene": torch.tensor(self.scenes[i]), "id": f"s{i}"}


def test_loaders_check_labels_once_at_the_data_boundary():
    ok = MemoryLoader(_Labels([0, 1, 2, 1]), list(range(4)), 2, "cpu", 0)
    ok.require_labels(num_scenes=3, num_seg_classes=5)
    bad = MemoryLoader(_Labels([0, 1, 7, 1]), list(range(4)), 2, "cpu", 0)
    with pytest.raises(DataError, match=r"'scene' label 7 in samples \['s2'\].*outside \[0, 3\)"):
        bad.require_labels(num_scenes=3)
    seg = MemoryLoader(_Labels([0, 0], seg_value=9), [0, 1], 2, "cpu", 0)
    seg.require_labels(num_scenes=3)  # seg not required
    with pytest.raises(DataError, match=r"'seg' label 9 .* or -1 \(ignored\)"):
        seg.require_labels(num_seg_classes=5)
    ignored = MemoryLoader(_Labels([0, 0], seg_value=-1), [0, 1], 2, "cpu", 0)
    ignored.require_labels(num_scenes=1, num_seg_classes=5)


def test_torch_loader_checks_each_batch_before_the_copy():
    from mgm_fast.data.loader import TorchLoader

    loader = TorchLoader(_Labels([0, 1, 4, 1]), list(range(4)), 2, "cpu", 0, shuffle=False)
    loader.require_labels(num_scenes=3)
    with pytest.raises(DataError, match=r"'scene' label 4 in samples \['s2'\]"):
        list(loader)


def test_cli_writes_a_report_and_json_per_row(tmp_path):
    import json

    out, js = tmp_path / "cost.md", tmp_path / "cost.json"
    assert stepcost.main(["--methods", "mt", "--engines", "reference,fast", "--batch-size", "2", "--no-floor",
                          "--time-steps", "1", "--out", str(out), "--json", str(js)]) == 0
    text = out.read_text()
    assert "| reference | mt |" in text and "| fast | mt |" in text and "step time" in text
    rows = json.loads(js.read_text())["rows"]
    assert rows["fast"][0]["syncs"] == 0 and rows["reference"][0]["syncs"] >= 3
    assert all(r[0]["extra"]["timing"] == "interleaved" for r in rows.values()) and "round-robin" in text
    with pytest.raises(SystemExit, match="unknown row"):
        stepcost.main(["--methods", "mt", "--engines", "fast+jit", "--no-floor"])
    with pytest.raises(SystemExit, match="unknown step"):
        stepcost.main(["--methods", "phase-b", "--no-floor"])


def test_rows_are_timed_round_robin():
    """Step times of the rows of one report come from steps taken in turn, one per row per round,
    so that the machine's drift touches every row alike."""
    import itertools

    calls = []

    class Ctx:
        def __init__(self, name):
            self.name = name

        def pop_means(self):
            return {}

    def step(ctx, batch):
        calls.append((ctx.name, batch))

    live = [(step, Ctx(name), itertools.repeat((name + "-batch",))) for name in ("reference", "fast", "compiled")]
    ms = stepcost._interleaved_median_ms(live, 3)
    assert calls == [(n, n + "-batch") for n in ("reference", "fast", "compiled")] * 3
    assert len(ms) == 3 and all(m >= 0 for m in ms)


_HOST_DATA_FACTORIES = ("torch.tensor", "torch.as_tensor")
_UPLOADS_ALLOWED = {
    ("mgm_fast/ops/_dispatch.py", "device_constant"): "the one home: each constant uploaded once",
    ("mgm_fast/ops/_dispatch.py", "_device_constant"): "the one home: each constant uploaded once",
    ("mgm_fast/data/augment.py", "identity_params"): "view parameters for tests and docs, never drawn in a step",
    ("mgm_fast/metrics.py", "reduce_"): "evaluation across ranks, after the steps; reads its sizes back anyway",
    ("mgm_fast/metrics.py", "_median_from_hist"): "evaluation, after the steps; returns a host float anyway",
}


def _uploads_from_host_data(root) -> set[tuple[str, str, int]]:
    """(file, enclosing function, line) of every call that makes a tensor from host numbers on a
    chosen device: ``torch.tensor``/``torch.as_tensor`` with ``device=``, or followed by ``.to(...)``
    / ``.cuda()``, and every ``Tensor.new_tensor`` (on the device of its tensor)."""
    import ast

    found = set()
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text())
        enclosing = {}
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    enclosing[id(node)] = fn.name  # inner functions are walked later: they win
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            name = ast.unparse(node.func)
            factory_on_device = name in _HOST_DATA_FACTORIES and any(k.arg == "device" for k in node.keywords)
            moved_after = (node.func.attr in ("to", "cuda") and isinstance(node.func.value, ast.Call)
                           and ast.unparse(node.func.value.func) in _HOST_DATA_FACTORIES)  # fmt: skip
            if factory_on_device or moved_after or node.func.attr == "new_tensor":
                rel = path.relative_to(root.parent).as_posix()
                found.add((rel, enclosing.get(id(node), "<module>"), node.lineno))
    return found


def test_no_tensor_is_made_from_host_numbers_on_a_device_outside_the_allowed_places():
    # On a GPU such a call is a blocking upload (a stream sync); the step counter sees the ones a
    # CPU step runs (aten.lift_fresh), this scan also the GPU-only paths (Triton, SyncBN).
    from pathlib import Path

    import mgm_fast

    found = _uploads_from_host_data(Path(mgm_fast.__file__).parent)
    unexpected = sorted(f"{f}:{line} in {fn}" for f, fn, line in found if (f, fn) not in _UPLOADS_ALLOWED)
    assert not unexpected, "tensors made from host numbers on a device (use device_constant, torch.full or " \
        f"Tensor.new_full): {unexpected}"
    stale = set(_UPLOADS_ALLOWED) - {(f, fn) for f, fn, _ in found}
    assert not stale, f"allowed places that no longer make such a tensor: {sorted(stale)}"


def test_upload_scan_finds_each_pattern(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "m.py").write_text(
        "import torch\n"
        "def a(x):\n    return torch.tensor([1.0], device=x.device)\n"
        "def b(x):\n    return torch.tensor([1.0]).to(x.device)\n"
        "def c(x):\n    return x.new_tensor(2.0)\n"
        "def fine(x):\n    return torch.tensor([1.0]), x.new_full((), 2.0), torch.full((1,), 1.0, device=x.device)\n"
    )
    assert {(fn, line) for _, fn, line in _uploads_from_host_data(pkg)} == {("a", 3), ("b", 5), ("c", 7)}


def test_ops_outside_graphs_counts_the_eager_ops_between_compiled_code():
    torch._dynamo.reset()
    f = torch.compile(lambda x: (x * 2).sin().sum(), backend="aot_eager", fullgraph=True)
    x = torch.randn(8, requires_grad=True)
    f(x).backward()  # compiled, and x.grad exists

    def step():
        y = f(x)  # mul, sin, sum and their backward: compiled code
        (y + 1).backward()  # add, the backward's seed and the gradient sum into x.grad: eager

    outside = stepcost.ops_outside_graphs(step)
    assert outside == {"aten::add": 1, "aten::ones_like": 1, "aten::add_": 1}
    eager = stepcost.ops_outside_graphs(lambda: ((x * 2).sin().sum() + 1).backward())
    assert eager["aten::sin"] == 1 and eager["aten::mul"] >= 1  # without compilation they are outside


def test_report_lists_the_ops_outside_the_compiled_graphs():
    cost = stepcost.StepCost(step="mgm", ops=None, syncs=None, ops_by_section={}, syncs_by_op={},
                             syncs_by_section={}, top_ops=[], graph_breaks=0, recompiles=0,
                             extra={"graphs": 22, "ops_outside_graphs": 724,
                                    "top_outside_graphs": [("aten::add_", 150), ("aten::select", 36)],
                                    "floor_profiled_ms": {"wall": 97.6, "graph_code": 57.5, "guard_checks": 8.3,
                                                          "optimisers": 7.2}})
    text = stepcost.render({"fast+compile": [cost]}, "cpu")
    assert "`fast+compile` `mgm` outside the compiled graphs: 724 ops at top level (22 graphs); " \
        "most frequent: add_ 150, select 36" in text
    assert "a profiled floor step: 97.6 ms, of which compiled graph code 57.5 ms; 40.1 ms outside it, among " \
        "them guard checks 8.3 ms and optimiser steps 7.2 ms" in text


def test_host_split_times_graph_code_guards_and_optimisers():
    torch._dynamo.reset()
    f = torch.compile(lambda x: (x * 2).sin().sum(), fullgraph=True)  # inductor: its code is timed
    w = torch.randn(64, requires_grad=True)
    opt = torch.optim.Adam([w])
    f(w).backward()

    def step():
        f(w)
        w.grad = torch.ones(64)
        opt.step()
        time.sleep(0.02)  # host work outside the graph

    t = stepcost.host_split_ms(step)
    assert t["wall"] >= 20 and 0 < t["graph_code"] < 10, t
    assert t["guard_checks"] > 0 and t["optimisers"] > 0, t
    eager = stepcost.host_split_ms(lambda: (w * 2).sin().sum())
    assert eager["graph_code"] == eager["guard_checks"] == eager["optimisers"] == 0  # nothing compiled



def test_cli_compiled_row_reports_outside_ops_and_the_floor_split(tmp_path):
    # the MT step (encoder and three decoders) compiled with inductor, counted and at the floor
    import json

    out, js = tmp_path / "cost.md", tmp_path / "cost.json"
    assert stepcost.main(["--methods", "mt", "--engines", "fast+compile", "--batch-size", "2",
                          "--out", str(out), "--json", str(js)]) == 0
    extra = json.loads(js.read_text())["rows"]["fast+compile"][0]["extra"]
    assert extra["ops_outside_graphs"] > 0 and extra["graphs"] > 0
    split = extra["floor_profiled_ms"]
    assert 0 < split["graph_code"] < split["wall"] and split["guard_checks"] > 0 and split["optimisers"] > 0
    text = out.read_text()
    assert "`fast+compile` `mt` outside the compiled graphs:" in text and "a profiled floor step:" in text
