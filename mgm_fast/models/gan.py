"""SAGAN generator and projection discriminator (docs/method.md 1.4), for any power-of-two image
size >= 32 with the channel plans of ``ModelConfig.g_mults`` / ``d_mults``.

At the paper preset (128x128, g = d = 64, 27 scenes):

* G: SN-Linear z (B, 128) -> (B, 1024, 4, 4); GenBlocks 1024-1024-512-256 (32x32), self-attention,
  GenBlocks 256-128-64 (128x128); BN, ReLU, SN-conv3x3 -> 3, tanh -> (B, 3, 128, 128) in [-1, 1].
* D: OptBlock 3->64 (64x64), DiscBlock 64->128 (32x32), self-attention, DiscBlocks to 1024 at
  4x4, a last non-downsampling 1024->1024 block, ReLU, global sum pool h (B, 1024);
  output SN-Linear(h) + <h, SN-Embedding[y]> -> (B,).

Labels y are int64 (B,) scene indices. Images and latents are float in the parameters' dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mgm_fast.config import ModelConfig
from mgm_fast.models.layers import (
    ConditionalBatchNorm2d,
    SelfAttention,
    SNConv2d,
    SNEmbedding,
    SNLinear,
    SpectralNormLayer,
    in_layout_of,
    refreshes_spectral_norm,
    use_conv_impl,
)
from mgm_fast.ops import BackendUnavailable
from mgm_fast.ops import genblock as genblock_ops

GENBLOCK_IMPLS = ("reference", "auto", "cpp", "cuda", "triton")
"""Backends a :class:`GenBlock` accepts (``model.genblock_impl``). "reference" runs the op's
reference :func:`mgm_fast.ops.genblock.genblock_reference` on the block's own modules; the
others go through :func:`mgm_fast.ops.genblock.genblock`
("auto" picks the fastest backend that supports the inputs; a forced one that cannot run them
raises :class:`~mgm_fast.ops.BackendUnavailable` at the forward). The generator's output head
(BN, ReLU, conv3x3) uses the same backend through :func:`mgm_fast.ops.genblock.cbn_relu_conv3x3`."""


def init_gan_(module: nn.Module) -> None:
    """SAGAN init: Xavier-uniform for every SN linear/conv/embedding weight, biases 0.

    Conditional-BN embeddings (plain ``nn.Embedding``) and BN affine parameters keep their own
    initialisation (gamma 1, beta 0), as in the released code.
    """
    for m in module.modules():
        if isinstance(m, SpectralNormLayer):
            nn.init.xavier_uniform_(m.weight_orig)
            bias = getattr(m, "bias", None)
            if bias is not None:
                nn.init.zeros_(bias)


def _fusable(impl: str, *bns: nn.Module) -> bool:
    """Whether the fused op reproduces these BN layers: plain BatchNorm2d with running statistics
    and (for a GenBlock's two CBNs) one momentum, eps and mode. Anything else -- e.g. the
    SyncBatchNorm of multi-process training, whose statistics span all ranks -- runs the module
    path when impl is "auto"; a forced backend raises instead of silently changing semantics."""
    plain = all(type(bn) is nn.BatchNorm2d and bn.track_running_stats for bn in bns)
    same = len({(bn.momentum, bn.eps, bn.training) for bn in bns}) == 1
    if plain and same:
        return True
    if impl == "auto":
        return False
    raise BackendUnavailable(
        f"genblock impl {impl!r}: the fused op implements BatchNorm2d with running statistics and one "
        f"momentum/eps/mode per block; got {[type(bn).__name__ for bn in bns]} "
        "(use impl='auto' or 'reference')"
    )


class GenBlock(nn.Module):
    """Generator residual block: conditional BN, ReLU, nearest x2, SN-conv3x3, conditional BN,
    ReLU, SN-conv3x3; shortcut nearest x2 then SN-conv1x1 (always present).

    ``impl`` (:data:`GENBLOCK_IMPLS`): "reference" is the module path, the op's reference
    :func:`mgm_fast.ops.genblock.genblock_reference` run on this block's layers;
    anything else calls the fused op :func:`mgm_fast.ops.genblock.genblock` with the effective
    (spectrally normalised) weights -- ``sn_weight()``, the weights the generator's batched
    refresh prepared for this forward (one power iteration per conv and forward, exactly as on
    the reference path) -- and the BN buffers, which it updates in place.

    x (B, in_channels, H, W), y (B,) int64 -> (B, out_channels, 2H, 2W).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_classes: int,
        impl: str = "reference",
        cbn_momentum: float = 0.001,
    ) -> None:
        super().__init__()
        if impl not in GENBLOCK_IMPLS:
            raise ValueError(f"unknown GenBlock impl {impl!r}; accepted values: {list(GENBLOCK_IMPLS)}")
        self.impl = impl
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.cond_bn1 = ConditionalBatchNorm2d(in_channels, num_classes, momentum=cbn_momentum)
        self.snconv2d1 = SNConv2d(in_channels, out_channels, 3, padding=1)
        self.cond_bn2 = ConditionalBatchNorm2d(out_channels, num_classes, momentum=cbn_momentum)
        self.snconv2d2 = SNConv2d(out_channels, out_channels, 3, padding=1)
        self.snconv2d0 = SNConv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if self.impl == "reference" or not _fusable(self.impl, self.cond_bn1.bn, self.cond_bn2.bn):
            return genblock_ops.genblock_reference(x, y, self)
        bn1, bn2 = self.cond_bn1.bn, self.cond_bn2.bn
        return genblock_ops.genblock(
            x,
            y,
            self.cond_bn1.embed.weight,
            self.snconv2d1.sn_weight(),
            self.snconv2d1.bias,
            self.cond_bn2.embed.weight,
            self.snconv2d2.sn_weight(),
            self.snconv2d2.bias,
            self.snconv2d0.sn_weight(),
            self.snconv2d0.bias,
            bn1.running_mean,
            bn1.running_var,
            bn2.running_mean,
            bn2.running_var,
            bn1.num_batches_tracked,
            bn2.num_batches_tracked,
            training=bn1.training,
            momentum=bn1.momentum,
            eps=bn1.eps,
            impl=self.impl,
        )

    def _apply(self, fn, recurse=True):
        # The fused kernels read their convolution weights in NCHW (the cpp phase and GEMM
        # algorithms, the CUDA kernel) and return NCHW weight gradients. A network converted to
        # channels_last (Module.to(memory_format=...) goes through _apply) keeps these weights
        # NCHW: no weight copy per call, and none per optimiser step for a layout torch's fused
        # Adam does not walk directly. The values are unchanged. With impl="reference" the plain
        # convolutions follow the network's layout; an "auto" block that falls back to them (a
        # SyncBatchNorm) converts these NCHW weights per call.
        module = super()._apply(fn, recurse)
        if self.impl != "reference":
            with torch.no_grad():
                for conv in (self.snconv2d1, self.snconv2d2, self.snconv2d0):
                    if not conv.weight_orig.is_contiguous():
                        conv.weight_orig.data = conv.weight_orig.data.contiguous()
        return module

    def extra_repr(self) -> str:
        return f"impl={self.impl!r}"


def generator_blocks(cfg: ModelConfig) -> list[tuple[int, int, int]]:
    """(in channels, out channels, input resolution) of each GenBlock of the generator of ``cfg``,
    in order: C_k = g_mults[k] * g_conv_dim, block k+1 upsamples C_k -> C_{k+1} from 4 * 2^k."""
    ch = [m * cfg.g_conv_dim for m in cfg.g_mults]
    return [(ch[k], ch[k + 1], 4 * 2**k) for k in range(len(ch) - 1)]


class Generator(nn.Module):
    """Class-conditional SAGAN generator G(z, y).

    ``snlinear0`` z_dim -> C0*4*4 (C_k = g_mults[k] * g_conv_dim), ``block1..blockN``
    (N = len(g_mults) - 1, each doubling the resolution), ``self_attn`` after the block whose
    output resolution is ``cfg.attn_resolution``, then ``bn`` (BatchNorm2d, momentum 1e-4),
    ReLU, ``snconv2d1`` 3x3 -> 3 channels, tanh.

    z (B, z_dim) float, y (B,) int64 -> (B, 3, image_size, image_size) in [-1, 1]. Each forward
    first prepares the normalised weights of all SN layers at once
    (:func:`~mgm_fast.models.layers.refresh_spectral_norm`).
    """

    def __init__(self, cfg: ModelConfig, impl: str | None = None) -> None:
        super().__init__()
        impl = cfg.genblock_impl if impl is None else impl
        self.impl = impl
        self.spectral_norm_impl = cfg.spectral_norm_impl
        blocks = generator_blocks(cfg)
        self.z_dim = cfg.z_dim
        self.base_channels = blocks[0][0]
        self.snlinear0 = SNLinear(cfg.z_dim, self.base_channels * 4 * 4)
        self.num_blocks = len(blocks)
        self.attn_after: int | None = None
        # Registration order follows the forward order (self_attn between its neighbours), as
        # in the released state dict.
        for k, (cin, cout, res) in enumerate(blocks, start=1):
            setattr(self, f"block{k}", GenBlock(cin, cout, cfg.num_scenes, impl=impl))
            if 2 * res == cfg.attn_resolution:
                self.self_attn = SelfAttention(cout, cfg.attention_impl)
                self.attn_after = k
        if self.attn_after is None:
            valid = [4 * 2**k for k in range(1, self.num_blocks + 1)]
            raise ValueError(
                f"model.attn_resolution={cfg.attn_resolution} is not a generator block output "
                f"resolution for image_size {cfg.image_size}; choose one of {valid}"
            )
        last = blocks[-1][1]
        self.bn = nn.BatchNorm2d(last, eps=1e-5, momentum=1e-4)
        self.snconv2d1 = SNConv2d(last, 3, 3, padding=1)
        init_gan_(self)
        use_conv_impl(self, cfg.conv_impl)

    @refreshes_spectral_norm
    def forward(self, z: Tensor, y: Tensor) -> Tensor:
        seed = self.snlinear0(z).view(z.shape[0], self.base_channels, 4, 4)
        h = in_layout_of(seed, self.snconv2d1.weight_orig)
        for k in range(1, self.num_blocks + 1):
            h = getattr(self, f"block{k}")(h, y)
            if k == self.attn_after:
                h = self.self_attn(h)
        if self.impl == "reference" or not _fusable(self.impl, self.bn):
            return self.snconv2d1(F.relu(self.bn(h))).tanh()
        # The output head BN -> ReLU -> conv3x3 is one fused piece with gamma/beta = BN affine.
        bn, b = self.bn, h.shape[0]
        return genblock_ops.cbn_relu_conv3x3(
            h,
            bn.weight.expand(b, -1),
            bn.bias.expand(b, -1),
            self.snconv2d1.sn_weight(),
            self.snconv2d1.bias,
            bn.running_mean,
            bn.running_var,
            bn.num_batches_tracked,
            training=bn.training,
            momentum=bn.momentum,
            eps=bn.eps,
            upsample=False,
            impl=self.impl,
        ).tanh()


class OptBlock(nn.Module):
    """First discriminator block: SN-conv3x3, ReLU, SN-conv3x3, avg-pool 2; shortcut avg-pool 2
    then SN-conv1x1. (B, in, H, W) -> (B, out, H/2, W/2)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.snconv2d1 = SNConv2d(in_channels, out_channels, 3, padding=1)
        self.snconv2d2 = SNConv2d(out_channels, out_channels, 3, padding=1)
        self.snconv2d0 = SNConv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = F.avg_pool2d(self.snconv2d2(F.relu(self.snconv2d1(x))), 2)
        return h + self.snconv2d0(F.avg_pool2d(x, 2))


class DiscBlock(nn.Module):
    """Pre-activation discriminator block: ReLU, SN-conv3x3, ReLU, SN-conv3x3, avg-pool 2 if
    ``downsample``. The shortcut is SN-conv1x1 then avg-pool, used only when downsampling or when
    the width changes; otherwise it is the identity.

    ``shortcut_after_relu``: the released block applies its first ReLU in place, which also
    rewrites the tensor the shortcut reads, so its shortcut sees relu(x) (True, the released
    behaviour); False gives the textbook block whose shortcut reads x.

    ``keep_unused_shortcut``: a block that needs no shortcut conv still owns ``snconv2d0`` (the
    released code builds it unconditionally); it is never called, so neither its output nor its
    spectral-norm buffers change (:meth:`idle_spectral_norm_layers` keeps it out of the
    network's spectral-norm refresh).

    (B, in, H, W) -> (B, out, H/2, W/2) if downsample else (B, out, H, W).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        downsample: bool = True,
        shortcut_after_relu: bool = True,
        keep_unused_shortcut: bool = True,
    ) -> None:
        super().__init__()
        self.downsample = downsample
        self.shortcut_after_relu = shortcut_after_relu
        self.learnable_shortcut = downsample or in_channels != out_channels
        self.snconv2d1 = SNConv2d(in_channels, out_channels, 3, padding=1)
        self.snconv2d2 = SNConv2d(out_channels, out_channels, 3, padding=1)
        if self.learnable_shortcut or keep_unused_shortcut:
            self.snconv2d0 = SNConv2d(in_channels, out_channels, 1)

    def idle_spectral_norm_layers(self) -> list[nn.Module]:
        """The SN layers this block owns but never calls: the kept unused shortcut."""
        return [] if self.learnable_shortcut or not hasattr(self, "snconv2d0") else [self.snconv2d0]

    def forward(self, x: Tensor) -> Tensor:
        a = F.relu(x)
        h = self.snconv2d2(F.relu(self.snconv2d1(a)))
        shortcut = a if self.shortcut_after_relu else x
        if self.learnable_shortcut:
            shortcut = self.snconv2d0(shortcut)
        if self.downsample:
            h, shortcut = F.avg_pool2d(h, 2), F.avg_pool2d(shortcut, 2)
        return h + shortcut

    def extra_repr(self) -> str:
        return f"downsample={self.downsample}, shortcut_after_relu={self.shortcut_after_relu}"


class Discriminator(nn.Module):
    """Projection discriminator D(x, y).

    ``opt_block1`` (3 -> C0, C_k = d_mults[k] * d_conv_dim), ``block1..blockM``
    (M = len(d_mults) - 1; all downsample except the last), ``self_attn`` after the first stage
    whose output resolution is ``cfg.attn_resolution`` (at 128: after block1, 32x32, 128
    channels), ReLU, global sum pool h, output ``snlinear1``(h) + <h, ``sn_embedding1``[y]>.

    x (B, 3, image_size, image_size) float, y (B,) int64 -> (B,) float. Each forward first
    prepares the normalised weights of all SN layers it calls at once
    (:func:`~mgm_fast.models.layers.refresh_spectral_norm`); :meth:`features` alone does not.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.spectral_norm_impl = cfg.spectral_norm_impl
        ch = [m * cfg.d_conv_dim for m in cfg.d_mults]
        self.num_blocks = len(ch) - 1
        self.attn_after: int | None = None  # 0 = after opt_block1
        resolutions = []
        res = cfg.image_size // 2
        self.opt_block1 = OptBlock(3, ch[0])
        resolutions.append(res)
        if res == cfg.attn_resolution:
            self.self_attn = SelfAttention(ch[0], cfg.attention_impl)
            self.attn_after = 0
        for k in range(1, self.num_blocks + 1):
            down = k < self.num_blocks
            block = DiscBlock(
                ch[k - 1],
                ch[k],
                downsample=down,
                shortcut_after_relu=cfg.d_shortcut_after_relu,
                keep_unused_shortcut=cfg.d_keep_unused_shortcut,
            )
            setattr(self, f"block{k}", block)
            res = res // 2 if down else res
            resolutions.append(res)
            if res == cfg.attn_resolution and self.attn_after is None:
                self.self_attn = SelfAttention(ch[k], cfg.attention_impl)
                self.attn_after = k
        if self.attn_after is None:
            raise ValueError(
                f"model.attn_resolution={cfg.attn_resolution} is not a discriminator stage output "
                f"resolution for image_size {cfg.image_size}; choose one of {sorted(set(resolutions))}"
            )
        self.snlinear1 = SNLinear(ch[-1], 1)
        self.sn_embedding1 = SNEmbedding(cfg.num_scenes, ch[-1])
        init_gan_(self)
        use_conv_impl(self, cfg.conv_impl)

    def features(self, x: Tensor) -> Tensor:
        """Sum-pooled features h: (B, 3, H, W) -> (B, C_last)."""
        h = self.opt_block1(in_layout_of(x, self.opt_block1.snconv2d1.weight_orig))
        if self.attn_after == 0:
            h = self.self_attn(h)
        for k in range(1, self.num_blocks + 1):
            h = getattr(self, f"block{k}")(h)
            if k == self.attn_after:
                h = self.self_attn(h)
        return F.relu(h).sum(dim=(2, 3))

    @refreshes_spectral_norm
    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        h = self.features(x)
        return self.snlinear1(h).squeeze(1) + (h * self.sn_embedding1(y)).sum(dim=1)
