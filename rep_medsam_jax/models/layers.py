"""Small layers shared by the encoders and the decoder (NHWC throughout)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def gelu(x: jax.Array) -> jax.Array:
    """PyTorch's ``nn.GELU()``: the exact erf form (jax defaults to the tanh approximation)."""
    return jax.nn.gelu(x, approximate=False)


class LayerNorm2d(nn.Module):
    """SAM's LayerNorm2d: normalise over channels at each pixel, biased variance, eps in the sqrt.

    x: (..., C) -> (..., C). Parameters ``weight`` and ``bias`` (C,) keep PyTorch's names so
    that conversion is a rename.
    """

    eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        weight = self.param("weight", nn.initializers.ones, (channels,))
        bias = self.param("bias", nn.initializers.zeros, (channels,))
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + self.eps) * weight + bias


def torch_padding(kernel_size: int, padding: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Explicit symmetric padding as PyTorch's Conv2d does it (never 'SAME', which pads a
    stride-2 conv on an even input (0, 1) and shifts the sampling grid by a pixel)."""
    del kernel_size
    return ((padding, padding), (padding, padding))
