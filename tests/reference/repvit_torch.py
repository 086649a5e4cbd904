"""A PyTorch reference of Rep-MedSAM's RepViT encoder, written from the RepViT and Rep-MedSAM
code for the tests.

Module and attribute names follow the reference exactly, so that ``state_dict()`` keys are the
checkpoint's (without the ``image_encoder.`` prefix): ``features.N.token_mixer...``,
``channel_mixer.m.`` for residual channel mixers, ``channel_mixer.`` for the transition block,
``neck.0..3``. ``fuse`` methods and ``replace_batchnorm`` implement the reference's BN folding.
Configurable by a rows list, so it builds both m1_0 and the tiny test variant.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F


def make_divisible(value: float, divisor: int = 8) -> int:
    """RepViT's ``_make_divisible`` (MobileNet rounding with the 10 % correction)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def timm_make_divisible(value: float, divisor: int = 8) -> int:
    """timm's ``make_divisible(v, divisor, round_limit=0)``: the correction never fires."""
    return max(divisor, int(value + divisor / 2) // divisor * divisor)


class Conv2d_BN(nn.Sequential):  # noqa: N801 (the reference's name)
    """Children ``c`` (Conv2d, no bias) and ``bn`` (BatchNorm2d, weight = bn_weight_init)."""

    def __init__(self, a: int, b: int, ks: int = 1, stride: int = 1, pad: int = 0,
                 groups: int = 1, bn_weight_init: float = 1.0):
        super().__init__()
        self.add_module("c", nn.Conv2d(a, b, ks, stride, pad, groups=groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(b))
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.constant_(self.bn.bias, 0.0)

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        conv, bn = self.c, self.bn
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                          conv.padding, groups=conv.groups, bias=True)
        fused.weight.copy_(conv.weight * scale[:, None, None, None])
        fused.bias.copy_(bn.bias - bn.running_mean * scale)
        return fused


class Residual(nn.Module):
    """``x + m(x)`` (drop-path rate 0)."""

    def __init__(self, m: nn.Module):
        super().__init__()
        self.m = m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.m(x)

    def fuse(self) -> nn.Module:
        # The reference folds the identity into a wrapped depthwise-3x3 Conv2d_BN / Conv2d; in
        # this network the wrapped module is always a Sequential, which is returned unchanged so
        # that replace_batchnorm recurses into it. The other cases are not needed here.
        if isinstance(self.m, (Conv2d_BN, nn.Conv2d)):
            raise NotImplementedError("Residual around a single conv does not occur in RepViT")
        return self


class RepVGGDW(nn.Module):
    """``bn(conv(x) + conv1(x) + x)``: dw 3x3 Conv2d_BN, dw 1x1 conv with bias, identity."""

    def __init__(self, ed: int):
        super().__init__()
        self.conv = Conv2d_BN(ed, ed, 3, 1, 1, groups=ed)
        self.conv1 = nn.Conv2d(ed, ed, 1, 1, 0, groups=ed, bias=True)
        self.dim = ed
        self.bn = nn.BatchNorm2d(ed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x) + self.conv1(x) + x)

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        inner = self.conv.fuse()
        weight = inner.weight + F.pad(self.conv1.weight, [1, 1, 1, 1])
        weight[:, 0, 1, 1] += 1.0                         # the identity branch
        bias = inner.bias + self.conv1.bias
        bn = self.bn
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        fused = nn.Conv2d(self.dim, self.dim, 3, 1, 1, groups=self.dim, bias=True)
        fused.weight.copy_(weight * scale[:, None, None, None])
        fused.bias.copy_(bn.bias + (bias - bn.running_mean) * scale)
        return fused


class SqueezeExcite(nn.Module):
    """timm's SEModule(C, rd_ratio): fc1, bn (Identity), act (ReLU), fc2, gate (sigmoid)."""

    def __init__(self, channels: int, rd_ratio: float = 0.25):
        super().__init__()
        reduced = timm_make_divisible(channels * rd_ratio, 8)
        self.fc1 = nn.Conv2d(channels, reduced, 1, bias=True)
        self.bn = nn.Identity()
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(reduced, channels, 1, bias=True)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        s = self.fc2(self.act(self.bn(self.fc1(s))))
        return x * self.gate(s)


class RepViTBlock(nn.Module):
    def __init__(self, inp: int, hidden_dim: int, oup: int, kernel_size: int, stride: int,
                 use_se: bool, use_hs: bool):
        super().__init__()
        assert stride in (1, 2)
        del use_hs  # GELU in both branches
        se = SqueezeExcite(inp, 0.25) if use_se else nn.Identity()
        if stride == 2:
            self.token_mixer = nn.Sequential(
                Conv2d_BN(inp, inp, kernel_size, stride, (kernel_size - 1) // 2, groups=inp),
                se,
                Conv2d_BN(inp, oup, 1, 1, 0),
            )
            self.channel_mixer = Residual(nn.Sequential(
                Conv2d_BN(oup, 2 * oup, 1, 1, 0),
                nn.GELU(),
                Conv2d_BN(2 * oup, oup, 1, 1, 0, bn_weight_init=0.0),
            ))
        else:
            self.token_mixer = nn.Sequential(RepVGGDW(inp), se)
            mixer = nn.Sequential(
                Conv2d_BN(inp, hidden_dim, 1, 1, 0),
                nn.GELU(),
                Conv2d_BN(hidden_dim, oup, 1, 1, 0, bn_weight_init=0.0),
            )
            # Rep-MedSAM's stride-1 width change (features.24): no residual around the mixer.
            self.channel_mixer = Residual(mixer) if inp == oup else mixer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.channel_mixer(self.token_mixer(x))


class LayerNorm2d(nn.Module):
    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class RepViT(nn.Module):
    """``features`` (stem + one block per row) then ``neck``. Input (B, 3, H, W) NCHW."""

    def __init__(self, rows: Sequence[Sequence[int]], stem_strides: tuple[int, int] = (1, 1),
                 neck_channels: int = 256):
        super().__init__()
        channels = rows[0][2]
        stem = nn.Sequential(
            Conv2d_BN(3, channels // 2, 3, stem_strides[0], 1),
            nn.GELU(),
            Conv2d_BN(channels // 2, channels, 3, stem_strides[1], 1),
        )
        layers: list[nn.Module] = [stem]
        for kernel, expansion, c, use_se, use_hs, stride in rows:
            out = make_divisible(c, 8)
            hidden = make_divisible(channels * expansion, 8)
            layers.append(RepViTBlock(channels, hidden, out, kernel, stride, bool(use_se),
                                      bool(use_hs)))
            channels = out
        self.features = nn.ModuleList(layers)
        self.neck = nn.Sequential(
            nn.Conv2d(channels, neck_channels, 1, bias=False),
            LayerNorm2d(neck_channels),
            nn.Conv2d(neck_channels, neck_channels, 3, padding=1, bias=False),
            LayerNorm2d(neck_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.features:
            x = layer(x)
        return self.neck(x)


def replace_batchnorm(net: nn.Module) -> None:
    """Rep-MedSAM ``utils.replace_batchnorm``: fuse every child with ``fuse`` (and recurse into
    the result), turn free BatchNorm2d into Identity, recurse into everything else."""
    for name, child in net.named_children():
        if hasattr(child, "fuse"):
            fused = child.fuse()
            setattr(net, name, fused)
            replace_batchnorm(fused)
        elif isinstance(child, nn.BatchNorm2d):
            setattr(net, name, nn.Identity())
        else:
            replace_batchnorm(child)


@torch.no_grad()
def randomize(module: nn.Module, seed: int = 0, calibration: torch.Tensor | None = None
              ) -> nn.Module:
    """Make every BatchNorm and LayerNorm non-trivial: weight U(0.5, 1.5), bias N(0, 0.1),
    running mean N(0, 0.1), running variance U(0.5, 2). Conv weights keep PyTorch's random init
    (the caller seeds it). Returns the module, in eval mode.

    calibration: images (B, 3, H, W) to run ``module`` on. The running statistics are then the
    batch statistics of those images (a train-mode pass), the mean shifted by N(0, 0.1) of the
    channel's standard deviation and the variance scaled by U(0.5, 2). With statistics that do
    not match the activations, the image-dependent part of a deep random net's output shrinks
    layer after layer (RepViT m1.0: 4e-3 of an embedding of scale 4); calibrated, two noise
    images give embeddings that differ by O(1), so a test sees every layer."""
    gen = torch.Generator().manual_seed(seed)

    def uniform(t: torch.Tensor, lo: float, hi: float) -> None:
        t.copy_(torch.rand(t.shape, generator=gen) * (hi - lo) + lo)

    def normal(t: torch.Tensor, std: float) -> None:
        t.copy_(torch.randn(t.shape, generator=gen) * std)

    for m in module.modules():
        if isinstance(m, (nn.BatchNorm2d, LayerNorm2d)):
            uniform(m.weight, 0.5, 1.5)
            normal(m.bias, 0.1)
        if isinstance(m, nn.BatchNorm2d):
            normal(m.running_mean, 0.1)
            uniform(m.running_var, 0.5, 2.0)
    if calibration is not None:
        norms = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None                     # a cumulative average: one pass = batch
        module.train()
        module(calibration)
        for norm in norms:
            norm.momentum = 0.1
            std = norm.running_var.sqrt()
            norm.running_mean += torch.randn(std.shape, generator=gen) * 0.1 * std
            norm.running_var *= torch.rand(std.shape, generator=gen) * 1.5 + 0.5
    return module.eval()


def build_reference(rows: Sequence[Sequence[int]], stem_strides: tuple[int, int] = (1, 1),
                    neck_channels: int = 256, seed: int = 0,
                    calibration: torch.Tensor | None = None) -> RepViT:
    """A seeded, randomised reference in eval mode (``randomize``'s calibration images)."""
    torch.manual_seed(seed)
    return randomize(RepViT(rows, stem_strides, neck_channels), seed, calibration)


def state_dict_numpy(module: nn.Module, prefix: str = "") -> dict:
    """``{prefix + key: numpy array}`` as the converters expect."""
    return {prefix + k: v.detach().numpy() for k, v in module.state_dict().items()}


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
