"""GAN losses of MGM as fused ops: hinge losses and instance noise.

* ``hinge_d_loss(d_real, d_fake, *, impl="auto")`` -- mean ReLU(1 - D(real)) + mean
  ReLU(1 + D(fake)), 0-dim float32 (reference: :func:`hinge_d_reference`).
* ``hinge_g_loss(d_fake, *, impl="auto")`` -- -mean D(fake), 0-dim float32 (reference:
  :func:`hinge_g_reference`).
* ``noisy(x, std, seed_or_generator, *, return_noise=False, impl="auto")`` -- instance noise
  x + std * N(0, 1) of x's shape, dtype and device (reference: :func:`instance_noise` with a
  generator seeded or given); differentiable w.r.t. x (the identity).
  ``return_noise=True`` returns ``(out, noise)`` with the float32 draw, so tests can check
  ``out == x + std * noise`` exactly.

Backends:

* hinge losses: ``reference`` and ``triton`` (one launch for the loss, one for both
  gradients). The scores are B values; there is no ``cpp`` / ``cuda`` backend because a pass
  over B floats costs less than a kernel launch -- on the CPU the eager reference is the
  fast path.
* ``noisy``: ``reference`` (torch.randn, then x + std * noise), ``triton`` (CUDA; the draw
  happens inside the kernel, so no noise tensor is written and read back: one read of x, one
  write of the result) and ``cpp`` (CPU float32, OpenMP, csrc/kernels/cpu/gan_noise.*).

``torch.compile``: the fused backends run behind the custom ops ``mgm_fast::noisy_cpp``,
``mgm_fast::noisy_triton``, ``mgm_fast::hinge_d_triton``, ``mgm_fast::hinge_g_triton`` (with
their autograd formulas) and the hinge losses' ``..._backward`` ops (:mod:`mgm_fast.ops._library`).
``noisy`` traces with an int seed; drawing the key from a ``torch.Generator`` does not trace
(dynamo does not take generator arguments), so with a generator it runs outside compiled code, as
in the training schedule.

The noise streams. ``reference`` draws with ``torch.randn`` (the generator's Philox/MT stream).
The fused backends draw a different, documented stream: Philox4x32-10 keyed by a 64-bit seed,
counter q = e // 4 for element e (e = position in memory), Box-Muller on the two pairs of
uniforms of each counter, lane e % 4 (exactly Triton's ``tl.randn4x(seed, q)``). ``triton`` and
``cpp`` therefore produce the same integers and normals equal to a few ulp (their log / sin /
cos implementations differ), but NOT the numbers torch.randn would give for the same seed. Both
are N(0, 1) and independent across elements; the tests check moments, neighbour and lane
correlations, reproducibility for equal seeds, and ``out == x + std * noise``.
:func:`noisy_twin` evaluates that stream in plain torch (its integers bit for bit,
:func:`philox_uniforms`; the normals in float64 or float32): the twin of the self-test cases.

``seed_or_generator``: an int in [0, 2^63) is the Philox key itself (reference: a fresh
torch.Generator on x's device seeded with it), equal seeds give equal noise. A
``torch.Generator`` advances: the fused backends draw their key from it (a CPU generator on the
host; a CUDA generator on the device, read by the kernel, so no host synchronisation), the
reference draws its noise from it. A dense x of any dimension order (channels_last included) is
processed in memory order and the result keeps x's strides; other strides are made contiguous
first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mgm_fast.ops._dispatch import cpp_backend, define_op, native_function, reference_backend, triton_backend
from mgm_fast.ops._library import once_differentiable, or_placeholder, placeholder, qualname

__all__ = [
    "HINGE_D_OP",
    "HINGE_G_OP",
    "NOISY_OP",
    "hinge_d_loss",
    "hinge_d_reference",
    "hinge_g_loss",
    "hinge_g_reference",
    "instance_noise",
    "noisy",
]

_SEED_LIMIT = 2**63


# ---------------------------------------------------------------------------------------------
# checks


def _check_scores(name: str, t) -> None:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a floating tensor of discriminator scores, got {got}")


def _check_noise_args(x, std, seed_or_generator) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"noisy: x must be a floating tensor, got {got}")
    if not isinstance(std, (int, float)) or not std >= 0:
        raise ValueError(f"noisy: std must be a number >= 0, got {std!r}")
    if isinstance(seed_or_generator, torch.Generator):
        return
    if isinstance(seed_or_generator, bool) or not isinstance(seed_or_generator, int):
        raise ValueError(
            f"noisy: seed_or_generator must be an int seed or a torch.Generator, got {type(seed_or_generator).__name__}"
        )
    if not 0 <= seed_or_generator < _SEED_LIMIT:
        raise ValueError(f"noisy: the seed must lie in [0, 2^63), got {seed_or_generator}")


# ---------------------------------------------------------------------------------------------
# references


def hinge_d_reference(d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss in plain PyTorch: mean ReLU(1 - D(real)) + mean ReLU(1 + D(fake)),
    0-dim float32 (scores of any shapes and float dtypes)."""
    _check_scores("hinge_d_loss: d_real", d_real)
    _check_scores("hinge_d_loss: d_fake", d_fake)
    return F.relu(1.0 - d_real.float()).mean() + F.relu(1.0 + d_fake.float()).mean()


def hinge_g_reference(d_fake: torch.Tensor) -> torch.Tensor:
    """Generator hinge loss in plain PyTorch: -mean D(fake), 0-dim float32."""
    _check_scores("hinge_g_loss: d_fake", d_fake)
    return -d_fake.float().mean()


def _draw(x: torch.Tensor, std: float, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + std * noise, noise), the noise ``torch.randn`` of x's shape, dtype and device."""
    noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
    return x + std * noise, noise


def instance_noise(x: torch.Tensor, std: float = 0.01, generator: torch.Generator | None = None) -> torch.Tensor:
    """x + N(0, std^2) noise of x's shape, drawn on x's device with ``torch.randn`` (released std
    0.01; ``generator`` None draws from the global generator, as the released code did)."""
    return _draw(x, std, generator)[0]


def _noisy_reference(x, std, seed_or_generator, *, return_noise=False):
    _check_noise_args(x, std, seed_or_generator)
    if isinstance(seed_or_generator, torch.Generator):
        gen = seed_or_generator
    else:
        gen = torch.Generator(device=x.device).manual_seed(seed_or_generator)
    out, noise = _draw(x, std, gen)
    return (out, noise) if return_noise else out


# ---------------------------------------------------------------------------------------------
# fused noise (triton, cpp)


def _fused_seed(seed_or_generator, device: torch.device):
    """The Philox key: the int itself, or one drawn from the generator as a one-element int64
    tensor on the generator's device, which the kernel reads there (no host read-back)."""
    if not isinstance(seed_or_generator, torch.Generator):
        return seed_or_generator
    gen = seed_or_generator
    if gen.device.type == "cpu":
        return torch.randint(0, _SEED_LIMIT - 1, (1,), generator=gen)
    other_index = None not in (gen.device.index, device.index) and gen.device.index != device.index
    if gen.device.type != device.type or other_index:
        raise ValueError(f"noisy: the generator is on {gen.device} but x on {device}")
    return torch.randint(0, _SEED_LIMIT - 1, (1,), generator=gen, device=gen.device)


# custom ops mgm_fast::noisy_<backend> (mgm_fast.ops._library): (out, noise) with the identity as
# the gradient w.r.t. x; the key is an int or (drawn from a generator) a one-element int64 tensor.


def _noise_meta(x, return_noise):
    """out: x's strides when x is dense (memory order is the stream's order), else contiguous;
    noise: float32 in out's strides, or a placeholder."""
    out = torch.empty_strided(x.shape, _dense_strides(x), dtype=x.dtype, device=x.device)
    return out, torch.empty_like(out, dtype=torch.float32) if return_noise else placeholder(x)


def _noise_setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1])


def _noise_backward(ctx, grad_out, _grad_noise):
    return grad_out, None, None, None, None


@torch.library.custom_op(qualname("noisy_cpp"), mutates_args=())
def _cpp_noise_op(x: torch.Tensor, std: float, seed: int, seed_tensor: torch.Tensor | None,
                  return_noise: bool) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """x + std * n (CPU kernel; key ``seed_tensor`` when given, else ``seed``)."""
    kernel = native_function("instance_noise_{device}", "cpu")
    out, noise = kernel(x, std, seed if seed_tensor is None else seed_tensor, return_noise)
    return out, or_placeholder(noise, x)


@_cpp_noise_op.register_fake
def _(x, std, seed, seed_tensor, return_noise):
    return _noise_meta(x, return_noise)


@torch.library.custom_op(qualname("noisy_triton"), mutates_args=())
def _triton_noise_op(x: torch.Tensor, std: float, seed: int, seed_tensor: torch.Tensor | None,
                     return_noise: bool) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """x + std * n (Triton kernel, mgm_fast.ops._triton.gan_losses)."""
    from mgm_fast.ops._triton import gan_losses as tg

    out, noise = tg.noisy(x, std, seed if seed_tensor is None else seed_tensor, return_noise)
    return out, or_placeholder(noise, x)


@_triton_noise_op.register_fake
def _(x, std, seed, seed_tensor, return_noise):
    return _noise_meta(x, return_noise)


for _noise_op in (_cpp_noise_op, _triton_noise_op):
    _noise_op.register_autograd(_noise_backward, setup_context=_noise_setup_context)


def _apply(op, x, std, seed_or_generator, return_noise, cpu_key=False):
    _check_noise_args(x, std, seed_or_generator)
    seed = _fused_seed(seed_or_generator, x.device)
    tensor_seed = isinstance(seed, torch.Tensor)
    if cpu_key and tensor_seed and seed.device.type != "cpu":
        raise ValueError("noisy (cpp backend): pass an int seed or a CPU torch.Generator")
    out, noise = op(x, float(std), 0 if tensor_seed else seed, seed if tensor_seed else None, bool(return_noise))
    return (out, noise) if return_noise else out


def _noisy_triton(x, std, seed_or_generator, *, return_noise=False):
    return _apply(_triton_noise_op, x, std, seed_or_generator, return_noise)


def _noisy_cpp(x, std, seed_or_generator, *, return_noise=False):
    return _apply(_cpp_noise_op, x, std, seed_or_generator, return_noise, cpu_key=True)


def _cpp_noise_reasons(inputs) -> list[str]:
    generator = inputs["seed_or_generator"]
    if isinstance(generator, torch.Generator) and generator.device.type != "cpu":
        return [f"the generator is on {generator.device} (the cpp backend draws its key on the CPU)"]
    return []


# ---------------------------------------------------------------------------------------------
# hinge losses (triton): custom ops mgm_fast::hinge_d_triton / hinge_g_triton with their autograd
# formulas, and their backward ops (the kernels: mgm_fast.ops._triton.gan_losses)


def _scalar_meta(t):
    return torch.empty((), dtype=torch.float32, device=t.device)


@torch.library.custom_op(qualname("hinge_d_triton"), mutates_args=())
def _hinge_d_op(d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """0-dim float32 mean relu(1 - d_real) + mean relu(1 + d_fake)."""
    from mgm_fast.ops._triton import gan_losses as tg

    return tg.hinge_d_forward(d_real, d_fake)


@_hinge_d_op.register_fake
def _(d_real, d_fake):
    return _scalar_meta(d_real)


@torch.library.custom_op(qualname("hinge_d_triton_backward"), mutates_args=())
def _hinge_d_backward_op(d_real: torch.Tensor, d_fake: torch.Tensor,
                         grad_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(grad d_real, grad d_fake), contiguous, in the scores' shapes and dtypes."""
    from mgm_fast.ops._triton import gan_losses as tg

    return tg.hinge_d_backward(d_real, d_fake, grad_output)


@_hinge_d_backward_op.register_fake
def _(d_real, d_fake, grad_output):
    return d_real.new_empty(d_real.shape), d_fake.new_empty(d_fake.shape)


def _hinge_d_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _hinge_d_backward(ctx, grad_output):
    return _hinge_d_backward_op(*ctx.saved_tensors, grad_output)


_hinge_d_op.register_autograd(_hinge_d_backward, setup_context=_hinge_d_setup_context)


@torch.library.custom_op(qualname("hinge_g_triton"), mutates_args=())
def _hinge_g_op(d_fake: torch.Tensor) -> torch.Tensor:
    """0-dim float32 -mean d_fake."""
    from mgm_fast.ops._triton import gan_losses as tg

    return tg.hinge_g_forward(d_fake)


@_hinge_g_op.register_fake
def _(d_fake):
    return _scalar_meta(d_fake)


@torch.library.custom_op(qualname("hinge_g_triton_backward"), mutates_args=())
def _hinge_g_backward_op(d_fake: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """grad d_fake = -grad_output / numel, contiguous, in d_fake's shape and dtype (d_fake is read
    for its metadata only)."""
    from mgm_fast.ops._triton import gan_losses as tg

    return tg.hinge_g_backward(d_fake.shape, d_fake.device, d_fake.dtype, grad_output)


@_hinge_g_backward_op.register_fake
def _(d_fake, grad_output):
    return d_fake.new_empty(d_fake.shape)


def _hinge_g_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _hinge_g_backward(ctx, grad_output):
    return _hinge_g_backward_op(*ctx.saved_tensors, grad_output)


_hinge_g_op.register_autograd(_hinge_g_backward, setup_context=_hinge_g_setup_context)
once_differentiable(_hinge_d_backward_op, "hinge_d_loss (triton backend)")
once_differentiable(_hinge_g_backward_op, "hinge_g_loss (triton backend)")


def _hinge_d_triton(d_real, d_fake):
    _check_scores("hinge_d_loss: d_real", d_real)
    _check_scores("hinge_d_loss: d_fake", d_fake)
    if d_real.device != d_fake.device:
        raise ValueError(f"hinge_d_loss: d_real is on {d_real.device} but d_fake on {d_fake.device}")
    return _hinge_d_op(d_real, d_fake)


def _hinge_g_triton(d_fake):
    _check_scores("hinge_g_loss: d_fake", d_fake)
    return _hinge_g_op(d_fake)


# ---------------------------------------------------------------------------------------------
# dispatch

HINGE_D_OP = define_op("hinge_d_loss", "discriminator hinge loss, fused fwd/bwd",
                       [reference_backend(hinge_d_reference), triton_backend(_hinge_d_triton)])  # fmt: skip
HINGE_G_OP = define_op("hinge_g_loss", "generator hinge loss, fused fwd/bwd",
                       [reference_backend(hinge_g_reference), triton_backend(_hinge_g_triton)])  # fmt: skip
NOISY_OP = define_op(
    "noisy",
    "instance noise x + std * N(0, 1), drawn in-kernel",
    [
        reference_backend(_noisy_reference),
        triton_backend(_noisy_triton),
        cpp_backend(_noisy_cpp, extra_check=_cpp_noise_reasons),
    ],
)


def hinge_d_loss(d_real: torch.Tensor, d_fake: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """mean ReLU(1 - d_real) + mean ReLU(1 + d_fake), 0-dim float32 (any shapes)."""
    return HINGE_D_OP(d_real, d_fake, impl=impl)


def hinge_g_loss(d_fake: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """-mean d_fake, 0-dim float32 (any shape)."""
    return HINGE_G_OP(d_fake, impl=impl)


def noisy(
    x: torch.Tensor,
    std: float,
    seed_or_generator: int | torch.Generator,
    *,
    return_noise: bool = False,
    impl: str = "auto",
):
    """x + std * N(0, 1) (x's shape, dtype, device); ``(out, noise)`` with ``return_noise``.
    See the module docstring for the streams of the backends."""
    return NOISY_OP(x, std, seed_or_generator, return_noise=return_noise, impl=impl)


# ---------------------------------------------------------------------------------------------
# float64 twins and self-test cases (mgm_fast.ops._selftest)

_PHILOX_ROUND = (0xD2511F53, 0xCD9E8D57)  # multipliers of counter words 0 and 2
_PHILOX_KEY_STEP = (0x9E3779B9, 0xBB67AE85)
_UNIFORM_SCALE = 4.6566127342e-10  # Triton's uint_to_uniform_float (rounded to float32)
_UNIFORM_FLOOR = 1.0e-7  # Box-Muller's floor of the radius uniform (float32, as the kernels)
_UNIFORM_FLOOR_F32 = float(torch.tensor(_UNIFORM_FLOOR, dtype=torch.float32))  # its float32 value, once


def philox_uniforms(seed: int, groups: int) -> torch.Tensor:
    """(groups, 4) float32 uniforms of the fused noise stream for the counters q < groups.

    Philox4x32-10 keyed by the 64-bit seed (k0 = low word, k1 = high word) on the counter
    (q mod 2^32, q div 2^32, 0, 0); each output word as int32, negatives complemented, times
    4.6566127342e-10 in float32 -- exactly Triton's ``tl.rand4x(seed, q)`` and the CPU kernel
    (csrc/kernels/cpu/gan_noise.cpp), bit for bit (numpy integer arithmetic).
    """
    import numpy as np

    q = np.arange(groups, dtype=np.uint64)
    mask = np.uint64(0xFFFFFFFF)
    c = [q & mask, q >> np.uint64(32), np.zeros(groups, np.uint64), np.zeros(groups, np.uint64)]
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64((seed >> 32) & 0xFFFFFFFF)
    a_mul, b_mul = np.uint64(_PHILOX_ROUND[0]), np.uint64(_PHILOX_ROUND[1])
    for _ in range(10):  # words held in uint64, always < 2^32: the products cannot overflow
        p0, p2 = c[0] * a_mul, c[2] * b_mul
        c = [(p2 >> np.uint64(32)) ^ c[1] ^ k0, p2 & mask, (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & mask]
        k0, k1 = (k0 + np.uint64(_PHILOX_KEY_STEP[0])) & mask, (k1 + np.uint64(_PHILOX_KEY_STEP[1])) & mask
    v = np.stack(c, axis=1).astype(np.uint32).view(np.int32)
    folded = np.where(v < 0, ~v, v)
    return torch.from_numpy(folded.astype(np.float32) * np.float32(_UNIFORM_SCALE))


def philox_normals(seed: int, n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The first n normals of the fused noise stream, element e = lane e % 4 of counter e // 4:
    Box-Muller on the float32 uniforms (u0, u1) -> (r cos 2 pi u1, r sin 2 pi u1),
    (u2, u3) -> lanes 2, 3, with r = sqrt(-2 log max(u, 1e-7)), evaluated in ``dtype``
    (float64: the truth the kernels approximate; float32: a plain evaluation)."""
    u = philox_uniforms(seed, (n + 3) // 4).to(dtype)
    radius = u[:, 0::2].clamp_min(_UNIFORM_FLOOR_F32)
    r = torch.sqrt(-2 * torch.log(radius))
    t = 2 * torch.pi * u[:, 1::2]
    z = torch.stack((r[:, 0] * torch.cos(t[:, 0]), r[:, 0] * torch.sin(t[:, 0]),
                     r[:, 1] * torch.cos(t[:, 1]), r[:, 1] * torch.sin(t[:, 1])), dim=1)  # fmt: skip
    return z.reshape(-1)[:n]


def _dense_strides(x: torch.Tensor) -> tuple[int, ...]:
    expected, dense = 1, True
    for stride, size in sorted((st, sz) for st, sz in zip(x.stride(), x.shape) if sz != 1):
        if stride != expected:
            dense = False
            break
        expected *= size
    return x.stride() if dense and x.numel() else torch.empty(x.shape).stride()


def noisy_twin(x, std, seed_or_generator, *, return_noise=False):
    """:func:`noisy` with the fused backends' Philox stream (not torch.randn's), in x's dtype:
    the float64 truth of the self-test, and in float32 / float16 / bfloat16 the plain path (the
    normals computed in float32, rounded to x's dtype like a ``torch.randn`` draw, then
    ``x + std * noise`` in x's dtype). Element e of x's memory order takes normal e."""
    _check_noise_args(x, std, seed_or_generator)
    seed = _fused_seed(seed_or_generator, x.device)
    if isinstance(seed, torch.Tensor):
        seed = int(seed)
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    flat = philox_normals(seed, x.numel(), work).to(device=x.device, dtype=x.dtype)
    noise = flat.as_strided(x.shape, _dense_strides(x))
    out = x + std * noise
    return (out, noise) if return_noise else out


def hinge_d_float64(d_real, d_fake):
    """mean ReLU(1 - d_real) + mean ReLU(1 + d_fake) in the inputs' dtype (the reference
    accumulates in float32)."""
    return torch.relu(1.0 - d_real).mean() + torch.relu(1.0 + d_fake).mean()


def hinge_g_float64(d_fake):
    """-mean d_fake in the input's dtype."""
    return -d_fake.mean()


def _scores(gen, shape):
    """Discriminator scores ~ 1.5 N(0, 1) on a grid of 2^-6 (exact in every test dtype), the 3rd
    and 4th of every five exactly on a hinge (+1, -1): relu'(0) = 0 as in torch."""
    s = torch.round(1.5 * torch.randn(shape, generator=gen, dtype=torch.float64) * 64) / 64
    s.view(-1)[2::5] = 1.0
    s.view(-1)[3::5] = -1.0
    return s


def _hinge_d_cases():
    from mgm_fast.ops._selftest import Case, Inputs

    def make(real_shape, fake_shape):
        def build(gen):
            return Inputs(kwargs=dict(d_real=_scores(gen, real_shape), d_fake=_scores(gen, fake_shape)),
                          grad=("d_real", "d_fake"))  # fmt: skip

        return build

    specs = [("b1", "small", (1,), (1,)), ("real (37,), fake (20, 1)", "small", (37,), (20, 1)),
             ("patch scores (3, 1, 5, 5)", "small", (3, 1, 5, 5), (3, 1, 5, 5)),
             ("paper: D(real), D(fake) (32,)", "paper", (32,), (32,))]  # fmt: skip
    return [Case("hinge_d_loss", name, size, make(r, f), truth=hinge_d_float64) for name, size, r, f in specs]


def _hinge_g_cases():
    from mgm_fast.ops._selftest import Case, Inputs

    def make(shape):
        def build(gen):
            return Inputs(kwargs=dict(d_fake=_scores(gen, shape)), grad=("d_fake",))

        return build

    specs = [("b1", "small", (1,)), ("(37, 1)", "small", (37, 1)), ("paper: D(G(z)) (32,)", "paper", (32,))]
    return [
        Case("hinge_g_loss", name, size, make(shape), truth=hinge_g_float64) for name, size, shape in specs
    ]


def _noisy_cases():
    from mgm_fast.ops._selftest import Case, Inputs

    def make(shape, std, seed, return_noise):
        def build(gen):
            x = torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1  # images in [-1, 1]
            return Inputs(kwargs=dict(x=x, std=std, seed_or_generator=seed, return_noise=return_noise),
                          grad=("x",))  # fmt: skip

        return build

    specs = [  # name, size, shape, std, seed, return_noise
        ("(3, 5, 7) (a partial group of 4), std 0.3, seed 2^40 + 17, with its draw", "small", (3, 5, 7), 0.3,
         2**40 + 17, True),
        ("b1 (1, 3, 13, 11), std 1, seed 2^63 - 1, with its draw", "small", (1, 3, 13, 11), 1.0, 2**63 - 1, True),
        ("b2 (2, 3, 9, 6), std 0.01 (released), seed 5", "small", (2, 3, 9, 6), 0.01, 5, False),
        ("paper: D input (32, 3, 128, 128), std 0.01, with its draw", "paper", (32, 3, 128, 128), 0.01, 1234,
         True),
    ]  # fmt: skip
    # x stays out of channels_last: the stream follows memory order, and the truth is evaluated
    # on contiguous inputs.
    return [Case("noisy", name, size, make(shape, std, seed, rn), truth=noisy_twin, plain=noisy_twin)
            for name, size, shape, std, seed, rn in specs]  # fmt: skip


HINGE_D_OP.selftest_cases = _hinge_d_cases
HINGE_G_OP.selftest_cases = _hinge_g_cases
NOISY_OP.selftest_cases = _noisy_cases
