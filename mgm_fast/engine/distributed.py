"""Data-parallel training with torch.distributed (``torchrun``), the StyleGAN3 way.

MGM backpropagates several losses through the shared encoder in one step, each followed by its
own optimiser step, so ``DistributedDataParallel`` (whose reducer expects every parameter to be
ready once per iteration) does not fit. Instead:

* weights and buffers are broadcast from rank 0 once, after the models are built;
* every optimiser step is preceded by one all-reduce of that sub-step's gradients, packed into
  one flat buffer per dtype (:func:`all_reduce_grads`), averaged over the ranks;
* cross-rank terms of a loss go through autograd-aware collectives whose backward *sums* the
  gradients of all ranks (:func:`all_gather_cat`, used by :class:`SyncBatchNorm` and by the
  NT-Xent negatives gathered across ranks).

Scaling convention (why averaging the gradients is right): every rank computes its *local*
loss l_r, a mean over its own samples, and the global objective is J = (1/W) sum_r l_r. Where
l_r depends on other ranks' samples (gathered statistics or negatives), the collective's
backward adds the other ranks' gradients, so rank r ends with W * dJ/dtheta through its own
samples and the average over ranks is exactly dJ/dtheta. With the same global batch, a W-rank
run therefore takes the same optimiser steps as a 1-rank run up to float rounding, except
where random draws differ (each rank draws its own latents, noise and SimCLR views; seeds are
offset per rank) and, without :class:`SyncBatchNorm`, where BatchNorm normalises with the
statistics of the local batch only.

CPU runs use the gloo backend, CUDA runs NCCL. Only rank 0 writes files (logs, checkpoints,
samples, evaluation).
"""

from __future__ import annotations

import copy
import datetime
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from mgm_fast.models.layers import add_relu

RANK_SEED_STRIDE = 7919
"""Ranks r > 0 reseed with ``seed + RANK_SEED_STRIDE * r``, so their draws differ from rank 0's."""


@dataclass(frozen=True)
class World:
    """This process's place in the job (a single process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def seed_for(self, seed: int) -> int:
        """Per-rank seed: rank 0 keeps ``seed`` (a 1-process run is unchanged)."""
        return seed + RANK_SEED_STRIDE * self.rank


SINGLE = World()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str | None = None, timeout_s: float = 1800) -> tuple[World, torch.device]:
    """Join the process group that ``torchrun`` describes (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR/PORT); a plain ``python`` launch returns :data:`SINGLE`.

    Args:
        device: the ``--device`` option: None picks ``cuda:<local_rank>`` when CUDA exists,
            else the CPU; "cuda" means this rank's GPU; "cpu" forces gloo on the CPU.

    Returns:
        (world, device) with the default process group initialised (NCCL for CUDA, gloo for
        the CPU) when WORLD_SIZE > 1.
    """
    if not launched_by_torchrun():
        return SINGLE, torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda:
        if torch.cuda.device_count() <= local_rank:
            raise SystemExit(
                f"rank {rank}: LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA "
                "device(s) are visible; use --nproc_per_node <= the GPU count or --device cpu"
            )
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev = torch.device("cpu")
        backend = "gloo"
        # Ranks on one machine share its cores.
        per_rank = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
        torch.set_num_threads(per_rank)
    if not dist.is_initialized():
        dist.init_process_group(
            backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s)
        )
    return World(rank, world_size, local_rank), dev


def shutdown(world: World) -> None:
    if world.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.enabled:
        dist.barrier()


# ------------------------------------------------------------------------------------------
# Weights and gradients.


def _flat_groups(tensors: Iterable[Tensor]) -> dict[tuple, list[Tensor]]:
    groups: dict[tuple, list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    return groups


def broadcast_module(module: nn.Module, world: World, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers (BN statistics, spectral-norm vectors) to every
    rank, one flat broadcast per dtype. The modules must have been built identically."""
    if not world.enabled:
        return
    tensors = [t.data for t in list(module.parameters()) + list(module.buffers())]
    with torch.no_grad():
        for group in _flat_groups(tensors).values():
            flat = torch.cat([t.reshape(-1) for t in group])
            dist.broadcast(flat, src)
            offset = 0
            for t in group:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()


def all_reduce_grads(params: Iterable[nn.Parameter], world: World) -> None:
    """Average the gradients of ``params`` over the ranks in place: one flat all-reduce per
    dtype. Parameters without a gradient (``set_to_none`` and not reached by this sub-step's
    loss) are skipped; every rank runs the same sub-step, so the sets agree."""
    if not world.enabled:
        return
    unique = {id(p): p for p in params}.values()  # optimisers may share parameters
    grads = [p.grad for p in unique if p.grad is not None]
    with torch.no_grad():
        for group in _flat_groups(grads).values():
            flat = torch.cat([g.reshape(-1) for g in group])
            dist.all_reduce(flat)
            flat.div_(world.world_size)
            offset = 0
            for g in group:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()


def all_finite(value: Tensor, world: World) -> bool:
    """Whether ``value`` is finite on every rank (a host synchronisation; one all-reduce)."""
    flag = torch.isfinite(value.detach()).all().to(torch.int32).reshape(1)
    if world.enabled:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def average_scalars(values: dict[str, Tensor], world: World) -> dict[str, Tensor]:
    """Mean over ranks of 0-dim tensors (the logged losses), one all-reduce for all of them."""
    if not world.enabled or not values:
        return values
    names = sorted(values)
    flat = torch.stack([values[k].detach().float().reshape(()) for k in names])
    dist.all_reduce(flat)
    flat /= world.world_size
    return {k: flat[i] for i, k in enumerate(names)}


def gather_objects(obj, world: World) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (``[obj]`` for one process)."""
    if not world.enabled:
        return [obj]
    out = [None] * world.world_size
    dist.all_gather_object(out, obj)
    return out


def to_cpu(tree):
    """Tensors of a nested structure moved to the CPU (for gather_objects of RNG states)."""
    return tree_map(lambda t: t.cpu() if isinstance(t, Tensor) else t, tree)


# ------------------------------------------------------------------------------------------
# Autograd-aware collectives.


class _AllGatherCat(torch.autograd.Function):
    """cat([x of rank 0, x of rank 1, ...], dim 0); backward: the sum over ranks of the
    gradient w.r.t. the gathered tensor, sliced to this rank's rows."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        world_size, rank = dist.get_world_size(), dist.get_rank()
        parts = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows = rank, x.shape[0]
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def all_gather_cat(x: Tensor, world: World) -> Tensor:
    """(n, ...) on every rank -> (W * n, ...) in rank order, differentiable (see module doc).
    Every rank must pass the same shape."""
    if not world.enabled:
        return x
    return _AllGatherCat.apply(x)


# ------------------------------------------------------------------------------------------
# Synchronised BatchNorm.


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training-mode statistics are those of the global batch (all ranks).

    Same parameters, buffers and state-dict keys as the ``BatchNorm1d/2d`` it replaces, so
    checkpoints do not change. Inputs (N, C, *). Each rank computes its count, mean and sum of
    squared deviations in float32; they are gathered (:func:`all_gather_cat`) and combined with
    the parallel-variance formula (Chan et al.), which avoids the cancellation of
    E[x^2] - E[x]^2. The running variance is updated with the unbiased global variance, as
    ``nn.BatchNorm`` does. Gradients flow through the global statistics to every rank. With
    one process, or in eval mode, it is ``nn.BatchNorm``'s own forward.

    Unlike ``torch.nn.SyncBatchNorm`` it runs on the CPU (gloo) as well as on CUDA.
    """

    world: World = SINGLE

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"SyncBatchNorm: expected input of shape (N, C, *), got {tuple(x.shape)}")

    def forward(self, x: Tensor, relu: bool = False, residual: Tensor | None = None) -> Tensor:
        """BatchNorm of ``x``, plus ``residual``, then ``F.relu`` with ``relu`` (the signature of
        the networks' :class:`~mgm_fast.models.layers.BatchNorm2d`, which it replaces)."""
        return add_relu(self._normalize(x), relu, residual)

    def _normalize(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if not (self.training and self.world.enabled):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        xf = x.float()
        count = torch.full((1,), x.numel() / x.shape[1], dtype=torch.float32, device=x.device)  # a fill, no upload
        mean = xf.mean(dims)
        m2 = ((xf - mean.view(1, -1, *([1] * (x.dim() - 2)))) ** 2).sum(dims)
        stats = all_gather_cat(torch.cat([count, mean, m2]).unsqueeze(0), self.world)  # (W, 1 + 2C)
        c = self.num_features
        counts, means, m2s = stats[:, :1], stats[:, 1 : 1 + c], stats[:, 1 + c :]
        total = counts.sum()
        g_mean = (counts * means).sum(0) / total
        g_m2 = (m2s + counts * (means - g_mean) ** 2).sum(0)
        var = g_m2 / total
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = (
                    1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                )
                unbiased = g_m2 / (total - 1).clamp_min(1)
                self.running_mean.mul_(1 - factor).add_(g_mean.to(self.running_mean.dtype), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = (xf - g_mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def local_copy(module: nn.Module) -> nn.Module:
    """A deep copy that runs on its own: its SyncBatchNorms use local statistics (no
    collectives, so one rank may run it alone) and it is not compiled (a compiled module's copy
    would otherwise call the original's forward)."""
    out = copy.deepcopy(module)
    for m in out.modules():
        if isinstance(m, SyncBatchNorm):
            m.world = SINGLE
        if getattr(m, "_compiled_call_impl", None) is not None:
            m._compiled_call_impl = None
    return out


def convert_sync_batchnorm(module: nn.Module, world: World) -> nn.Module:
    """Replace every ``nn.BatchNorm1d/2d/3d`` inside ``module`` by a :class:`SyncBatchNorm`
    sharing its parameters and buffers (in place; returns ``module``)."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, SyncBatchNorm):
            sync = SyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                 child.track_running_stats, device=None, dtype=None)
            sync.world = world
            if child.affine:
                sync.weight, sync.bias = child.weight, child.bias
            if child.track_running_stats:
                sync.running_mean, sync.running_var = child.running_mean, child.running_var
                sync.num_batches_tracked = child.num_batches_tracked
            sync.train(child.training)
            setattr(module, name, sync)
        else:
            convert_sync_batchnorm(child, world)
    return module
