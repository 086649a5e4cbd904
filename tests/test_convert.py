"""``rep-medsam convert``: the three checkpoint layouts, strictness, and no output on failure."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from rep_medsam_jax.cli import main
from rep_medsam_jax.model_dir import load_model_dir, read_model_config


def _convert(kind, path, out, capsys):
    code = main(["convert", "--from", kind, str(path), "-o", str(out)])
    return code, capsys.readouterr()


@pytest.mark.slow
def test_converted_rep_medsam_matches_pytorch_unfused_and_folded(torch_rep_medsam,
                                                                converted_rep_medsam):
    import jax

    from rep_medsam_jax.models.deploy import deploy_variables, model_functions
    from tests.reference.medsam_lite_torch import fused_copy

    model, _ = torch_rep_medsam
    config, variables = load_model_dir(converted_rep_medsam)
    assert config.encoder_variant == "rep_medsam_m1_0" and not config.deployed
    image = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    nhwc = image.permute(0, 2, 3, 1).numpy()
    with torch.no_grad():
        want = model.image_encoder(image).permute(0, 2, 3, 1).numpy()
        want_fused = fused_copy(model).image_encoder(image).permute(0, 2, 3, 1).numpy()
    encode, decode = model_functions(config, variables)
    got = np.asarray(jax.jit(encode)(nhwc))
    deploy_config, deploy = deploy_variables(config, variables)
    got_folded = np.asarray(jax.jit(model_functions(deploy_config, deploy)[0])(nhwc))
    unfused_error = np.abs(got - want).max()
    folded_error = np.abs(got_folded - want_fused).max()
    print(f"encoder max abs diff: unfused {unfused_error:.2e}, folded {folded_error:.2e}, "
          f"folded vs unfused (JAX) {np.abs(got_folded - got).max():.2e}")
    # 5x the measured 6.7e-6 / 8.5e-6 / 8.8e-6 (embedding of largest |value| about 4).
    assert unfused_error < 3.5e-5 and folded_error < 4.5e-5
    assert np.abs(got_folded - got).max() < 4.5e-5

    boxes = np.array([[30, 40, 200, 180], [0, 0, 255, 255], [100, 90, 140, 120]], np.float32)
    with torch.no_grad():
        sparse, dense = model.prompt_encoder(points=None, boxes=torch.tensor(boxes), masks=None)
        logits, iou = model.mask_decoder(
            image_embeddings=torch.tensor(want).permute(0, 3, 1, 2),
            image_pe=model.prompt_encoder.get_dense_pe(), sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense, multimask_output=False)
    got_logits, got_iou = decode(want, boxes)
    decoder_error = max(np.abs(np.asarray(got_logits) - logits[:, 0].numpy()).max(),
                        np.abs(np.asarray(got_iou) - iou[:, 0].numpy()).max())
    print(f"decoder max abs diff (3 boxes, one embedding): {decoder_error:.2e}")
    assert decoder_error < 1.2e-6                       # 5x the measured 2.3e-7


def test_wrapped_checkpoint_loads_like_a_raw_one(torch_rep_medsam, tmp_path, capsys):
    model, _ = torch_rep_medsam
    path = tmp_path / "wrapped.pth"
    torch.save({"model": model.state_dict(), "epoch": 3, "loss": 0.1}, path)
    code, _ = _convert("rep-medsam", path, tmp_path / "out", capsys)
    assert code == 0
    config, meta = read_model_config(tmp_path / "out")
    assert config.encoder_variant == "rep_medsam_m1_0" and meta["source_kind"] == "rep-medsam"


def _state(torch_rep_medsam) -> dict:
    return dict(torch_rep_medsam[0].state_dict())


@pytest.mark.parametrize("damage, words", [
    ("missing", ["1 missing key", "image_encoder.features.5.token_mixer.0.bn.running_var"]),
    ("extra", ["1 unexpected key", "image_encoder.features.99.weight"]),
    ("shape", ["shape mismatch for mask_decoder.iou_token.weight", "(1, 256)", "(1, 128)"]),
])
def test_damaged_checkpoints_fail_with_one_clear_error_and_no_output(
        torch_rep_medsam, tmp_path, capsys, damage, words):
    state = _state(torch_rep_medsam)
    if damage == "missing":
        del state["image_encoder.features.5.token_mixer.0.bn.running_var"]
    elif damage == "extra":
        state["image_encoder.features.99.weight"] = torch.zeros(3)
    else:
        state["mask_decoder.iou_token.weight"] = torch.zeros(1, 128)
    path = tmp_path / "damaged.pth"
    torch.save(state, path)
    code, out = _convert("rep-medsam", path, tmp_path / "out", capsys)
    assert code == 2
    for word in words:
        assert word in out.err
    assert os.listdir(tmp_path) == ["damaged.pth"]          # no MODEL_DIR, no temp folder


def test_wrong_kind_is_named(torch_rep_medsam, tmp_path, capsys):
    code, out = _convert("medsam", torch_rep_medsam[1], tmp_path / "out", capsys)
    assert code == 2 and "this is a rep-medsam checkpoint, not a medsam one" in out.err
    torch.save({"conv.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    code, out = _convert("rep-medsam", tmp_path / "other.pth", tmp_path / "out", capsys)
    assert code == 2 and "not a rep-medsam checkpoint" in out.err
    assert not (tmp_path / "out").exists()


def test_truncated_empty_and_missing_files_give_clear_errors(torch_rep_medsam, tmp_path, capsys):
    data = torch_rep_medsam[1].read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 3])
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "junk.pth").write_bytes(b"\x80\x04not really a pickle")
    for name, words in [("truncated.pth", "truncated or corrupt"), ("empty.pth", "empty"),
                        ("junk.pth", "cannot read it as a PyTorch checkpoint"),
                        ("absent.pth", "no such file")]:
        code, out = _convert("rep-medsam", tmp_path / name, tmp_path / "out", capsys)
        assert code == 2 and name in out.err and words in out.err, out.err
    assert not (tmp_path / "out").exists()


def test_litemedsam_heads_are_converted_and_tinyvit_reported(torch_rep_medsam, tmp_path, capsys):
    # A LiteMedSAM checkpoint: SAM heads identical to Rep-MedSAM's, a TinyViT encoder.
    state = {k: v for k, v in _state(torch_rep_medsam).items()
             if not k.startswith("image_encoder.")}
    state["image_encoder.patch_embed.seq.0.c.weight"] = torch.zeros(32, 3, 1, 1)
    state["image_encoder.layers.0.blocks.0.conv1.c.weight"] = torch.zeros(256, 64, 1, 1)
    torch.save(state, tmp_path / "lite_medsam.pth")
    code, out = _convert("litemedsam", tmp_path / "lite_medsam.pth", tmp_path / "out", capsys)
    assert code == 0 and "TinyViT image encoder not converted (2 keys skipped)" in out.out
    config, variables = load_model_dir(tmp_path / "out")
    assert config.encoder == "none"
    assert set(variables["params"]) == {"prompt_encoder", "mask_decoder"}
    np.testing.assert_array_equal(variables["params"]["mask_decoder"]["iou_token"],
                                  state["mask_decoder.iou_token.weight"].numpy())


@pytest.mark.slow
def test_medsam_vit_b_checkpoint_converts(tmp_path, capsys):
    from tests.reference.sam_modeling import load_sam_modeling

    modeling = load_sam_modeling()
    torch.manual_seed(0)
    encoder = modeling.ImageEncoderViT(
        depth=12, embed_dim=768, img_size=1024, mlp_ratio=4, num_heads=12, patch_size=16,
        qkv_bias=True, use_rel_pos=True, global_attn_indexes=(2, 5, 8, 11), window_size=14,
        out_chans=256, norm_layer=lambda d: torch.nn.LayerNorm(d, eps=1e-6))
    prompt = modeling.PromptEncoder(embed_dim=256, image_embedding_size=(64, 64),
                                    input_image_size=(1024, 1024), mask_in_chans=16)
    decoder = modeling.MaskDecoder(num_multimask_outputs=3, transformer=modeling.TwoWayTransformer(
        depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8), transformer_dim=256,
        iou_head_depth=3, iou_head_hidden_dim=256)
    state = {f"image_encoder.{k}": v for k, v in encoder.state_dict().items()}
    state.update({f"prompt_encoder.{k}": v for k, v in prompt.state_dict().items()})
    state.update({f"mask_decoder.{k}": v for k, v in decoder.state_dict().items()})
    assert len(state) == 314
    torch.save(state, tmp_path / "medsam_vit_b.pth")
    code, out = _convert("medsam", tmp_path / "medsam_vit_b.pth", tmp_path / "out", capsys)
    assert code == 0, out.err
    config, variables = load_model_dir(tmp_path / "out")
    assert config.encoder == "vit" and config.image_size == 1024
    import jax

    count = sum(np.size(x) for x in jax.tree_util.tree_leaves(variables["params"]["image_encoder"]))
    assert count == 89_670_912
