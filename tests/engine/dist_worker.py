"""Worker for tests/engine/test_distributed.py, launched as
``python -m torch.distributed.run --nproc_per_node=W tests/engine/dist_worker.py CASE OUT``.

Each case builds the same global inputs on every rank (fixed seed), runs this rank's shard
through the distributed code path, and rank 0 saves what the test compares against a
single-process computation: ``torch.save(results, OUT)``.
"""

import sys

import torch
from torch import nn

from mgm_fast.engine import distributed
from mgm_fast.engine.schedule import ntxent_across_ranks


def shard(t: torch.Tensor, world: distributed.World) -> torch.Tensor:
    """Rank r's rows r::W (the loaders' sharding of a global batch)."""
    return t[world.rank :: world.world_size]


def case_syncbn(world):
    torch.manual_seed(0)
    x = torch.randn(8, 5, 6, 7) * 3 + 1.5
    coef = torch.randn(8, 5, 6, 7)
    bn = nn.BatchNorm2d(5, momentum=0.3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    holder = distributed.convert_sync_batchnorm(nn.Sequential(bn), world)
    sync = holder[0]
    x_local = shard(x, world).requires_grad_()
    y = sync(x_local)
    loss = (y * shard(coef, world)).mean()  # local mean: J = mean over ranks
    loss.backward()
    distributed.all_reduce_grads(sync.parameters(), world)
    gathered = distributed.gather_objects(
        {"x_grad": x_local.grad / world.world_size, "y": y.detach()}, world)  # dJ/dx = grad / W
    return {
        "y": torch.cat([g["y"] for g in gathered]),
        "x_grad": torch.cat([g["x_grad"] for g in gathered]),
        "order": torch.cat([torch.arange(8)[r::world.world_size] for r in range(world.world_size)]),
        "weight_grad": sync.weight.grad, "bias_grad": sync.bias.grad,
        "running_mean": sync.running_mean, "running_var": sync.running_var,
        "num_batches_tracked": sync.num_batches_tracked,
    }


def case_ntxent(world):
    torch.manual_seed(1)
    x1, x2 = torch.randn(8, 6), torch.randn(8, 6)
    proj = nn.Linear(6, 4)
    distributed.broadcast_module(proj, world)
    loss = ntxent_across_ranks(proj(shard(x1, world)), proj(shard(x2, world)), 0.5, world)
    loss.backward()
    distributed.all_reduce_grads(proj.parameters(), world)
    return {"loss": distributed.average_scalars({"l": loss.detach()}, world)["l"],
            "weight_grad": proj.weight.grad, "bias_grad": proj.bias.grad,
            "weight": proj.weight.detach(), "bias": proj.bias.detach()}


def case_broadcast(world):
    torch.manual_seed(100 + world.rank)  # different weights per rank before the broadcast
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    net[1].running_mean.normal_()
    distributed.broadcast_module(net, world)
    states = distributed.gather_objects({k: v.clone() for k, v in net.state_dict().items()}, world)
    return {"states": states}


CASES = {"syncbn": case_syncbn, "ntxent": case_ntxent, "broadcast": case_broadcast}


def main() -> None:
    case, out = sys.argv[1], sys.argv[2]
    world, _ = distributed.init_from_env("cpu")
    try:
        results = CASES[case](world)
        if world.is_main:
            torch.save(results, out)
    finally:
        distributed.shutdown(world)


if __name__ == "__main__":
    main()
