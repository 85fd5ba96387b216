"""Import and export of the released MGM code's checkpoints.

The released code saves one ``state_dict`` of its MGM module (1,090 tensors at the paper size),
whose children are ``multi_model``, ``post_model``, ``middle_net``, ``G`` and ``D``. Inside every
block our modules use the released names (``conv1``, ``bn_upconv0``, ``cond_bn1.embed``,
``snconv2d0``, ...) and the released tensor state, spectral norm included (``weight_orig``
parameter plus ``weight_u`` / ``weight_v`` buffers, one power iteration per training-mode
forward). Only the containers are renamed, by prefix:

==============================  ===============================
released prefix                 mgm_fast prefix
==============================  ===============================
``multi_model.encoder.``        ``multitask.encoder.``
``multi_model.ss_decoder.``     ``multitask.decoders.seg.``
``multi_model.de_decoder.``     ``multitask.decoders.depth.``
``multi_model.sn_decoder.``     ``multitask.decoders.normal.``
``multi_model.clr_decoder.``    ``multitask.clr_head.``
``post_model.ss_encoder.``      ``refine.encoders.seg.``
``post_model.de_encoder.``      ``refine.encoders.depth.``
``post_model.nm_encoder.``      ``refine.encoders.normal.``
``post_model.``                 ``refine.`` (``fc1``, ``fc2``)
``middle_net.``                 ``bridge.``
``G.``                          ``generator.``
``D.``                          ``discriminator.``
==============================  ===============================

The longest matching prefix wins, in both directions. A name is accepted only if it maps to a
name that maps back to it (so ``post_model.encoders.seg.x`` is rejected rather than being
smuggled in through ``post_model.``).

Public API:

* :func:`load_released_state_dict` -- read a checkpoint file (``weights_only=True``, CPU) or take
  an already loaded dict; unwrap ``{"state_dict": ...}``-style wrappers when unambiguous.
* :func:`import_released` -- validate and load into :class:`~mgm_fast.models.MGMNets`; any unknown,
  missing or mis-shaped tensor raises :class:`CheckpointMismatchError` before anything is loaded.
* :func:`infer_model_config` -- a :class:`~mgm_fast.config.ModelConfig` that fits a checkpoint;
  :func:`build_from_released` reads, infers, builds and imports in one call.
* :func:`export_released` / :func:`save_released` -- the inverse map; the file is written
  atomically (temp file, fsync, rename).

The released discriminator's last block owns a 1x1 shortcut convolution that its forward never
uses; our models keep it when ``model.d_keep_unused_shortcut`` is true (the default), which makes
import and export one-to-one.
"""

from __future__ import annotations

import os
import re
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mgm_fast.atomic_io import atomic_torch_save
from mgm_fast.config import ModelConfig, default_d_channel_mults, default_g_channel_mults
from mgm_fast.models import build_models

# (released prefix, our prefix), in the released checkpoint's order.
PREFIX_MAP: tuple[tuple[str, str], ...] = (
    ("multi_model.encoder.", "multitask.encoder."),
    ("multi_model.ss_decoder.", "multitask.decoders.seg."),
    ("multi_model.de_decoder.", "multitask.decoders.depth."),
    ("multi_model.sn_decoder.", "multitask.decoders.normal."),
    ("multi_model.clr_decoder.", "multitask.clr_head."),
    ("post_model.ss_encoder.", "refine.encoders.seg."),
    ("post_model.de_encoder.", "refine.encoders.depth."),
    ("post_model.nm_encoder.", "refine.encoders.normal."),
    ("post_model.", "refine."),
    ("middle_net.", "bridge."),
    ("G.", "generator."),
    ("D.", "discriminator."),
)

NET_NAMES: tuple[str, ...] = ("multitask", "refine", "bridge", "generator", "discriminator")
"""Attributes of :class:`~mgm_fast.models.MGMNets` that hold the networks, in released order."""

WRAPPER_KEYS: tuple[str, ...] = ("state_dict", "model", "model_state_dict", "net", "network")
"""Keys under which a checkpoint may wrap the state dict; unwrapped only when exactly one holds
a dict of tensors."""

_MAX_LISTED = 40


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be read or does not hold a state dict."""


class CheckpointMismatchError(CheckpointError):
    """A state dict does not fit the target networks. Nothing was loaded.

    Attributes hold the complete lists: ``unknown`` (names that map to nothing in the target),
    ``missing`` (target names that the state dict does not fill), ``shape_mismatches``
    (name, expected shape, got shape) and ``dtype_mismatches`` (name, expected, got).
    """

    def __init__(self, message: str, unknown=(), missing=(), shape_mismatches=(), dtype_mismatches=()):
        super().__init__(message)
        self.unknown = list(unknown)
        self.missing = list(missing)
        self.shape_mismatches = list(shape_mismatches)
        self.dtype_mismatches = list(dtype_mismatches)


@dataclass
class ImportReport:
    """What :func:`import_released` loaded (and, with ``strict=False``, what it left out)."""

    loaded: list[str] = field(default_factory=list)
    """Our names of every tensor filled."""
    num_elements: int = 0
    unknown: list[str] = field(default_factory=list)
    """Released names that were ignored (only ever non-empty with ``strict=False``)."""
    missing: list[str] = field(default_factory=list)
    """Our names that kept their previous value (only ever non-empty with ``strict=False``)."""

    def __str__(self) -> str:
        text = f"imported {len(self.loaded)} tensors ({self.num_elements:,} elements)"
        if self.unknown:
            text += f"; ignored {len(self.unknown)} unknown"
        if self.missing:
            text += f"; {len(self.missing)} left at their previous values"
        return text


# -------------------------------------------------------------------------------------------
# Name mapping.


def _longest_prefix(name: str, prefixes) -> int | None:
    best, best_len = None, -1
    for i, prefix in enumerate(prefixes):
        if name.startswith(prefix) and len(prefix) > best_len:
            best, best_len = i, len(prefix)
    return best


def released_to_ours(name: str) -> str | None:
    """Our name for a released tensor name, or None if it has no counterpart."""
    i = _longest_prefix(name, [r for r, _ in PREFIX_MAP])
    if i is None:
        return None
    released, ours = PREFIX_MAP[i]
    mapped = ours + name[len(released) :]
    return mapped if _ours_to_released_raw(mapped) == name else None


def _ours_to_released_raw(name: str) -> str | None:
    i = _longest_prefix(name, [o for _, o in PREFIX_MAP])
    if i is None:
        return None
    released, ours = PREFIX_MAP[i]
    return released + name[len(ours) :]


def ours_to_released(name: str) -> str | None:
    """The released tensor name for one of ours, or None if it has no counterpart."""
    mapped = _ours_to_released_raw(name)
    if mapped is None:
        return None
    i = _longest_prefix(mapped, [r for r, _ in PREFIX_MAP])
    return mapped if PREFIX_MAP[i][1] + mapped[len(PREFIX_MAP[i][0]) :] == name else None


def _nets_state(nets: Any) -> OrderedDict[str, torch.Tensor]:
    """State of all networks of ``nets`` under our full names (``multitask.encoder.conv1...``)."""
    state: OrderedDict[str, torch.Tensor] = OrderedDict()
    for net_name in NET_NAMES:
        module = getattr(nets, net_name, None)
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"nets.{net_name} must be a torch.nn.Module, got {type(module).__name__}")
        for key, value in module.state_dict().items():
            state[f"{net_name}.{key}"] = value
    return state


# -------------------------------------------------------------------------------------------
# Reading.


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _unwrap(obj: Any, source: str) -> OrderedDict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: expected a state dict, got {type(obj).__name__}")
    if not _is_state_dict(obj):
        candidates = [k for k in WRAPPER_KEYS if k in obj and _is_state_dict(obj[k])]
        if len(candidates) != 1:
            found = "several wrapped state dicts" if candidates else "no state dict"
            non_tensor = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)][:10]
            raise CheckpointError(
                f"{source}: {found} (top-level keys {list(obj)[:20]}; "
                f"entries that are not tensors: {non_tensor}; looked under {list(WRAPPER_KEYS)})"
            )
        obj = obj[candidates[0]]
    state = OrderedDict(obj.items())
    # A checkpoint of a DataParallel-wrapped module: every name carries "module.".
    if all(k.startswith("module.") for k in state):
        state = OrderedDict((k[len("module.") :], v) for k, v in state.items())
    return state


def load_released_state_dict(path_or_dict: str | os.PathLike | Mapping) -> OrderedDict[str, torch.Tensor]:
    """Read a released-code checkpoint into a flat ``{name: tensor}`` dict on the CPU.

    Accepts a file path (read with ``torch.load(weights_only=True, map_location="cpu")``) or an
    already loaded dict. A dict that wraps the state dict under one of :data:`WRAPPER_KEYS` is
    unwrapped when exactly one such key holds a dict of tensors, and a common ``module.`` prefix
    is stripped. A missing, truncated or corrupt file raises :class:`CheckpointError` (or
    ``FileNotFoundError``) naming the file.
    """
    if isinstance(path_or_dict, Mapping):
        return _unwrap(path_or_dict, "checkpoint dict")
    path = Path(path_or_dict)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # torch raises RuntimeError, EOFError, UnpicklingError, ...
        size = path.stat().st_size
        raise CheckpointError(
            f"{path}: cannot read checkpoint ({size} bytes; truncated or corrupt?): "
            f"{type(err).__name__}: {err}"
        ) from err
    return _unwrap(obj, str(path))


# -------------------------------------------------------------------------------------------
# Import.


def _listing(title: str, items: list[str]) -> str:
    shown = "\n".join(f"    {item}" for item in items[:_MAX_LISTED])
    more = f"\n    ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"  {title} ({len(items)}):\n{shown}{more}"


def _dtype_kind(dtype: torch.dtype) -> str:
    if dtype.is_floating_point:
        return "float"
    if dtype.is_complex:
        return "complex"
    return "bool" if dtype == torch.bool else "int"


def import_released(state_dict: Mapping[str, torch.Tensor], nets: Any, strict: bool = True) -> ImportReport:
    """Load a released-layout state dict into our networks (``nets.multitask``, ``.refine``, ...).

    Every name is renamed by :data:`PREFIX_MAP` and checked before anything is written. With
    ``strict=True`` (the default) any released name without a counterpart, any of our tensors
    left unfilled, any shape mismatch or any float/integer mismatch raises
    :class:`CheckpointMismatchError` listing all of them, and ``nets`` is left untouched. With
    ``strict=False`` unknown and missing names are tolerated (a warning lists them and the
    report returns them), but shape and dtype mismatches still raise.

    Values are copied into the existing tensors (converted to their dtype); the device and
    dtype of ``nets`` are kept.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
    target = _nets_state(nets)

    renamed: dict[str, tuple[str, torch.Tensor]] = {}
    unknown: list[str] = []
    shape_bad: list[tuple[str, tuple, tuple]] = []
    dtype_bad: list[tuple[str, torch.dtype, torch.dtype]] = []
    for name, value in state_dict.items():
        ours = released_to_ours(name)
        if ours is None or ours not in target:
            unknown.append(name if ours is None else f"{name} (-> {ours}, not in our networks)")
            continue
        if not isinstance(value, torch.Tensor):
            raise CheckpointMismatchError(f"{name}: expected a tensor, got {type(value).__name__}")
        expected = target[ours]
        if tuple(value.shape) != tuple(expected.shape):
            shape_bad.append((name, tuple(expected.shape), tuple(value.shape)))
        elif _dtype_kind(value.dtype) != _dtype_kind(expected.dtype):
            dtype_bad.append((name, expected.dtype, value.dtype))
        renamed[ours] = (name, value)
    missing = [k for k in target if k not in renamed]
    missing_text = [f"{ours_to_released(k) or '(no released name)'} (our {k})" for k in missing]

    if shape_bad or dtype_bad or (strict and (unknown or missing)):
        parts = ["released checkpoint does not fit the networks; nothing was loaded"]
        if unknown:
            parts.append(_listing("unknown names", unknown))
        if missing:
            parts.append(_listing("missing names", missing_text))
        if shape_bad:
            parts.append(
                _listing(
                    "shape mismatches (name: expected, got)",
                    [f"{n}: expected {list(e)}, got {list(g)}" for n, e, g in shape_bad],
                )
            )
        if dtype_bad:
            parts.append(
                _listing(
                    "dtype mismatches (name: expected, got)",
                    [f"{n}: expected {e}, got {g}" for n, e, g in dtype_bad],
                )
            )
        raise CheckpointMismatchError("\n".join(parts), unknown, missing_text, shape_bad, dtype_bad)
    if unknown or missing:
        warnings.warn(
            f"import_released(strict=False): ignored {len(unknown)} unknown names "
            f"{unknown[:5]}, left {len(missing)} tensors unfilled {missing[:5]}",
            stacklevel=2,
        )

    report = ImportReport(unknown=unknown, missing=missing)
    for net_name in NET_NAMES:
        module = getattr(nets, net_name)
        prefix = net_name + "."
        part = OrderedDict(
            (ours[len(prefix) :], value) for ours, (_, value) in renamed.items() if ours.startswith(prefix)
        )
        module.load_state_dict(part, strict=strict)
        report.loaded.extend(prefix + k for k in part)
        report.num_elements += sum(v.numel() for v in part.values())
    return report


# -------------------------------------------------------------------------------------------
# Export.


def export_released(nets: Any) -> OrderedDict[str, torch.Tensor]:
    """The state of ``nets`` in the released layout: released names, released container order.

    Tensors are detached CPU copies. Raises :class:`CheckpointError` for any of our tensors that
    has no released name.
    """
    ours = _nets_state(nets)
    our_prefixes = [o for _, o in PREFIX_MAP]
    rows = []
    unmapped = []
    for position, (name, value) in enumerate(ours.items()):
        released = ours_to_released(name)
        if released is None:
            unmapped.append(name)
            continue
        rows.append((_longest_prefix(name, our_prefixes), position, released, value))
    if unmapped:
        raise CheckpointError("\n".join(["tensors without a released name:", *unmapped[:_MAX_LISTED]]))
    rows.sort(key=lambda row: (row[0], row[1]))
    return OrderedDict((released, value.detach().to("cpu", copy=True)) for _, _, released, value in rows)


def save_released(nets: Any, path: str | os.PathLike) -> Path:
    """Write ``export_released(nets)`` to ``path`` atomically; the released code can load it."""
    return atomic_torch_save(export_released(nets), path)


# -------------------------------------------------------------------------------------------
# Config inference.


def _shape(state: Mapping[str, torch.Tensor], name: str) -> tuple[int, ...]:
    if name not in state:
        raise CheckpointError(f"cannot infer the model config: {name} is missing from the checkpoint")
    return tuple(state[name].shape)


def _indices(state: Mapping[str, torch.Tensor], pattern: str) -> list[int]:
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for k in state if (m := regex.match(k))})


def _layer_plan(state, prefix: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    layers = _indices(state, re.escape(prefix) + r"layer(\d+)\.")
    if layers != list(range(1, len(layers) + 1)):
        raise CheckpointError(f"cannot infer the model config: {prefix}layer* are {layers}")
    widths, blocks = [], []
    for i in layers:
        widths.append(_shape(state, f"{prefix}layer{i}.0.conv1.weight")[0])
        blocks.append(len(_indices(state, re.escape(f"{prefix}layer{i}.") + r"(\d+)\.")))
    return tuple(widths), tuple(blocks)


def _mults(channels: list[int], base: int, what: str) -> tuple[int, ...]:
    if any(c % base for c in channels):
        raise CheckpointError(
            f"cannot infer the model config: {what} widths {channels} not multiples of {base}"
        )
    return tuple(c // base for c in channels)


def infer_model_config(state_dict: Mapping[str, torch.Tensor], **overrides: Any) -> ModelConfig:
    """A :class:`ModelConfig` whose networks have exactly the tensors of ``state_dict``.

    ``state_dict`` may use released or our names. Read off the tensors: image size (number of
    generator blocks), class counts, encoder / decoder / refinement widths and block counts,
    SimCLR size, z size, generator / discriminator widths, self-attention resolution and whether
    the discriminator keeps its unused last shortcut. Fields that leave no trace in the tensors
    (``refine_logit_relu``, ``d_shortcut_after_relu``, ``genblock_impl``, ``attention_impl``) keep
    their defaults -- the released behaviour -- unless given in ``overrides``.
    """
    state = dict(state_dict)
    if any(k.startswith(NET_NAMES) for k in state):
        state = {ours_to_released(k) or k: v for k, v in state.items()}

    enc_widths, enc_blocks = _layer_plan(state, "multi_model.encoder.")
    ref_widths, ref_blocks = _layer_plan(state, "post_model.ss_encoder.")
    stages = _indices(state, r"multi_model\.ss_decoder\.upconv(\d+)\.weight")
    last = stages[-1] if stages else 0

    g_blocks = _indices(state, r"G\.block(\d+)\.")
    d_blocks = _indices(state, r"D\.block(\d+)\.")
    n_up = len(g_blocks)
    image_size = 4 * 2**n_up
    z_dim = _shape(state, "G.snlinear0.weight_orig")[1]
    g = _shape(state, "G.snconv2d1.weight_orig")[1]
    g_channels = [_shape(state, "G.block1.snconv2d1.weight_orig")[1]]
    g_channels += [_shape(state, f"G.block{i}.snconv2d1.weight_orig")[0] for i in g_blocks]
    d = _shape(state, "D.opt_block1.snconv2d1.weight_orig")[0]
    d_channels = [d] + [_shape(state, f"D.block{i}.snconv2d1.weight_orig")[0] for i in d_blocks]
    g_mults = _mults(g_channels, g, "generator")
    d_mults = _mults(d_channels, d, "discriminator")

    # Self-attention sits where its width matches a block output; G and D must agree.
    g_attn = _shape(state, "G.self_attn.snconv1x1_theta.weight_orig")[1]
    d_attn = _shape(state, "D.self_attn.snconv1x1_theta.weight_orig")[1]
    g_res = {4 * 2**i for i, c in enumerate(g_channels) if c == g_attn and i > 0}
    d_res = {image_size // 2 ** min(j + 1, n_up) for j, c in enumerate(d_channels) if c == d_attn}
    common = g_res & d_res
    if len(common) != 1:
        raise CheckpointError(
            f"cannot infer the self-attention resolution: generator allows {sorted(g_res)}, "
            f"discriminator {sorted(d_res)}"
        )
    last_d = d_blocks[-1] if d_blocks else 0
    keep_unused = f"D.block{last_d}.snconv2d0.weight_orig" in state

    fields: dict[str, Any] = dict(
        image_size=image_size,
        num_seg_classes=_shape(state, f"multi_model.ss_decoder.conv_decode{last}.weight")[0],
        num_scenes=_shape(state, "G.block1.cond_bn1.embed.weight")[0],
        stem_width=_shape(state, "multi_model.encoder.conv1.weight")[0],
        encoder_widths=enc_widths,
        encoder_blocks=enc_blocks,
        decoder_widths=tuple(_shape(state, f"multi_model.ss_decoder.upconv{k}.weight")[1] for k in stages),
        clr_dim=_shape(state, "multi_model.clr_decoder.fc.weight")[0],
        refine_stem_width=_shape(state, "post_model.ss_encoder.conv1.weight")[0],
        refine_widths=ref_widths,
        refine_blocks=ref_blocks,
        refine_hidden=_shape(state, "post_model.fc1.weight")[0],
        z_dim=z_dim,
        g_conv_dim=g,
        d_conv_dim=d,
        g_channel_mults=() if g_mults == default_g_channel_mults(image_size) else g_mults,
        d_channel_mults=() if d_mults == default_d_channel_mults(image_size) else d_mults,
        attn_resolution=common.pop(),
        d_keep_unused_shortcut=keep_unused,
    )
    fields.update(overrides)
    try:
        return ModelConfig(**fields)
    except ValueError as err:
        raise CheckpointError(f"the checkpoint does not describe a valid model config: {err}") from err


def build_from_released(
    path_or_dict: str | os.PathLike | Mapping, device: torch.device | str | None = None, **overrides: Any
) -> tuple[ModelConfig, Any, ImportReport]:
    """Read a released checkpoint, infer its config, build our networks and import it strictly.

    Returns ``(model_config, nets, report)``; ``overrides`` go to :func:`infer_model_config`.
    """
    state = load_released_state_dict(path_or_dict)
    cfg = infer_model_config(state, **overrides)
    nets = build_models(cfg, device=device)
    report = import_released(state, nets)
    return cfg, nets, report
