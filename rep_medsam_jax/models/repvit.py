"""Rep-MedSAM's image encoder: a RepViT (Wang et al., "RepViT: Revisiting Mobile CNN From ViT
Perspective", CVPR 2024) with a stride-1 stem and a stride-1 last stage, plus SAM's neck
(Rep-MedSAM's ``repvit.py`` and ``repvit_cfgs.py``).

Two forms of the same network, chosen by ``deploy``:

* training form (``deploy=False``): every convolution that the reference follows with a
  BatchNorm is a ``ConvBN`` (conv without bias + ``TorchBatchNorm``), and every stride-1 token
  mixer is a ``RepVGGDW`` (depthwise 3x3 conv+BN, depthwise 1x1 conv with bias, identity, outer BN).
  Variables: ``{"params", "batch_stats"}``. This is the form checkpoints are converted into and
  the form that trains.
* deploy form (``deploy=True``): each ``ConvBN`` and each ``RepVGGDW`` is a single convolution
  with bias (RepViT's ``fuse``). Variables: ``{"params"}`` only; ``models.folding.fold`` maps the
  training form's variables onto it.

Everything is NHWC. Padding is explicit and symmetric, as PyTorch's (never ``'SAME'``: for a
stride-2 conv on an even input ``'SAME'`` pads (0, 1) and shifts the sampling grid).

Parameter tree (training form; the deploy form drops every ``bn`` and the RepVGGDW branches)::

    stem/conv_bn1/{conv, bn}, stem/conv_bn2/{conv, bn}
    block_N/  (N = the reference's ``features.N`` index, 1..len(rows))
        token_mixer/{dw3x3/{conv, bn}, dw1x1, bn}        stride 1: RepVGGDW
        token_mixer/{conv, bn}                           stride 2: depthwise ConvBN
        se/{fc1, fc2}                                    if the row asks for SE
        projection/{conv, bn}                            stride 2 only: 1x1 in -> out
        channel_mixer/{expand/{conv, bn}, project/{conv, bn}}
    neck/{conv1, norm1, conv2, norm2}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rep_medsam_jax.models.config import RepViTConfig
from rep_medsam_jax.models.layers import LayerNorm2d, gelu, torch_padding

BN_MOMENTUM = 0.9     # Flax keeps `momentum` of the old statistic: 1 - PyTorch's 0.1.
BN_EPSILON = 1e-5


class TorchBatchNorm(nn.Module):
    """BatchNorm over the last axis that updates its running statistics as PyTorch does.

    Train mode normalises with the batch mean and the *biased* batch variance (two passes, not
    E[x^2] - E[x]^2) and folds the *unbiased* variance, n / (n - 1) times the biased one with
    n = B*H*W, into ``var`` (``torch.nn.BatchNorm2d``; flax's ``nn.BatchNorm`` folds the biased
    one). Variables and numerics are otherwise flax's: params ``scale`` / ``bias``, batch_stats
    ``mean`` / ``var``. x: (..., C) -> (..., C).
    """

    use_running_average: bool
    momentum: float = BN_MOMENTUM
    epsilon: float = BN_EPSILON
    scale_init: Callable[..., jax.Array] = nn.initializers.ones

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        axes = tuple(range(x.ndim - 1))
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32),
                                (features,))
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32),
                               (features,))
        scale = self.param("scale", self.scale_init, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        if self.use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            # Statistics in (at least) float32, the variance in two passes.
            wide = x.astype(jnp.promote_types(x.dtype, jnp.float32))
            mean = wide.mean(axes)
            var = jnp.square(wide - mean).mean(axes)
            if not self.is_initializing():
                count = int(np.prod(x.shape[:-1]))
                unbiased = var * (count / max(count - 1, 1))
                ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
                ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * unbiased
        multiplier = jax.lax.rsqrt(var + self.epsilon) * scale
        y = (x - mean) * multiplier + bias
        return y.astype(jnp.result_type(x, scale, bias))


# --- PyTorch-like initialisation (only matters when training from scratch) ---------------------

# PyTorch's Conv2d/Linear weight init, kaiming_uniform(a=sqrt(5)), is U(-1/sqrt(fan_in), ...):
# a variance scaling of 1/3 with a uniform distribution gives exactly that bound.
torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int) -> Callable[..., jax.Array]:
    """PyTorch's default bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / float(fan_in) ** 0.5

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


# --- Channel arithmetic ---------------------------------------------------------------------

def make_divisible(value: float, divisor: int = 8) -> int:
    """RepViT's ``_make_divisible``: round to a multiple of ``divisor``, never dropping > 10 %."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def se_reduced_channels(channels: int, ratio: float = 0.25, divisor: int = 8) -> int:
    """timm's ``make_divisible(channels * ratio, 8, round_limit=0)``: no 10 % correction.

    56 -> 16, 112 -> 32, 224 -> 56, 448 -> 112 (timm ``SqueezeExcite(C, 0.25)``).
    """
    return max(divisor, int(channels * ratio + divisor / 2) // divisor * divisor)


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One RepViT block, derived from a config row.

    ``kind`` is "downsample" (stride 2), "identity" (stride 1, in == out; residual channel mixer)
    or "transition" (stride 1, in != out; channel mixer WITHOUT residual, as RepViT builds it).
    ``stage`` counts from 1; a new stage starts at every block that changes stride or width.
    """

    index: int                 # the reference's features.N index (the stem is 0)
    in_channels: int
    hidden_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    use_se: bool
    stage: int
    last_in_stage: bool

    @property
    def kind(self) -> str:
        if self.stride == 2:
            return "downsample"
        return "identity" if self.in_channels == self.out_channels else "transition"


def block_specs(config: RepViTConfig) -> list[BlockSpec]:
    """The blocks of ``config.rows`` in order, with widths as the reference computes them."""
    specs: list[BlockSpec] = []
    in_channels = config.stem_channels[1]
    stage = 1
    rows = list(config.rows)
    for i, (kernel, expansion, channels, use_se, _use_hs, stride) in enumerate(rows):
        if stride not in (1, 2):
            raise ValueError(f"row {i}: stride must be 1 or 2, got {stride}")
        out_channels = make_divisible(channels, 8)
        starts_stage = stride == 2 or in_channels != out_channels
        if starts_stage and specs:
            stage += 1
            specs[-1] = dataclasses.replace(specs[-1], last_in_stage=True)
        if stride == 2:
            hidden = 2 * out_channels          # the reference hard-codes 2 * oup here
        else:
            hidden = make_divisible(in_channels * expansion, 8)
        specs.append(BlockSpec(index=i + 1, in_channels=in_channels, hidden_channels=hidden,
                               out_channels=out_channels, kernel_size=kernel, stride=stride,
                               use_se=bool(use_se), stage=stage, last_in_stage=False))
        in_channels = out_channels
    if specs:
        specs[-1] = dataclasses.replace(specs[-1], last_in_stage=True)
    return specs


# --- Building blocks ------------------------------------------------------------------------

def _conv(features: int, kernel_size: int, *, stride: int = 1, padding: int = 0,
          groups: int = 1, use_bias: bool, fan_in: int, name: str) -> nn.Conv:
    """An ``nn.Conv`` (one ``lax.conv_general_dilated``) with PyTorch's explicit symmetric
    padding and default initialisation."""
    return nn.Conv(features, (kernel_size, kernel_size), strides=(stride, stride),
                   padding=torch_padding(kernel_size, padding), feature_group_count=groups,
                   use_bias=use_bias, kernel_init=torch_kernel_init,
                   bias_init=torch_bias_init(fan_in), name=name)


class ConvBN(nn.Module):
    """The reference's Conv2d_BN: conv (no bias) then BatchNorm; deploy form: one conv with bias.

    x: (B, H, W, C_in) -> (B, H / stride, W / stride, features). ``bn_weight_init`` is the BN
    weight at initialisation (0 for the last conv of every channel mixer).
    """

    features: int
    kernel_size: int = 1
    stride: int = 1
    padding: int = 0
    groups: int = 1
    bn_weight_init: float = 1.0
    deploy: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        fan_in = x.shape[-1] // self.groups * self.kernel_size ** 2
        y = _conv(self.features, self.kernel_size, stride=self.stride, padding=self.padding,
                  groups=self.groups, use_bias=self.deploy, fan_in=fan_in, name="conv")(x)
        if self.deploy:
            return y
        return TorchBatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                              epsilon=BN_EPSILON,
                              scale_init=nn.initializers.constant(self.bn_weight_init),
                              name="bn")(y)


class RepVGGDW(nn.Module):
    """Depthwise token mixer: ``bn(dw3x3_bn(x) + dw1x1(x) + x)``; deploy form: one dw 3x3 conv.

    x: (B, H, W, C) -> (B, H, W, C). No activation.
    """

    deploy: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        channels = x.shape[-1]
        if self.deploy:
            return _conv(channels, 3, padding=1, groups=channels, use_bias=True, fan_in=9,
                         name="conv")(x)
        branch3 = ConvBN(channels, 3, 1, 1, groups=channels, name="dw3x3")(x, train)
        branch1 = _conv(channels, 1, groups=channels, use_bias=True, fan_in=1, name="dw1x1")(x)
        return TorchBatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                              epsilon=BN_EPSILON, name="bn")(branch3 + branch1 + x)


class SqueezeExcite(nn.Module):
    """timm's SEModule with ratio 0.25: per-channel gate from the spatial mean.

    x: (B, H, W, C) -> (B, H, W, C). ``fc1``/``fc2`` are Dense layers on the pooled (B, C) vector
    (the reference's 1x1 convs on a 1x1 map).
    """

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        reduced = se_reduced_channels(channels)
        pooled = jnp.mean(x, axis=(1, 2))
        hidden = nn.relu(nn.Dense(reduced, kernel_init=torch_kernel_init,
                                  bias_init=torch_bias_init(channels), name="fc1")(pooled))
        gate = nn.sigmoid(nn.Dense(channels, kernel_init=torch_kernel_init,
                                   bias_init=torch_bias_init(reduced), name="fc2")(hidden))
        return x * gate[:, None, None, :]


class ChannelMixer(nn.Module):
    """1x1 expand + GELU + 1x1 project (BN weight 0 at init), with or without the residual.

    x: (B, H, W, C_in) -> (B, H, W, out_channels). ``residual`` needs C_in == out_channels.
    """

    hidden_channels: int
    out_channels: int
    residual: bool = True
    deploy: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        y = ConvBN(self.hidden_channels, deploy=self.deploy, name="expand")(x, train)
        y = ConvBN(self.out_channels, bn_weight_init=0.0, deploy=self.deploy,
                   name="project")(gelu(y), train)
        return x + y if self.residual else y


class RepViTBlock(nn.Module):
    """Token mixer (spatial, depthwise) then channel mixer; no outer skip (RepViT's
    ``RepViTBlock``).

    x: (B, H, W, in) -> (B, H / stride, W / stride, out).
    """

    spec: BlockSpec
    deploy: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        spec, deploy = self.spec, self.deploy
        if spec.kind == "downsample":
            x = ConvBN(spec.in_channels, spec.kernel_size, stride=2,
                       padding=(spec.kernel_size - 1) // 2, groups=spec.in_channels,
                       deploy=deploy, name="token_mixer")(x, train)
            if spec.use_se:
                x = SqueezeExcite(name="se")(x)
            x = ConvBN(spec.out_channels, deploy=deploy, name="projection")(x, train)
            return ChannelMixer(spec.hidden_channels, spec.out_channels, residual=True,
                                deploy=deploy, name="channel_mixer")(x, train)
        x = RepVGGDW(deploy=deploy, name="token_mixer")(x, train)
        if spec.use_se:
            x = SqueezeExcite(name="se")(x)
        return ChannelMixer(spec.hidden_channels, spec.out_channels,
                            residual=spec.kind == "identity", deploy=deploy,
                            name="channel_mixer")(x, train)


class Stem(nn.Module):
    """Two 3x3 ConvBNs with a GELU between them (none after). x: (B, H, W, 3) -> (B, H', W', C)."""

    channels: tuple[int, int]
    strides: tuple[int, int]
    deploy: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = ConvBN(self.channels[0], 3, self.strides[0], 1, deploy=self.deploy,
                   name="conv_bn1")(x, train)
        return ConvBN(self.channels[1], 3, self.strides[1], 1, deploy=self.deploy,
                      name="conv_bn2")(gelu(x), train)


class SamNeck(nn.Module):
    """SAM's neck: 1x1 conv, LayerNorm2d, 3x3 conv (pad 1), LayerNorm2d; convs without bias.

    x: (B, H, W, C) -> (B, H, W, channels).
    """

    channels: int = 256

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = _conv(self.channels, 1, use_bias=False, fan_in=x.shape[-1], name="conv1")(x)
        x = LayerNorm2d(name="norm1")(x)
        x = _conv(self.channels, 3, padding=1, use_bias=False, fan_in=9 * self.channels,
                  name="conv2")(x)
        return LayerNorm2d(name="norm2")(x)


class RepViT(nn.Module):
    """The Rep-MedSAM image encoder.

    ``__call__(x, train)``: x (B, H, W, 3) float in [0, 1] (no normalisation inside) ->
    ``(embedding, features)`` with embedding (B, H / s, W / s, neck_channels), s =
    ``config.out_stride`` (4 for every shipped variant), and ``features`` the named intermediates
    ``"stem"``, ``"stage1"`` .. ``"stageK"`` (output of each stage's last block) and
    ``"neck_in"`` (the last block's output). In training form with ``train=True`` BatchNorm uses
    batch statistics and the call needs ``mutable=["batch_stats"]``; ``train`` is irrelevant in
    deploy form (there is no BatchNorm left).
    """

    config: RepViTConfig
    deploy: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
        config = self.config
        features: dict[str, jax.Array] = {}
        x = Stem(config.stem_channels, config.stem_strides, deploy=self.deploy,
                 name="stem")(x, train)
        features["stem"] = x
        for spec in block_specs(config):
            x = RepViTBlock(spec, deploy=self.deploy, name=f"block_{spec.index}")(x, train)
            if spec.last_in_stage:
                features[f"stage{spec.stage}"] = x
        features["neck_in"] = x
        embedding = SamNeck(config.neck_channels, name="neck")(x)
        return embedding, features


def init_repvit(rng: jax.Array | int, config: RepViTConfig,
                deploy: bool = False) -> dict[str, Any]:
    """Fresh variables with PyTorch's initialisation, ready to train (or to fold).

    Training form: ``{"params", "batch_stats"}`` with conv/Dense weights and biases
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)), BN weight 1 except 0 for every channel mixer's last BN
    (the reference's ``bn_weight_init=0``), BN bias 0, running mean 0, running variance 1,
    LayerNorm2d weight 1 and bias 0. Deploy form: ``{"params"}`` with the same rules.

    The same distributions as ``RepViT(config).init`` (the modules carry these initialisers),
    but drawn on the host with NumPy: a jitted ``init`` compiles one random-number kernel per
    parameter, which takes tens of seconds for m1_0 on a CPU, while this takes milliseconds.
    ``rng`` is a JAX key or an int seed.
    """
    size = 2 * config.out_stride
    abstract = jax.eval_shape(RepViT(config, deploy=deploy).init, jax.random.key(0),
                              jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
    if isinstance(rng, int):
        seed = rng
    else:
        seed = int(jax.random.randint(rng, (), 0, 2 ** 31 - 1))
    generator = np.random.default_rng(seed)
    return {collection: _init_subtree(tree, (collection,), generator)
            for collection, tree in abstract.items()}


def _init_subtree(tree: Mapping[str, Any], path: tuple[str, ...],
                  generator: np.random.Generator) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in tree.items():
        if isinstance(value, Mapping):
            out[name] = _init_subtree(value, path + (name,), generator)
        else:
            out[name] = jnp.asarray(_init_leaf(path + (name,), value.shape, tree, generator))
    return out


def _init_leaf(path: tuple[str, ...], shape: tuple[int, ...], siblings: Mapping[str, Any],
               generator: np.random.Generator) -> np.ndarray:
    """PyTorch's default value for one leaf, decided by its place in the tree."""
    name, owner = path[-1], path[-2]
    if path[0] == "batch_stats":
        return (np.zeros if name == "mean" else np.ones)(shape, np.float32)
    if owner == "bn":                                    # BatchNorm weight / bias
        zero_init = name == "bias" or path[-3] == "project"   # ChannelMixer's bn_weight_init=0
        return (np.zeros if zero_init else np.ones)(shape, np.float32)
    if owner.startswith("norm"):                         # LayerNorm2d weight / bias
        return (np.zeros if name == "bias" else np.ones)(shape, np.float32)
    if name in ("kernel", "bias"):                       # conv (HWIO) or Dense (in, out)
        fan_in = int(np.prod(siblings["kernel"].shape[:-1]))
        bound = 1.0 / np.sqrt(fan_in)
        return generator.uniform(-bound, bound, shape).astype(np.float32)
    raise ValueError(f"no initialisation rule for {'/'.join(path)}")


def count_params(variables: dict[str, Any]) -> int:
    """Number of trainable parameters (the ``params`` collection), as PyTorch counts them:
    BN weight and bias count, running statistics do not."""
    return sum(int(leaf.size) for leaf in jax.tree_util.tree_leaves(variables["params"]))
