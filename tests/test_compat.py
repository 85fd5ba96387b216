"""Import / export of the released code's checkpoints (mgm_fast.compat).

``released_twin`` is an independent construction of the released network family; its state dict
is checked against the recorded layout of a released checkpoint (tests/fixtures/official_checkpoint_layout.json,
1,090 tensors). Checkpoints made from the twin are then imported into our networks, compared
tensor by tensor, round-tripped, and run side by side to prove functional equivalence.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from mgm_fast import compat
from mgm_fast.compat import (
    PREFIX_MAP,
    CheckpointError,
    CheckpointMismatchError,
    export_released,
    import_released,
    infer_model_config,
    load_released_state_dict,
    released_to_ours,
    save_released,
)
from mgm_fast.config import ModelConfig

sys.path.insert(0, str(Path(__file__).parent))
from released_twin import ReleasedMGM, as_our_layout, randomize_

LAYOUT_PATH = Path(__file__).parent / "fixtures" / "official_checkpoint_layout.json"

# A narrow twin at the paper's 128x128 topology, and the matching config of ours.
SMALL_TWIN = dict(
    num_seg=5,
    num_scenes=4,
    stem=8,
    enc_widths=(8, 16, 16, 24),
    enc_blocks=(1, 2, 1, 1),
    dec_widths=(16, 8, 8, 8, 8),
    clr_dim=8,
    post_stem=8,
    post_widths=(8, 8, 16),
    post_blocks=(1, 1, 2),
    post_hidden=8,
    z_dim=16,
    g_conv_dim=8,
    d_conv_dim=8,
)
SMALL_CFG = ModelConfig(
    image_size=128,
    num_seg_classes=5,
    num_scenes=4,
    stem_width=8,
    encoder_widths=(8, 16, 16, 24),
    encoder_blocks=(1, 2, 1, 1),
    decoder_widths=(16, 8, 8, 8, 8),
    clr_dim=8,
    refine_stem_width=8,
    refine_widths=(8, 8, 16),
    refine_blocks=(1, 1, 2),
    refine_hidden=8,
    z_dim=16,
    g_conv_dim=8,
    d_conv_dim=8,
)


def _layout() -> dict[str, list[int]]:
    return json.loads(LAYOUT_PATH.read_text())


@pytest.fixture(scope="module")
def paper_twin() -> ReleasedMGM:
    return randomize_(ReleasedMGM(), seed=1)


@pytest.fixture(scope="module")
def paper_sd(paper_twin) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in paper_twin.state_dict().items()}


def _small_twin(seed: int = 2) -> ReleasedMGM:
    return randomize_(ReleasedMGM(**SMALL_TWIN), seed=seed)


def _assert_state_equal(got: dict, expected: dict) -> None:
    """Same names in the same order, same shapes, dtypes and bits."""
    assert list(got) == list(expected)
    for name, value in expected.items():
        assert got[name].dtype == value.dtype, name
        assert got[name].shape == value.shape, name
        assert torch.equal(got[name], value), name


# -------------------------------------------------------------------------------------------
# The twin against the recorded layout; the name map on its own.


def test_twin_state_dict_equals_released_layout():
    layout = _layout()
    assert len(layout) == 1090
    sd = ReleasedMGM().state_dict()
    assert [(k, list(v.shape)) for k, v in sd.items()] == list(layout.items())
    # The parameter counts of docs/method.md section 8.
    twin = ReleasedMGM()
    mm = twin.multi_model

    def count(module):
        return sum(p.numel() for p in module.parameters())

    assert count(mm.encoder) == 11_135_504
    assert [count(d) for d in (mm.ss_decoder, mm.de_decoder, mm.sn_decoder)] == [
        1_360_424,
        1_349_153,
        1_349_731,
    ]
    assert round(count(twin.post_model) / 1e6, 2) == 7.98
    assert round(count(twin.G) / 1e6, 2) == 32.49
    assert round(count(twin.D) / 1e6, 2) == 39.52
    assert count(twin.middle_net) == 46_464


def test_every_layout_name_maps_to_one_of_ours_and_back():
    layout = _layout()
    ours = [released_to_ours(k) for k in layout]
    assert None not in ours
    assert len(set(ours)) == len(layout)
    assert [compat.ours_to_released(k) for k in ours] == list(layout)
    # Every container of the table is used, and every name starts with one of our networks.
    used = {
        next(o for r, o in sorted(PREFIX_MAP, key=lambda p: -len(p[0])) if k.startswith(r)) for k in layout
    }
    assert used == {o for _, o in PREFIX_MAP}
    assert {k.split(".")[0] for k in ours} == set(compat.NET_NAMES)
    # Spot checks of the table.
    assert (
        released_to_ours("multi_model.sn_decoder.upconv0.weight")
        == "multitask.decoders.normal.upconv0.weight"
    )
    assert released_to_ours("post_model.nm_encoder.conv1.weight") == "refine.encoders.normal.conv1.weight"
    assert released_to_ours("post_model.fc2.bias") == "refine.fc2.bias"
    assert released_to_ours("D.sn_embedding1.weight_u") == "discriminator.sn_embedding1.weight_u"


def test_names_that_would_alias_are_rejected():
    # Through "post_model." this would land on refine.encoders.seg.*, which maps back elsewhere.
    assert released_to_ours("post_model.encoders.seg.conv1.weight") is None
    assert released_to_ours("multi_model.decoders.seg.upconv0.weight") is None
    assert released_to_ours("encoder.conv1.weight") is None
    assert compat.ours_to_released("refine.ss_encoder.conv1.weight") is None
    assert compat.ours_to_released("model.conv1.weight") is None


def test_round_trip_through_the_twin_in_our_layout(paper_twin, paper_sd):
    nets = as_our_layout(paper_twin)
    exported = export_released(nets)
    _assert_state_equal(exported, paper_sd)  # names, order and bits of all 1,090 tensors
    fresh = ReleasedMGM()
    report = import_released(paper_sd, as_our_layout(fresh))
    assert len(report.loaded) == 1090 and not report.unknown and not report.missing
    assert report.num_elements == sum(v.numel() for v in paper_sd.values())
    _assert_state_equal(fresh.state_dict(), paper_sd)


# -------------------------------------------------------------------------------------------
# Reading files and dicts.


def test_load_file_and_wrappers(tmp_path, paper_twin, paper_sd):
    path = save_released(as_our_layout(paper_twin), tmp_path / "released.pth")
    assert [p.name for p in tmp_path.iterdir()] == ["released.pth"]  # no temp file left behind
    _assert_state_equal(load_released_state_dict(path), paper_sd)
    _assert_state_equal(load_released_state_dict(str(path)), paper_sd)

    small = dict(list(paper_sd.items())[:5])
    _assert_state_equal(load_released_state_dict(small), small)
    _assert_state_equal(load_released_state_dict({"state_dict": small, "epoch": 3}), small)
    _assert_state_equal(load_released_state_dict({"model": small, "optim": {"lr": 1e-3}}), small)
    _assert_state_equal(load_released_state_dict({f"module.{k}": v for k, v in small.items()}), small)
    with pytest.raises(CheckpointError, match="several wrapped state dicts"):
        load_released_state_dict({"model": small, "state_dict": small})
    with pytest.raises(CheckpointError, match=r"no state dict.*'epoch'"):
        load_released_state_dict({"weights": small, "epoch": 3})
    with pytest.raises(CheckpointError, match="expected a state dict, got list"):
        torch.save([1, 2], tmp_path / "list.pth")
        load_released_state_dict(tmp_path / "list.pth")


def test_truncated_missing_and_corrupt_files_name_the_file(tmp_path):
    sd = {"G.bn.weight": torch.randn(64), "G.bn.bias": torch.randn(64)}
    good = tmp_path / "good.pth"
    torch.save(sd, good)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.pth: cannot read checkpoint"):
        load_released_state_dict(truncated)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"garbage\.pth"):
        load_released_state_dict(garbage)
    with pytest.raises(FileNotFoundError, match=r"absent\.pth"):
        load_released_state_dict(tmp_path / "absent.pth")


class _Payload:
    pass


def test_weights_only_refuses_arbitrary_objects(tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"state_dict": {"G.bn.weight": torch.ones(2)}, "obj": _Payload()}, path)
    with pytest.raises(CheckpointError, match=r"pickled\.pth"):
        load_released_state_dict(path)


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("refuse to pickle")


def test_atomic_save_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "ckpt.pth"
    compat.atomic_torch_save({"a": torch.arange(3)}, path)
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="refuse to pickle"):
        compat.atomic_torch_save({"a": torch.zeros(1000), "b": _Unpicklable()}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]
    compat.atomic_torch_save({"a": torch.arange(4)}, path)  # overwriting works
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.arange(4))


# -------------------------------------------------------------------------------------------
# Config inference.


def test_infer_paper_config_from_released_layout(paper_sd):
    assert infer_model_config(paper_sd) == ModelConfig()
    assert infer_model_config(paper_sd, genblock_impl="x").genblock_impl == "x"


def test_infer_small_config_in_both_namings():
    twin = ReleasedMGM(**SMALL_TWIN)
    sd = twin.state_dict()
    assert infer_model_config(sd) == SMALL_CFG
    ours = {released_to_ours(k): v for k, v in sd.items()}
    assert infer_model_config(ours) == SMALL_CFG


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_infer_config_of_our_exports(preset):
    from mgm_fast.config import tiny_model

    cfg = tiny_model() if preset == "tiny" else SMALL_CFG
    nets = _build(cfg)
    exported = export_released(nets)
    assert infer_model_config(exported) == cfg
    assert infer_model_config(compat._nets_state(nets)) == cfg
    again = _build(cfg)
    import_released(exported, again)
    _assert_state_equal(export_released(again), exported)


def test_infer_config_reports_the_missing_tensor(paper_sd):
    sd = {k: v for k, v in paper_sd.items() if k != "G.snlinear0.weight_orig"}
    with pytest.raises(CheckpointError, match=r"G\.snlinear0\.weight_orig is missing"):
        infer_model_config(sd)
    sd = {k: v for k, v in paper_sd.items() if not k.startswith("D.block5.snconv2d0.")}
    assert infer_model_config(sd).d_keep_unused_shortcut is False


# -------------------------------------------------------------------------------------------
# Our networks.


def _build(cfg: ModelConfig):
    from mgm_fast.models import build_models

    return build_models(cfg)


@pytest.fixture(scope="module")
def paper_nets(paper_sd):
    nets = _build(ModelConfig())
    import_released(paper_sd, nets)
    return nets


def test_our_paper_networks_have_exactly_the_released_tensors():
    nets = _build(ModelConfig())
    ours = [(k, list(v.shape)) for k, v in compat._nets_state(nets).items()]
    expected = [(released_to_ours(k), shape) for k, shape in _layout().items()]
    assert sorted(ours) == sorted(expected)
    assert ours == expected  # same order too


def test_import_then_export_is_bit_exact(paper_nets, paper_sd):
    nets_state = compat._nets_state(paper_nets)
    for name, value in paper_sd.items():
        assert torch.equal(nets_state[released_to_ours(name)], value), name
    _assert_state_equal(export_released(paper_nets), paper_sd)  # all 1,090, order included


def test_save_load_import_round_trip_through_a_file(tmp_path, paper_nets, paper_sd):
    path = save_released(paper_nets, tmp_path / "out" / "released.pth")
    loaded = load_released_state_dict(path)
    _assert_state_equal(loaded, paper_sd)
    twin = ReleasedMGM()
    twin.load_state_dict(loaded)  # the released module itself accepts our export
    _assert_state_equal(twin.state_dict(), paper_sd)
    cfg, nets, report = compat.build_from_released(path)
    assert cfg == ModelConfig()
    _assert_state_equal(export_released(nets), paper_sd)
    assert len(report.loaded) == 1090 and report.num_elements == sum(v.numel() for v in paper_sd.values())
    assert "imported 1090 tensors" in str(report)


def _small_sd(seed: int = 3) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in _small_twin(seed).state_dict().items()}


def _mismatch(sd, nets, **kwargs) -> CheckpointMismatchError:
    before = export_released(nets)
    with pytest.raises(CheckpointMismatchError) as info:
        import_released(sd, nets, **kwargs)
    _assert_state_equal(export_released(nets), before)  # nothing was loaded
    return info.value


def test_import_rejects_an_extra_key():
    nets, sd = _build(SMALL_CFG), _small_sd()
    sd["G.block6.snconv2d1.weight_orig"] = torch.zeros(3, 3)
    sd["post_model.encoders.seg.conv1.weight"] = torch.zeros(1)
    err = _mismatch(sd, nets)
    assert err.unknown == [
        "G.block6.snconv2d1.weight_orig (-> generator.block6.snconv2d1.weight_orig, not in our networks)",
        "post_model.encoders.seg.conv1.weight",
    ]
    assert not err.missing and not err.shape_mismatches
    assert "unknown names (2)" in str(err) and "G.block6.snconv2d1.weight_orig" in str(err)


def test_import_rejects_a_missing_key():
    nets, sd = _build(SMALL_CFG), _small_sd()
    del sd["D.sn_embedding1.weight_u"]
    del sd["multi_model.encoder.layer2.1.bn1.num_batches_tracked"]
    err = _mismatch(sd, nets)
    assert err.missing == [
        "multi_model.encoder.layer2.1.bn1.num_batches_tracked "
        "(our multitask.encoder.layer2.1.bn1.num_batches_tracked)",
        "D.sn_embedding1.weight_u (our discriminator.sn_embedding1.weight_u)",
    ]
    assert not err.unknown and not err.shape_mismatches
    assert "missing names (2)" in str(err) and "D.sn_embedding1.weight_u" in str(err)


def test_import_rejects_a_wrong_shape_and_a_wrong_dtype():
    nets, sd = _build(SMALL_CFG), _small_sd()
    sd["multi_model.ss_decoder.conv_decode4.weight"] = torch.randn(6, 8, 3, 3)
    sd["G.bn.num_batches_tracked"] = torch.tensor(3.5)
    err = _mismatch(sd, nets)
    assert err.shape_mismatches == [
        ("multi_model.ss_decoder.conv_decode4.weight", (5, 8, 3, 3), (6, 8, 3, 3))
    ]
    assert err.dtype_mismatches == [("G.bn.num_batches_tracked", torch.int64, torch.float32)]
    assert "multi_model.ss_decoder.conv_decode4.weight: expected [5, 8, 3, 3], got [6, 8, 3, 3]" in str(err)
    # Shape errors are never tolerated, even when unknown / missing names are.
    err = _mismatch(sd, nets, strict=False)
    assert err.shape_mismatches and err.dtype_mismatches


def test_import_lists_every_problem_at_once_and_truncates_long_lists(paper_sd):
    nets = _build(SMALL_CFG)
    err = _mismatch(paper_sd, nets)  # paper widths into a narrow model
    n_ours = len(compat._nets_state(nets))
    assert len(err.shape_mismatches) > 500
    assert len(err.shape_mismatches) + len(err.unknown) <= 1090
    assert len(err.missing) == n_ours - (1090 - len(err.unknown))
    assert "... and" in str(err) and "more" in str(err)


def test_non_strict_import_reports_what_it_skipped():
    nets, sd = _build(SMALL_CFG), _small_sd()
    del sd["G.snconv2d1.bias"]
    sd["extra.tensor"] = torch.ones(1)
    previous_bias = nets.generator.snconv2d1.bias.detach().clone()
    with pytest.warns(UserWarning, match="ignored 1 unknown"):
        report = import_released(sd, nets, strict=False)
    assert report.unknown == ["extra.tensor"]
    assert report.missing == ["generator.snconv2d1.bias"]
    assert len(report.loaded) == len(sd) - 1
    assert torch.equal(nets.generator.snconv2d1.bias, previous_bias)
    assert torch.equal(nets.generator.snconv2d1.weight_orig, sd["G.snconv2d1.weight_orig"])


def test_unused_discriminator_shortcut_is_required_unless_dropped_by_config():
    sd = _small_sd()
    cfg = ModelConfig(**{**SMALL_CFG.__dict__, "d_keep_unused_shortcut": False})
    nets = _build(cfg)
    err = _mismatch(sd, nets)
    assert sorted(err.unknown) == sorted(
        f"D.block5.snconv2d0.{leaf} (-> discriminator.block5.snconv2d0.{leaf}, not in our networks)"
        for leaf in ("bias", "weight_orig", "weight_u", "weight_v")
    )
    with pytest.warns(UserWarning):
        report = import_released(sd, nets, strict=False)
    assert len(report.unknown) == 4 and not report.missing


def test_truncated_checkpoint_of_our_export_names_the_file(tmp_path):
    nets = _build(SMALL_CFG)
    path = save_released(nets, tmp_path / "mgm.pth")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"mgm\.pth: cannot read checkpoint"):
        load_released_state_dict(path)


# -------------------------------------------------------------------------------------------
# Functional equivalence: the twin and our networks compute the same thing.


def _close(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert got.shape == expected.shape, what
    assert torch.isfinite(expected).all(), what
    assert expected.abs().max() > 1e-3, f"{what}: degenerate (near zero) reference output"
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


def _compare_states(nets, twin, dtype, what: str) -> None:
    ours = export_released(nets)
    ref = twin.state_dict()
    assert list(ours) == list(ref)
    for name, value in ref.items():
        if value.dtype.is_floating_point:
            _close_state(ours[name], value, dtype, f"{what}: {name}")
        else:
            assert torch.equal(ours[name], value), f"{what}: {name}"


def _close_state(got, expected, dtype, what):
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


def _run_pair(twin, nets, dtype, train: bool, batch: int, gen: torch.Generator, cfg: ModelConfig) -> None:
    twin.train(train)
    nets.train(train)
    size = cfg.image_size

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    x = rand(batch, 3, size, size).clamp(-1, 1)
    y = torch.randint(0, cfg.num_scenes, (batch,), generator=gen)
    mm, mt = twin.multi_model, nets.multitask

    feat = mm.encoder(x)
    _close(mt.encoder(x), feat, dtype, "encoder")
    feat = feat.detach()
    _close(mt.decoders["seg"](feat), mm.ss_decoder(feat), dtype, "seg decoder")
    _close(mt.decoders["depth"](feat), mm.de_decoder(feat), dtype, "depth decoder")
    _close(mt.decoders["normal"](feat), mm.sn_decoder(feat), dtype, "normal decoder")
    _close(mt.clr_head(feat), mm.clr_decoder(feat), dtype, "clr head")
    _close(nets.bridge(feat), twin.middle_net(feat), dtype, "middle net")

    seg, dep, nrm = (
        rand(batch, cfg.num_seg_classes, size, size),
        rand(batch, 1, size, size),
        rand(batch, 3, size, size),
    )
    _close(nets.refine(seg=seg, depth=dep, normal=nrm), twin.post_model(seg, dep, nrm), dtype, "post net")

    # End to end through the multi-task and refinement networks.
    outs = mt(x)
    ref = mm(x)
    for task, expected in zip(("seg", "depth", "normal"), ref):
        _close(outs[task], expected, dtype, f"multi-task {task}")
    _close(nets.refine(**outs), twin.post_model(*ref), dtype, "post net on predictions")

    z = rand(batch, cfg.z_dim)
    fake_ref = twin.G(z, y)
    _close(nets.generator(z, y), fake_ref, dtype, "G(z, y)")
    _close(nets.discriminator(x.clone(), y), twin.D(x.clone(), y), dtype, "D(x, y)")
    fake_ref = fake_ref.detach()
    _close(nets.discriminator(fake_ref.clone(), y), twin.D(fake_ref.clone(), y), dtype, "D(G(z, y), y)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_functional_equivalence_small(dtype):
    twin = _small_twin(seed=4)
    nets = _build(SMALL_CFG)
    import_released(twin.state_dict(), nets)
    twin.to(dtype)
    nets.to(dtype)
    gen = torch.Generator().manual_seed(5)
    _run_pair(twin, nets, dtype, train=False, batch=3, gen=gen, cfg=SMALL_CFG)
    _compare_states(nets, twin, dtype, "after eval-mode forwards")
    # Train mode: batch statistics, running statistics and power iterations update identically.
    before = export_released(nets)
    _run_pair(twin, nets, dtype, train=True, batch=3, gen=gen, cfg=SMALL_CFG)
    _compare_states(nets, twin, dtype, "after train-mode forwards")
    after = export_released(nets)
    changed = [k for k in after if not torch.equal(after[k], before[k])]
    assert any(k.endswith("running_var") for k in changed)
    assert any(k.endswith("weight_u") for k in changed) and any(k.endswith("weight_v") for k in changed)
    # The unused last shortcut of D is never run: its u/v stay as loaded.
    assert not any(k.startswith("D.block5.snconv2d0.") for k in changed)
    _run_pair(twin, nets, dtype, train=False, batch=2, gen=gen, cfg=SMALL_CFG)  # eval after training


def test_gradients_match_small():
    twin = _small_twin(seed=6)
    nets = _build(SMALL_CFG)
    import_released(twin.state_dict(), nets)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 128, 128, generator=gen).clamp(-1, 1)
    y = torch.tensor([1, 3])
    z = torch.randn(2, SMALL_CFG.z_dim, generator=gen)
    w = torch.randn(2, generator=gen)
    # Same loss shape as a GAN step: D on real and fake, then one backward.
    loss_ref = (twin.D(x.clone(), y) * w).sum() + (twin.D(twin.G(z, y), y) * w).sum()
    loss = (nets.discriminator(x.clone(), y) * w).sum() + (
        nets.discriminator(nets.generator(z, y), y) * w
    ).sum()
    _close(loss, loss_ref, torch.float32, "GAN loss")
    loss_ref.backward()
    loss.backward()
    ours = dict(nets.named_parameters())
    for name, p in twin.named_parameters():
        if not name.startswith(("G.", "D.")):
            continue
        mine = ours[released_to_ours(name)]
        if p.grad is None:  # the unused shortcut of D's last block
            assert name.startswith("D.block5.snconv2d0.") and mine.grad is None
            continue
        torch.testing.assert_close(mine.grad, p.grad, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_functional_equivalence_paper_size_cheap_parts(paper_sd, train):
    twin = ReleasedMGM()
    twin.load_state_dict(paper_sd)
    nets = _build(ModelConfig())
    import_released(paper_sd, nets)
    twin.train(train)
    nets.train(train)
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 3, 128, 128, generator=gen).clamp(-1, 1)
    feat = twin.multi_model.encoder(x)
    _close(nets.multitask.encoder(x), feat, torch.float32, "paper encoder")
    feat = feat.detach()
    _close(nets.bridge(feat), twin.middle_net(feat), torch.float32, "paper middle net")
    _close(nets.multitask.clr_head(feat), twin.multi_model.clr_decoder(feat), torch.float32, "paper clr head")
    _close(
        nets.multitask.decoders["depth"](feat),
        twin.multi_model.de_decoder(feat),
        torch.float32,
        "paper depth",
    )
    for twin_net, our_net in (
        (twin.multi_model.encoder, nets.multitask.encoder),
        (twin.middle_net, nets.bridge),
        (twin.multi_model.de_decoder, nets.multitask.decoders["depth"]),
    ):
        ours = our_net.state_dict()
        assert list(ours) == list(twin_net.state_dict())
        for name, ref in twin_net.state_dict().items():
            got = ours[name]
            if ref.dtype.is_floating_point:
                _close_state(got, ref, torch.float32, f"paper state {name}")
            else:
                assert torch.equal(got, ref), name
