"""PromptEncoder against segment-anything 1.0's, through the checkpoint converter.

The PyTorch module is randomly initialised with every tensor randomised (LayerNorm weights and
biases included), its state dict converted, and both run on the same random prompts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from rep_medsam_jax.convert.sam_heads import convert_prompt_encoder
from rep_medsam_jax.convert.state_dict import CheckpointMismatchError, StateDictReader
from rep_medsam_jax.models.prompt_encoder import PromptEncoder
from tests.reference.randomise import randomise_, torch_state
from tests.reference.sam_modeling import load_sam_modeling

TOLERANCE = 1e-3

# (embed_dim, embedding grid, input size, mask_in_chans): a small one, then Rep-MedSAM's.
SMALL = (64, 16, 64, 16)
FULL = (256, 64, 256, 16)


def build_pair(size: tuple[int, int, int, int], seed: int = 0):
    """A randomised segment-anything PromptEncoder and the converted Flax one."""
    embed_dim, grid, image, mask_chans = size
    sam = load_sam_modeling()
    torch_encoder = sam.PromptEncoder(embed_dim=embed_dim, image_embedding_size=(grid, grid),
                                      input_image_size=(image, image), mask_in_chans=mask_chans)
    randomise_(torch_encoder, seed)
    torch_encoder.eval()
    reader = StateDictReader(torch_state(torch_encoder))
    variables = convert_prompt_encoder(reader, prefix="", embed_dim=embed_dim,
                                       mask_in_chans=mask_chans)
    reader.finish()
    jax_encoder = PromptEncoder(embed_dim=embed_dim, image_embedding_size=(grid, grid),
                                input_image_size=(image, image), mask_in_chans=mask_chans)
    return torch_encoder, jax_encoder, variables


def max_diff(jax_value, torch_value: torch.Tensor) -> float:
    return float(np.max(np.abs(np.asarray(jax_value) - torch_value.detach().numpy())))


def nchw(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2)


def random_boxes(rng: np.random.Generator, n: int, image: int) -> np.ndarray:
    corners = rng.uniform(0, image - 1, size=(n, 2, 2)).astype(np.float32)
    return np.concatenate([corners.min(axis=1), corners.max(axis=1)], axis=1)  # (n, 4)


@pytest.fixture(scope="module")
def small_pair():
    return build_pair(SMALL)


def test_converter_takes_all_17_keys(small_pair):
    torch_encoder, _, _ = small_pair
    state = torch_state(torch_encoder, "prompt_encoder.")
    assert len(state) == 17
    reader = StateDictReader(state)
    convert_prompt_encoder(reader, embed_dim=SMALL[0], mask_in_chans=SMALL[3])
    reader.finish()
    assert reader.unexpected() == [] and reader.missing == [] and reader.mismatched == []


def test_converted_tree_matches_init_tree(small_pair):
    _, jax_encoder, variables = small_pair
    boxes = jnp.zeros((2, 4))
    initial = jax_encoder.init(jax.random.PRNGKey(0), boxes=boxes)
    shapes = lambda tree: jax.tree_util.tree_map(lambda a: tuple(a.shape), tree)
    assert shapes(initial) == shapes(variables)


def test_reference_parameter_count():
    """6,220 prompt-encoder parameters (the Gaussian buffer is not a parameter)."""
    variables = jax.eval_shape(lambda: PromptEncoder().init(jax.random.PRNGKey(0),
                                                            boxes=jnp.zeros((1, 4))))
    sizes = {"/".join(str(k.key) for k in path): leaf.size
             for path, leaf in jax.tree_util.tree_leaves_with_path(variables)}
    assert sizes["params/pe_layer/positional_encoding_gaussian_matrix"] == 256
    assert sum(sizes.values()) - 256 == 6220


@pytest.mark.parametrize("fault", ["missing", "extra", "misshaped"])
def test_converter_reports_key_problems(small_pair, fault):
    torch_encoder, _, _ = small_pair
    state = torch_state(torch_encoder, "prompt_encoder.")
    key = "prompt_encoder.mask_downscaling.3.weight"
    if fault == "missing":
        del state[key]
    elif fault == "extra":
        state["prompt_encoder.surprise.weight"] = np.zeros(3, np.float32)
    else:
        state[key] = np.zeros((16, 4, 3, 3), np.float32)
    reader = StateDictReader(state)
    convert_prompt_encoder(reader, embed_dim=SMALL[0], mask_in_chans=SMALL[3])
    with pytest.raises(CheckpointMismatchError) as error:
        reader.finish()
    if fault == "missing":
        assert error.value.missing == [key]
    elif fault == "extra":
        assert error.value.unexpected == ["prompt_encoder.surprise.weight"]
    else:
        assert [m[0] for m in error.value.mismatched] == [key]


def check_prompts(pair, num_prompts: int, seed: int = 1) -> dict[str, float]:
    """Max abs differences for every prompt kind on random inputs."""
    torch_encoder, jax_encoder, variables = pair
    grid = torch_encoder.image_embedding_size[0]
    image = torch_encoder.input_image_size[0]
    rng = np.random.default_rng(seed)
    boxes = random_boxes(rng, num_prompts, image)
    coords = rng.uniform(0, image - 1, size=(num_prompts, 3, 2)).astype(np.float32)
    labels = rng.integers(-1, 2, size=(num_prompts, 3)).astype(np.int32)
    labels[:, 0] = np.arange(num_prompts) % 3 - 1   # every label kind appears
    masks = rng.normal(size=(num_prompts, 4 * grid, 4 * grid, 1)).astype(np.float32)

    apply = jax.jit(lambda p, b, m: jax_encoder.apply(variables, p, b, m))
    t = torch.from_numpy
    diffs = {}
    cases = {
        "boxes": ((None, boxes, None), (None, t(boxes), None)),
        "points_padded": (((coords, labels), None, None),
                          ((t(coords), t(labels)), None, None)),
        "points_and_boxes": (((coords, labels), boxes, None),
                             ((t(coords), t(labels)), t(boxes), None)),
        "boxes_and_masks": ((None, boxes, masks), (None, t(boxes), nchw(t(masks)))),
        "nothing": ((None, None, None), (None, None, None)),
    }
    for name, (jax_args, torch_args) in cases.items():
        sparse, dense = apply(*jax_args)
        with torch.no_grad():
            torch_sparse, torch_dense = torch_encoder(*torch_args)
        assert sparse.shape == tuple(torch_sparse.shape), name
        assert dense.shape == tuple(torch_dense.permute(0, 2, 3, 1).shape), name
        diffs[f"{name}/sparse"] = max_diff(sparse, torch_sparse) if sparse.size else 0.0
        diffs[f"{name}/dense"] = max_diff(dense, torch_dense.permute(0, 2, 3, 1))

    dense_pe = jax_encoder.apply(variables, method=PromptEncoder.get_dense_pe)
    with torch.no_grad():
        torch_pe = torch_encoder.get_dense_pe().permute(0, 2, 3, 1)
    assert dense_pe.shape == tuple(torch_pe.shape) == (1, grid, grid, torch_encoder.embed_dim)
    diffs["dense_pe"] = max_diff(dense_pe, torch_pe)
    return diffs


@pytest.mark.parametrize("num_prompts", [1, 5])
def test_matches_segment_anything_small(small_pair, num_prompts):
    diffs = check_prompts(small_pair, num_prompts)
    print(f"prompt encoder small, {num_prompts} prompt(s): max abs diff "
          + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    assert max(diffs.values()) < TOLERANCE, diffs


def test_matches_segment_anything_full_size():
    """Rep-MedSAM's configuration: 256 wide, 64x64 grid, 256x256 input."""
    diffs = check_prompts(build_pair(FULL, seed=3), num_prompts=5)
    print("prompt encoder full, 5 prompts: max abs diff "
          + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    assert max(diffs.values()) < TOLERANCE, diffs


def test_box_embedding_by_hand(small_pair):
    """One box, computed from segment-anything's formula with NumPy (independent of both models)."""
    torch_encoder, jax_encoder, variables = small_pair
    params = variables["params"]
    image = torch_encoder.input_image_size[0]
    box = np.array([[10.0, 3.0, 40.0, 50.0]], np.float32)
    gaussian = params["pe_layer"]["positional_encoding_gaussian_matrix"]
    corners = (box.reshape(2, 2) + 0.5) / image          # (x, y) / (W, H), W = H
    projected = 2 * np.pi * ((2 * corners - 1) @ gaussian)
    expected = np.concatenate([np.sin(projected), np.cos(projected)], axis=-1)
    expected += np.concatenate([params["point_embeddings_2"], params["point_embeddings_3"]])
    sparse, _ = jax_encoder.apply(variables, boxes=jnp.asarray(box))
    np.testing.assert_allclose(np.asarray(sparse[0]), expected, atol=1e-4)
