"""Building blocks shared by the MGM networks.

* :class:`SNConv2d`, :class:`SNLinear`, :class:`SNEmbedding` -- spectrally normalised layers.
  Our own implementation (no forward pre-hooks) with exactly the semantics, parameter/buffer
  names and state-dict layout of ``torch.nn.utils.spectral_norm`` as the released code used it:
  parameter ``weight_orig``, buffers ``weight_u`` (size out) and ``weight_v`` (size
  in*kh*kw), one power iteration per call in training mode, none in eval mode.
  :meth:`~SpectralNormLayer.sn_weight` returns the normalised weight so that fused kernels can take
  it as an input. A network whose forward is decorated with :func:`refreshes_spectral_norm`
  computes the weights of all its SN layers at once (:func:`spectral_norm_weights`: foreach
  normalisations, one autograd node for all ``W / sigma``), a few ops per layer instead of
  dozens; the layers then take those weights.
* :class:`BatchNorm2d` and :func:`counts_batches_once` -- ``nn.BatchNorm2d`` whose network
  advances the batch counters of all its layers in one op per forward.
* :class:`ConditionalBatchNorm2d` -- BN without affine, then a per-class gamma/beta.
* :class:`SelfAttention` -- the SAGAN/BigGAN self-attention block with 2x2-pooled keys/values.
* :class:`BasicBlock` -- the ResNet basic block of the taskgrouping encoder.

All modules compute in the dtype of their parameters (float32 unless converted); class labels
are int64 tensors of shape (B,).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mgm_fast.ops.attention import sagan_attention
from mgm_fast.ops.batch_norm import batch_norm_train
from mgm_fast.ops.conv2d import conv2d
from mgm_fast.ops.spectral_norm import normalize_weights

SN_EPS = 1e-12
"""``eps`` of ``torch.nn.utils.spectral_norm`` (used by every normalisation of u and v)."""


class SpectralNormLayer(nn.Module):
    """Spectral-norm state and power iteration, shared by the SN layers.

    Subclasses create ``weight_orig`` (first dimension = output size) and then call
    :meth:`_init_spectral_norm`. The weight is viewed as the matrix
    ``weight_orig.reshape(out, -1)`` (torch's ``dim=0``).

    A network that holds several SN layers prepares all their weights at once at the start of
    its forward (:func:`refresh_spectral_norm`, :func:`refreshes_spectral_norm`); each layer then
    takes the weight prepared for it. A layer called on its own computes its weight itself.
    """

    n_power_iterations: int
    eps: float
    _prepared_weight: Tensor | None = None
    """The normalised weight :func:`refresh_spectral_norm` computed for the next call, if any
    (a plain attribute, not state: checkpoints never see it)."""

    def _init_spectral_norm(self, n_power_iterations: int, eps: float) -> None:
        if n_power_iterations <= 0:
            raise ValueError(f"n_power_iterations must be positive, got {n_power_iterations}")
        self.n_power_iterations = n_power_iterations
        self.eps = eps
        # in the instance from the start: a compiled forward guards on where the attribute lives
        self._prepared_weight = None
        with torch.no_grad():
            w = self.weight_orig
            height = w.shape[0]
            width = w.numel() // height
            # Same draws, in the same order, as torch's spectral_norm: u first, then v.
            u = F.normalize(w.new_empty(height).normal_(0, 1), dim=0, eps=eps)
            v = F.normalize(w.new_empty(width).normal_(0, 1), dim=0, eps=eps)
        self.register_buffer("weight_u", u)
        self.register_buffer("weight_v", v)

    def sn_weight(self) -> Tensor:
        """The spectrally normalised weight ``weight_orig / sigma``, shaped like ``weight_orig``.

        Returns the weight prepared by the enclosing network's :func:`refresh_spectral_norm` when
        there is one (and forgets it: it serves one call), else computes it for this layer alone
        with :func:`spectral_norm_weights`. In training mode that runs ``n_power_iterations``
        power-iteration steps and updates ``weight_u`` / ``weight_v`` in place, so call it exactly once per
        forward pass. In eval mode the stored vectors are used unchanged. Gradients flow into
        ``weight_orig`` through both the numerator and ``sigma = u . (W v)``.
        """
        prepared = self._prepared_weight
        if prepared is not None:
            self._prepared_weight = None
            return prepared
        return spectral_norm_weights([self])[0]


class SNConv2d(SpectralNormLayer):
    """Spectrally normalised ``Conv2d`` (zero padding, groups 1).

    Input (B, in_channels, H, W), output (B, out_channels, H', W'), floating dtype of the
    parameters. Default initialisation is ``nn.Conv2d``'s (kaiming-uniform a=sqrt(5), uniform
    bias), then u and v as in ``torch.nn.utils.spectral_norm``; the GAN re-initialises.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        bias: bool = True,
        n_power_iterations: int = 1,
        eps: float = SN_EPS,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = (kernel_size, kernel_size)
        self.stride = (stride, stride)
        self.padding = (padding, padding)
        weight = torch.empty(out_channels, in_channels, kernel_size, kernel_size)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        # Registration order (bias, weight_orig, weight_u, weight_v) follows the state dict of
        # a torch spectral_norm layer, so checkpoints list tensors in the same order.
        if bias:
            fan_in = in_channels * kernel_size * kernel_size
            bound = 1 / math.sqrt(fan_in)
            self.bias = nn.Parameter(torch.empty(out_channels).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)
        self.weight_orig = nn.Parameter(weight)
        self._init_spectral_norm(n_power_iterations, eps)

    impl: str = "reference"
    """The convolution's backend (``ModelConfig.conv_impl``, :func:`use_conv_impl`; a plain
    attribute)."""

    def forward(self, x: Tensor) -> Tensor:
        if self.impl == "reference":
            return F.conv2d(x, self.sn_weight(), self.bias, self.stride, self.padding)
        return conv2d(x, self.sn_weight(), self.bias, self.stride, self.padding, impl=self.impl)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, bias={self.bias is not None}"
        )


class SNLinear(SpectralNormLayer):
    """Spectrally normalised ``Linear``: (..., in_features) -> (..., out_features).

    Default initialisation is ``nn.Linear``'s, then u and v as in torch's spectral_norm.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        n_power_iterations: int = 1,
        eps: float = SN_EPS,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        weight = torch.empty(out_features, in_features)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        if bias:
            bound = 1 / math.sqrt(in_features)
            self.bias = nn.Parameter(torch.empty(out_features).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)
        self.weight_orig = nn.Parameter(weight)
        self._init_spectral_norm(n_power_iterations, eps)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.sn_weight(), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        )


class SNEmbedding(SpectralNormLayer):
    """Spectrally normalised ``Embedding``: int64 indices (...) -> (..., embedding_dim).

    The weight (num_embeddings, embedding_dim) is normalised as a matrix with ``dim=0``, so
    ``weight_u`` has num_embeddings entries and ``weight_v`` embedding_dim, as in torch.
    Default initialisation is ``nn.Embedding``'s (standard normal).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        n_power_iterations: int = 1,
        eps: float = SN_EPS,
    ) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.weight_orig = nn.Parameter(torch.empty(num_embeddings, embedding_dim).normal_(0, 1))
        self._init_spectral_norm(n_power_iterations, eps)

    def forward(self, idx: Tensor) -> Tensor:
        return F.embedding(idx, self.sn_weight())

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


# -------------------------------------------------------------------------------------------
# Spectral norm of a group of layers: one batched refresh per network forward.


def spectral_norm_weights(layers: Sequence[SpectralNormLayer], impl: str = "reference") -> list[Tensor]:
    """``weight_orig / sigma`` of every layer, computed for the whole group at once by the op
    :func:`mgm_fast.ops.spectral_norm.normalize_weights` (backend ``impl``).

    Training-mode layers run their power iteration (``n_power_iterations`` steps, exactly as
    ``torch.nn.utils.spectral_norm`` does per call) and write the new vectors into their
    ``weight_u`` / ``weight_v`` buffers in place (the buffers keep their storage); eval-mode
    layers use the stored vectors. The iteration and sigma are in the
    buffers' dtype (fp32) even under autocast, which would run the products in bf16 on CUDA.
    Gradients reach each ``weight_orig`` through the numerator and sigma. No value is read on
    the host.

    Returns one tensor per layer, in order, shaped and typed like its ``weight_orig``.
    """
    if not layers:
        return []
    normalised, us, vs = normalize_weights(
        [layer.weight_orig for layer in layers], [layer.weight_u for layer in layers],
        [layer.weight_v for layer in layers], [layer.n_power_iterations if layer.training else 0 for layer in layers],
        [layer.eps for layer in layers], impl=impl)  # fmt: skip
    # The new vectors are written into the buffers (one foreach copy), which keep their storage:
    # CUDA graphs replay reads and writes at fixed addresses, and a buffer rebound to a graph's
    # output would be overwritten by the next replay. The op returned fresh tensors and saved
    # those for backward, so a later forward iterating again before one backward through both
    # (the GAN pattern D(real) + D(fake)) leaves this forward's saved vectors unchanged.
    trained = [i for i, layer in enumerate(layers) if layer.training]
    if trained:
        torch._foreach_copy_([b for i in trained for b in (layers[i].weight_u, layers[i].weight_v)],
                             [t for i in trained for t in (us[i], vs[i])])  # fmt: skip
    return normalised


def spectral_norm_layers(module: nn.Module) -> list[SpectralNormLayer]:
    """The SN layers under ``module`` (itself included) that its forward calls, in registration
    order: every :class:`SpectralNormLayer` except those a submodule reports as never called
    through an ``idle_spectral_norm_layers()`` method (e.g. a kept but unused shortcut)."""
    layers: list[SpectralNormLayer] = []
    idle: list[nn.Module] = []
    for m in module.modules():
        if isinstance(m, SpectralNormLayer):
            layers.append(m)
        report = getattr(m, "idle_spectral_norm_layers", None)
        if report is not None:
            idle.extend(report())
    return [layer for layer in layers if not any(layer is other for other in idle)]


def refresh_spectral_norm(module: nn.Module, impl: str = "reference") -> list[SpectralNormLayer]:
    """Prepare the normalised weight of every SN layer ``module``'s forward calls
    (:func:`spectral_norm_layers`), in one :func:`spectral_norm_weights` call: one power
    iteration per layer, as if each layer ran its own, at a fraction of the ops. Each layer's
    next :meth:`~SpectralNormLayer.sn_weight` returns its prepared weight.

    Layers that still hold a prepared weight are left alone, so that a refreshing network inside
    another one does not iterate twice per forward. Returns the layers it prepared.
    """
    layers = [layer for layer in _listed(module, "_spectral_norm_layers", spectral_norm_layers)
              if layer._prepared_weight is None]  # fmt: skip
    for layer, weight in zip(layers, spectral_norm_weights(layers, impl)):
        layer._prepared_weight = weight
    return layers


def in_layout_of(x: Tensor, like: Tensor) -> Tensor:
    """``x`` (B, C, H, W) in the memory format of the 4-D tensor ``like`` (a network's weight, or
    an activation): channels_last when ``like`` is unambiguously channels_last (the network was
    converted with ``.to(memory_format=torch.channels_last)``), else as it is. A network converts
    its NCHW input (images, the generator's 4x4 seed, the attention output) once, where it enters,
    instead of every convolution converting it again; shapes and values are unchanged."""
    if like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous():
        return x.contiguous(memory_format=torch.channels_last)
    return x


def refreshes_spectral_norm(forward: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator of a network's ``forward``: :func:`refresh_spectral_norm` first (with the
    network's ``spectral_norm_impl`` backend, "reference" when it has none), and afterwards (also
    when the forward raises) drop any prepared weight left unused, so that a layer later called on
    its own never takes a weight of an earlier forward."""

    @functools.wraps(forward)
    def wrapped(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        layers = refresh_spectral_norm(self, getattr(self, "spectral_norm_impl", "reference"))
        try:
            return forward(self, *args, **kwargs)
        finally:
            for layer in layers:
                layer._prepared_weight = None

    return _own_code(wrapped, forward)


def _listed(module: nn.Module, name: str, find: Callable[[nn.Module], list]) -> list:
    """``find(module)``, computed at the module's first call and kept in its ``__dict__`` under
    ``name`` (not a submodule, parameter or buffer): walking every submodule on every forward is
    host time of the step. The networks' layers do not change after they are built; a
    SyncBatchNorm conversion happens before the first forward."""
    found = module.__dict__.get(name)
    if found is None:
        found = find(module)
        module.__dict__[name] = found
    return found


def _own_code(wrapped: Callable[..., Any], forward: Callable[..., Any]) -> Callable[..., Any]:
    """``wrapped`` with a code object of its own, named after ``forward``: torch.compile caches
    compiled frames per code object, and the networks that share a decorator's wrapper would
    otherwise share (and overflow) one cache."""
    wrapped.__code__ = wrapped.__code__.replace(co_name=forward.__name__, co_qualname=forward.__qualname__)
    return wrapped


# -------------------------------------------------------------------------------------------


_BATCH_NORM_WITH_UPDATE = torch.ops.aten._batch_norm_with_update.default


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (same parameters, buffers, state dict and arithmetic) whose batch counter
    its network can advance for all its layers at once.

    In training mode ``nn.BatchNorm2d`` adds 1 to ``num_batches_tracked`` on every call, one tiny
    op per layer. Inside a forward decorated with :func:`counts_batches_once`, a layer instead
    records its counter and the network adds 1 to every recorded counter in one foreach op when
    its forward returns (a layer called twice is counted twice); the layer itself then calls
    ``aten._batch_norm_with_update``, the op ``F.batch_norm`` ends in, directly -- or, with an
    ``impl`` other than "reference" (:func:`use_batch_norm_impl`), the op
    :func:`~mgm_fast.ops.batch_norm.batch_norm_train` (on the CPU, channels_last: the
    extension's kernels). ``layer(x, relu=True, residual=r)`` is ``F.relu(layer(x) + r)``, which
    the op fuses.
    With ``momentum=None`` the counter sets the running-average factor of the call itself, so
    such a layer counts as usual. Called on its own, it is ``nn.BatchNorm2d`` (then ``F.relu``).
    """

    _counted_calls: list[Tensor] | None = None
    """Where a call records its counter while the enclosing network defers the counts (a plain
    attribute, not state)."""
    impl: str = "reference"
    """The backend of the deferred path (``ModelConfig.batch_norm_impl``; a plain attribute)."""

    def forward(self, input: Tensor, relu: bool = False, residual: Tensor | None = None) -> Tensor:
        """BatchNorm of ``input``, plus ``residual``, then ``F.relu`` with ``relu`` (the op fuses
        the three)."""
        if torch.compiler.is_compiling():  # a compiled graph fuses the increments itself
            return add_relu(super().forward(input), relu, residual)
        calls = self._counted_calls
        if calls is None or not (self.training and self.track_running_stats) or self.momentum is None:
            return add_relu(super().forward(input), relu, residual)
        self._check_input_dim(input)
        F._verify_batch_size(input.size())
        calls.append(self.num_batches_tracked)
        if self.impl != "reference":
            return batch_norm_train(input, self.weight, self.bias, self.running_mean, self.running_var,
                                    self.momentum, self.eps, relu, residual, impl=self.impl)  # fmt: skip
        # The op F.batch_norm reaches in training (same backend choice: cuDNN, MIOpen or native),
        # without the empty "reserve" tensor its composite wrapper dispatches on every call.
        return add_relu(_BATCH_NORM_WITH_UPDATE(input, self.weight, self.bias, self.running_mean, self.running_var,
                                                 self.momentum, self.eps)[0], relu, residual)  # fmt: skip


def add_relu(x: Tensor, relu: bool, residual: Tensor | None) -> Tensor:
    """``x + residual`` (when given), then ``F.relu`` with ``relu``."""
    if residual is not None:
        x = x + residual
    return F.relu(x) if relu else x


def use_batch_norm_impl(module: nn.Module, impl: str) -> None:
    """Sets the backend of every :class:`BatchNorm2d` under ``module`` ("reference", "auto" or
    "cpp", :mod:`mgm_fast.ops.batch_norm`); a network calls it once when it is built."""
    for layer in module.modules():
        if isinstance(layer, BatchNorm2d):
            layer.impl = impl


def counts_batches_once(forward: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator of a network's ``forward``: the :class:`BatchNorm2d` layers under the network
    record their calls, and their ``num_batches_tracked`` counters advance in one
    ``_foreach_add_`` after the forward (the values are those of one increment per call). A
    network inside a decorated one leaves the counting to the outer one. Under ``torch.compile``
    the layers count as ``nn.BatchNorm2d`` does (the compiled graph fuses the increments)."""

    @functools.wraps(forward)
    def wrapped(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():  # each layer counts itself inside a compiled graph
            return forward(self, *args, **kwargs)
        layers = _listed(self, "_batch_norm_layers", lambda m: [x for x in m.modules() if isinstance(x, BatchNorm2d)])
        if not layers or any(layer._counted_calls is not None for layer in layers):
            return forward(self, *args, **kwargs)
        calls: list[Tensor] = []
        for layer in layers:  # plain attributes: skip nn.Module.__setattr__'s parameter checks
            layer.__dict__["_counted_calls"] = calls
        try:
            out = forward(self, *args, **kwargs)
        finally:
            for layer in layers:
                layer.__dict__["_counted_calls"] = None
        if calls:
            counters: dict[int, list] = {}
            for counter in calls:  # one foreach entry per counter, its number of calls as the step
                counters.setdefault(id(counter), [counter, 0])[1] += 1
            tensors = [entry[0] for entry in counters.values()]
            steps = [entry[1] for entry in counters.values()]
            if all(step == 1 for step in steps):
                torch._foreach_add_(tensors, 1)
            else:
                torch._foreach_add_(tensors, steps)
        return out

    return _own_code(wrapped, forward)


class ConditionalBatchNorm2d(nn.Module):
    """Class-conditional BatchNorm: ``gamma[y] * BN(x) + beta[y]``.

    ``bn`` is a ``BatchNorm2d`` without affine parameters (batch statistics in training mode,
    running statistics in eval mode); ``embed`` is a plain ``Embedding(num_classes, 2C)`` whose
    first C columns are gamma (initialised to 1) and last C columns beta (initialised to 0).

    Shapes: x (B, C, H, W) float, y (B,) int64 in [0, num_classes) -> (B, C, H, W).
    """

    def __init__(
        self, num_features: int, num_classes: int, momentum: float = 0.001, eps: float = 1e-5
    ) -> None:
        super().__init__()
        self.num_features = num_features
        self.bn = nn.BatchNorm2d(num_features, eps=eps, momentum=momentum, affine=False)
        self.embed = nn.Embedding(num_classes, 2 * num_features)
        self.reset_embedding()

    def reset_embedding(self) -> None:
        """gamma = 1, beta = 0 for every class: the layer starts as a plain BN."""
        with torch.no_grad():
            self.embed.weight[:, : self.num_features].fill_(1.0)
            self.embed.weight[:, self.num_features :].zero_()

    def gamma_beta(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sample gamma and beta, each (B, C)."""
        gamma, beta = self.embed(y).chunk(2, dim=1)
        return gamma, beta

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        gamma, beta = self.gamma_beta(y)
        return gamma[:, :, None, None] * self.bn(x) + beta[:, :, None, None]


class SelfAttention(nn.Module):
    """SAGAN/BigGAN self-attention with 2x2 max-pooled keys and values.

    theta = conv(C -> C/8), phi = maxpool2(conv(C -> C/8)), g = maxpool2(conv(C -> C/2)); the
    attention map is the softmax over the N/4 pooled positions of theta^T phi (N = H*W);
    o = conv(C/2 -> C)(g A^T), the core computed by :func:`mgm_fast.ops.attention.sagan_attention`
    with backend ``impl`` ("reference": the released bmm-softmax-bmm); output x + sigma * o with
    the learnable scalar ``sigma`` (shape [1], initialised to 0, so the block starts as the
    identity). All convs are 1x1 SN convs with bias.

    Shapes: x (B, C, H, W) float with C divisible by 8 and H, W even -> (B, C, H, W).
    """

    def __init__(self, channels: int, impl: str = "reference") -> None:
        super().__init__()
        if channels % 8 != 0:
            raise ValueError(f"self-attention needs channels divisible by 8, got {channels}")
        self.channels = channels
        self.impl = impl
        self.snconv1x1_theta = SNConv2d(channels, channels // 8, 1)
        self.snconv1x1_phi = SNConv2d(channels, channels // 8, 1)
        self.snconv1x1_g = SNConv2d(channels, channels // 2, 1)
        self.snconv1x1_attn = SNConv2d(channels // 2, channels, 1)
        self.sigma = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"self-attention needs an even height and width, got {h}x{w}")
        n = h * w
        theta = self.snconv1x1_theta(x).reshape(b, c // 8, n)
        phi = F.max_pool2d(self.snconv1x1_phi(x), 2).reshape(b, c // 8, n // 4)
        g = F.max_pool2d(self.snconv1x1_g(x), 2).reshape(b, c // 2, n // 4)
        # g softmax(theta^T phi)^T: the released bmm-softmax-bmm ("reference") or a fused backend
        o = sagan_attention(theta, phi, g, impl=self.impl).reshape(b, c // 2, h, w)
        # o is NCHW; the 1x1 conv's weight is layout-ambiguous, so the conv would run (and
        # return) NCHW in a channels_last network: convert o to x's layout instead.
        return x + self.sigma * self.snconv1x1_attn(in_layout_of(o, x))


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters, state dict, initialisation and arithmetic) whose forward is
    the op :func:`~mgm_fast.ops.conv2d.conv2d` with an ``impl`` other than "reference"
    (:func:`use_conv_impl`; on the CPU, channels_last: the algorithm chosen per shape), eager or
    compiled (a compiled graph holds the ATen op of the algorithm chosen while it was traced).
    Groups 1, dilation 1 and zero padding only (what the networks use)."""

    impl: str = "reference"
    """The backend (``ModelConfig.conv_impl``; a plain attribute)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 bias: bool = True) -> None:  # fmt: skip
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, bias=bias)

    def forward(self, input: Tensor) -> Tensor:
        if self.impl == "reference":
            return super().forward(input)
        return conv2d(input, self.weight, self.bias, self.stride, self.padding, impl=self.impl)


def use_conv_impl(module: nn.Module, impl: str) -> None:
    """Sets the backend of every :class:`Conv2d` and :class:`SNConv2d` under ``module``
    ("reference", "auto" or "cpp", :mod:`mgm_fast.ops.conv2d`); a network calls it once when it is
    built."""
    for layer in module.modules():
        if isinstance(layer, (Conv2d, SNConv2d)):
            layer.impl = impl


class BasicBlock(nn.Module):
    """ResNet basic block: conv3x3-BN-ReLU-conv3x3-BN, add the shortcut, ReLU.

    The shortcut is ``downsample`` = Sequential(conv1x1 with the block's stride, no bias; BN)
    when the stride or the width changes, else the identity. Convs have no bias.

    Shapes: (B, in_channels, H, W) -> (B, out_channels, ceil(H/stride), ceil(W/stride)).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = BatchNorm2d(out_channels)
        self.conv2 = Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = BatchNorm2d(out_channels)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                Conv2d(in_channels, out_channels, 1, stride, bias=False),
                BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn1(self.conv1(x), relu=True)
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.bn2(self.conv2(out), relu=True, residual=shortcut)  # relu(bn2(conv2(out)) + shortcut)


def make_layer(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
    """``blocks`` BasicBlocks; the first one changes width/stride, the rest keep them."""
    if blocks < 1:
        raise ValueError(f"a ResNet layer needs at least one block, got {blocks}")
    layers = [BasicBlock(in_channels, out_channels, stride)]
    layers += [BasicBlock(out_channels, out_channels, 1) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def init_resnet_(module: nn.Module) -> None:
    """Taskgrouping ResNet init: Kaiming-normal (fan_out, ReLU) convs, BN weight 1 / bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
