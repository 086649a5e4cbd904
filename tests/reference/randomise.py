"""Random weights for segment-anything's PyTorch modules (shared by the head parity tests)."""

from __future__ import annotations

import numpy as np
import torch


def randomise_(module: torch.nn.Module, seed: int) -> None:
    """Overwrite every float parameter and buffer with random values of a sensible scale.

    Linear / conv weights ~ N(0, 1/fan_in) (activations keep unit scale, attention is far from
    uniform); LayerNorm weights 1 + 0.2 N; biases 0.2 N; embeddings and the Gaussian matrix N(0, 1).
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for sub in module.modules():
            kind = type(sub).__name__
            tensors = [*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False)]
            for name, tensor in tensors:
                noise = torch.randn(tensor.shape, generator=generator)
                if kind in ("LayerNorm", "LayerNorm2d") and name == "weight":
                    tensor.copy_(1.0 + 0.2 * noise)
                elif name == "bias":
                    tensor.copy_(0.2 * noise)
                elif kind in ("Linear", "Conv2d"):
                    tensor.copy_(noise / np.sqrt(np.prod(tensor.shape[1:])))
                elif kind == "ConvTranspose2d":   # (in, out, k, k): each output sees `in` taps
                    tensor.copy_(noise / np.sqrt(tensor.shape[0]))
                else:                              # nn.Embedding, the PE Gaussian matrix
                    tensor.copy_(noise)


def torch_state(module: torch.nn.Module, prefix: str = "") -> dict[str, np.ndarray]:
    return {prefix + k: v.detach().numpy() for k, v in module.state_dict().items()}

