"""Engines: how a training step is executed, never what it computes.

Both engines run the same schedule (:mod:`mgm_fast.engine.schedule`) with the same config; they
differ only in the ingredients below, so comparing them measures the implementation alone:

* ``reference`` -- our faithful plain-PyTorch rendering of the released code's execution:
  torch DataLoader, SimCLR views made one image at a time with PIL on the CPU (as released),
  every loss read back to the host after every sub-step (the released ``.item()`` calls),
  autograd as released (every network's weight gradients computed in every sub-step, even
  those no optimiser of that sub-step applies, and graphs built for the detached synthesized
  batches: docs/method.md I2, I3), reference losses, instance noise from the global RNG
  (torch.randn), reference GenBlocks and self-attention, for-loop Adam, fp32, NCHW.
* ``fast`` -- on-device memory loader (or DALI / DataLoader when the data does not fit),
  batched views through ``mgm_fast.ops.simclr_views``, losses read once per log window, pruned
  autograd (only the updated networks' weights get gradients; detached branches under
  ``no_grad``), fused losses, in-kernel instance noise, fused GenBlocks and self-attention
  (``impl="auto"``), fused Adam, channels_last, and bf16 autocast on CUDA. On the CPU the fast
  engine stays fp32 so that CPU runs give the same numbers on every machine; ``--precision
  bf16`` is the opt-in (a separate row of the end-to-end benchmark).

``fast-<ingredient>`` engines are ``fast`` with one ingredient set back to its reference value
(the ablation rows of the end-to-end benchmark). Explicit command-line options (``--loader``,
``--precision``, ``--channels-last``, ``--views``) and ``--set`` overrides win over the engine's choice.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

INGREDIENTS = ("loader", "views", "readback", "autograd", "adam", "loss_impl", "noise_impl", "genblock_impl",
               "attention_impl", "spectral_norm_impl", "precision", "channels_last")


@dataclass(frozen=True)
class Engine:
    """The execution ingredients of a training run.

    Attributes:
        loader: ``make_loader`` kind ("auto" | "memory" | "dali" | "torch").
        views: "batched" (one batched pass through ops.simclr_views on the images' device) or
            "per-sample" (PIL, one image at a time on the CPU, then copied to the device).
        readback: "window" (losses stay on the device, read once per log window) or "step"
            (every logged loss is read back to the host right after its sub-step).
        autograd: "pruned" (weights of the networks a sub-step does not update have
            ``requires_grad`` off; the detached synthesized batches run under ``no_grad``) or
            "released" (every weight gets its gradient in every sub-step and the detached
            branches build graphs, as the released code does). The updates are the same.
        adam: ``OptimConfig.implementation``.
        loss_impl: ``ScheduleConfig.loss_impl``.
        noise_impl: ``ScheduleConfig.noise_impl``.
        genblock_impl: ``ModelConfig.genblock_impl``.
        attention_impl: ``ModelConfig.attention_impl``.
        spectral_norm_impl: ``ModelConfig.spectral_norm_impl``.
        precision: "fp32" | "bf16" | "fp16", or None: bf16 on CUDA, fp32 elsewhere.
        channels_last: channels_last memory format on every device.
    """

    name: str
    loader: str
    views: str
    readback: str
    autograd: str
    adam: str
    loss_impl: str
    noise_impl: str
    genblock_impl: str
    attention_impl: str
    spectral_norm_impl: str
    precision: str | None
    channels_last: bool

    def resolved_precision(self, device: torch.device) -> str:
        if self.precision is not None:
            return self.precision
        return "bf16" if device.type == "cuda" else "fp32"

    def config_overrides(self) -> list[str]:
        """``--set`` style overrides of the config fields this engine chooses."""
        return [
            f"optim.implementation={self.adam}",
            f"schedule.loss_impl={self.loss_impl}",
            f"schedule.noise_impl={self.noise_impl}",
            f"model.genblock_impl={self.genblock_impl}",
            f"model.attention_impl={self.attention_impl}",
            f"model.spectral_norm_impl={self.spectral_norm_impl}",
        ]


REFERENCE = Engine("reference", loader="torch", views="per-sample", readback="step", autograd="released",
                   adam="for-loop", loss_impl="reference", noise_impl="reference", genblock_impl="reference",
                   attention_impl="reference", spectral_norm_impl="reference", precision="fp32", channels_last=False)
FAST = Engine("fast", loader="auto", views="batched", readback="window", autograd="pruned", adam="auto",
              loss_impl="auto", noise_impl="auto", genblock_impl="auto",
              attention_impl="auto", spectral_norm_impl="auto", precision=None, channels_last=True)


def differing_ingredients() -> list[str]:
    """The ingredients in which ``fast`` differs from ``reference``."""
    return [f for f in INGREDIENTS if getattr(FAST, f) != getattr(REFERENCE, f)]


def _ablations() -> dict[str, Engine]:
    out = {}
    for field in differing_ingredients():
        name = f"fast-{field.replace('_', '-')}"
        out[name] = dataclasses.replace(FAST, name=name, **{field: getattr(REFERENCE, field)})
    return out


ENGINES: dict[str, Engine] = {"reference": REFERENCE, "fast": FAST, **_ablations()}
"""Every engine by name: reference, fast, and fast-<ingredient> (that ingredient as in reference)."""


def get(name: str) -> Engine:
    try:
        return ENGINES[name]
    except KeyError:
        raise ValueError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}") from None
