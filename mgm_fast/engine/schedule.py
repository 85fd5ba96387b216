"""The MGM training schedule, written once, top to bottom (docs/method.md section 3).

Each function below is one training step of one method, in exactly the released order. Every
sub-step says which loss updates which parameters through which optimiser. Parameters change
between sub-steps, so each sub-step re-runs its forward pass with the latest weights, as the
released code does.

Efficiency never changes the algorithm here:

* modules a sub-step does not update have ``requires_grad`` off for that sub-step (activation
  gradients still flow through them; the released code computed and discarded their weight
  gradients, docs/method.md I3);
* detached branches (the synthesized images of steps 4a and 5) run under ``no_grad``; their
  BatchNorm running statistics and spectral-norm power iterations still happen, as released;
* both are skipped with ``StepContext.autograd="released"`` (the reference engine), which does
  the discarded work as the released code does -- the updates are the same either way;
* ``zero_grad(set_to_none=True)``: parameters without a gradient in a sub-step are skipped by
  Adam -- the released code's behaviour on PyTorch >= 2.0 (docs/method.md B8), pinned here;
* noise and latents are drawn on the device; losses are accumulated on the device and never
  read back inside a step (no host synchronisation).

Batches are dicts in the sample format of :mod:`mgm_fast.data.sample` (already on the device):
``rgb`` (B, 3, H, W) float in [-1, 1], ``seg`` (B, H, W) int64, ``depth``/``depth_mask``
(B, 1, H, W), ``normal`` (B, 3, H, W) unit, ``normal_mask`` (B, 1, H, W) bool, ``scene`` (B,)
int64.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from mgm_fast import losses
from mgm_fast.config import Config
from mgm_fast.data.augment import SimCLRAugment
from mgm_fast.engine import distributed
from mgm_fast.engine.distributed import SINGLE, World
from mgm_fast.models import MGMNets
from mgm_fast.ops import gan_losses
from mgm_fast.ops._dispatch import value_checks
from mgm_fast.ops.gan_losses import hinge_d_loss, hinge_g_loss, noisy
from mgm_fast.ops.multitask_loss import depth_l1, normal_l1, seg_ce
from mgm_fast.ops.multitask_loss import multitask_loss as fused_multitask_loss
from mgm_fast.ops.ntxent import ntxent_loss, ntxent_rows

OPTIMIZER_NAMES = ("multi", "encoder", "post", "middle", "G", "D")


def adam_kwargs(implementation: str) -> dict:
    """Keyword arguments selecting torch's Adam kernel (see OptimConfig.implementation)."""
    if implementation == "auto":
        implementation = "fused"
    return {
        "fused": {"fused": True},
        "foreach": {"foreach": True},
        "for-loop": {"foreach": False},
    }[implementation]


def build_optimizers(nets: MGMNets, cfg: Config) -> dict[str, torch.optim.Adam]:
    """The six Adam optimisers of docs/method.md 3.1 (all of them, whatever the method uses)."""
    o = cfg.optim
    kw = adam_kwargs(o.implementation)
    betas = tuple(o.betas)
    mt = nets.multitask

    def adam(params, lr, wd):
        return torch.optim.Adam(list(params), lr=lr, betas=betas, weight_decay=wd, **kw)

    return {
        "multi": adam(mt.parameters(), o.multi_lr, o.multi_weight_decay),
        "encoder": adam(mt.encoder.parameters(), o.encoder_lr, o.encoder_weight_decay),
        "post": adam(nets.refine.parameters(), o.post_lr, o.post_weight_decay),
        "middle": adam(nets.bridge.parameters(), o.middle_lr, o.middle_weight_decay),
        "G": adam(nets.generator.parameters(), o.g_lr, o.g_weight_decay),
        "D": adam(nets.discriminator.parameters(), o.d_lr, o.d_weight_decay),
    }


@dataclass
class StepContext:
    """Everything a training step touches.

    ``autocast`` is a factory of the precision context (``contextlib.nullcontext`` for fp32);
    ``scaler`` a GradScaler for fp16 or None; ``aug_generator`` the seeded generator of the
    SimCLR views (on the images' device, so that the view parameters are drawn there);
    ``noise_generator`` the run's generator of in-kernel instance noise (on the images' device;
    unused with ``schedule.noise_impl="reference"``); ``totals`` the on-device running sums of
    every logged loss; ``world`` this
    process's place in a torchrun job (gradients are averaged over ranks before every
    optimiser step); ``on_nonfinite`` what a non-finite loss does: ``"stop"`` (the caller
    checks the logged means every log window and stops) or ``"skip"`` (the sub-step is skipped:
    no backward, no optimiser step; one host synchronisation per sub-step), ``skipped`` the
    count of skipped sub-steps per loss name. ``views``, ``readback`` and ``autograd`` are
    execution choices of the engine (:mod:`mgm_fast.engine.engines`): SimCLR views in one
    batched pass or per sample with PIL; losses read back once per log window or after every
    sub-step; weight gradients only where an optimiser applies them ("pruned") or everywhere
    ("released"). ``check_values``: whether ops check label and index values inside a step
    (False: the loaders checked them at the data boundary, so a step reads nothing back; True:
    on every device, a debugging aid; see :func:`mgm_fast.ops._dispatch.value_checks`).
    """

    cfg: Config
    nets: MGMNets
    optimizers: dict[str, torch.optim.Optimizer]
    augment: SimCLRAugment
    aug_generator: torch.Generator
    noise_generator: torch.Generator | None = None
    autocast: callable = contextlib.nullcontext
    scaler: torch.amp.GradScaler | None = None
    world: World = SINGLE
    on_nonfinite: str = "stop"
    views: str = "batched"
    readback: str = "window"
    autograd: str = "pruned"
    check_values: bool | None = False
    cuda_graphs: bool = False
    """The networks replay CUDA graphs (``--compile cudagraphs``): each step begins a new
    generation of replays (:func:`execute`)."""
    totals: dict[str, Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    group_params: dict[str, list[nn.Parameter]] = field(default_factory=dict)
    """The parameters of each module group (:func:`trainable`), listed once: walking the modules
    every sub-step is host time of the step."""

    def log(self, name: str, value: Tensor) -> None:
        value = value.detach().float()
        if self.readback == "step":  # the released code's per-step .item() (a host sync)
            value = torch.tensor(value.item())
        self.totals[name] = self.totals[name] + value if name in self.totals else value.clone()
        self.counts[name] = self.counts.get(name, 0) + 1

    def pop_means(self) -> dict[str, Tensor]:
        """Mean of every logged loss since the last call, still on the device."""
        out = {k: v / self.counts[k] for k, v in self.totals.items()}
        self.totals, self.counts = {}, {}
        return out


# ------------------------------------------------------------------------------------------
# Small helpers shared by every step.


def _groups(nets: MGMNets) -> dict[str, list[nn.Module]]:
    mt = nets.multitask
    return {
        "encoder": [mt.encoder],
        "decoders": list(mt.decoders.values()),
        "clr": [mt.clr_head],
        "refine": [nets.refine],
        "bridge": [nets.bridge],
        "generator": [nets.generator],
        "discriminator": [nets.discriminator],
    }


def trainable(ctx: StepContext, *names: str) -> None:
    """Weights of the named module groups get gradients; every other group's do not (with
    ``autograd="released"``: every group's do, as in the released code)."""
    if not ctx.group_params:
        ctx.group_params.update((group, [p for m in modules for p in m.parameters()])
                                for group, modules in _groups(ctx.nets).items())  # fmt: skip
    for group, params in ctx.group_params.items():
        flag = group in names or ctx.autograd == "released"
        for p in params:
            p.requires_grad_(flag)


def update(ctx: StepContext, loss: Tensor, *optimizers: str, name: str = "") -> bool:
    """Clear the named optimisers' gradients (set to None), backward, average the gradients over
    the ranks (torchrun), step each optimiser in the given order. Returns False when the
    sub-step was skipped (``on_nonfinite="skip"`` and a non-finite loss on any rank)."""
    opts = [ctx.optimizers[name] for name in optimizers]
    if ctx.autograd == "released":  # pruned autograd sets every .grad of the optimisers itself
        for opt in opts:
            opt.zero_grad(set_to_none=True)
    if ctx.on_nonfinite == "skip" and not distributed.all_finite(loss, ctx.world):
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        ctx.skipped[name] = ctx.skipped.get(name, 0) + 1
        return False
    if ctx.scaler is None:
        _backward(ctx, loss, opts)
        _sync_grads(ctx, opts)
        for opt in opts:
            opt.step()
    else:
        _backward(ctx, ctx.scaler.scale(loss), opts)
        _sync_grads(ctx, opts)
        for opt in opts:
            ctx.scaler.step(opt)
        ctx.scaler.update()
    return True


def _backward(ctx: StepContext, loss: Tensor, opts: list[torch.optim.Optimizer]) -> None:
    """The gradients of ``loss`` into the ``.grad`` of the optimisers' parameters.

    ``autograd="pruned"`` asks autograd for exactly those gradients (``torch.autograd.grad``) and
    hands each tensor to its parameter: the same values as ``loss.backward()``, without the
    per-parameter op that accumulating into an empty ``.grad`` dispatches (a ``detach`` per
    parameter per sub-step, ~1,200 ops of an MGM step). Every other parameter of the optimisers
    gets ``grad=None`` (Adam skips it, as after ``zero_grad`` and ``backward``), so no
    ``zero_grad`` is needed before. ``autograd="released"`` runs ``loss.backward()``, which also
    fills the gradients no optimiser of the sub-step reads."""
    if ctx.autograd == "released":
        loss.backward()
        return
    params = []
    for opt in opts:
        for group in opt.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    params.append(p)
                else:
                    p.grad = None
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    for param, grad in zip(params, grads):
        if grad is not None and not _same_layout(grad, param):
            # torch's fused CPU Adam walks a parameter and its gradient in one memory order: a
            # gradient in another layout (channels_last of an NCHW weight) updates the wrong
            # elements. AccumulateGrad copies such a gradient into the parameter's layout; so do we.
            grad = torch.empty_like(param).copy_(grad)
        param.grad = grad


def _same_layout(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` (same shape) lay their elements out in the same memory order:
    equal strides wherever a dimension has more than one element."""
    return all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n > 1)


def _sync_grads(ctx: StepContext, opts: list[torch.optim.Optimizer]) -> None:
    """Average the optimisers' gradients over the torchrun ranks (nothing with one process)."""
    if ctx.world.enabled:
        params = [p for opt in opts for group in opt.param_groups for p in group["params"]]
        distributed.all_reduce_grads(params, ctx.world)


def detached(ctx: StepContext):
    """The context of a branch whose output is detached: ``no_grad``, or with
    ``autograd="released"`` a graph that is built and thrown away, as released."""
    return contextlib.nullcontext() if ctx.autograd == "released" else torch.no_grad()


def _normal_target(ctx: StepContext, normal: Tensor) -> Tensor:
    return (normal + 1) * 0.5 if ctx.cfg.schedule.normal_target == "released01" else normal


def dense_losses(ctx: StepContext, pred: dict[str, Tensor], batch: dict) -> dict[str, Tensor]:
    """L_seg, L_dep, L_nrm of docs/method.md 2 for the configured tasks."""
    s = ctx.cfg.schedule
    tasks = ctx.nets.tasks
    depth_mask = batch["depth_mask"] if s.depth_mask else None
    if set(tasks) == {"seg", "depth", "normal"}:
        seg, dep, nrm = fused_multitask_loss(
            pred["seg"], pred["depth"], pred["normal"],
            batch["seg"], batch["depth"], _normal_target(ctx, batch["normal"]),
            depth_mask, batch["normal_mask"],
            ignore_index=s.seg_ignore_index, reduction=s.loss_reduction, impl=s.loss_impl,
        )
        return {"seg": seg, "depth": dep, "normal": nrm}
    out = {}
    if "seg" in tasks:
        out["seg"] = seg_ce(pred["seg"], batch["seg"], s.seg_ignore_index)
    if "depth" in tasks:
        out["depth"] = depth_l1(pred["depth"], batch["depth"], depth_mask, s.loss_reduction)
    if "normal" in tasks:
        out["normal"] = normal_l1(
            pred["normal"], _normal_target(ctx, batch["normal"]), batch["normal_mask"], s.loss_reduction
        )
    return out


def simclr_loss(ctx: StepContext, images: Tensor) -> Tensor:
    """NT-Xent between the projections of two augmented views (two encoder passes, as released).

    Under torchrun the negatives are the views of the whole global batch: this rank's 2b rows
    against the 2N gathered columns, averaged over the local rows (the scaling convention of
    :mod:`mgm_fast.engine.distributed`), so the averaged gradients equal those of one process
    with the global batch."""
    if ctx.views == "per-sample":
        v1, v2 = ctx.augment.two_views_per_sample(images, ctx.aug_generator)
    else:
        v1, v2 = ctx.augment.two_views(images, ctx.aug_generator)
    mt = ctx.nets.multitask
    z1 = mt.project(mt.features(v1))
    z2 = mt.project(mt.features(v2))
    s = ctx.cfg.schedule
    return ntxent_across_ranks(z1, z2, s.ntxent_temperature, ctx.world, s.loss_impl)


def ntxent_across_ranks(z1: Tensor, z2: Tensor, tau: float, world: World, impl: str = "auto") -> Tensor:
    """NT-Xent of this rank's (b, D) view projections with the negatives of all ranks.

    One process: :func:`mgm_fast.ops.ntxent.ntxent_loss` (= :func:`~mgm_fast.ops.ntxent.ntxent_loss_reference`). Under torchrun: this rank's 2b rows against the 2N
    gathered columns (N = b * world_size), averaged over the local rows -- the local-mean
    convention of :mod:`mgm_fast.engine.distributed`, so the averaged gradients equal those of
    one process computing NT-Xent over the global batch."""
    if not world.enabled:
        return ntxent_loss(z1, z2, tau, impl=impl)
    b, n = z1.shape[0], z1.shape[0] * world.world_size
    cols = torch.cat([distributed.all_gather_cat(z1, world), distributed.all_gather_cat(z2, world)])
    local = torch.arange(world.rank * b, (world.rank + 1) * b, device=z1.device)
    return ntxent_rows(torch.cat([z1, z2]), cols, torch.cat([local, local + n]), tau, impl=impl) / (2 * b)


def refine_loss(ctx: StepContext, images: Tensor, scenes: Tensor) -> Tensor:
    """Scene CE of the refinement net on the multi-task network's raw predictions."""
    pred = ctx.nets.multitask(images)
    return losses.scene_ce(ctx.nets.refine(**pred), scenes)


def latent(ctx: StepContext, x: Tensor | None, batch_size: int, device: torch.device) -> Tensor:
    """z ~ N(0, I), plus Mid(E(x)) when a real batch conditions the generator (phase B)."""
    z = torch.randn(batch_size, ctx.cfg.model.z_dim, device=device)
    if x is None:
        return z
    return z + ctx.nets.bridge(ctx.nets.multitask.features(x))


def instance_noise(ctx: StepContext, x: Tensor) -> Tensor:
    """x + N(0, std^2): torch.randn from the global RNG (released) or drawn in-kernel from the
    run's noise generator (``schedule.noise_impl``)."""
    s = ctx.cfg.schedule
    if s.noise_impl == "reference":
        return gan_losses.instance_noise(x, s.instance_noise_std)
    return noisy(x, s.instance_noise_std, ctx.noise_generator, impl=s.noise_impl)


def d_step(ctx: StepContext, x: Tensor, y: Tensor, conditioned: bool) -> None:
    """D update: hinge loss on real x and a detached G sample, both with instance noise."""
    nets, impl = ctx.nets, ctx.cfg.schedule.loss_impl
    trainable(ctx, "discriminator")
    with ctx.autocast():
        with detached(ctx):
            fake = nets.generator(latent(ctx, x if conditioned else None, x.shape[0], x.device), y).detach()
        d_real = nets.discriminator(instance_noise(ctx, x), y)
        d_fake = nets.discriminator(instance_noise(ctx, fake), y)
        loss = hinge_d_loss(d_real, d_fake, impl=impl)
    if update(ctx, loss, "D", name="gan/d"):
        ctx.log("gan/d", loss)


def g_step(ctx: StepContext, x: Tensor, y: Tensor, conditioned: bool) -> None:
    """G update from the hinge loss; when conditioned, the gradient also reaches Mid and E
    through the latent, and encoder_opt and middle_opt step too (released step 4b)."""
    nets = ctx.nets
    if conditioned:
        trainable(ctx, "generator", "bridge", "encoder")
    else:
        trainable(ctx, "generator")
    with ctx.autocast():
        fake = nets.generator(latent(ctx, x if conditioned else None, x.shape[0], x.device), y)
        loss = hinge_g_loss(nets.discriminator(instance_noise(ctx, fake), y), impl=ctx.cfg.schedule.loss_impl)
    if update(ctx, loss, *(("G", "encoder", "middle") if conditioned else ("G",)), name="gan/g"):
        ctx.log("gan/g", loss)


# ------------------------------------------------------------------------------------------
# The steps of each method.


def supervised_step(ctx: StepContext, batch: dict) -> None:
    """Step 1 (and the whole step of the MT baseline): L_mt = L_seg + L_dep + L_nrm on the
    labelled batch updates the multi-task network (encoder + decoders) through multi_opt."""
    trainable(ctx, "encoder", "decoders")
    with ctx.autocast():
        parts = dense_losses(ctx, ctx.nets.multitask(batch["rgb"]), batch)
        loss = sum(parts.values())
    if update(ctx, loss, "multi", name="mt"):
        for name, value in parts.items():
            ctx.log(f"mt/{name}", value)


def refine_step(ctx: StepContext, x: Tensor, y: Tensor, tag: str, update_refine: bool = True) -> None:
    """L_ref(x, y) on real images -> post_opt (R, when ``update_refine``) and encoder_opt (E)."""
    trainable(ctx, *(("encoder", "refine") if update_refine else ("encoder",)))
    with ctx.autocast():
        loss = refine_loss(ctx, x, y)
    if update(ctx, loss, *(("post", "encoder") if update_refine else ("encoder",)), name=f"ref/{tag}"):
        ctx.log(f"ref/{tag}", loss)


def simclr_step(ctx: StepContext, images: Tensor, tag: str) -> None:
    """L_clr on two views of ``images`` -> multi_opt (encoder + SimCLR head)."""
    trainable(ctx, "encoder", "clr")
    with ctx.autocast():
        loss = simclr_loss(ctx, images)
    if update(ctx, loss, "multi", name=f"clr/{tag}"):
        ctx.log(f"clr/{tag}", loss)


def gan_pretrain_step(ctx: StepContext, batch: dict) -> None:
    """Phase A: gan_iters x (D step, G step) on the real batch, latent z only."""
    x, y = batch["rgb"], batch["scene"]
    for _ in range(ctx.cfg.schedule.gan_iters):
        if ctx.cfg.schedule.phase_a_encoder_pass:
            with detached(ctx), ctx.autocast():
                ctx.nets.multitask.features(x)  # released: computed and unused (BN statistics)
        d_step(ctx, x, y, conditioned=False)
        if ctx.cfg.schedule.phase_a_encoder_pass:
            with detached(ctx), ctx.autocast():
                ctx.nets.multitask.features(x)
        g_step(ctx, x, y, conditioned=False)


def mgm_step(ctx: StepContext, batch: dict) -> None:
    """Phase B: one MGM joint-training step on a labelled batch (docs/method.md 3.2, steps 1-6).

    Per batch: 3 multi_opt steps, 4 encoder_opt steps, 1 post_opt step, gan_iters steps each of
    D_opt, G_opt and middle_opt.
    """
    x, y = batch["rgb"], batch["scene"]
    nets = ctx.nets

    # 1. Supervised multi-task loss -> multi_opt (encoder + decoders).
    supervised_step(ctx, batch)

    # 2. Refinement on real images: L_ref(x, y) -> post_opt (R) and encoder_opt (E).
    refine_step(ctx, x, y, "real")

    # 3. SimCLR on real images: L_clr -> multi_opt (encoder + SimCLR head).
    simclr_step(ctx, x, "real")

    # 4. Encoder-conditioned GAN, gan_iters x: (a) D_opt; (b) G_opt + encoder_opt + middle_opt.
    for _ in range(ctx.cfg.schedule.gan_iters):
        d_step(ctx, x, y, conditioned=True)
        g_step(ctx, x, y, conditioned=True)

    # 5. Refinement on a detached synthesized batch labelled with the real scene labels:
    #    L_ref(x~, y) -> encoder_opt only (R and the decoders are not updated, G gets nothing).
    with detached(ctx), ctx.autocast():
        fake = nets.generator(latent(ctx, x, x.shape[0], x.device), y).float().detach()
    refine_step(ctx, fake, y, "synth", update_refine=False)

    # 6. SimCLR on the synthesized batch: L_clr -> multi_opt (encoder + SimCLR head).
    simclr_step(ctx, fake, "synth")


def mgm_light_step(ctx: StepContext, batch: dict, weak: dict) -> None:
    """MGM-light (docs/method.md 3.3): steps 1-3 on the labelled batch, then on a weakly
    labelled real batch (scene labels only) L_ref -> encoder_opt and L_clr -> multi_opt."""
    x, y = batch["rgb"], batch["scene"]
    supervised_step(ctx, batch)
    refine_step(ctx, x, y, "real")
    simclr_step(ctx, x, "real")
    refine_step(ctx, weak["rgb"], weak["scene"], "weak", update_refine=False)
    simclr_step(ctx, weak["rgb"], "weak")


def execute(step_fn, ctx: StepContext, *batches: dict) -> None:
    """One training step ``step_fn(ctx, *batches)`` as the engines run it: with the ops' value
    checks as ``ctx.check_values`` says (off by default: no host read-backs inside a step).
    With ``ctx.cuda_graphs`` the step first tells torch that a new step begins: the networks'
    graph replays of the previous step are done with, and their memory may be reused."""
    if ctx.cuda_graphs:
        torch.compiler.cudagraph_mark_step_begin()
    with value_checks(ctx.check_values):
        step_fn(ctx, *batches)


def run_steps(step_fn, ctx: StepContext, batches: Iterable[dict]) -> None:
    """:func:`execute` ``step_fn`` on every batch (convenience for tests and tools)."""
    for batch in batches:
        execute(step_fn, ctx, batch)
