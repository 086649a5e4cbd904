"""ViTImageEncoder + convert_vit against segment-anything 1.0's ImageEncoderViT.

The PyTorch encoder is randomly initialised, and the tensors SAM zero-initialises (pos_embed,
rel_pos_h/w) and the LayerNorm affine parameters are randomised too, so that every parameter
path and layout is exercised. Its state dict goes through convert_vit, and both models run on
the same input.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from rep_medsam_jax.convert.state_dict import CheckpointMismatchError, StateDictReader
from rep_medsam_jax.convert.vit import convert_vit
from rep_medsam_jax.models.config import VIT_VARIANTS, ViTConfig
from rep_medsam_jax.models.vit import ViTImageEncoder, decomposed_rel_pos_bias, get_rel_pos
from tests.reference.sam_modeling import load_sam_modeling

VIT_B_PARAMS = 89_670_912  # SAM ViT-B image encoder
VIT_B_KEYS = 177           # its state-dict keys

# Small configurations beside vit_tiny (windows of 3 on an 8x8 grid: padding happens).
NO_EXTRAS = ViTConfig(name="no_extras", img_size=64, embed_dim=32, depth=2, num_heads=2,
                      window_size=0, global_attn_indexes=(), out_chans=16, qkv_bias=False,
                      use_rel_pos=False, use_abs_pos=False)
WINDOWS_DIVIDE = ViTConfig(name="windows_divide", img_size=96, embed_dim=48, depth=2,
                           num_heads=3, mlp_ratio=2.0, window_size=3, global_attn_indexes=(0,),
                           out_chans=32)


def torch_encoder(config: ViTConfig, seed: int = 0) -> torch.nn.Module:
    """SAM's ImageEncoderViT built as MedSAM's build_sam does, with every tensor randomised."""
    sam = load_sam_modeling()
    torch.manual_seed(seed)
    encoder = sam.ImageEncoderViT(
        img_size=config.img_size, patch_size=config.patch_size, in_chans=3,
        embed_dim=config.embed_dim, depth=config.depth, num_heads=config.num_heads,
        mlp_ratio=config.mlp_ratio, out_chans=config.out_chans, qkv_bias=config.qkv_bias,
        norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6), act_layer=torch.nn.GELU,
        use_abs_pos=config.use_abs_pos, use_rel_pos=config.use_rel_pos, rel_pos_zero_init=True,
        window_size=config.window_size, global_attn_indexes=config.global_attn_indexes)
    with torch.no_grad():
        for name, param in encoder.named_parameters():
            if name == "pos_embed" or "rel_pos" in name:
                param.normal_(0.0, 0.5)  # SAM zero-initialises these
            elif "norm" in name or name.startswith(("neck.1", "neck.3")):
                if name.endswith("weight"):
                    param.copy_(1.0 + 0.2 * torch.randn_like(param))
                else:
                    param.normal_(0.0, 0.1)
    return encoder.eval()


def numpy_state(module: torch.nn.Module, prefix: str = "") -> dict[str, np.ndarray]:
    return {prefix + k: v.detach().numpy() for k, v in module.state_dict().items()}


def convert(state: dict[str, np.ndarray], config: ViTConfig, prefix: str = "") -> dict:
    reader = StateDictReader(state, context="ViT test")
    variables = convert_vit(reader, prefix, config)
    reader.finish()
    return jax.tree_util.tree_map(jnp.asarray, variables)


def run_torch(encoder: torch.nn.Module, images_nhwc: np.ndarray
              ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Embedding (B, g, g, out) and the same named features as ViTImageEncoder, NHWC."""
    outputs: dict[str, np.ndarray] = {}
    hooks = [block.register_forward_hook(
                 lambda _m, _i, out, i=i: outputs.__setitem__(f"block_{i}", out.numpy()))
             for i, block in enumerate(encoder.blocks)]
    hooks.append(encoder.patch_embed.register_forward_hook(
        lambda _m, _i, out: outputs.__setitem__("patch_embed", out.numpy())))
    try:
        with torch.no_grad():
            embedding = encoder(torch.from_numpy(images_nhwc).permute(0, 3, 1, 2))
    finally:
        for hook in hooks:
            hook.remove()
    if encoder.pos_embed is not None:
        outputs["patch_embed"] = outputs["patch_embed"] + encoder.pos_embed.detach().numpy()
    return embedding.permute(0, 2, 3, 1).numpy(), outputs


def count_params(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


def max_abs_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.mark.parametrize("config", [VIT_VARIANTS["vit_tiny"], NO_EXTRAS, WINDOWS_DIVIDE],
                         ids=lambda c: c.name)
def test_small_encoder_matches_sam(config: ViTConfig):
    encoder = torch_encoder(config, seed=1)
    state = numpy_state(encoder)
    variables = convert(state, config)
    assert count_params(variables) == sum(p.numel() for p in encoder.parameters())

    images = np.random.default_rng(0).random((2, config.img_size, config.img_size, 3),
                                             dtype=np.float32)
    want_embedding, want_features = run_torch(encoder, images)
    model = ViTImageEncoder(config)
    embedding, features = jax.jit(model.apply)(variables, jnp.asarray(images))

    grid = config.img_size // config.patch_size
    assert embedding.shape == (2, grid, grid, config.out_chans)
    assert embedding.dtype == jnp.float32
    assert set(features) == set(want_features)
    for name, want in want_features.items():
        # Relative to the feature's scale: the residual stream grows through the blocks.
        scale = max(1.0, float(np.max(np.abs(want))))
        assert max_abs_diff(features[name], want) <= 2e-5 * scale, name
    assert max_abs_diff(embedding, want_embedding) <= 1e-4


def test_vit_b_parameter_count_from_shapes():
    model = ViTImageEncoder(VIT_VARIANTS["medsam_vit_b"])
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, 1024, 1024, 3), jnp.float32))
    assert count_params(shapes["params"]) == VIT_B_PARAMS
    rel_pos = {i: shapes["params"][f"blocks_{i}"]["attn"]["rel_pos_h"].shape for i in range(12)}
    assert rel_pos[2] == rel_pos[11] == (127, 64)
    assert rel_pos[0] == rel_pos[10] == (27, 64)


def test_converter_accepts_prefix_and_reports_every_mismatch():
    config = VIT_VARIANTS["vit_tiny"]
    state = numpy_state(torch_encoder(config), prefix="image_encoder.")
    assert count_params(convert(state, config, prefix="image_encoder.")) > 0

    broken = dict(state)
    del broken["image_encoder.blocks.1.attn.rel_pos_w"]
    broken["image_encoder.blocks.0.attn.extra"] = np.zeros(3, np.float32)
    broken["image_encoder.neck.2.weight"] = np.zeros((256, 256, 1, 1), np.float32)
    reader = StateDictReader(broken)
    convert_vit(reader, "image_encoder.", config)
    with pytest.raises(CheckpointMismatchError) as error:
        reader.finish()
    assert error.value.missing == ["image_encoder.blocks.1.attn.rel_pos_w"]
    assert error.value.unexpected == ["image_encoder.blocks.0.attn.extra"]
    assert error.value.mismatched == [("image_encoder.neck.2.weight", (256, 256, 3, 3),
                                       (256, 256, 1, 1))]

    # A ViT-B converter on the tiny checkpoint: deeper blocks missing, the rest mis-shaped.
    reader = StateDictReader(state)
    convert_vit(reader, "image_encoder.", VIT_VARIANTS["medsam_vit_b"])
    assert "image_encoder.blocks.11.attn.qkv.weight" in reader.missing
    assert ("image_encoder.pos_embed", (1, 64, 64, 768), (1, 8, 8, 64)) in reader.mismatched
    assert reader.unexpected() == []


@pytest.mark.parametrize("q_size, k_size, length", [
    (5, 5, 9),     # table already the right length: plain gather
    (5, 5, 13),    # shrink
    (7, 7, 5),     # stretch
    (14, 14, 127),  # a global-attention table used at window size (strong shrink)
    (4, 6, 11),    # query and key sizes differ: coordinates are stretched
    (6, 3, 7),     # both
])
def test_get_rel_pos_matches_sam_including_resize(q_size, k_size, length):
    image_encoder = load_sam_modeling().image_encoder
    table = torch.randn(length, 8, generator=torch.Generator().manual_seed(length))
    want = image_encoder.get_rel_pos(q_size, k_size, table).numpy()
    got = get_rel_pos(q_size, k_size, jnp.asarray(table.numpy()))
    assert got.shape == want.shape == (q_size, k_size, 8)
    assert max_abs_diff(got, want) <= 1e-6


def test_decomposed_rel_pos_bias_matches_sam_with_resized_tables():
    image_encoder = load_sam_modeling().image_encoder
    generator = torch.Generator().manual_seed(0)
    q_hw, k_hw, dim = (3, 5), (3, 5), 8
    q = torch.randn(2, q_hw[0] * q_hw[1], dim, generator=generator)
    rel_pos_h = torch.randn(9, dim, generator=generator)   # 2*3-1 = 5 needed: resized
    rel_pos_w = torch.randn(4, dim, generator=generator)   # 2*5-1 = 9 needed: resized
    zeros = torch.zeros(2, q_hw[0] * q_hw[1], k_hw[0] * k_hw[1])
    want = image_encoder.add_decomposed_rel_pos(zeros, q, rel_pos_h, rel_pos_w, q_hw, k_hw)

    q_grid = jnp.asarray(q.numpy()).reshape(2, *q_hw, 1, dim)  # one head
    got = decomposed_rel_pos_bias(q_grid, jnp.asarray(rel_pos_h.numpy()),
                                  jnp.asarray(rel_pos_w.numpy()), q_hw, k_hw)
    got = got.reshape(2, q_hw[0] * q_hw[1], k_hw[0] * k_hw[1])
    assert max_abs_diff(got, want.numpy()) <= 1e-5


def test_bfloat16_compute_keeps_float32_params_and_stays_close():
    config = VIT_VARIANTS["vit_tiny"]
    variables = convert(numpy_state(torch_encoder(config)), config)
    images = jnp.asarray(np.random.default_rng(1).random((1, 128, 128, 3), dtype=np.float32))
    full, _ = jax.jit(ViTImageEncoder(config).apply)(variables, images)
    half_model = ViTImageEncoder(config, dtype=jnp.bfloat16)
    half, features = jax.jit(half_model.apply)(variables, images)
    init_dtypes = {leaf.dtype for leaf in jax.tree_util.tree_leaves(
        jax.eval_shape(half_model.init, jax.random.PRNGKey(0), images))}
    assert init_dtypes == {jnp.dtype(jnp.float32)}
    assert half.dtype == features["block_3"].dtype == jnp.float32
    # The embedding is LayerNorm-ed (unit scale per pixel): bf16 matmuls stay within a few %.
    assert 0 < max_abs_diff(half, full) < 0.15


@pytest.mark.slow
def test_medsam_vit_b_matches_sam_at_1024():
    config = VIT_VARIANTS["medsam_vit_b"]
    encoder = torch_encoder(config, seed=2)
    state = numpy_state(encoder)
    assert len(state) == VIT_B_KEYS
    assert sum(p.numel() for p in encoder.parameters()) == VIT_B_PARAMS
    variables = convert(state, config)
    assert count_params(variables) == VIT_B_PARAMS

    images = np.random.default_rng(2).random((1, 1024, 1024, 3), dtype=np.float32)
    start = time.perf_counter()
    want, _ = run_torch(encoder, images)
    torch_seconds = time.perf_counter() - start
    del encoder, state

    start = time.perf_counter()
    embedding = jax.jit(lambda v, x: ViTImageEncoder(config).apply(v, x)[0])(
        variables, jnp.asarray(images))
    embedding = np.asarray(embedding)
    jax_seconds = time.perf_counter() - start

    diff = max_abs_diff(embedding, want)
    print(f"\nViT-B 1024: max abs diff {diff:.3g}; torch {torch_seconds:.1f} s, "
          f"jax (compile + run) {jax_seconds:.1f} s")
    assert embedding.shape == (1, 64, 64, 256)
    assert diff <= 7e-5                 # README "Exactness": 1.4e-5, with a 5x margin
