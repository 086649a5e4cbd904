"""MaskDecoder (with the two-way transformer) against segment-anything 1.0's.

Randomised PyTorch modules (every tensor, LayerNorms included) -> state dict -> converter ->
Flax, then both decode the same random embeddings. segment-anything repeats a batch-1 image
embedding once per prompt; the Flax decoder broadcasts it instead, which must agree.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from rep_medsam_jax.convert.sam_heads import convert_mask_decoder, convert_prompt_encoder
from rep_medsam_jax.convert.state_dict import CheckpointMismatchError, StateDictReader
from rep_medsam_jax.models.config import DecoderConfig
from rep_medsam_jax.models.mask_decoder import ConvTranspose2x2, MaskDecoder
from rep_medsam_jax.models.prompt_encoder import PromptEncoder
from rep_medsam_jax.models.transformer import Attention, TwoWayTransformer
from tests.reference.randomise import randomise_, torch_state
from tests.reference.sam_modeling import load_sam_modeling

TOLERANCE = 1e-3
# The full-size decoder vs segment-anything (README "Exactness": 5.6e-6), with a 5x margin.
FULL_DECODER_BOUND = 2.8e-5
SMALL = DecoderConfig(embed_dim=64, num_heads=4, mlp_dim=256, iou_head_hidden_dim=64)
FULL = DecoderConfig()
SMALL_GRID = 16   # embedding grid of the fast tests; masks come out 64x64


def build_torch_decoder(config: DecoderConfig, seed: int) -> torch.nn.Module:
    sam = load_sam_modeling()
    transformer = sam.TwoWayTransformer(depth=config.depth, embedding_dim=config.embed_dim,
                                        mlp_dim=config.mlp_dim, num_heads=config.num_heads)
    decoder = sam.MaskDecoder(transformer_dim=config.embed_dim, transformer=transformer,
                              num_multimask_outputs=config.num_multimask_outputs,
                              iou_head_depth=config.iou_head_depth,
                              iou_head_hidden_dim=config.iou_head_hidden_dim)
    randomise_(decoder, seed)
    return decoder.eval()


def convert(decoder: torch.nn.Module, config: DecoderConfig) -> dict:
    reader = StateDictReader(torch_state(decoder, "mask_decoder."))
    variables = convert_mask_decoder(reader, "mask_decoder.", config)
    reader.finish()
    return variables


def nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(x, (0, 2, 3, 1)))


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def decode_jax(config: DecoderConfig, variables, multimask: bool):
    decoder = MaskDecoder.from_config(config)
    return jax.jit(lambda *args: decoder.apply(variables, *args, multimask_output=multimask))


def decode_torch(decoder, image, pe, sparse, dense, multimask: bool):
    with torch.no_grad():
        masks, iou = decoder(torch.from_numpy(image), torch.from_numpy(pe),
                             torch.from_numpy(sparse), torch.from_numpy(dense), multimask)
    return masks.numpy(), iou.numpy()


def random_inputs(config: DecoderConfig, grid: int, num_prompts: int, seed: int):
    """NCHW image embedding (1, C, g, g), PE (1, C, g, g), sparse (N, 2, C), dense (N, C, g, g)."""
    rng = np.random.default_rng(seed)
    c = config.embed_dim
    image = rng.normal(size=(1, c, grid, grid)).astype(np.float32)
    pe = rng.normal(size=(1, c, grid, grid)).astype(np.float32)
    sparse = rng.normal(size=(num_prompts, 2, c)).astype(np.float32)
    dense = rng.normal(size=(num_prompts, c, grid, grid)).astype(np.float32)
    return image, pe, sparse, dense


@pytest.fixture(scope="module")
def small_decoder():
    torch_decoder = build_torch_decoder(SMALL, seed=0)
    return torch_decoder, convert(torch_decoder, SMALL)


# --- conversion ------------------------------------------------------------------------------

def test_reference_decoder_has_120_keys_all_taken():
    torch_decoder = build_torch_decoder(FULL, seed=0)
    state = torch_state(torch_decoder, "mask_decoder.")
    assert len(state) == 120
    reader = StateDictReader(state)
    variables = convert_mask_decoder(reader, "mask_decoder.", FULL)
    reader.finish()
    leaves = jax.tree_util.tree_leaves(variables)
    assert len(leaves) == 120
    assert sum(leaf.size for leaf in leaves) == 4_058_340   # segment-anything's decoder


def test_converted_tree_matches_init_tree(small_decoder):
    _, variables = small_decoder
    c, g = SMALL.embed_dim, SMALL_GRID
    initial = jax.eval_shape(lambda: MaskDecoder.from_config(SMALL).init(
        jax.random.PRNGKey(0), jnp.zeros((1, g, g, c)), jnp.zeros((1, g, g, c)),
        jnp.zeros((3, 2, c)), jnp.zeros((1, g, g, c)), multimask_output=False))
    shapes = lambda tree: jax.tree_util.tree_map(lambda a: tuple(a.shape), tree)
    assert shapes(initial) == shapes(variables)


@pytest.mark.parametrize("fault", ["missing", "extra", "misshaped"])
def test_converter_reports_key_problems(small_decoder, fault):
    torch_decoder, _ = small_decoder
    state = torch_state(torch_decoder, "mask_decoder.")
    key = "mask_decoder.transformer.layers.1.cross_attn_image_to_token.k_proj.weight"
    if fault == "missing":
        del state[key]
    elif fault == "extra":
        state["mask_decoder.transformer.layers.2.norm1.weight"] = np.zeros(64, np.float32)
    else:
        state[key] = np.zeros((64, 64), np.float32)   # full width, not the downsampled 32
    reader = StateDictReader(state)
    convert_mask_decoder(reader, "mask_decoder.", SMALL)
    with pytest.raises(CheckpointMismatchError) as error:
        reader.finish()
    if fault == "missing":
        assert error.value.missing == [key]
    elif fault == "extra":
        assert error.value.unexpected == ["mask_decoder.transformer.layers.2.norm1.weight"]
    else:
        assert error.value.mismatched == [(key, (32, 64), (64, 64))]


def test_conv_transpose_matches_torch():
    """The einsum + reshape form of ConvTranspose2d(k=2, s=2) against torch's own op."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 3, 6)).astype(np.float32)         # (B, Cin, h, w)
    weight = rng.normal(size=(5, 4, 2, 2)).astype(np.float32)    # (Cin, Cout, kh, kw)
    bias = rng.normal(size=(4,)).astype(np.float32)
    expected = torch.nn.functional.conv_transpose2d(
        torch.from_numpy(x), torch.from_numpy(weight), torch.from_numpy(bias), stride=2).numpy()
    params = {"params": {"kernel": np.transpose(weight, (2, 3, 0, 1)), "bias": bias}}
    out = ConvTranspose2x2(4).apply(params, nhwc(x))
    assert out.shape == (2, 6, 12, 4)
    assert max_diff(out, nhwc(expected)) < 1e-5


# --- parity ----------------------------------------------------------------------------------

@pytest.mark.parametrize("multimask", [False, True])
@pytest.mark.parametrize("num_prompts", [1, 5])
def test_matches_segment_anything_small(small_decoder, num_prompts, multimask):
    """N prompts share one image embedding (batch 1, broadcast), each with its own dense."""
    torch_decoder, variables = small_decoder
    image, pe, sparse, dense = random_inputs(SMALL, SMALL_GRID, num_prompts, seed=num_prompts)
    masks, iou = decode_jax(SMALL, variables, multimask)(nhwc(image), nhwc(pe), sparse,
                                                          nhwc(dense))
    ref_masks, ref_iou = decode_torch(torch_decoder, image, pe, sparse, dense, multimask)
    outputs = 3 if multimask else 1
    assert masks.shape == ref_masks.shape == (num_prompts, outputs, 4 * SMALL_GRID,
                                              4 * SMALL_GRID)
    assert iou.shape == ref_iou.shape == (num_prompts, outputs)
    mask_diff, iou_diff = max_diff(masks, ref_masks), max_diff(iou, ref_iou)
    print(f"decoder small N={num_prompts} multimask={multimask}: max abs diff masks "
          f"{mask_diff:.1e} (|ref| max {np.abs(ref_masks).max():.1f}), iou {iou_diff:.1e}")
    assert mask_diff < TOLERANCE and iou_diff < TOLERANCE


def test_shared_dense_batch_one_matches(small_decoder):
    """No mask prompt: dense rows are equal, and passing dense[:1] (fully shared image side)
    gives the reference result for every prompt."""
    torch_decoder, variables = small_decoder
    image, pe, sparse, dense = random_inputs(SMALL, SMALL_GRID, 5, seed=7)
    dense = np.repeat(dense[:1], 5, axis=0)
    masks, iou = decode_jax(SMALL, variables, False)(nhwc(image), nhwc(pe), sparse,
                                                      nhwc(dense[:1]))
    ref_masks, ref_iou = decode_torch(torch_decoder, image, pe, sparse, dense, False)
    assert masks.shape == ref_masks.shape == (5, 1, 4 * SMALL_GRID, 4 * SMALL_GRID)
    assert max_diff(masks, ref_masks) < TOLERANCE and max_diff(iou, ref_iou) < TOLERANCE


def test_per_prompt_image_embeddings(small_decoder):
    """Image batch N (one embedding per prompt, as in training) = the reference run per prompt."""
    torch_decoder, variables = small_decoder
    rng = np.random.default_rng(11)
    c, g, n = SMALL.embed_dim, SMALL_GRID, 3
    images = rng.normal(size=(n, c, g, g)).astype(np.float32)
    _, pe, sparse, dense = random_inputs(SMALL, g, n, seed=12)
    masks, iou = decode_jax(SMALL, variables, True)(nhwc(images), nhwc(pe), sparse, nhwc(dense))
    for i in range(n):
        ref_masks, ref_iou = decode_torch(torch_decoder, images[i:i + 1], pe, sparse[i:i + 1],
                                          dense[i:i + 1], True)
        assert max_diff(masks[i:i + 1], ref_masks) < TOLERANCE
        assert max_diff(iou[i:i + 1], ref_iou) < TOLERANCE


def test_transformer_on_tiny_activations():
    """Tiny activations (inputs x 1e-3, zero biases) make LayerNorm's eps visible: a 1e-6 eps
    instead of PyTorch's 1e-5 changes the outputs at O(1) here, not at 1e-6 as above."""
    sam = load_sam_modeling()
    c, g, scale = SMALL.embed_dim, 8, 1e-3
    reference = sam.TwoWayTransformer(depth=SMALL.depth, embedding_dim=c, mlp_dim=SMALL.mlp_dim,
                                      num_heads=SMALL.num_heads)
    randomise_(reference, seed=9)
    with torch.no_grad():
        for name, tensor in reference.named_parameters():
            if name.endswith("bias") and "norm" not in name:
                tensor.zero_()
    reader = StateDictReader(torch_state(reference, "mask_decoder.transformer."))
    # The decoder converter builds the transformer subtree; keep only that part.
    transformer_vars = {"params": convert_mask_decoder(reader, "mask_decoder.", SMALL)
                        ["params"]["transformer"]}
    assert all(key.startswith(("mask_decoder.iou", "mask_decoder.mask", "mask_decoder.output"))
               for key in reader.missing)
    rng = np.random.default_rng(9)
    image = (scale * rng.normal(size=(1, c, g, g))).astype(np.float32)
    pe = (scale * rng.normal(size=(1, c, g, g))).astype(np.float32)
    tokens = (scale * rng.normal(size=(4, 7, c))).astype(np.float32)
    transformer = TwoWayTransformer(SMALL.depth, c, SMALL.num_heads, SMALL.mlp_dim)
    queries, keys = transformer.apply(transformer_vars, nhwc(image), nhwc(pe), tokens)
    with torch.no_grad():
        ref_queries, ref_keys = reference(torch.from_numpy(np.repeat(image, 4, axis=0)),
                                          torch.from_numpy(np.repeat(pe, 4, axis=0)),
                                          torch.from_numpy(tokens))
    assert queries.shape == tuple(ref_queries.shape) and keys.shape == tuple(ref_keys.shape)
    query_diff, key_diff = max_diff(queries, ref_queries), max_diff(keys, ref_keys)
    print(f"transformer, tiny activations: max abs diff queries {query_diff:.1e}, "
          f"keys {key_diff:.1e}")
    assert query_diff < TOLERANCE and key_diff < TOLERANCE


def test_rejects_mismatched_image_batch(small_decoder):
    _, variables = small_decoder
    c, g = SMALL.embed_dim, SMALL_GRID
    with pytest.raises(ValueError, match="image_embeddings has batch 2"):
        MaskDecoder.from_config(SMALL).apply(
            variables, jnp.zeros((2, g, g, c)), jnp.zeros((1, g, g, c)), jnp.zeros((3, 2, c)),
            jnp.zeros((1, g, g, c)), multimask_output=False)


@pytest.mark.slow
def test_full_size_boxes_end_to_end():
    """Rep-MedSAM's heads at full size (256 wide, 64x64 grid, 256x256 input): 5 boxes on one
    embedding through prompt encoder + decoder, single- and multi-mask."""
    sam = load_sam_modeling()
    torch_prompt = sam.PromptEncoder(embed_dim=256, image_embedding_size=(64, 64),
                                     input_image_size=(256, 256), mask_in_chans=16)
    randomise_(torch_prompt, seed=5)
    torch_decoder = build_torch_decoder(FULL, seed=6)
    state = {**torch_state(torch_prompt, "prompt_encoder."),
             **torch_state(torch_decoder, "mask_decoder.")}
    reader = StateDictReader(state)
    prompt_vars = convert_prompt_encoder(reader)
    decoder_vars = convert_mask_decoder(reader, config=FULL)
    reader.finish()

    rng = np.random.default_rng(5)
    corners = rng.uniform(0, 255, size=(5, 2, 2)).astype(np.float32)
    boxes = np.concatenate([corners.min(axis=1), corners.max(axis=1)], axis=1)
    image = rng.normal(size=(1, 256, 64, 64)).astype(np.float32)

    prompt = PromptEncoder.from_config(FULL, image_size=256, embedding_size=64)
    decoder = MaskDecoder.from_config(FULL)

    def pipeline(image_nhwc, boxes, multimask):
        sparse, dense = prompt.apply(prompt_vars, boxes=boxes)
        pe = prompt.apply(prompt_vars, method=PromptEncoder.get_dense_pe)
        return decoder.apply(decoder_vars, image_nhwc, pe, sparse, dense[:1], multimask)

    run = jax.jit(pipeline, static_argnums=2)
    for multimask in (False, True):
        start = time.perf_counter()
        masks, iou = run(nhwc(image), boxes, multimask)
        masks.block_until_ready()
        seconds = time.perf_counter() - start
        with torch.no_grad():
            sparse, dense = torch_prompt(None, torch.from_numpy(boxes), None)
            ref_masks, ref_iou = torch_decoder(torch.from_numpy(image),
                                               torch_prompt.get_dense_pe(), sparse, dense,
                                               multimask)
        outputs = 3 if multimask else 1
        assert masks.shape == tuple(ref_masks.shape) == (5, outputs, 256, 256)
        mask_diff, iou_diff = max_diff(masks, ref_masks.numpy()), max_diff(iou, ref_iou.numpy())
        print(f"decoder full N=5 multimask={multimask}: max abs diff masks {mask_diff:.1e} "
              f"(|ref| max {ref_masks.abs().max():.1f}), iou {iou_diff:.1e}; "
              f"jit+run {seconds:.1f} s")
        assert mask_diff < FULL_DECODER_BOUND and iou_diff < FULL_DECODER_BOUND


# --- every product order of Attention vs the formula ----------------------------------------
# Attention picks how to order its products from the shapes (transformer.py); each order must
# equal SAM's plain multi-head attention, written here in NumPy float64.


def _reference_attention(params, q, k, v, heads):
    """SAM's Attention in NumPy: project, split heads, softmax(q k^T / sqrt(d)) v, merge, out."""
    def proj(x, name):
        return x @ params[name]["kernel"] + params[name]["bias"]

    def split(x):
        b, n, c = x.shape
        return x.reshape(b, n, heads, c // heads).transpose(0, 2, 1, 3)

    qh, kh, vh = split(proj(q, "q_proj")), split(proj(k, "k_proj")), split(proj(v, "v_proj"))
    scores = qh @ kh.transpose(0, 1, 3, 2) / np.sqrt(qh.shape[-1])
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = probs @ vh
    b, h, n, d = out.shape
    return proj(out.transpose(0, 2, 1, 3).reshape(b, n, h * d), "out_proj")


@pytest.mark.parametrize("q_shape, kv_shape", [
    ((3, 7, 32), (3, 7, 32)),      # token self-attention: plain form
    ((3, 7, 32), (1, 50, 32)),     # tokens -> one shared image: keys projected once
    ((1, 50, 32), (3, 7, 32)),     # one shared image -> tokens: queries projected once
    ((3, 2, 32), (3, 50, 32)),     # few tokens -> per-prompt image: projections folded
    ((3, 50, 32), (3, 2, 32)),     # per-prompt image -> few tokens: projections folded
    ((3, 9, 32), (3, 50, 32)),     # too many tokens to fold (4 * 9 > 16): plain form
    ((1, 50, 32), (3, 9, 32)),     # shared image -> many tokens
])
def test_attention_product_orders_match_the_formula(q_shape, kv_shape):
    rng = np.random.default_rng(0)
    q = rng.normal(size=q_shape).astype(np.float32)
    k = rng.normal(size=kv_shape).astype(np.float32)
    v = rng.normal(size=kv_shape).astype(np.float32)
    attention = Attention(32, num_heads=4, downsample_rate=2)
    variables = attention.init(jax.random.key(0), q, k, v)
    params = jax.tree_util.tree_map(lambda x: rng.normal(0, 0.3, x.shape).astype(np.float32),
                                    variables["params"])
    out = np.asarray(attention.apply({"params": params}, q, k, v))
    params64 = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), params)
    expected = _reference_attention(params64, q.astype(np.float64), k.astype(np.float64),
                                   v.astype(np.float64), heads=4)
    assert out.shape == expected.shape
    assert np.max(np.abs(out - expected)) < 1e-5
