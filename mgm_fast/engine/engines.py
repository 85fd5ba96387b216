"""Engines: how a training step is executed, never what it computes.

Both engines run the same schedule (:mod:`mgm_fast.engine.schedule`) with the same config; they
differ only in the ingredients below, so comparing them measures the implementation alone:

* ``reference`` -- our faithful plain-PyTorch rendering of the released code's execution:
  torch DataLoader, SimCLR views made one image at a time with PIL on the CPU (as released),
  every loss read back to the host after every sub-step (the released ``.item()`` calls),
  autograd as released (every network's weight gradients computed in every sub-step, even
  those no optimiser of that sub-step applies, and graphs built for the detached synthesized
  batches: docs/method.md I2, I3), reference losses, instance noise from the global RNG
  (torch.randn), reference GenBlocks, self-attention, spectral norm and BatchNorm, for-loop Adam,
  fp32, NCHW.
* ``fast`` -- on-device memory loader (or DALI / DataLoader when the data does not fit),
  batched views through ``mgm_fast.ops.simclr_views``, losses read once per log window, pruned
  autograd (only the updated networks' weights get gradients; detached branches under
  ``no_grad``), fused losses, in-kernel instance noise, fused GenBlocks, self-attention, spectral
  norm and (CPU, channels_last) BatchNorm + shortcut add + ReLU (``impl="auto"``), fused Adam,
  channels_last, and bf16 autocast on CUDA. On the CPU the fast engine stays fp32 so that CPU
  runs give the same numbers on every machine; ``--precision bf16`` is the opt-in (a separate row
  of the end-to-end benchmark).

``fast-<ingredient>`` engines are ``fast`` with one ingredient set back to its reference value
(the ablation rows of the end-to-end benchmark). Explicit command-line options (``--loader``,
``--precision``, ``--channels-last``, ``--views``, ``--compile``) and ``--set`` overrides win over the
engine's choice. On CUDA the fast engine also compiles every network and replays its graphs as
CUDA graphs (``compile``), so that a step costs the host a few launches per network.

A run resolves its engine once (``mgm_fast.train.resolve_run``): :meth:`Engine.configure` writes
the eight ingredients that are config fields (the backends) into the run's :class:`Config`, and
:meth:`Engine.execution` gives the run's :class:`Execution` record -- every ingredient as the run
uses it, after the explicit options, on its device. The record is kept on the run, read by
everything that builds the run's loaders, networks and step context, and written in full to
the run's ``config.yaml``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from mgm_fast.config import Config

COMPILE_MODES = ("off", "default", "cudagraphs")
"""How a run's networks execute: eager, torch.compile (inductor), or torch.compile with CUDA
graph replay (``mode="reduce-overhead"``, CUDA only)."""

@dataclass(frozen=True, kw_only=True)
class Ingredients:
    """The execution ingredients of a training run, the fields :class:`Engine` chooses and
    :class:`Execution` records (one list for both).

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
        batch_norm_impl: ``ModelConfig.batch_norm_impl``.
        conv_impl: ``ModelConfig.conv_impl``.
        precision: "fp32" | "bf16" | "fp16", or None (an engine's only): bf16 on CUDA, fp32
            elsewhere.
        channels_last: channels_last memory format on every device.
        cudnn_benchmark: on CUDA, let cuDNN time its convolution algorithms once per shape and
            keep the fastest (shapes are fixed per run). Not an ablation ingredient: every
            ``fast-<ingredient>`` engine keeps fast's choice.
        compile: how the networks run (:data:`COMPILE_MODES`): "off" (eager), "default"
            (``torch.compile``, inductor) or "cudagraphs" (``torch.compile`` with
            ``mode="reduce-overhead"``: inductor, and each compiled graph replayed as a CUDA
            graph, one launch instead of one per kernel; CUDA only); None (an engine's only):
            "cudagraphs" on CUDA, "off" elsewhere (on the CPU compiling gains little at the tiny
            preset and costs minutes of compilation per run: docs/performance.md). Not an
            ablation ingredient.
    """

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
    batch_norm_impl: str
    conv_impl: str
    precision: str | None
    channels_last: bool
    cudnn_benchmark: bool
    compile: str | None


INGREDIENTS = tuple(f.name for f in dataclasses.fields(Ingredients) if f.name not in ("cudnn_benchmark", "compile"))
"""The ablation ingredients: every field of :class:`Ingredients` but cudnn_benchmark and compile."""


@dataclass(frozen=True)
class Engine(Ingredients):
    """A named choice of every ingredient (:class:`Ingredients`); ``Engine(name, loader=...,
    ...)``."""

    name: str

    def resolved_precision(self, device: torch.device) -> str:
        if self.precision is not None:
            return self.precision
        return "bf16" if device.type == "cuda" else "fp32"

    def resolved_compile(self, device: torch.device) -> str:
        if self.compile is not None:
            return self.compile
        return "cudagraphs" if device.type == "cuda" else "off"

    def configure(self, cfg: Config) -> Config:
        """A copy of ``cfg`` with the backends this engine chooses (``cfg`` is left unchanged)."""
        return dataclasses.replace(
            cfg,
            model=dataclasses.replace(cfg.model, genblock_impl=self.genblock_impl,
                                      attention_impl=self.attention_impl, spectral_norm_impl=self.spectral_norm_impl,
                                      batch_norm_impl=self.batch_norm_impl, conv_impl=self.conv_impl),
            optim=dataclasses.replace(cfg.optim, implementation=self.adam),
            schedule=dataclasses.replace(cfg.schedule, loss_impl=self.loss_impl, noise_impl=self.noise_impl),
        )

    def execution(self, cfg: Config, device: torch.device, loader: str | None = None,
                  precision: str | None = None, channels_last: bool | None = None, views: str | None = None,
                  compile: str | None = None) -> Execution:
        """The record of a run of this engine on ``device`` whose config is ``cfg``.

        ``loader``, ``precision``, ``channels_last``, ``views`` and ``compile`` are the explicit
        command-line choices (None: the engine's); the backends are read from ``cfg``, which
        holds this engine's (:meth:`configure`) unless ``--set`` changed them. Raises
        ValueError for a compile mode the device cannot run.
        """
        compile = self.resolved_compile(device) if compile is None else compile
        if compile not in COMPILE_MODES:
            raise ValueError(f"unknown compile mode {compile!r}; choose from {', '.join(COMPILE_MODES)}")
        if compile == "cudagraphs" and device.type != "cuda":
            raise ValueError(f"compile mode 'cudagraphs' replays CUDA graphs and needs a CUDA device, not {device}")
        ingredients = {f.name: getattr(self, f.name) for f in dataclasses.fields(Ingredients)}
        ingredients.update(
            adam=cfg.optim.implementation, loss_impl=cfg.schedule.loss_impl, noise_impl=cfg.schedule.noise_impl,
            genblock_impl=cfg.model.genblock_impl, attention_impl=cfg.model.attention_impl,
            spectral_norm_impl=cfg.model.spectral_norm_impl, batch_norm_impl=cfg.model.batch_norm_impl,
            conv_impl=cfg.model.conv_impl,
            precision=self.resolved_precision(device) if precision is None else precision,
            cudnn_benchmark=self.cudnn_benchmark and device.type == "cuda", compile=compile,
        )  # fmt: skip
        for name, explicit in (("loader", loader), ("views", views), ("channels_last", channels_last)):
            if explicit is not None:
                ingredients[name] = explicit
        return Execution(engine=self.name, **ingredients)


@dataclass(frozen=True)
class Execution(Ingredients):
    """How one run executes: its engine's ingredients (:class:`Ingredients`) after the explicit
    command-line options, resolved for the run's device; ``engine`` is the engine's name.

    Built once per run by ``mgm_fast.train.resolve_run`` (a resumed run reads it back from its
    ``config.yaml``) and kept on the run object; the loaders, networks and step context are
    built from it, and ``config.yaml`` holds every field at its top level.

    Resolved: ``precision`` ("fp32", "bf16" or "fp16", never None), ``cudnn_benchmark`` (True
    only on CUDA), ``compile`` ("off", "default" or "cudagraphs", never None). ``adam``,
    ``loss_impl``, ``noise_impl`` and the ``*_impl`` backends repeat the run config's fields of
    those names, for the record; the networks and the schedule read them from the config.
    """

    engine: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, record: dict) -> Execution | None:
        """The record among the entries of ``record`` (extra entries are ignored); None when one
        of its fields is missing (a ``config.yaml`` written before the record was complete).
        A record written when ``compile`` was a flag (true/false) reads as "default"/"off"; one
        written before ``batch_norm_impl`` or ``conv_impl`` existed ran torch's BatchNorm or
        convolutions, "reference"."""
        names = [f.name for f in dataclasses.fields(cls)]
        record = {"batch_norm_impl": "reference", "conv_impl": "reference", **record}
        if any(name not in record for name in names):
            return None
        fields = {name: record[name] for name in names}
        if isinstance(fields["compile"], bool):
            fields["compile"] = "default" if fields["compile"] else "off"
        return cls(**fields)


REFERENCE = Engine("reference", loader="torch", views="per-sample", readback="step", autograd="released",
                   adam="for-loop", loss_impl="reference", noise_impl="reference", genblock_impl="reference",
                   attention_impl="reference", spectral_norm_impl="reference", batch_norm_impl="reference",
                   conv_impl="reference", precision="fp32", channels_last=False, cudnn_benchmark=False, compile="off")
FAST = Engine("fast", loader="auto", views="batched", readback="window", autograd="pruned", adam="auto",
              loss_impl="auto", noise_impl="auto", genblock_impl="auto", attention_impl="auto",
              spectral_norm_impl="auto", batch_norm_impl="auto", conv_impl="auto", precision=None, channels_last=True,
              cudnn_benchmark=True, compile=None)


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
