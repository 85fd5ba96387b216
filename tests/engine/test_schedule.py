"""The schedule updates exactly the released parameters, the released number of times.

Adam keeps a per-parameter step counter, so after one training step every optimiser's state
says how often each parameter was updated: a direct check of docs/method.md 3.2's update table.
"""

import pytest
import torch

from mgm_fast.config import preset
from mgm_fast.data.augment import SimCLRAugment
from mgm_fast.data.sample import collate
from mgm_fast.data.synthetic import SyntheticScenes
from mgm_fast.engine import schedule
from mgm_fast.models import build_models


def _setup(**schedule_overrides):
    torch.manual_seed(0)
    cfg = preset("tiny")
    for key, value in schedule_overrides.items():
        setattr(cfg.schedule, key, value)
    nets = build_models(cfg.model)
    ctx = schedule.StepContext(
        cfg=cfg,
        nets=nets,
        optimizers=schedule.build_optimizers(nets, cfg),
        augment=SimCLRAugment(),
        aug_generator=torch.Generator().manual_seed(0),
    )
    data = SyntheticScenes(16, cfg.model.image_size, seed=0)
    batch = collate([data[i] for i in range(cfg.schedule.batch_size)])
    weak = collate([data[i] for i in range(8, 8 + cfg.schedule.batch_size)])
    return ctx, batch, weak


def _steps(opt, module):
    """Set of Adam step counts over the module's parameters in this optimiser (0 = never)."""
    counts = set()
    for p in module.parameters():
        state = opt.state.get(p, {})
        counts.add(int(state["step"]) if "step" in state else 0)
    return counts


def test_mgm_step_update_counts_match_the_released_schedule():
    ctx, batch, _ = _setup()
    schedule.mgm_step(ctx, batch)
    o, n = ctx.optimizers, ctx.nets
    mt = n.multitask
    assert _steps(o["multi"], mt.encoder) == {3}  # steps 1, 3, 6
    assert _steps(o["encoder"], mt.encoder) == {4}  # steps 2, 4b x2, 5
    for decoder in mt.decoders.values():
        assert _steps(o["multi"], decoder) == {1}  # step 1 only
    assert _steps(o["multi"], mt.clr_head) == {2}  # steps 3 and 6
    assert _steps(o["post"], n.refine) == {1}  # step 2 only (not step 5)
    assert _steps(o["middle"], n.bridge) == {2}
    assert _steps(o["G"], n.generator) == {2}
    assert _steps(o["D"], n.discriminator) == {2}
    logged = ctx.pop_means()
    assert set(logged) == {"mt/seg", "mt/depth", "mt/normal", "ref/real", "clr/real", "gan/d", "gan/g",
                           "ref/synth", "clr/synth"}
    assert all(torch.isfinite(v) for v in logged.values())


def test_gan_pretrain_touches_only_g_and_d():
    ctx, batch, _ = _setup()
    enc_before = [p.clone() for p in ctx.nets.multitask.encoder.parameters()]
    bn = ctx.nets.multitask.encoder.bn1
    stats_before = bn.running_mean.clone()
    schedule.gan_pretrain_step(ctx, batch)
    o, n = ctx.optimizers, ctx.nets
    assert _steps(o["G"], n.generator) == {2} and _steps(o["D"], n.discriminator) == {2}
    assert _steps(o["encoder"], n.multitask.encoder) == {0} and _steps(o["middle"], n.bridge) == {0}
    assert all(torch.equal(a, b) for a, b in zip(enc_before, n.multitask.encoder.parameters()))
    # the released unused encoder pass still moves BN running statistics
    assert not torch.equal(stats_before, bn.running_mean)


def test_gan_pretrain_without_the_unused_encoder_pass_leaves_encoder_stats():
    ctx, batch, _ = _setup(phase_a_encoder_pass=False)
    before = ctx.nets.multitask.encoder.bn1.running_mean.clone()
    schedule.gan_pretrain_step(ctx, batch)
    assert torch.equal(before, ctx.nets.multitask.encoder.bn1.running_mean)


def test_mgm_light_update_counts():
    ctx, batch, weak = _setup()
    schedule.mgm_light_step(ctx, batch, weak)
    o, mt = ctx.optimizers, ctx.nets.multitask
    assert _steps(o["multi"], mt.encoder) == {3}  # supervised, clr real, clr weak
    assert _steps(o["encoder"], mt.encoder) == {2}  # ref real, ref weak
    assert _steps(o["post"], ctx.nets.refine) == {1}
    assert _steps(o["G"], ctx.nets.generator) == {0}


def test_supervised_step_decreases_the_loss_on_a_fixed_batch():
    ctx, batch, _ = _setup()
    first = None
    for _ in range(8):
        schedule.supervised_step(ctx, batch)
        total = sum(ctx.pop_means().values())
        first = total if first is None else first
    assert total < first


@pytest.mark.parametrize("target", ["released01", "unit"])
def test_normal_target_encoding(target):
    ctx, batch, _ = _setup(normal_target=target)
    mapped = schedule._normal_target(ctx, batch["normal"])
    expected = (batch["normal"] + 1) / 2 if target == "released01" else batch["normal"]
    assert torch.equal(mapped, expected)


@pytest.mark.parametrize("autograd", ["pruned", "released"])
def test_gradients_reach_adam_in_the_parameters_layout(autograd):
    """A gradient laid out unlike its parameter (here channels_last for an NCHW weight: a
    convolution of a channels_last input) must reach Adam in the parameter's layout: torch's fused CPU Adam walks both in one
    memory order. Both autograd modes give the update of a plain contiguous gradient."""
    from types import SimpleNamespace

    torch.manual_seed(0)
    start = torch.randn(6, 4, 3, 3)
    x = torch.randn(2, 4, 7, 7).contiguous(memory_format=torch.channels_last)

    def loss_of(param):
        return torch.nn.functional.conv2d(x, param).square().sum()  # its weight gradient is channels_last

    def step(param):
        opt = torch.optim.Adam([param], lr=0.1, **schedule.adam_kwargs("fused"))
        ctx = SimpleNamespace(autograd=autograd)
        schedule._backward(ctx, loss_of(param), [opt])
        assert param.grad.stride() == param.stride()
        opt.step()
        return param.detach()

    ours = step(torch.nn.Parameter(start.clone()))
    expected = torch.nn.Parameter(start.clone())
    opt = torch.optim.Adam([expected], lr=0.1, foreach=False)
    loss_of(expected).backward()
    opt.step()
    torch.testing.assert_close(ours, expected.detach(), rtol=1e-6, atol=1e-6)
