"""The MGMNets container: parameter counts, the released checkpoint layout, a tiny train step."""

import json
from pathlib import Path

import pytest
import torch

from mgm_fast.config import preset
from mgm_fast.models import MGMNets, build_models, count_parameters, parameter_report

LAYOUT = Path(__file__).parent.parent / "fixtures" / "official_checkpoint_layout.json"
"""Tensor names and shapes of a ``torch.save`` of the released code's MGM module (a copy of
``tests/fixtures/official_checkpoint_layout.json``)."""

# Longest prefixes first: the rename an importer of released checkpoints applies.
RENAMES = [
    ("multi_model.ss_decoder.", "multitask.decoders.seg."),
    ("multi_model.de_decoder.", "multitask.decoders.depth."),
    ("multi_model.sn_decoder.", "multitask.decoders.normal."),
    ("multi_model.clr_decoder.", "multitask.clr_head."),
    ("multi_model.", "multitask."),
    ("post_model.ss_encoder.", "refine.encoders.seg."),
    ("post_model.de_encoder.", "refine.encoders.depth."),
    ("post_model.nm_encoder.", "refine.encoders.normal."),
    ("post_model.", "refine."),
    ("middle_net.", "bridge."),
    ("G.", "generator."),
    ("D.", "discriminator."),
]


def _rename(key: str) -> str:
    for old, new in RENAMES:
        if key.startswith(old):
            return new + key[len(old) :]
    raise KeyError(f"no container rename for released key {key}")


@pytest.fixture(scope="module")
def paper_nets() -> MGMNets:
    return build_models(preset("paper").model)


def test_paper_parameter_counts(paper_nets):
    mt = paper_nets.multitask
    millions = {
        "encoder": round(count_parameters(mt.encoder) / 1e6, 2),
        "seg": round(count_parameters(mt.decoders["seg"]) / 1e6, 2),
        "depth": round(count_parameters(mt.decoders["depth"]) / 1e6, 2),
        "normal": round(count_parameters(mt.decoders["normal"]) / 1e6, 2),
        "clr_head": round(count_parameters(mt.clr_head) / 1e6, 3),
        "multitask": round(count_parameters(mt) / 1e6, 1),
        "refinement": round(count_parameters(paper_nets.refine) / 1e6, 2),
        "bridge": round(count_parameters(paper_nets.bridge) / 1e6, 3),
        "generator": round(count_parameters(paper_nets.generator) / 1e6, 2),
        "discriminator": round(count_parameters(paper_nets.discriminator) / 1e6, 2),
    }
    assert millions == {
        "encoder": 11.14,
        "seg": 1.36,
        "depth": 1.35,
        "normal": 1.35,
        "clr_head": 0.023,
        "multitask": 15.2,
        "refinement": 7.98,
        "bridge": 0.046,
        "generator": 32.49,
        "discriminator": 39.52,
    }


def test_parameter_report_matches_real_build(paper_nets):
    report = parameter_report(preset("paper").model)
    mt = paper_nets.multitask
    assert report == {
        "encoder": count_parameters(mt.encoder),
        "decoder_seg": count_parameters(mt.decoders["seg"]),
        "decoder_depth": count_parameters(mt.decoders["depth"]),
        "decoder_normal": count_parameters(mt.decoders["normal"]),
        "clr_head": count_parameters(mt.clr_head),
        "multitask": count_parameters(mt),
        "refinement": count_parameters(paper_nets.refine),
        "bridge": count_parameters(paper_nets.bridge),
        "generator": count_parameters(paper_nets.generator),
        "discriminator": count_parameters(paper_nets.discriminator),
        "total": count_parameters(paper_nets),
    }
    assert report["bridge"] == 360 * 128 + 128 + 2 * 128
    assert report["clr_head"] == 360 * 64 + 64


def test_dropping_the_unused_shortcut_saves_its_parameters():
    cfg = preset("paper").model
    cfg.d_keep_unused_shortcut = False
    dropped = parameter_report(cfg)["discriminator"]
    assert parameter_report(preset("paper").model)["discriminator"] - dropped == 1024 * 1024 + 1024


def test_state_dict_maps_onto_released_layout_by_prefix(paper_nets):
    layout = json.loads(LAYOUT.read_text())
    assert len(layout) == 1090
    renamed = {_rename(k): tuple(shape) for k, shape in layout.items()}
    ours = {k: tuple(t.shape) for k, t in paper_nets.state_dict().items()}
    assert len(ours) == 1090
    assert set(renamed) - set(ours) == set()
    assert set(ours) - set(renamed) == set()
    assert {k: v for k, v in ours.items() if renamed[k] != v} == {}
    assert list(ours) == list(renamed)  # even the order of the released checkpoint


def test_meta_build_matches_real_build_layout(paper_nets):
    meta = build_models(preset("paper").model, device="meta")
    assert next(meta.parameters()).device.type == "meta"
    real = {k: tuple(v.shape) for k, v in paper_nets.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in meta.state_dict().items()} == real


def test_task_subset_build():
    nets = build_models(preset("tiny").model, tasks=("seg",))
    assert list(nets.multitask.decoders) == ["seg"] and list(nets.refine.encoders) == ["seg"]


def test_tiny_forward_backward_every_network():
    cfg = preset("tiny").model
    nets = build_models(cfg)
    batch, size = 8, cfg.image_size
    assert size == 64
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, cfg.num_scenes, (batch,))

    feats = nets.multitask.features(x)
    preds = nets.multitask.decode(feats)
    proj = nets.multitask.project(feats)
    scene = nets.refine(**preds)
    z = torch.randn(batch, cfg.z_dim) + nets.bridge(feats)
    fake = nets.generator(z, y)
    score = nets.discriminator(fake, y)
    loss = sum(p.square().mean() for p in preds.values()) + proj.square().mean()
    loss = loss + scene.mean() + score.mean()
    loss.backward()

    assert scene.shape == (batch, cfg.num_scenes) and score.shape == (batch,)
    assert fake.shape == (batch, 3, size, size)
    for name, module in [
        ("encoder", nets.multitask.encoder),
        ("decoders", nets.multitask.decoders),
        ("clr_head", nets.multitask.clr_head),
        ("refine", nets.refine),
        ("bridge", nets.bridge),
        ("generator", nets.generator),
        ("discriminator", nets.discriminator),
    ]:
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), name
        assert any(g.abs().sum() > 0 for g in grads), name
