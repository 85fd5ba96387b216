"""Small model configs for the model tests."""

import pytest

from mgm_fast.config import ModelConfig, override, preset


@pytest.fixture
def small_cfg():
    """``small_cfg(image_size, **fields)``: the tiny preset at another image size (narrow widths,
    fast on CPU), with optional field overrides."""

    def make(image_size: int = 64, **fields) -> ModelConfig:
        cfg = preset("tiny")
        assignments = [f"model.image_size={image_size}"]
        assignments += [
            f"model.{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in fields.items()
        ]
        return override(cfg, assignments).model

    return make
