"""The MGM networks and a container holding all of them.

``build_models(cfg)`` returns :class:`MGMNets` with ``multitask`` (encoder, dense decoders,
SimCLR head), ``refine`` (refinement network), ``bridge`` (the released "middle net"),
``generator`` and ``discriminator``. Inside every block the tensor names are the released
code's; only the containers are renamed (multi_model -> multitask, ss/de/sn_decoder ->
decoders.seg/depth/normal, clr_decoder -> clr_head, post_model -> refine, ss/de/nm_encoder ->
encoders.seg/depth/normal, middle_net -> bridge, G -> generator, D -> discriminator), so a
released checkpoint maps onto ``MGMNets.state_dict()`` by prefix alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mgm_fast.config import ModelConfig
from mgm_fast.models.bridge import Bridge
from mgm_fast.models.gan import Discriminator, GenBlock, Generator
from mgm_fast.models.layers import (
    BasicBlock,
    ConditionalBatchNorm2d,
    SelfAttention,
    SNConv2d,
    SNEmbedding,
    SNLinear,
)
from mgm_fast.models.multitask import TASKS, DenseDecoder, Encoder, MultiTaskNet, ProjectionHead
from mgm_fast.models.refinement import RefinementNet

__all__ = [
    "TASKS",
    "BasicBlock",
    "Bridge",
    "ConditionalBatchNorm2d",
    "DenseDecoder",
    "Discriminator",
    "Encoder",
    "GenBlock",
    "Generator",
    "MGMNets",
    "MultiTaskNet",
    "ProjectionHead",
    "RefinementNet",
    "SNConv2d",
    "SNEmbedding",
    "SNLinear",
    "SelfAttention",
    "build_models",
    "count_parameters",
    "parameter_report",
]


class MGMNets(nn.Module):
    """Every network of MGM in one module (one state dict, one ``.to()``); it has no forward.

    Attributes: ``cfg`` (the :class:`ModelConfig` it was built from), ``tasks``,
    ``multitask`` (:class:`MultiTaskNet`), ``refine`` (:class:`RefinementNet`), ``bridge``
    (:class:`Bridge`), ``generator`` (:class:`Generator`), ``discriminator``
    (:class:`Discriminator`).
    """

    def __init__(self, cfg: ModelConfig, tasks: Sequence[str] = TASKS) -> None:
        super().__init__()
        self.cfg = cfg
        self.multitask = MultiTaskNet(cfg, tasks)
        self.tasks = self.multitask.tasks
        self.refine = RefinementNet(cfg, tasks)
        self.bridge = Bridge(cfg.feature_dim, cfg.z_dim)
        self.generator = Generator(cfg)
        self.discriminator = Discriminator(cfg)


def build_models(
    cfg: ModelConfig, tasks: Sequence[str] = TASKS, device: torch.device | str | None = None
) -> MGMNets:
    """Build all networks for ``cfg`` (float32, training mode) on ``device`` (CPU by default;
    "meta" builds shapes only, without memory or initialisation cost)."""
    if device is None:
        return MGMNets(cfg, tasks)
    with torch.device(device):
        return MGMNets(cfg, tasks)


def count_parameters(module: nn.Module) -> int:
    """Number of parameter elements (buffers such as BN statistics and SN u/v excluded)."""
    return sum(p.numel() for p in module.parameters())


def parameter_report(cfg: ModelConfig, tasks: Sequence[str] = TASKS) -> dict[str, int]:
    """Parameter counts per network, built on the meta device (no memory, instant).

    Keys: encoder, decoder_<task> for each task, clr_head, multitask (encoder + decoders +
    head), refinement, bridge, generator, discriminator, total.
    """
    nets = build_models(cfg, tasks, device="meta")
    mt = nets.multitask
    report = {"encoder": count_parameters(mt.encoder)}
    for task, decoder in mt.decoders.items():
        report[f"decoder_{task}"] = count_parameters(decoder)
    report["clr_head"] = count_parameters(mt.clr_head)
    report["multitask"] = count_parameters(mt)
    report["refinement"] = count_parameters(nets.refine)
    report["bridge"] = count_parameters(nets.bridge)
    report["generator"] = count_parameters(nets.generator)
    report["discriminator"] = count_parameters(nets.discriminator)
    report["total"] = count_parameters(nets)
    return report
