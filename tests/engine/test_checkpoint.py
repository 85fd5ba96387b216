"""Training checkpoints (mgm_fast.engine.checkpoint): atomic files, safe loading, clear errors,
bit-exact RNG and training resume, the run-folder manager under SIGKILL, the non-finite guard."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mgm_fast import compat
from mgm_fast.config import preset, to_dict
from mgm_fast.engine.checkpoint import (
    FORMAT,
    VERSION,
    CheckpointError,
    CheckpointManager,
    CheckpointNotFoundError,
    NonFiniteLossError,
    atomic_torch_save,
    capture_rng,
    check_finite,
    load_checkpoint,
    restore,
    restore_rng,
    save_checkpoint,
    verify_checkpoint,
)

REPO = Path(__file__).resolve().parents[2]


# -------------------------------------------------------------------------------------------
# A small model with two Adam optimisers (one over the encoder only, as in MGM).


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.Conv2d(6, 8, 3, stride=2, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(0.2),  # draws from the global torch RNG
            nn.Linear(8 * 4 * 4, 16),
            nn.BatchNorm1d(16),
            nn.ReLU(),
            nn.Linear(16, 5),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def build_optimizers(net: Net) -> dict[str, torch.optim.Optimizer]:
    return {
        "all": torch.optim.Adam(net.parameters(), lr=1e-2),
        "encoder": torch.optim.Adam(net.encoder.parameters(), lr=5e-3, betas=(0.5, 0.9)),
    }


class Sampler:
    """Epoch-wise random order from its own generator; its state is the data-order state."""

    def __init__(self, n: int, batch: int, generator: torch.Generator) -> None:
        self.n, self.batch, self.generator = n, batch, generator
        self.epoch, self.pos = 0, 0
        self.perm = torch.randperm(n, generator=generator)

    def next(self) -> torch.Tensor:
        if self.pos + self.batch > self.n:
            self.epoch, self.pos = self.epoch + 1, 0
            self.perm = torch.randperm(self.n, generator=self.generator)
        idx = self.perm[self.pos : self.pos + self.batch]
        self.pos += self.batch
        return idx

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "perm": self.perm.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos, self.perm = state["epoch"], state["pos"], state["perm"].clone()


_data_gen = torch.Generator().manual_seed(1234)
DATA_X = torch.randn(20, 3, 8, 8, generator=_data_gen)
DATA_Y = torch.randint(0, 5, (20,), generator=_data_gen)


def train_step(net, opts, sampler, aug_gen) -> tuple[torch.Tensor, torch.Tensor]:
    idx = sampler.next()
    x, y = DATA_X[idx], DATA_Y[idx]
    x = x + 0.1 * torch.randn(x.shape, generator=aug_gen)  # named augmentation generator
    if random.random() < 0.5:  # python random
        x = x.flip(-1)
    x = x * float(np.random.uniform(0.8, 1.2))  # noqa: NPY002 -- the numpy global state
    loss = F.cross_entropy(net(x), y)
    opts["all"].zero_grad()
    loss.backward()
    opts["all"].step()
    # Encoder-only update from a second loss, through the second optimiser.
    loss_enc = net.encoder(x + 0.05 * torch.randn_like(x)).pow(2).mean()  # global torch RNG
    opts["encoder"].zero_grad()
    loss_enc.backward()
    opts["encoder"].step()
    return loss.detach(), loss_enc.detach()


def fresh_run(seed: int):
    torch.manual_seed(seed)
    np.random.seed(seed)  # noqa: NPY002
    random.seed(seed)
    net = Net()
    opts = build_optimizers(net)
    aug_gen = torch.Generator().manual_seed(seed + 1)
    data_gen = torch.Generator().manual_seed(seed + 2)
    sampler = Sampler(len(DATA_X), 4, data_gen)
    return net, opts, aug_gen, data_gen, sampler


def assert_same(a, b, where="state"):
    """Recursive equality with torch.equal for tensors (and dtypes), == for the rest."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def save_run(path, net, opts, aug_gen, data_gen, sampler, step, **kw):
    return save_checkpoint(
        path,
        config=kw.pop("config", {"preset": "test", "lr": 1e-2}),
        step=step,
        epoch=sampler.epoch,
        phase="joint",
        modules={"net": net},
        optimizers=opts,
        rng=capture_rng({"augment": aug_gen, "data": data_gen}),
        data_state=sampler.state_dict(),
        **kw,
    )


# -------------------------------------------------------------------------------------------
# Bit-exact resume.


@pytest.mark.parametrize("k", [3, 5])
def test_resume_is_bit_exact(tmp_path, k):
    n_steps = 8  # 5 batches per epoch: the epoch boundary falls on either side of k
    net, opts, aug_gen, _, sampler = fresh_run(0)
    straight = [train_step(net, opts, sampler, aug_gen) for _ in range(n_steps)]

    net_a, opts_a, aug_a, data_a, sampler_a = fresh_run(0)
    first = [train_step(net_a, opts_a, sampler_a, aug_a) for _ in range(k)]
    path = save_run(tmp_path / "ckpt.pt", net_a, opts_a, aug_a, data_a, sampler_a, step=k)
    del net_a, opts_a, aug_a, data_a, sampler_a

    # Everything rebuilt from scratch with other seeds, so only the restore can make it match.
    net_b, opts_b, aug_b, data_b, sampler_b = fresh_run(99)
    assert not torch.equal(net_b.encoder[0].weight, net.encoder[0].weight)
    report = restore(
        load_checkpoint(path), {"net": net_b}, opts_b, generators={"augment": aug_b, "data": data_b}
    )
    sampler_b.load_state_dict(report.data_state)
    assert (report.step, report.epoch, report.phase) == (k, sampler_b.epoch, "joint")
    resumed = first + [train_step(net_b, opts_b, sampler_b, aug_b) for _ in range(n_steps - k)]

    for (l1, e1), (l2, e2) in zip(straight, resumed):
        assert torch.equal(l1, l2) and torch.equal(e1, e2)
    assert_same(net.state_dict(), net_b.state_dict(), "weights")  # BN running stats included
    for name in opts:
        assert_same(opts[name].state_dict(), opts_b[name].state_dict(), f"optimizer {name}")
    assert sampler.state_dict()["epoch"] == sampler_b.epoch == 1


# -------------------------------------------------------------------------------------------
# Save / load.


def test_roundtrip_holds_every_entry(tmp_path):
    net, opts, aug_gen, data_gen, sampler = fresh_run(0)
    train_step(net, opts, sampler, aug_gen)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    cfg = to_dict(preset("tiny"))
    path = save_run(
        tmp_path / "sub" / "ckpt.pt",
        net,
        opts,
        aug_gen,
        data_gen,
        sampler,
        step=1,
        config=cfg,
        scaler=scaler,
        metrics={"delta_m": 1.5, "miou": 0.25},
        extra={"ema": OrderedDict(w=torch.ones(2)), "note": "x", "shape": torch.Size([2, 3])},
    )
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.pt"]  # no temp file left
    ckpt = load_checkpoint(path)
    assert ckpt["format"] == FORMAT and ckpt["version"] == VERSION
    assert ckpt["_path"] == str(path)
    assert ckpt["config"] == cfg and ckpt["step"] == 1 and ckpt["phase"] == "joint"
    assert_same(ckpt["modules"]["net"], dict(net.state_dict()))
    assert_same(ckpt["optimizers"]["encoder"], opts["encoder"].state_dict())
    assert ckpt["scaler"]["scale"] == 1024.0
    assert ckpt["metrics"] == {"delta_m": 1.5, "miou": 0.25}
    assert ckpt["extra"]["shape"] == torch.Size([2, 3])
    assert_same(ckpt["data_state"], sampler.state_dict())
    # A config dataclass is converted on the way in.
    path2 = save_run(tmp_path / "c2.pt", net, opts, aug_gen, data_gen, sampler, step=1, config=preset("tiny"))
    assert load_checkpoint(path2)["config"] == cfg
    assert verify_checkpoint(path2)["step"] == 1


def test_save_unwraps_compiled_and_parallel_modules(tmp_path):
    net = Net()
    wrapped = nn.DataParallel(net)
    path = save_checkpoint(
        tmp_path / "c.pt",
        config={},
        step=0,
        epoch=0,
        phase="p",
        modules={"net": wrapped},
        optimizers={},
        rng=capture_rng(),
        data_state={},
    )
    assert list(load_checkpoint(path)["modules"]["net"]) == list(net.state_dict())


@pytest.mark.parametrize(
    ("entry", "value", "match"),
    [
        ("metrics", {"delta_m": np.float64(1.0)}, r"metrics\['delta_m'\] is a numpy\.float64.*\.item\(\)"),
        ("extra", {"arr": np.zeros(3)}, r"extra\['arr'\] is a numpy\.ndarray"),
        ("extra", {"ids": {1, 2}}, r"extra\['ids'\] is a builtins\.set.*sorted list"),
        ("data_state", {"obj": object()}, r"data_state\['obj'\] is a builtins\.object"),
        ("extra", {"cfg": preset("tiny")}, r"extra\['cfg'\] is a mgm_fast\.config\.Config.*to_dict"),
    ],
)
def test_save_refuses_entries_that_weights_only_cannot_load(tmp_path, entry, value, match):
    kwargs = dict(
        config={}, step=0, epoch=0, phase="p", modules={}, optimizers={}, rng=capture_rng(), data_state={}
    )
    kwargs[entry] = value
    with pytest.raises(TypeError, match=match):
        save_checkpoint(tmp_path / "c.pt", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_save_validates_arguments(tmp_path):
    base = dict(
        config={}, step=0, epoch=0, phase="p", modules={}, optimizers={}, rng=capture_rng(), data_state={}
    )
    with pytest.raises(TypeError, match="step must be an int"):
        save_checkpoint(tmp_path / "c.pt", **{**base, "step": 1.0})
    with pytest.raises(TypeError, match=r"modules\['x'\] must be a Module"):
        save_checkpoint(tmp_path / "c.pt", **{**base, "modules": {"x": torch.zeros(1)}})
    with pytest.raises(TypeError, match=r"rng lacks \['torch', 'cuda', 'numpy', 'python', 'generators'\]"):
        save_checkpoint(tmp_path / "c.pt", **{**base, "rng": {}})
    with pytest.raises(TypeError, match="metrics must be a dict or None"):
        save_checkpoint(tmp_path / "c.pt", **{**base, "metrics": 1.0})
    assert list(tmp_path.iterdir()) == []


def test_atomic_save_keeps_the_old_file_on_failure(tmp_path):
    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("refuse to pickle")

    path = tmp_path / "f.pt"
    atomic_torch_save({"a": torch.arange(3)}, path)
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="refuse to pickle"):
        atomic_torch_save({"a": torch.zeros(1000), "b": Unpicklable()}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["f.pt"]
    assert compat.atomic_torch_save is atomic_torch_save


# -------------------------------------------------------------------------------------------
# Load errors.


@pytest.fixture
def good_ckpt(tmp_path):
    net, opts, aug_gen, data_gen, sampler = fresh_run(0)
    path = save_run(tmp_path / "good.pt", net, opts, aug_gen, data_gen, sampler, step=3)
    return path, net, opts, aug_gen, data_gen


def test_truncated_file(good_ckpt, tmp_path):
    data = good_ckpt[0].read_bytes()
    for cut in (10, len(data) // 2, len(data) - 5):
        bad = tmp_path / "truncated.pt"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=r"truncated\.pt: .*truncated, corrupt"):
            load_checkpoint(bad)


def test_bit_flip_is_caught_by_the_crc_check(good_ckpt, tmp_path):
    data = bytearray(good_ckpt[0].read_bytes())
    # Flip a byte inside the largest tensor's data (not in any header).
    data[len(data) // 2] ^= 0xFF
    bad = tmp_path / "flipped.pt"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"flipped\.pt: corrupt checkpoint"):
        verify_checkpoint(bad)


def test_random_file(tmp_path):
    bad = tmp_path / "noise.pt"
    bad.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(CheckpointError, match=r"noise\.pt: not a readable checkpoint \(5000 bytes"):
        load_checkpoint(bad)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match=r"not found: .*nothing\.pt"):
        load_checkpoint(tmp_path / "nothing.pt")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nothing.pt")


def test_plain_state_dict_is_foreign(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(Net().state_dict(), path)
    with pytest.raises(CheckpointError, match=r"weights\.pt: a plain state dict .*mgm_fast\.compat"):
        load_checkpoint(path)


@pytest.mark.parametrize("wrap", [False, True])
def test_released_checkpoint_points_to_compat(tmp_path, wrap):
    state = {"multi_model.encoder.conv1.weight": torch.zeros(2), "G.snlinear0.weight_orig": torch.zeros(2)}
    path = tmp_path / "mgm.pth"
    torch.save({"state_dict": state, "epoch": 3} if wrap else state, path)
    with pytest.raises(
        CheckpointError, match=r"mgm\.pth: looks like a checkpoint of the released MGM code.*mgm_fast\.compat"
    ):
        load_checkpoint(path)


def test_foreign_format_tag_and_non_dict(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"format": "lightning", "state_dict": {}}, path)
    with pytest.raises(
        CheckpointError, match=r"other\.pt: format 'lightning'; expected an mgm_fast checkpoint"
    ):
        load_checkpoint(path)
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match=r"other\.pt: holds a list"):
        load_checkpoint(path)


def test_arbitrary_pickled_object_is_refused(tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save({"format": FORMAT, "obj": Sampler}, path)  # a class: only full unpickling could load it
    with pytest.raises(CheckpointError, match=r"pickled\.pt: torch\.load\(weights_only=True\) refused"):
        load_checkpoint(path)


def test_newer_version_and_missing_entries(good_ckpt, tmp_path):
    ckpt = torch.load(good_ckpt[0], weights_only=True)
    path = tmp_path / "future.pt"
    torch.save({**ckpt, "version": VERSION + 1}, path)
    with pytest.raises(
        CheckpointError, match=rf"future\.pt: checkpoint version {VERSION + 1} is newer .*up to {VERSION}"
    ):
        load_checkpoint(path)
    torch.save({**ckpt, "version": "1"}, path)
    with pytest.raises(CheckpointError, match="invalid checkpoint version '1'"):
        load_checkpoint(path)
    del ckpt["rng"]
    torch.save(ckpt, path)
    with pytest.raises(
        CheckpointError, match=r"future\.pt: incomplete checkpoint, missing entries \['rng'\]"
    ):
        load_checkpoint(path)


# -------------------------------------------------------------------------------------------
# Restore.


def test_restore_missing_and_unknown_names_load_nothing(good_ckpt):
    path, *_ = good_ckpt
    net, opts, aug_gen, data_gen, _ = fresh_run(5)
    other = Net()
    other.extra = nn.Linear(1, 1, bias=False)
    refine = nn.Linear(2, 2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng_before = torch.get_rng_state()
    gens = {"augment": aug_gen, "data": data_gen}

    with pytest.raises(
        CheckpointError, match=r"(?s)good\.pt: .*given but not in the checkpoint \(1\): modules\.refine"
    ):
        restore(load_checkpoint(path), {"net": net, "refine": refine}, opts, generators=gens)
    with pytest.raises(CheckpointError, match=r"in the checkpoint but not given \(1\): optimizers\.encoder"):
        restore(path, {"net": net}, {"all": opts["all"]}, generators=gens)
    with pytest.raises(CheckpointError, match=r"not given \(1\): generators\.data"):
        restore(path, {"net": net}, opts, generators={"augment": aug_gen})
    with pytest.raises(CheckpointError, match=r"modules\['net'\] missing keys \(1\): extra\.weight"):
        restore(path, {"net": other}, build_optimizers(other), generators=gens)
    assert_same(net.state_dict(), before)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert all(not o.state for o in opts.values())


def test_restore_shape_mismatch_lists_every_tensor(good_ckpt):
    path, *_ = good_ckpt
    net = Net()
    net.head[-1] = nn.Linear(16, 7)
    with pytest.raises(
        CheckpointError, match=r"shape mismatches \(2\): head\.5\.weight: expected \[7, 16\], got \[5, 16\]"
    ):
        restore(
            path,
            {"net": net},
            build_optimizers(net),
            generators={"augment": torch.Generator(), "data": torch.Generator()},
        )


def test_restore_optimizer_over_other_parameters(good_ckpt):
    path, *_ = good_ckpt
    net, opts, aug_gen, data_gen, _ = fresh_run(5)
    swapped = {"all": opts["encoder"], "encoder": opts["all"]}
    with pytest.raises(
        CheckpointError, match=r"optimizers\['all'\] group 0: 14 parameters in the checkpoint, 8 given"
    ):
        restore(path, {"net": net}, swapped, generators={"augment": aug_gen, "data": data_gen})


def test_restore_non_strict_loads_the_common_part(good_ckpt):
    path, ref_net, *_ = good_ckpt
    net, opts, aug_gen, _, _ = fresh_run(5)
    extra = nn.Linear(2, 2)
    extra_before = extra.weight.clone()
    with pytest.warns(
        UserWarning, match=r"skipped checkpoint entries \['optimizers\.encoder', 'generators\.data'\]"
    ):
        report = restore(
            path,
            {"net": net, "extra": extra},
            {"all": opts["all"]},
            generators={"augment": aug_gen},
            strict=False,
        )
    assert report.unknown == ["optimizers.encoder", "generators.data"]
    assert report.missing == ["modules.extra"]
    assert report.modules == ["net"] and report.optimizers == ["all"]
    assert_same(net.state_dict(), ref_net.state_dict())
    assert torch.equal(extra.weight, extra_before)


def test_scaler_roundtrip_and_presence_check(tmp_path):
    net = Net()
    opts = build_optimizers(net)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=7)
    base = dict(
        config={},
        step=0,
        epoch=0,
        phase="p",
        modules={"net": net},
        optimizers=opts,
        rng=capture_rng(),
        data_state={},
    )
    path = save_checkpoint(tmp_path / "s.pt", scaler=scaler, **base)
    fresh = torch.amp.GradScaler("cpu")
    restore(path, {"net": net}, opts, scaler=fresh)
    assert fresh.state_dict() == scaler.state_dict()
    with pytest.raises(CheckpointError, match=r"in the checkpoint but not given \(1\): scaler"):
        restore(path, {"net": net}, opts, scaler=None)
    path2 = save_checkpoint(tmp_path / "n.pt", scaler=None, **base)
    with pytest.raises(CheckpointError, match=r"given but not in the checkpoint \(1\): scaler"):
        restore(path2, {"net": net}, opts, scaler=fresh)
    restore(path2, {"net": net}, opts, scaler=torch.amp.GradScaler("cpu", enabled=False))


# -------------------------------------------------------------------------------------------
# RNG.


def _sources():
    torch_gen = torch.Generator().manual_seed(7)
    np_gen = np.random.default_rng(7)
    np_rs = np.random.RandomState(7)
    py_gen = random.Random(7)
    return {
        "torch_cpu": (None, lambda: torch.rand(64)),
        "numpy_global": (
            None,
            lambda: torch.from_numpy(np.random.standard_normal(64)),  # noqa: NPY002
        ),
        "python_global": (
            None,
            lambda: torch.tensor([random.random() for _ in range(8)] + [random.gauss(0, 1)]),
        ),
        "named_torch": (torch_gen, lambda: torch.randn(64, generator=torch_gen)),
        "named_numpy_generator": (np_gen, lambda: torch.from_numpy(np_gen.standard_normal(64))),
        "named_numpy_randomstate": (np_rs, lambda: torch.from_numpy(np_rs.standard_normal(3))),
        "named_python": (py_gen, lambda: torch.tensor([py_gen.random(), py_gen.gauss(0, 1)])),
    }


@pytest.mark.parametrize("through_file", [False, True])
@pytest.mark.parametrize("source", list(_sources()))
def test_rng_capture_restore_is_bit_exact(tmp_path, source, through_file):
    gen, draw = _sources()[source]
    gens = {"g": gen} if gen is not None else {}
    draw()  # move away from the seed; a gauss draw leaves a cached value in numpy and python
    state = capture_rng(gens)
    if through_file:
        path = tmp_path / "rng.pt"
        atomic_torch_save(state, path)
        state = torch.load(path, weights_only=True)
    first = draw()
    second = draw()
    assert not torch.equal(first, second)
    restore_rng(state, gens)
    assert torch.equal(draw(), first)
    assert torch.equal(draw(), second)


def test_restore_rng_checks_names_and_types():
    gen = torch.Generator()
    state = capture_rng({"augment": gen})
    with pytest.raises(
        CheckpointError, match=r"checkpoint only \['augment'\].*not in the checkpoint \['aug'\]"
    ):
        restore_rng(state, {"aug": gen})
    with pytest.raises(
        CheckpointError, match=r"generator 'augment': checkpoint holds a torch state, given a python"
    ):
        restore_rng(state, {"augment": random.Random()})
    with pytest.warns(UserWarning, match="named generators differ"):
        restore_rng(state, {}, strict=False)


@pytest.mark.gpu
def test_rng_cuda_bit_exact():
    cuda_gen = torch.Generator("cuda").manual_seed(3)
    state = capture_rng({"cuda_aug": cuda_gen})
    assert len(state["cuda"]) == torch.cuda.device_count()
    a = torch.rand(16, device="cuda"), torch.rand(16, device="cuda", generator=cuda_gen)
    restore_rng(state, {"cuda_aug": cuda_gen})
    b = torch.rand(16, device="cuda"), torch.rand(16, device="cuda", generator=cuda_gen)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# -------------------------------------------------------------------------------------------
# CheckpointManager.


def _save(mgr: CheckpointManager, step: int, value: float | None = None, net: nn.Module | None = None):
    net = net if net is not None else nn.Linear(4, 4)
    with torch.no_grad():
        net.weight.fill_(step)
    return mgr.save(
        step=step,
        epoch=0,
        phase="p",
        config={},
        modules={"net": net},
        optimizers={},
        rng=capture_rng(),
        data_state={"step": step},
        metrics=None if value is None else {"delta_m": value},
    )


def _step_of(path: Path) -> int:
    return load_checkpoint(path)["step"]


def test_manager_rotation_best_and_pointer(tmp_path):
    mgr = CheckpointManager(tmp_path / "run", keep_last=2)
    values = {100: 1.0, 200: 5.0, 300: 2.0, 400: 3.0, 500: float("nan")}
    for step, value in values.items():
        path = _save(mgr, step, value)
        assert path.name == f"ckpt-{step:08d}.pt"
    run = tmp_path / "run"
    # keep_last=2 keeps 400 and 500; 200 survives as the best.
    assert [s for s, _ in mgr.checkpoints()] == [200, 400, 500]
    pointer_file = run / "latest"
    assert not pointer_file.is_symlink()
    pointer = json.loads(pointer_file.read_text())
    assert pointer["latest"] == "ckpt-00000500.pt" and pointer["step"] == 500
    assert pointer["best"] == {
        "file": "ckpt-00000200.pt",
        "step": 200,
        "metric": "delta_m",
        "value": 5.0,
        "mode": "max",
    }
    assert mgr.best_path == run / "best.pt" and _step_of(run / "best.pt") == 200
    assert mgr.latest_path() == run / "ckpt-00000500.pt"
    assert mgr.last_saved == run / "ckpt-00000500.pt"
    assert sorted(p.name for p in run.iterdir()) == [
        "best.pt",
        "ckpt-00000200.pt",
        "ckpt-00000400.pt",
        "ckpt-00000500.pt",
        "latest",
    ]

    # Reopening keeps the best record; a better value replaces best.pt and frees 200 for rotation.
    mgr2 = CheckpointManager(run, keep_last=2)
    assert mgr2.best["step"] == 200
    _save(mgr2, 600, 4.0)
    assert _step_of(run / "best.pt") == 200
    _save(mgr2, 700, 9.0)
    assert _step_of(run / "best.pt") == 700
    assert [s for s, _ in mgr2.checkpoints()] == [600, 700]


def test_manager_min_mode_and_other_metric(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=None, best_metric="loss", mode="min")
    net = nn.Linear(4, 4)
    for step, loss in [(1, 3.0), (2, 1.0), (3, 2.0)]:
        mgr.save(
            step=step,
            epoch=0,
            phase="p",
            config={},
            modules={"net": net},
            optimizers={},
            rng=capture_rng(),
            data_state={},
            metrics={"loss": loss},
        )
    assert mgr.best["step"] == 2 and _step_of(mgr.best_path) == 2
    assert len(mgr.checkpoints()) == 3  # keep_last=None keeps everything
    with pytest.warns(UserWarning, match="ranks by 'loss'"):
        CheckpointManager(tmp_path, best_metric="delta_m")
    with pytest.raises(ValueError, match="mode"):
        CheckpointManager(tmp_path, mode="up")
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=0)


def test_latest_path_falls_back_over_corrupt_files(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=5)
    for step in (1, 2, 3):
        _save(mgr, step)
    newest = tmp_path / "ckpt-00000003.pt"
    newest.write_bytes(newest.read_bytes()[:-100])  # truncated behind our back
    (tmp_path / "ckpt-00000004.pt").write_bytes(b"not a checkpoint")
    with pytest.warns(
        UserWarning, match=r"ckpt-00000004\.pt.*ckpt-00000003\.pt.*falling back to ckpt-00000002\.pt"
    ):
        assert mgr.latest_path() == tmp_path / "ckpt-00000002.pt"
    with pytest.warns(UserWarning, match="falling back"):
        assert mgr.load_latest()["step"] == 2
    for p in tmp_path.glob("ckpt-*.pt"):
        p.write_bytes(b"x")
    with pytest.warns(UserWarning, match="no complete checkpoint"):
        assert mgr.latest_path() is None
    assert CheckpointManager(tmp_path / "empty").latest_path() is None


def test_manager_cleans_temp_files_and_repairs_best(tmp_path):
    mgr = CheckpointManager(tmp_path)
    _save(mgr, 1, 1.0)
    _save(mgr, 2, 2.0)
    # A writer killed mid-save leaves a temp file; one killed between `latest` and best.pt
    # leaves best.pt on the previous best.
    (tmp_path / ".ckpt-00000003.pt.abc123.tmp").write_bytes(b"partial")
    (tmp_path / ".latest.xyz.tmp").write_bytes(b"{")
    os.replace(tmp_path / "best.pt", tmp_path / "keep.tmp")
    os.link(tmp_path / "ckpt-00000001.pt", tmp_path / "best.pt")
    unrelated = tmp_path / ".other.tmp"
    unrelated.write_text("not ours")
    mgr2 = CheckpointManager(tmp_path)
    assert not list(tmp_path.glob(".ckpt-*.tmp")) and not list(tmp_path.glob(".latest.*"))
    assert unrelated.exists()
    assert _step_of(tmp_path / "best.pt") == 2
    assert mgr2.last_saved == tmp_path / "ckpt-00000002.pt"


def test_resuming_from_an_earlier_checkpoint_retires_later_ones(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=3)
    for step, value in [(100, 1.0), (200, 3.0), (300, 2.0)]:
        _save(mgr, step, value)
    # The run is resumed from step 100 (e.g. after a divergence) into the same folder.
    mgr = CheckpointManager(tmp_path, keep_last=3)
    with pytest.warns(UserWarning, match=r"saving step 150 .*\['ckpt-00000200\.pt', 'ckpt-00000300\.pt'\]"):
        _save(mgr, 150, 0.5)
    assert [s for s, _ in mgr.checkpoints()] == [100, 150]
    assert sorted(p.name for p in tmp_path.glob("stale-*")) == [
        "stale-ckpt-00000200.pt",
        "stale-ckpt-00000300.pt",
    ]
    assert mgr.latest_path() == tmp_path / "ckpt-00000150.pt"
    assert mgr.best["file"] == "stale-ckpt-00000200.pt" and _step_of(mgr.best_path) == 200
    _save(mgr, 200, 0.1)  # the new step 200 does not take over best.pt
    assert _step_of(mgr.best_path) == 200 and load_checkpoint(mgr.best_path)["metrics"]["delta_m"] == 3.0
    assert CheckpointManager(tmp_path).best["file"] == "stale-ckpt-00000200.pt"


def test_manager_ignores_an_unreadable_pointer(tmp_path):
    mgr = CheckpointManager(tmp_path)
    _save(mgr, 1, 1.0)
    (tmp_path / "latest").write_text("{broken")
    with pytest.warns(UserWarning, match="unreadable checkpoint pointer"):
        mgr2 = CheckpointManager(tmp_path)
    assert mgr2.best is None and mgr2.latest_path() == tmp_path / "ckpt-00000001.pt"


_WRITER = textwrap.dedent(
    """
    import sys, torch
    from mgm_fast.engine.checkpoint import CheckpointManager, capture_rng
    mgr = CheckpointManager(sys.argv[1], keep_last=2, best_metric="score")
    net = torch.nn.Linear(1024, 2048)  # ~8 MB per checkpoint
    step = int(sys.argv[2])
    while True:
        with torch.no_grad():
            net.weight.fill_(step)
        mgr.save(step=step, epoch=0, phase="p", config={}, modules={"net": net}, optimizers={},
                 rng=capture_rng(), data_state={"step": step}, metrics={"score": float(step % 5)})
        print(step, flush=True)
        step += 1
    """
)


def test_sigkill_at_any_moment_leaves_a_loadable_checkpoint(tmp_path):
    rng = random.Random(0)
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = 0
    for _ in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(run), str(start)], stdout=subprocess.PIPE, env=env, text=True
        )
        try:
            assert proc.stdout.readline().strip() == str(start)  # at least one save completed
            time.sleep(rng.uniform(0.0, 0.3))
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
        printed = [int(line) for line in [str(start), *proc.stdout.read().split()]]
        proc.stdout.close()

        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no corrupt file may be found either
            mgr = CheckpointManager(run, keep_last=2, best_metric="score")
            latest = mgr.latest_path()
        assert latest is not None
        ckpt = load_checkpoint(latest)
        step = ckpt["step"]
        assert step >= printed[-1]  # every save that returned is durable
        assert latest.name == f"ckpt-{step:08d}.pt" and ckpt["data_state"] == {"step": step}
        assert torch.all(ckpt["modules"]["net"]["weight"] == step)
        assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
        pointer = json.loads((run / "latest").read_text())
        assert load_checkpoint(run / pointer["latest"])["step"] == pointer["step"]
        assert load_checkpoint(mgr.best_path)["metrics"]["score"] == mgr.best["value"]
        start = step + 1


# -------------------------------------------------------------------------------------------
# Non-finite guard.


def test_check_finite_passes_finite_values():
    assert check_finite({"g": torch.tensor(1.0), "d": torch.ones(3), "f": 2.0}, 10, None)
    assert check_finite({}, 10, None)


def test_check_finite_stop_names_step_losses_and_checkpoint():
    losses = {
        "loss_g": torch.tensor(float("nan")),
        "loss_d": torch.tensor(0.5),
        "loss_t": torch.tensor([1.0, float("inf")]),
    }
    with pytest.raises(
        NonFiniteLossError,
        match=r"step 1200: loss_g=nan, loss_t=inf; last good checkpoint: run/ckpt-00001000\.pt",
    ) as info:
        check_finite(losses, 1200, "run/ckpt-00001000.pt")
    assert info.value.names == ["loss_g", "loss_t"] and info.value.step == 1200
    assert info.value.last_checkpoint == "run/ckpt-00001000.pt"
    with pytest.raises(NonFiniteLossError, match=r"loss_x=inf; no checkpoint written yet"):
        check_finite({"loss_x": float("inf")}, 5, None)


def test_check_finite_skip_and_bad_policy():
    assert check_finite({"a": torch.tensor(float("nan"))}, 1, None, policy="skip") is False
    with pytest.raises(ValueError, match="policy"):
        check_finite({"a": torch.tensor(1.0)}, 1, None, policy="ignore")
