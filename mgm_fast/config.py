"""Dataclass configs and named presets.

Two presets ship:

* ``paper`` -- the released code's defaults (docs/method.md section 1 and 3): 128x128 images,
  40 semantic classes, 27 scene classes, z 128, generator / discriminator width 64.
* ``tiny`` -- the same architecture family scaled down so that a whole MGM training step takes
  well under a second on a 2-core CPU at 64x64. Used by the default CPU job and the tests.

Every field can be overridden with ``override(cfg, ["model.z_dim=64", ...])``; the value is
parsed according to the field's declared type, and an unknown key is an error that lists the
valid ones. In code, change a config with ``dataclasses.replace``; :func:`from_dict` reads back
what :func:`to_dict` wrote.

Backends. Eight fields say which implementation computes a part of the step, never what it
computes: ``model.genblock_impl``, ``model.attention_impl``, ``model.spectral_norm_impl``,
``model.batch_norm_impl``, ``model.conv_impl``, ``schedule.loss_impl``, ``schedule.noise_impl`` and
``optim.implementation`` (Adam). Each defaults to the released
code's own computation -- "reference" (plain PyTorch, and the global RNG's stream for the
instance noise), "for-loop" for Adam -- so a config built here, without an engine, computes what
the released code computes. A training run never relies on these defaults: its engine
(``mgm_fast/engine/engines.py``, ``--engine``) sets all eight, and ``--set`` overrides win over
the engine's choice.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelConfig:
    """Architecture of every network of MGM (docs/method.md section 1)."""

    image_size: int = 128
    """Square input / generated image size. A multiple of 32 and a power of two >= 32."""
    num_seg_classes: int = 40
    num_scenes: int = 27

    # Shared encoder (taskgrouping ResNet, BasicBlocks) and dense decoders.
    stem_width: int = 64
    encoder_widths: tuple[int, ...] = (48, 96, 192, 360)
    encoder_blocks: tuple[int, ...] = (3, 4, 6, 3)
    decoder_widths: tuple[int, ...] = (256, 128, 64, 48, 32)
    """Output channels of the five x2 decoder stages (4x4 -> 128x128 at the paper size)."""
    clr_dim: int = 64
    """SimCLR projection size (one Linear after global average pooling)."""

    # Refinement network: one small ResNet per task output, then an MLP to scene logits.
    refine_stem_width: int = 64
    refine_widths: tuple[int, ...] = (48, 96, 192)
    refine_blocks: tuple[int, ...] = (3, 4, 3)
    refine_hidden: int = 128
    refine_logit_relu: bool = True
    """Released-code behaviour (docs/method.md B2): a ReLU on the scene logits before CE."""

    # SAGAN generator / projection discriminator.
    z_dim: int = 128
    g_conv_dim: int = 64
    d_conv_dim: int = 64
    g_channel_mults: tuple[int, ...] = ()
    """Generator channels per resolution 4, 8, ..., image_size as multiples of g_conv_dim.
    Empty means the default for image_size (128: 16,16,8,4,2,1)."""
    d_channel_mults: tuple[int, ...] = ()
    """Discriminator block widths as multiples of d_conv_dim, first entry the optimised first
    block; every block downsamples except the last. Empty means the default for image_size
    (128: 1,2,4,8,16,16)."""
    attn_resolution: int = 32
    """Resolution at which G and D apply self-attention."""
    d_keep_unused_shortcut: bool = True
    """The released discriminator's last block owns a 1x1 shortcut conv it never uses
    (docs/method.md B9). Kept by default so released checkpoints import one-to-one and the
    parameter count matches; it never affects the output."""
    d_shortcut_after_relu: bool = True
    """Released-code behaviour: each discriminator residual block applies its first ReLU in
    place, which also rewrites the tensor its shortcut reads, so the shortcut (and the identity
    shortcut of the last block) sees relu(x). False gives the textbook block whose shortcut reads
    x. No parameter changes, so checkpoints load either way."""
    genblock_impl: str = "reference"
    """Backend of the generator's upsampling blocks (see ``python -m mgm_fast.info``); the
    default, like every backend field's, is the released computation (module docstring)."""
    attention_impl: str = "reference"
    """Backend of the softmax core of G's and D's self-attention (:mod:`mgm_fast.ops.attention`):
    "reference" (the released bmm-softmax-bmm, the default), "auto", "cpp"."""
    spectral_norm_impl: str = "reference"
    """Backend of G's and D's spectral normalisation, one call per network forward
    (:mod:`mgm_fast.ops.spectral_norm`): "reference" (foreach ops, the default), "auto", "cpp"."""
    batch_norm_impl: str = "reference"
    """Backend of the training-mode BatchNorm layers of the multi-task and refinement networks
    in eager steps (:mod:`mgm_fast.ops.batch_norm`): "reference" (torch's kernels, the default),
    "auto", "cpp" (channels_last CPU kernels, the shortcut add and ReLU after a BatchNorm fused)."""
    conv_impl: str = "reference"
    """Backend of the networks' plain convolutions in eager steps (every ``Conv2d`` and ``SNConv2d``
    layer; not the ones inside a fused GenBlock, nor the decoders' transposed convolutions;
    :mod:`mgm_fast.ops.conv2d`): "reference" (``F.conv2d``, the default), "auto", "cpp" (CPU,
    channels_last: oneDNN or im2col + GEMM, chosen per shape by a cost model)."""

    def __post_init__(self) -> None:
        size = self.image_size
        if size < 32 or size % 32 != 0 or (size & (size - 1)) != 0:
            raise ValueError(f"model.image_size must be a power of two >= 32, got {size}")
        n_up = int(math.log2(size // 4))
        if len(self.g_mults) != n_up + 1:
            raise ValueError(
                f"model.g_channel_mults needs {n_up + 1} entries (resolutions 4..{size}), "
                f"got {len(self.g_mults)}"
            )
        if len(self.d_mults) != n_up + 1:
            raise ValueError(
                f"model.d_channel_mults needs {n_up + 1} entries for image_size {size} "
                f"(downsampling blocks to 4x4 plus one final block), got {len(self.d_mults)}"
            )
        if len(self.decoder_widths) != 5:
            raise ValueError("model.decoder_widths needs 5 entries (the encoder downsamples 32x)")
        if len(self.encoder_widths) != len(self.encoder_blocks):
            raise ValueError("model.encoder_widths and model.encoder_blocks differ in length")
        if len(self.refine_widths) != len(self.refine_blocks):
            raise ValueError("model.refine_widths and model.refine_blocks differ in length")

    @property
    def g_mults(self) -> tuple[int, ...]:
        """Resolved generator channel multipliers (resolution 4 first)."""
        return self.g_channel_mults or default_g_channel_mults(self.image_size)

    @property
    def d_mults(self) -> tuple[int, ...]:
        """Resolved discriminator channel multipliers (optimised first block first)."""
        return self.d_channel_mults or default_d_channel_mults(self.image_size)

    @property
    def feature_dim(self) -> int:
        """Channels of the shared representation E(x)."""
        return self.encoder_widths[-1]


def default_g_channel_mults(image_size: int) -> tuple[int, ...]:
    """SAGAN/BigGAN channel plan: 16 at 4x4, halving towards 1 at full resolution."""
    return {
        32: (4, 4, 2, 1),
        64: (16, 8, 4, 2, 1),
        128: (16, 16, 8, 4, 2, 1),
        256: (16, 16, 8, 8, 4, 2, 1),
    }.get(image_size) or _geometric_mults(int(math.log2(image_size // 4)) + 1)


def default_d_channel_mults(image_size: int) -> tuple[int, ...]:
    return {
        32: (1, 2, 4, 8),
        64: (1, 2, 4, 8, 16),
        128: (1, 2, 4, 8, 16, 16),
        256: (1, 2, 4, 8, 8, 16, 16),
    }.get(image_size) or _geometric_mults(int(math.log2(image_size // 4)) + 1)[::-1]


def _geometric_mults(n: int) -> tuple[int, ...]:
    return tuple(min(16, 2 ** (n - 1 - i)) for i in range(n))


@dataclass
class OptimConfig:
    """The six Adam optimisers of the released code (docs/method.md 3.1)."""

    multi_lr: float = 1e-3
    """multi_opt: the whole multi-task network (encoder, decoders, SimCLR head)."""
    encoder_lr: float = 1e-3
    """encoder_opt: a second Adam over the encoder alone, with its own moments (B7)."""
    post_lr: float = 5e-3
    """post_opt: the refinement network."""
    middle_lr: float = 1e-3
    """middle_opt: the bridge ("middle net")."""
    g_lr: float = 1e-4
    d_lr: float = 4e-4
    betas: tuple[float, ...] = (0.9, 0.999)
    multi_weight_decay: float = 1e-4
    encoder_weight_decay: float = 1e-4
    post_weight_decay: float = 1e-4
    middle_weight_decay: float = 0.0
    g_weight_decay: float = 0.0
    d_weight_decay: float = 0.0
    implementation: str = "for-loop"
    """Adam kernel: "for-loop" (the default: one parameter at a time, as the reference engine
    runs it), "foreach", "fused", or "auto" (= "fused", on CPU and CUDA alike). All compute the
    same update up to floating-point rounding."""


@dataclass
class ScheduleConfig:
    """What is trained, from which loss, in which order (engine/schedule.py)."""

    batch_size: int = 32
    gan_epochs: int = 500
    """Phase A (GAN pre-training) epochs over the labelled set (MGM only)."""
    epochs: int = 300
    """Joint-training epochs (MGM phase B, MGM-light, and the MT / ST baselines)."""
    max_steps: int = 0
    """If > 0, stop every phase after this many steps (quick runs; the epoch counts still set
    the order of the data)."""
    gan_iters: int = 2
    """D and G updates per batch, in GAN pre-training and in MGM step 4."""
    instance_noise_std: float = 0.01
    ntxent_temperature: float = 0.5
    seg_ignore_index: int = -1
    """Pixels with this label leave the segmentation loss. The released CE has no ignore index,
    so its data cannot contain void pixels; on such data both agree exactly."""
    loss_reduction: str = "all"
    """Depth/normal L1 normalisation: "all" (released: masked sum over all elements) or "valid"."""
    depth_mask: bool = False
    """Released: the depth loss mask is all ones, so missing depth (0) is regressed as well."""
    normal_target: str = "released01"
    """How normals are regressed: "released01" -- against (n + 1) / 2 in [0, 1] like the released
    8-bit PNG targets (predictions are decoded with 2p - 1 for evaluation); "unit" -- against n."""
    phase_a_encoder_pass: bool = True
    """Released: GAN pre-training runs the encoder on the real batch and discards the result,
    which only moves the encoder's BatchNorm running statistics (docs/method.md I2/B5)."""
    loss_impl: str = "reference"
    """Backend of the fused losses -- multi-task dense loss, NT-Xent, hinge -- ("reference", the
    default, "auto", "cpp", "cuda", "triton"; see python -m mgm_fast.info)."""
    noise_impl: str = "reference"
    """Instance noise: "reference" (the default) draws torch.randn from the global RNG (the
    released stream); "auto" / "cpp" / "triton" draw in-kernel (ops.gan_losses.noisy, Philox)
    from the run's own noise generator -- same distribution, another stream."""


@dataclass
class Config:
    """Top-level configuration."""

    preset: str = "paper"
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)


def tiny_model() -> ModelConfig:
    """The CPU preset: same topology, narrow widths, 64x64 images."""
    return ModelConfig(
        image_size=64,
        num_seg_classes=10,
        num_scenes=6,
        stem_width=16,
        encoder_widths=(16, 24, 32, 48),
        encoder_blocks=(1, 1, 1, 1),
        decoder_widths=(32, 24, 16, 16, 8),
        clr_dim=32,
        refine_stem_width=16,
        refine_widths=(16, 24, 32),
        refine_blocks=(1, 1, 1),
        refine_hidden=32,
        z_dim=32,
        g_conv_dim=8,
        d_conv_dim=8,
    )


PRESETS = {
    "paper": lambda: Config(preset="paper", model=ModelConfig()),
    "tiny": lambda: Config(
        preset="tiny", model=tiny_model(), schedule=ScheduleConfig(batch_size=8, gan_epochs=6, epochs=10)
    ),
}


def preset(name: str) -> Config:
    """Return a fresh config of the named preset."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()


# -------------------------------------------------------------------------------------------
# Overrides: "section.field=value" strings, parsed by the field's type.


def _parse_value(text: str, current: Any, type_hint: str) -> Any:
    hint = str(type_hint)
    if isinstance(current, bool) or hint == "bool":
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {text!r}")
    if isinstance(current, tuple) or hint.startswith("tuple"):
        items = [t for t in text.strip().strip("()[]").split(",") if t.strip()]
        elem = int if "int" in hint else float if "float" in hint else str
        return tuple(elem(t.strip()) for t in items)
    if isinstance(current, int) or hint == "int":
        return int(text)
    if isinstance(current, float) or hint == "float":
        return float(text)
    return text


def override(cfg: Any, assignments: list[str]) -> Any:
    """Apply ``key=value`` assignments (dotted keys) to a config tree in place and return it.

    Nested dataclasses are re-validated (``__post_init__``) after their fields change.
    """
    touched: list[Any] = []
    for assignment in assignments:
        if "=" not in assignment:
            raise ValueError(f"override {assignment!r} is not of the form key=value")
        key, text = assignment.split("=", 1)
        node = cfg
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if not dataclasses.is_dataclass(node) or not hasattr(node, part):
                raise KeyError(f"unknown config section {part!r} in {key!r}")
            node = getattr(node, part)
        names = {f.name: f for f in dataclasses.fields(node)}
        leaf = parts[-1]
        if leaf not in names:
            raise KeyError(f"unknown config field {key!r}; fields here: {sorted(names)}")
        try:
            value = _parse_value(text, getattr(node, leaf), names[leaf].type)
        except ValueError as err:
            raise ValueError(f"bad value for {key}: {err}") from None
        setattr(node, leaf, value)
        touched.append(node)
    for node in touched:
        post = getattr(node, "__post_init__", None)
        if post is not None:
            post()
    return cfg


def from_dict(data: dict) -> Config:
    """The :class:`Config` of a plain nested dict written by :func:`to_dict` (lists become the
    tuples the fields declare; a field the dict lacks keeps its default)."""

    def section(cls: type, values: dict) -> Any:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    return Config(
        preset=data["preset"],
        model=section(ModelConfig, data["model"]),
        optim=section(OptimConfig, data["optim"]),
        schedule=section(ScheduleConfig, data["schedule"]),
    )


def to_dict(cfg: Any) -> dict:
    """Plain nested dict of a config (tuples become lists), for YAML/JSON and checkpoints."""

    def convert(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, tuple):
            return [convert(v) for v in value]
        return value

    return convert(cfg)
