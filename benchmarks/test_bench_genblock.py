"""Forward + backward of the generator's GenBlocks and of the whole generator, per backend.

Each timed step runs the module (spectral-norm power iteration included, as in training), then
backward of ``(out * G).sum()`` for a fixed random G, with parameter gradients reset first.
Rows of a group: ``reference`` (eager, the released computation; the speed-up baseline),
``compile`` (``torch.compile`` of the reference module; compiled before timing), and the fused
backends that can run here (``cpp`` on the CPU; ``cuda`` and ``triton`` on a GPU).

* CPU: the tiny preset (``mgm_fast.config`` preset "tiny", batch 8, 64x64): every GenBlock
  (128->64 @4->8, 64->32 @8->16, 32->16 @16->32, 16->8 @32->64) and the whole generator.
  ``extra_info["saved_activation_bytes"]``: bytes of the tensors autograd keeps for backward
  (distinct storages), the CPU stand-in for peak memory.
* CPU, paper shapes (batch 8; only when benchmarking, ``-k paper``): the paper's GenBlocks and
  the paper generator. Besides ``reference`` and ``cpp`` (its default, ``auto``: the conv
  algorithms a cost model of the shape picks, csrc/bindings/genblock.cpp), the block rows force each pair of
  algorithms of the block's two convs, ``cpp[<conv1>+<conv2>]`` (MGM_FAST_GENBLOCK_ALGO /
  MGM_FAST_GENBLOCK_CONV2_ALGO); ``cpp[phase+conv]`` is the fixed choice of earlier versions.
  ``extra_info["algorithms"]``: what ``cpp`` chose.
* GPU (only with CUDA): the paper's GenBlocks at batch 32 (1024->1024 @4->8, 1024->512 @8->16,
  512->256 @16->32, 256->128 @32->64, 128->64 @64->128) and the paper generator, float32 and
  bfloat16, channels_last inputs; ``peak_memory_bytes`` of one step.

The compile rows take tens of seconds to compile on the CPU, and the paper rows minutes to run, so
with ``--benchmark-disable`` (CI) they are skipped. ``pytest benchmarks/test_bench_genblock.py
--benchmark-group-by=group`` (``OMP_NUM_THREADS=2 ... -k paper --benchmark-only`` for the paper
rows).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from mgm_fast import _native
from mgm_fast.benchtools import peak_memory
from mgm_fast.config import preset
from mgm_fast.models.gan import GenBlock, Generator, generator_blocks
from mgm_fast.ops import REGISTRY

TINY = preset("tiny")
TINY_BATCH = TINY.schedule.batch_size


PAPER_BLOCKS = generator_blocks(preset("paper").model)
"""(cin, cout, input resolution) of the paper generator's GenBlocks: 1024->1024 @4, 1024->512 @8,
512->256 @16, 256->128 @32, 128->64 @64."""


def _skip_unavailable(benchmark, impl: str, device: str) -> None:
    if impl == "compile":
        if benchmark.disabled:
            pytest.skip("torch.compile row: compiling takes tens of seconds; it runs when benchmarking")
        return
    if impl == "reference":
        return
    reason = REGISTRY["genblock"].backends[impl].unavailable_reason()
    if impl == "cpp" and device != "cpu":
        reason = "the cpp backend runs on the CPU"
    if reason is not None:
        pytest.skip(f"{impl} backend unavailable: {reason}")


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for backward during fn()."""
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def _module_step(module, inputs, grad_out_seed=0):
    """A closure: forward, backward of (out * G).sum() with parameter gradients reset first."""
    weight = {}

    def step():
        module.zero_grad(set_to_none=True)
        out = module(*inputs)
        if "g" not in weight:
            gen = torch.Generator(device=out.device).manual_seed(grad_out_seed)
            weight["g"] = torch.randn(out.shape, generator=gen, device=out.device, dtype=out.dtype)
        out.backward(weight["g"])
        return out

    return step


def _block(cin, cout, impl, device="cpu", dtype=torch.float32, classes=TINY.model.num_scenes):
    torch.manual_seed(0)
    block = GenBlock(cin, cout, classes, impl="reference" if impl == "compile" else impl)
    with torch.no_grad():  # CBN affine rows away from their identity init, as after training
        block.cond_bn1.embed.weight.normal_(0.8, 0.3)
        block.cond_bn2.embed.weight.normal_(0.8, 0.3)
    block = block.to(device, dtype).train()
    return torch.compile(block) if impl == "compile" else block


def _generator(cfg, impl, device="cpu", dtype=torch.float32):
    torch.manual_seed(0)
    g = Generator(cfg, impl="reference" if impl == "compile" else impl).to(device, dtype).train()
    return torch.compile(g) if impl == "compile" else g


# ---------------------------------------------------------------------------------------------
# CPU, tiny preset


@pytest.mark.parametrize("impl", ["reference", "cpp", "compile"])
@pytest.mark.parametrize(("cin", "cout", "res"), generator_blocks(TINY.model), ids=lambda v: str(v))
def test_bench_genblock_block_cpu(benchmark, cin, cout, res, impl):
    _skip_unavailable(benchmark, impl, "cpu")
    block = _block(cin, cout, impl)
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(TINY_BATCH, cin, res, res, generator=gen) * 1.5).requires_grad_(True)
    y = torch.randint(0, TINY.model.num_scenes, (TINY_BATCH,), generator=gen)
    step = _module_step(block, (x, y))
    step()  # compiles the compile row; warms every row
    benchmark.group = f"genblock fwd+bwd cpu b{TINY_BATCH} {cin}->{cout} @{res}->{2 * res}"
    benchmark.extra_info.update(
        impl=impl, threads=torch.get_num_threads(), baseline=impl == "reference",
        saved_activation_bytes=_saved_bytes(lambda: block(x, y)),
    )
    out = benchmark(step)
    assert out.shape == (TINY_BATCH, cout, 2 * res, 2 * res) and torch.isfinite(out).all()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("impl", ["reference", "cpp", "compile"])
def test_bench_genblock_generator_cpu(benchmark, impl):
    _skip_unavailable(benchmark, impl, "cpu")
    cfg = TINY.model
    g = _generator(cfg, impl)
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(TINY_BATCH, cfg.z_dim, generator=gen)
    y = torch.randint(0, cfg.num_scenes, (TINY_BATCH,), generator=gen)
    step = _module_step(g, (z, y))
    step()
    benchmark.group = f"generator fwd+bwd cpu tiny b{TINY_BATCH} {cfg.image_size}x{cfg.image_size}"
    benchmark.extra_info.update(
        impl=impl, threads=torch.get_num_threads(), baseline=impl == "reference",
        saved_activation_bytes=_saved_bytes(lambda: g(z, y)),
    )
    out = benchmark(step)
    assert out.shape == (TINY_BATCH, 3, cfg.image_size, cfg.image_size) and torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------
# CPU, paper shapes (batch 8): reference, cpp (auto) and cpp with each pair of conv algorithms

PAPER = preset("paper")
PAPER_CPU_BATCH = 8
ALGO_ENV = ("MGM_FAST_GENBLOCK_ALGO", "MGM_FAST_GENBLOCK_CONV2_ALGO")
FORCED = [f"cpp[{a}+{b}]" for a, b in itertools.product(("phase", "gemm", "upsample"), ("conv", "gemm"))]


def _paper_cpu_row(benchmark, monkeypatch, impl: str) -> str:
    """Skips without benchmarking; sets the algorithm variables of a cpp row (auto for plain
    ``cpp``); returns the backend."""
    if benchmark.disabled:
        pytest.skip("paper-shape CPU row: minutes of work; it runs when benchmarking")
    backend = impl.split("[")[0]
    _skip_unavailable(benchmark, backend, "cpu")
    forced = impl[len(backend) + 1 : -1].split("+") if "[" in impl else ["auto", "auto"]
    for name, value in zip(ALGO_ENV, forced):
        monkeypatch.setenv(name, value)
    return backend


def _chosen_algorithms(n: int, shapes) -> dict:
    """What auto picks for the (cin, cout, input size) float32 blocks at batch n:
    {block: (conv1, conv2)}."""
    ext = _native.extension()
    return {f"{cin}->{cout} @{res}": (ext.genblock_algo_cpu("conv1", n, cin, cout, res, res),
                                      ext.genblock_algo_cpu("conv2", n, cout, cout, 2 * res, 2 * res))
            for cin, cout, res in shapes}  # fmt: skip


@pytest.mark.parametrize("impl", ["reference", "cpp", *FORCED])
@pytest.mark.parametrize(("cin", "cout", "res"), PAPER_BLOCKS, ids=lambda v: str(v))
def test_bench_genblock_block_cpu_paper(benchmark, monkeypatch, cin, cout, res, impl):
    backend = _paper_cpu_row(benchmark, monkeypatch, impl)
    n = PAPER_CPU_BATCH
    block = _block(cin, cout, backend, classes=PAPER.model.num_scenes)
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(n, cin, res, res, generator=gen) * 1.5).requires_grad_(True)
    y = torch.randint(0, PAPER.model.num_scenes, (n,), generator=gen)
    step = _module_step(block, (x, y))
    step()  # warms every row
    benchmark.group = f"genblock fwd+bwd cpu paper b{n} {cin}->{cout} @{res}->{2 * res}"
    benchmark.extra_info.update(impl=impl, threads=torch.get_num_threads(), baseline=impl == "reference")
    if impl == "cpp":
        benchmark.extra_info["algorithms"] = _chosen_algorithms(n, [(cin, cout, res)])
    out = benchmark(step)
    assert out.shape == (n, cout, 2 * res, 2 * res) and torch.isfinite(out).all()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("impl", ["reference", "cpp", "cpp[phase+conv]"])
def test_bench_genblock_generator_cpu_paper(benchmark, monkeypatch, impl):
    backend = _paper_cpu_row(benchmark, monkeypatch, impl)
    cfg, n = PAPER.model, PAPER_CPU_BATCH
    g = _generator(cfg, backend)
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(n, cfg.z_dim, generator=gen)
    y = torch.randint(0, cfg.num_scenes, (n,), generator=gen)
    step = _module_step(g, (z, y))
    step()
    benchmark.group = f"generator fwd+bwd cpu paper b{n} {cfg.image_size}x{cfg.image_size}"
    benchmark.extra_info.update(impl=impl, threads=torch.get_num_threads(), baseline=impl == "reference")
    if impl == "cpp":
        benchmark.extra_info["algorithms"] = _chosen_algorithms(n, PAPER_BLOCKS)
    out = benchmark(step)
    assert out.shape == (n, 3, cfg.image_size, cfg.image_size) and torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------
# GPU, paper shapes (batch 32)

GPU_IMPLS = ["reference", "compile", "cuda", "triton"]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _synced(step):
    def run():
        out = step()
        torch.cuda.synchronize()
        return out

    return run


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("impl", GPU_IMPLS)
@pytest.mark.parametrize(("cin", "cout", "res"), PAPER_BLOCKS, ids=lambda v: str(v))
def test_bench_genblock_block_gpu(benchmark, cin, cout, res, impl, dtype):
    _skip_unavailable(benchmark, impl, "cuda")
    batch = 32
    block = _block(cin, cout, impl, "cuda", DTYPES[dtype])
    x = torch.randn(batch, cin, res, res, device="cuda", dtype=DTYPES[dtype])
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    y = torch.randint(0, TINY.model.num_scenes, (batch,), device="cuda")
    step = _synced(_module_step(block, (x, y)))
    step()
    benchmark.group = f"genblock fwd+bwd cuda {dtype} b{batch} {cin}->{cout} @{res}->{2 * res}"
    benchmark.extra_info.update(
        impl=impl, dtype=dtype, device=torch.cuda.get_device_name(), baseline=impl == "reference",
        peak_memory_bytes=peak_memory(step).bytes,
    )
    out = benchmark(step)
    assert torch.isfinite(out).all()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("impl", GPU_IMPLS)
def test_bench_genblock_generator_gpu(benchmark, impl, dtype):
    _skip_unavailable(benchmark, impl, "cuda")
    cfg = preset("paper").model
    batch = 32
    g = _generator(cfg, impl, "cuda", DTYPES[dtype])
    z = torch.randn(batch, cfg.z_dim, device="cuda", dtype=DTYPES[dtype])
    y = torch.randint(0, cfg.num_scenes, (batch,), device="cuda")
    step = _synced(_module_step(g, (z, y)))
    step()
    benchmark.group = f"generator fwd+bwd cuda {dtype} paper b{batch}"
    benchmark.extra_info.update(
        impl=impl, dtype=dtype, device=torch.cuda.get_device_name(), baseline=impl == "reference",
        peak_memory_bytes=peak_memory(step).bytes,
    )
    out = benchmark(step)
    assert torch.isfinite(out).all()
