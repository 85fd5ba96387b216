"""torchrun data parallelism on the CPU (gloo): the collectives, SyncBatchNorm, NT-Xent across
ranks, and whole training runs with 2 processes against 1 process with the same global batch.

Multi-process cases run ``python -m torch.distributed.run`` in a subprocess; rank 0 saves its
results for the comparisons made here against single-process computations.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from mgm_fast.engine import distributed
from mgm_fast.ops.ntxent import ntxent_loss_reference, ntxent_rows_reference

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("dist_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={_free_port()}", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def run_case(tmp_path, case: str, nproc: int = 2) -> dict:
    out = tmp_path / f"{case}.pt"
    torchrun(nproc, str(WORKER), case, str(out))
    return torch.load(out, weights_only=True)


# ------------------------------------------------------------------------------------------
# Single process: the distributed helpers are identities and SyncBatchNorm is BatchNorm.


def test_single_process_world_is_identity():
    world = distributed.SINGLE
    assert not world.enabled and world.is_main and world.seed_for(5) == 5
    x = torch.randn(3, 2)
    assert distributed.all_gather_cat(x, world) is x
    p = nn.Parameter(torch.randn(4))
    p.grad = torch.randn(4)
    before = p.grad.clone()
    distributed.all_reduce_grads([p], world)
    assert torch.equal(p.grad, before)
    assert distributed.all_finite(torch.tensor(1.0), world)
    assert not distributed.all_finite(torch.tensor(float("nan")), world)


def test_convert_keeps_state_dict_and_single_process_output():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.Flatten(), nn.BatchNorm1d(4 * 4 * 4)))
    plain = distributed.local_copy(net)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    distributed.convert_sync_batchnorm(net, distributed.SINGLE)
    assert isinstance(net[1], distributed.SyncBatchNorm) and isinstance(net[2][1], distributed.SyncBatchNorm)
    assert list(net.state_dict()) == list(state)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())
    x = torch.randn(5, 3, 6, 6)
    torch.testing.assert_close(net(x), plain(x), rtol=0, atol=0)
    torch.testing.assert_close(net[1].running_var, plain[1].running_var, rtol=0, atol=0)


def test_local_copy_uncompiles_and_detaches_from_the_world():
    bn = nn.Sequential(nn.BatchNorm2d(3))
    distributed.convert_sync_batchnorm(bn, distributed.World(rank=0, world_size=2))
    bn.compile()
    copy = distributed.local_copy(bn)
    assert copy[0].world is distributed.SINGLE and bn[0].world.world_size == 2
    assert copy._compiled_call_impl is None and bn._compiled_call_impl is not None


def test_ntxent_rows_reference_matches_ntxent():
    z1, z2 = torch.randn(6, 5), torch.randn(6, 5)
    u = torch.cat([z1, z2])
    torch.testing.assert_close(ntxent_rows_reference(u, u, torch.arange(12)) / 12, ntxent_loss_reference(z1, z2))
    with pytest.raises(ValueError, match="row_index"):
        ntxent_rows_reference(u, u, torch.arange(5))


# ------------------------------------------------------------------------------------------
# Two processes.


def test_broadcast_makes_every_rank_equal(tmp_path):
    states = run_case(tmp_path, "broadcast")["states"]
    assert len(states) == 2
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key


def test_sync_batchnorm_equals_batchnorm_on_the_global_batch(tmp_path):
    got = run_case(tmp_path, "syncbn")
    torch.manual_seed(0)
    x = (torch.randn(8, 5, 6, 7) * 3 + 1.5).requires_grad_()
    coef = torch.randn(8, 5, 6, 7)
    bn = nn.BatchNorm2d(5, momentum=0.3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    y = bn(x)
    (y * coef).mean().backward()
    order = got["order"]
    torch.testing.assert_close(got["y"], y.detach()[order], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["x_grad"], x.grad[order], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(got["weight_grad"], bn.weight.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got["bias_grad"], bn.bias.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got["running_mean"], bn.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["running_var"], bn.running_var, rtol=1e-5, atol=1e-6)
    assert int(got["num_batches_tracked"]) == 1


def test_ntxent_negatives_gathered_across_ranks(tmp_path):
    got = run_case(tmp_path, "ntxent")
    torch.manual_seed(1)
    x1, x2 = torch.randn(8, 6), torch.randn(8, 6)
    proj = nn.Linear(6, 4)
    with torch.no_grad():
        proj.weight.copy_(got["weight"])
        proj.bias.copy_(got["bias"])
    loss = ntxent_loss_reference(proj(x1), proj(x2), 0.5)
    loss.backward()
    torch.testing.assert_close(got["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["weight_grad"], proj.weight.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got["bias_grad"], proj.bias.grad, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------
# Whole runs through the CLI.

TRAIN = ["-m", "mgm_fast.train", "--data", "synthetic:48", "--quiet", "--device", "cpu",
         "--log-every", "1", "--set", "optim.implementation=for-loop"]


def _rows(out: Path, phase: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["phase"] == phase]


def _weights(out: Path) -> dict:
    return torch.load(out / "final_weights.pt", weights_only=True)["nets"]


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    """With SyncBN and the same global batch, the first step's losses agree to float rounding
    and so do the updated weights -- except the few elements whose gradient is ~0: Adam's first
    update is lr * g / (|g| + eps), so a rounding-level difference can flip its sign there."""
    outs = {}
    for nproc in (1, 2):
        outs[nproc] = tmp_path / f"np{nproc}"
        torchrun(nproc, *TRAIN, "--method", "mt", "--steps", "1", "--batch-size", "8", "--sync-bn",
                 "--out", str(outs[nproc]))
    one, two = _rows(outs[1], "mt")[0], _rows(outs[2], "mt")[0]
    for key in ("mt/seg", "mt/depth", "mt/normal"):
        assert two[key] == pytest.approx(one[key], rel=1e-5), key
    w1, w2 = _weights(outs[1]), _weights(outs[2])
    total = differing = 0
    for key, a in w1.items():
        if not a.is_floating_point():
            assert torch.equal(a, w2[key]), key
            continue
        diff = (a - w2[key]).abs()
        total += diff.numel()
        differing += int((diff > 1e-5).sum())
        assert float(diff.max()) <= 2.5e-3, key  # at most one flipped Adam step (lr 1e-3 in tiny)
    assert differing <= total * 1e-3, f"{differing} of {total} weights differ"


def test_two_process_mgm_run_checkpoints_and_resumes_bit_exactly(tmp_path):
    """Full MGM with 2 ranks (NT-Xent across ranks, SyncBN, per-rank noise): rank 0 writes the
    run folder; stopping and resuming gives the same weights as the uninterrupted run."""
    # genblock_impl=auto (fast engine): GenBlocks whose BN is a SyncBatchNorm take the module path.
    common = [*TRAIN, "--method", "mgm", "--steps", "2", "--batch-size", "4", "--sync-bn"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    torchrun(2, *common, "--out", str(full))
    rows = _rows(full, "mgm")
    assert len(rows) == 2 and all(v == v for r in rows for k, v in r.items() if "/" in k)
    assert {"clr/real", "clr/synth", "gan/d"} <= set(rows[-1])
    assert (full / "samples" / "final.png").is_file() and (full / "eval.json").is_file()
    torchrun(2, *common, "--out", str(cut), "--stop-at", "3")
    torchrun(2, "-m", "mgm_fast.train", "--resume", str(cut))
    a, b = _weights(full), _weights(cut)
    for key in a:
        assert torch.equal(a[key], b[key]), key
