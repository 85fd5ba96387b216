import pytest

from mgm_fast.config import Config, ModelConfig, from_dict, override, preset, to_dict


def test_paper_preset_is_the_released_defaults():
    m = preset("paper").model
    assert (m.image_size, m.num_seg_classes, m.num_scenes, m.z_dim) == (128, 40, 27, 128)
    assert (m.g_conv_dim, m.d_conv_dim) == (64, 64)
    assert m.encoder_widths == (48, 96, 192, 360) and m.encoder_blocks == (3, 4, 6, 3)
    assert m.g_mults == (16, 16, 8, 4, 2, 1) and m.d_mults == (1, 2, 4, 8, 16, 16)
    assert m.refine_logit_relu is True


def test_presets_are_fresh_objects():
    a, b = preset("tiny"), preset("tiny")
    a.model.z_dim = 7
    assert b.model.z_dim != 7


def test_override_parses_types_and_revalidates():
    cfg = preset("tiny")
    override(cfg, ["model.image_size=128", "model.refine_logit_relu=off", "model.encoder_widths=8,8,8,8"])
    assert cfg.model.image_size == 128 and cfg.model.g_mults == (16, 16, 8, 4, 2, 1)
    assert cfg.model.refine_logit_relu is False and cfg.model.encoder_widths == (8, 8, 8, 8)
    with pytest.raises(ValueError, match="power of two"):
        override(cfg, ["model.image_size=96"])


@pytest.mark.parametrize(
    "assignment, error, match",
    [
        ("model.nope=1", KeyError, "unknown config field"),
        ("nosection.x=1", KeyError, "unknown config section"),
        ("model.z_dim", ValueError, "key=value"),
        ("model.refine_logit_relu=maybe", ValueError, "model.refine_logit_relu"),
        ("model.g_channel_mults=1,2", ValueError, "g_channel_mults needs 6"),
    ],
)
def test_override_errors_name_the_key(assignment, error, match):
    with pytest.raises(error, match=match):
        override(preset("paper"), [assignment])


def test_unknown_preset_lists_choices():
    with pytest.raises(ValueError, match="paper"):
        preset("huge")


def test_to_dict_is_plain():
    d = to_dict(preset("paper"))
    assert d["model"]["encoder_widths"] == [48, 96, 192, 360]
    assert ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d["model"].items()}) == preset(
        "paper"
    ).model


@pytest.mark.parametrize("name", ["paper", "tiny"])
def test_from_dict_reads_back_to_dict(name):
    cfg = preset(name)
    assert from_dict(to_dict(cfg)) == cfg


def test_backend_fields_default_to_the_released_computation():
    """One rule for every backend field: a config built without an engine computes what the
    released code computes (the engines set these fields for a training run)."""
    cfg = Config()
    assert (cfg.model.genblock_impl, cfg.model.attention_impl) == ("reference", "reference")
    assert (cfg.schedule.loss_impl, cfg.schedule.noise_impl) == ("reference", "reference")
    assert cfg.optim.implementation == "for-loop"
