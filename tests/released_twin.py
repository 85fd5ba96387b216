"""An independent twin of the released MGM network family, for checkpoint-compatibility tests.

Written from ``docs/method.md`` section 1 with plain ``torch.nn`` modules and the hook
form of ``torch.nn.utils.spectral_norm`` (as the released code used), so that ``state_dict()`` of
:class:`ReleasedMGM` with default arguments has exactly the 1,090 names and shapes of a
``torch.save`` of the released code's MGM module (``tests/fixtures/official_checkpoint_layout.json``).

The topology is fixed at 128x128 images (five generator blocks, six discriminator blocks,
self-attention at 32x32); widths, block counts and class counts are arguments whose defaults are
the released values, so tests can build narrow twins cheaply.

This module is a test helper, not a test file (pytest does not collect it).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm

# -------------------------------------------------------------------------------------------
# Multi-task network: taskgrouping ResNet encoder, dense decoders, SimCLR head.


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        short = x if self.downsample is None else self.downsample(x)
        return self.relu(out + short)


def _layer(c_in: int, c_out: int, blocks: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        BasicBlock(c_in, c_out, stride), *[BasicBlock(c_out, c_out, 1) for _ in range(blocks - 1)]
    )


class ResNetEncoder(nn.Module):
    """5x5/2 stem, BN, ReLU, 3x3/2 max-pool, then BasicBlock stages.

    ``first_stride`` is the stride of layer1 (1 in the shared encoder, 2 in the refinement
    net's per-task encoders); every later stage starts with stride 2.
    """

    def __init__(self, c_in: int, stem: int, widths, blocks, first_stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, stem, 5, 2, 2, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        prev = stem
        self.num_layers = len(widths)
        for i, (w, n) in enumerate(zip(widths, blocks)):
            setattr(self, f"layer{i + 1}", _layer(prev, w, n, first_stride if i == 0 else 2))
            prev = w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.num_layers):
            x = getattr(self, f"layer{i + 1}")(x)
        return x


class DenseDecoder(nn.Module):
    """Five x2 stages: ConvTranspose(2,2)+BN+ReLU, then conv3x3+BN+ReLU (last: conv3x3 only)."""

    def __init__(self, c_in: int, widths, c_out: int) -> None:
        super().__init__()
        prev = c_in
        for k, w in enumerate(widths):
            setattr(self, f"upconv{k}", nn.ConvTranspose2d(prev, w, 2, 2))
            setattr(self, f"bn_upconv{k}", nn.BatchNorm2d(w))
            last = k == len(widths) - 1
            setattr(self, f"conv_decode{k}", nn.Conv2d(w, c_out if last else w, 3, 1, 1))
            if not last:
                setattr(self, f"bn_decode{k}", nn.BatchNorm2d(w))
            prev = w
        self.num_stages = len(widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for k in range(self.num_stages):
            x = F.relu(getattr(self, f"bn_upconv{k}")(getattr(self, f"upconv{k}")(x)))
            x = getattr(self, f"conv_decode{k}")(x)
            if k < self.num_stages - 1:
                x = F.relu(getattr(self, f"bn_decode{k}")(x))
        return x


class ClassificationDecoder(nn.Module):
    """The decoder class in classification mode: global average pool, one Linear."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.fc = nn.Linear(c_in, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class MultiTask(nn.Module):
    def __init__(self, num_seg, stem, enc_widths, enc_blocks, dec_widths, clr_dim) -> None:
        super().__init__()
        self.encoder = ResNetEncoder(3, stem, enc_widths, enc_blocks, first_stride=1)
        feat = enc_widths[-1]
        self.ss_decoder = DenseDecoder(feat, dec_widths, num_seg)
        self.de_decoder = DenseDecoder(feat, dec_widths, 1)
        self.sn_decoder = DenseDecoder(feat, dec_widths, 3)
        self.clr_decoder = ClassificationDecoder(feat, clr_dim)

    def forward(self, x: torch.Tensor):
        f = self.encoder(x)
        return self.ss_decoder(f), self.de_decoder(f), self.sn_decoder(f)


# -------------------------------------------------------------------------------------------
# Refinement network.


class PostNet(nn.Module):
    def __init__(self, num_seg, num_scenes, stem, widths, blocks, hidden) -> None:
        super().__init__()
        self.ss_encoder = ResNetEncoder(num_seg, stem, widths, blocks, first_stride=2)
        self.de_encoder = ResNetEncoder(1, stem, widths, blocks, first_stride=2)
        self.nm_encoder = ResNetEncoder(3, stem, widths, blocks, first_stride=2)
        self.fc1 = nn.Linear(3 * widths[-1], hidden)
        self.fc2 = nn.Linear(hidden, num_scenes)

    def forward(self, seg, depth, normal) -> torch.Tensor:
        feats = [
            F.max_pool2d(enc(t), 4).flatten(1)
            for enc, t in ((self.ss_encoder, seg), (self.de_encoder, depth), (self.nm_encoder, normal))
        ]
        h = F.relu(self.fc1(torch.cat(feats, 1)))
        return F.relu(self.fc2(h))


class MiddleNet(nn.Module):
    def __init__(self, feat: int, z_dim: int) -> None:
        super().__init__()
        self.fc = spectral_norm(nn.Linear(feat, z_dim))
        self.bn = nn.BatchNorm1d(z_dim)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(F.adaptive_avg_pool2d(feat, 1).flatten(1)))


# -------------------------------------------------------------------------------------------
# SAGAN generator and projection discriminator.


def snconv(c_in: int, c_out: int, k: int) -> nn.Module:
    return spectral_norm(nn.Conv2d(c_in, c_out, k, 1, k // 2))


class SelfAttn(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.snconv1x1_theta = snconv(c, c // 8, 1)
        self.snconv1x1_phi = snconv(c, c // 8, 1)
        self.snconv1x1_g = snconv(c, c // 2, 1)
        self.snconv1x1_attn = snconv(c // 2, c, 1)
        self.sigma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        theta = self.snconv1x1_theta(x).view(b, c // 8, h * w)
        phi = F.max_pool2d(self.snconv1x1_phi(x), 2).view(b, c // 8, h * w // 4)
        attn = torch.softmax(torch.bmm(theta.transpose(1, 2), phi), dim=-1)  # (b, N, N/4)
        g = F.max_pool2d(self.snconv1x1_g(x), 2).view(b, c // 2, h * w // 4)
        o = torch.bmm(g, attn.transpose(1, 2)).view(b, c // 2, h, w)
        return x + self.sigma * self.snconv1x1_attn(o)


class CondBN(nn.Module):
    def __init__(self, c: int, num_classes: int) -> None:
        super().__init__()
        self.c = c
        self.bn = nn.BatchNorm2d(c, momentum=0.001, affine=False)
        self.embed = nn.Embedding(num_classes, 2 * c)
        with torch.no_grad():
            self.embed.weight[:, :c].fill_(1.0)
            self.embed.weight[:, c:].zero_()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.embed(y).chunk(2, 1)
        return gamma[:, :, None, None] * self.bn(x) + beta[:, :, None, None]


class GenBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, num_classes: int) -> None:
        super().__init__()
        self.cond_bn1 = CondBN(c_in, num_classes)
        self.snconv2d1 = snconv(c_in, c_out, 3)
        self.cond_bn2 = CondBN(c_out, num_classes)
        self.snconv2d2 = snconv(c_out, c_out, 3)
        self.snconv2d0 = snconv(c_in, c_out, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = F.interpolate(F.relu(self.cond_bn1(x, y)), scale_factor=2, mode="nearest")
        h = self.snconv2d2(F.relu(self.cond_bn2(self.snconv2d1(h), y)))
        return h + self.snconv2d0(F.interpolate(x, scale_factor=2, mode="nearest"))


class Generator(nn.Module):
    def __init__(self, z_dim: int, g: int, num_classes: int) -> None:
        super().__init__()
        self.g = g
        self.snlinear0 = spectral_norm(nn.Linear(z_dim, 16 * g * 4 * 4))
        self.block1 = GenBlock(16 * g, 16 * g, num_classes)
        self.block2 = GenBlock(16 * g, 8 * g, num_classes)
        self.block3 = GenBlock(8 * g, 4 * g, num_classes)
        self.self_attn = SelfAttn(4 * g)
        self.block4 = GenBlock(4 * g, 2 * g, num_classes)
        self.block5 = GenBlock(2 * g, g, num_classes)
        self.bn = nn.BatchNorm2d(g, eps=1e-5, momentum=0.0001, affine=True)
        self.snconv2d1 = snconv(g, 3, 3)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.snlinear0(z).view(z.shape[0], 16 * self.g, 4, 4)
        h = self.block3(self.block2(self.block1(h, y), y), y)
        h = self.self_attn(h)
        h = self.block5(self.block4(h, y), y)
        return torch.tanh(self.snconv2d1(F.relu(self.bn(h))))


class DiscOptBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.snconv2d1 = snconv(c_in, c_out, 3)
        self.snconv2d2 = snconv(c_out, c_out, 3)
        self.snconv2d0 = snconv(c_in, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.avg_pool2d(self.snconv2d2(F.relu(self.snconv2d1(x))), 2)
        return h + self.snconv2d0(F.avg_pool2d(x, 2))


class DiscBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.snconv2d1 = snconv(c_in, c_out, 3)
        self.snconv2d2 = snconv(c_out, c_out, 3)
        self.snconv2d0 = snconv(c_in, c_out, 1)  # built even where the forward never uses it
        self.ch_mismatch = c_in != c_out

    def forward(self, x: torch.Tensor, downsample: bool = True) -> torch.Tensor:
        # The released block's first ReLU is in place on its input, which the shortcut also
        # holds: the shortcut (identity or 1x1 conv) therefore reads relu(x), not x.
        short = x
        x = F.relu(x, inplace=True)
        h = self.snconv2d2(F.relu(self.snconv2d1(x)))
        if downsample or self.ch_mismatch:
            short = self.snconv2d0(short)
        if downsample:
            h, short = F.avg_pool2d(h, 2), F.avg_pool2d(short, 2)
        return h + short


class Discriminator(nn.Module):
    def __init__(self, d: int, num_classes: int) -> None:
        super().__init__()
        self.opt_block1 = DiscOptBlock(3, d)
        self.block1 = DiscBlock(d, 2 * d)
        self.self_attn = SelfAttn(2 * d)
        self.block2 = DiscBlock(2 * d, 4 * d)
        self.block3 = DiscBlock(4 * d, 8 * d)
        self.block4 = DiscBlock(8 * d, 16 * d)
        self.block5 = DiscBlock(16 * d, 16 * d)
        self.snlinear1 = spectral_norm(nn.Linear(16 * d, 1))
        self.sn_embedding1 = spectral_norm(nn.Embedding(num_classes, 16 * d))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.self_attn(self.block1(self.opt_block1(x)))
        h = self.block4(self.block3(self.block2(h)))
        h = F.relu(self.block5(h, downsample=False))
        h = h.sum(dim=(2, 3))
        return self.snlinear1(h).squeeze(1) + (h * self.sn_embedding1(y)).sum(1)


# -------------------------------------------------------------------------------------------
# The whole family, rooted as the released MGM module.


class ReleasedMGM(nn.Module):
    def __init__(
        self,
        num_seg: int = 40,
        num_scenes: int = 27,
        stem: int = 64,
        enc_widths=(48, 96, 192, 360),
        enc_blocks=(3, 4, 6, 3),
        dec_widths=(256, 128, 64, 48, 32),
        clr_dim: int = 64,
        post_stem: int = 64,
        post_widths=(48, 96, 192),
        post_blocks=(3, 4, 3),
        post_hidden: int = 128,
        z_dim: int = 128,
        g_conv_dim: int = 64,
        d_conv_dim: int = 64,
    ) -> None:
        super().__init__()
        self.multi_model = MultiTask(num_seg, stem, enc_widths, enc_blocks, dec_widths, clr_dim)
        self.post_model = PostNet(num_seg, num_scenes, post_stem, post_widths, post_blocks, post_hidden)
        self.middle_net = MiddleNet(enc_widths[-1], z_dim)
        self.G = Generator(z_dim, g_conv_dim, num_scenes)
        self.D = Discriminator(d_conv_dim, num_scenes)


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every tensor of ``model`` with seeded, well-scaled random values.

    Weights get fan-in scaled normals, BN affine parameters and running statistics random
    values (variances positive), ``num_batches_tracked`` random counts, conditional-BN
    embeddings gamma near 1 and beta near 0, self-attention ``sigma`` a nonzero value, and
    spectral-norm ``u``/``v`` random unit vectors. Nothing is left at its initial value.
    """
    gen = torch.Generator().manual_seed(seed)

    def normal(t: torch.Tensor, std: float, mean: float = 0.0) -> None:
        t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float64) * std + mean)

    for name, t in model.state_dict(keep_vars=True).items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "num_batches_tracked":
            t.fill_(int(torch.randint(1, 1000, (1,), generator=gen)))
        elif leaf in ("weight_u", "weight_v"):
            normal(t, 1.0)
            t.div_(t.norm())
        elif leaf == "sigma":
            normal(t, 0.3, 0.7)
        elif leaf == "running_mean":
            normal(t, 0.1)
        elif leaf == "running_var":
            t.copy_(torch.rand(t.shape, generator=gen, dtype=torch.float64) * 1.5 + 0.5)
        elif name.endswith("embed.weight"):  # conditional BN: gamma | beta
            c = t.shape[1] // 2
            normal(t[:, :c], 0.2, 1.0)
            normal(t[:, c:], 0.2)
        elif t.dim() == 1:  # biases and BN affine parameters
            is_bn_weight = leaf == "weight"
            normal(t, 0.1, 1.0 if is_bn_weight else 0.0)
        else:  # conv / linear / embedding weights; a transposed conv's fan-in is dim 0
            fan_in = t.shape[0] if "upconv" in name else t[0].numel()
            normal(t, fan_in**-0.5)
    return model


def as_our_layout(twin: ReleasedMGM) -> SimpleNamespace:
    """The twin's modules regrouped under our container names (``multitask.decoders.seg``, ...).

    The returned namespace shares the twin's modules, so it exercises the name mapping of
    ``mgm_fast.compat`` without our own model code.
    """
    mm, post = twin.multi_model, twin.post_model
    multitask = nn.Module()
    multitask.encoder = mm.encoder
    multitask.decoders = nn.ModuleDict(
        {"seg": mm.ss_decoder, "depth": mm.de_decoder, "normal": mm.sn_decoder}
    )
    multitask.clr_head = mm.clr_decoder
    refine = nn.Module()
    refine.encoders = nn.ModuleDict(
        {"seg": post.ss_encoder, "depth": post.de_encoder, "normal": post.nm_encoder}
    )
    refine.fc1, refine.fc2 = post.fc1, post.fc2
    return SimpleNamespace(
        multitask=multitask, refine=refine, bridge=twin.middle_net, generator=twin.G, discriminator=twin.D
    )
