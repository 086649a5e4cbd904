"""Augmentation: flips consistent across image / mask / box / teacher embedding, colour jitter
against hand values and the standard library's colorsys, box perturbation bounds (the recipe
of the authors' ``train_one_gpu.py``)."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest

from input_pipeline import augment as aug

SIZE = 256


def _example(rng: np.random.Generator, grid: int = 64, channels: int = 8) -> dict:
    """An asymmetric object (an L shape) on a random image, with an "embedding" that is the
    image's 4 x 4 block average (so it lies on the same grid as a 64 x 64 teacher embedding)."""
    image = rng.random((SIZE, SIZE, 3), dtype=np.float32)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[30:90, 40:55] = 1
    mask[75:90, 40:120] = 1
    block = SIZE // grid
    pooled = image.reshape(grid, block, grid, block, 3).mean(axis=(1, 3))
    embedding = np.concatenate([pooled, rng.random((grid, grid, channels - 3))], axis=-1)
    return {"image": image, "mask": mask, "box": aug.box_from_mask(mask),
            "teacher_embedding": embedding.astype(np.float32)}


def _pool(image: np.ndarray, grid: int = 64) -> np.ndarray:
    block = image.shape[0] // grid
    return image.reshape(grid, block, grid, block, 3).mean(axis=(1, 3))


def _flip(array: np.ndarray, horizontal: int, vertical: int) -> np.ndarray:
    if horizontal:
        array = array[:, ::-1]
    return array[::-1] if vertical else array


def test_box_from_mask_by_hand():
    mask = np.zeros((10, 12), np.uint8)
    mask[2:5, 3:9] = 1
    mask[7, 1] = 1
    assert aug.box_from_mask(mask).tolist() == [1, 2, 8, 7]
    with pytest.raises(ValueError):
        aug.box_from_mask(np.zeros((4, 4)))


@pytest.mark.parametrize("flip", [aug.flip_horizontal, aug.flip_vertical])
def test_flips_are_consistent_across_image_mask_box_and_embedding(flip):
    example = _example(np.random.default_rng(0))
    flipped = flip(example)
    axis = 1 if flip is aug.flip_horizontal else 0
    assert np.array_equal(flipped["image"], np.flip(example["image"], axis))
    assert np.array_equal(flipped["mask"], np.flip(example["mask"], axis))
    # The box moves with the mask: it is the box of the flipped mask.
    assert np.array_equal(flipped["box"], aug.box_from_mask(flipped["mask"]))
    # The embedding grid moves with the image: cell (i, j) still covers the same pixels.
    assert np.allclose(flipped["teacher_embedding"][..., :3], _pool(flipped["image"]),
                       atol=1e-6)
    assert np.array_equal(flip(flipped)["teacher_embedding"], example["teacher_embedding"])
    assert np.array_equal(flip(flipped)["box"], example["box"])
    assert flipped["box"].dtype == example["box"].dtype


def test_horizontal_flip_box_by_hand():
    example = {"image": np.zeros((SIZE, SIZE, 3), np.float32), "box": np.array([0, 5, 9, 20])}
    assert aug.flip_horizontal(example)["box"].tolist() == [246, 5, 255, 20]
    assert aug.flip_vertical(example)["box"].tolist() == [0, 235, 9, 250]


def test_brightness_contrast_saturation_by_hand():
    image = np.array([[[0.2, 0.4, 0.6], [1.0, 0.5, 0.0]]], np.float32)      # (1, 2, 3)
    assert np.allclose(aug.adjust_brightness(image, 1.5),
                       [[[0.3, 0.6, 0.9], [1.0, 0.75, 0.0]]])
    grey = np.array([0.2989 * 0.2 + 0.587 * 0.4 + 0.114 * 0.6,
                     0.2989 * 1.0 + 0.587 * 0.5 + 0.114 * 0.0])
    mean = grey.mean()
    assert np.allclose(aug.adjust_contrast(image, 0.5), np.clip(0.5 * image + 0.5 * mean, 0, 1),
                       atol=1e-6)
    expected = np.clip(2.0 * image - grey[None, :, None], 0, 1)
    assert np.allclose(aug.adjust_saturation(image, 2.0), expected, atol=1e-6)


def test_hue_matches_colorsys_and_leaves_grey_alone():
    rng = np.random.default_rng(1)
    image = rng.random((6, 7, 3)).astype(np.float32)
    shift = 0.17
    expected = np.array([[colorsys.hsv_to_rgb((h + shift) % 1, s, v)
                          for h, s, v in (colorsys.rgb_to_hsv(*p) for p in row)]
                         for row in image.astype(np.float64)])
    assert np.allclose(aug.adjust_hue(image, shift), expected, atol=1e-5)
    assert np.allclose(aug.adjust_hue(image, -0.5), [[colorsys.hsv_to_rgb(
        (colorsys.rgb_to_hsv(*p)[0] - 0.5) % 1, *colorsys.rgb_to_hsv(*p)[1:]) for p in row]
        for row in image.astype(np.float64)], atol=1e-5)
    grey = np.repeat(rng.random((5, 5, 1)).astype(np.float32), 3, axis=-1)
    assert np.array_equal(aug.adjust_hue(grey, 0.2), grey)


def test_colour_jitter_keeps_range_and_is_seeded():
    image = np.random.default_rng(2).random((32, 32, 3)).astype(np.float32)
    config = aug.FINETUNE_AUGMENT
    a = aug.color_jitter(image, np.random.default_rng(7), config)
    b = aug.color_jitter(image, np.random.default_rng(7), config)
    c = aug.color_jitter(image, np.random.default_rng(8), config)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.dtype == np.float32 and 0.0 <= a.min() and a.max() <= 1.0


def test_perturbed_box_grows_by_at_most_the_shift_and_stays_on_the_image():
    rng = np.random.default_rng(3)
    box = np.array([2, 100, 250, 120])
    seen = set()
    for _ in range(300):
        moved = aug.perturb_box(box, rng, 5, SIZE)
        assert moved[0] <= box[0] and moved[1] <= box[1] and moved[2] >= box[2]
        assert moved[3] >= box[3]
        assert moved.min() >= 0 and moved.max() <= SIZE - 1           # 255, not 256
        assert box[1] - moved[1] <= 5 and moved[3] - box[3] <= 5
        seen.add(int(box[1] - moved[1]))
    assert seen == set(range(6))                                     # 0..5 inclusive


def test_augment_example_recipe():
    rng = np.random.default_rng(4)
    example = _example(rng)
    flips = {"h": 0, "v": 0}
    for seed in range(120):
        out = aug.augment_example(example, np.random.default_rng(seed), aug.FINETUNE_AUGMENT)
        tight = aug.box_from_mask(out["mask"])
        box = out["box"]
        assert np.all(box[:2] <= tight[:2]) and np.all(box[2:] >= tight[2:])
        assert np.all(tight[:2] - box[:2] <= 5) and np.all(box[2:] - tight[2:] <= 5)
        # Which flips happened, read off the (asymmetric) mask.
        mask = example["mask"]
        (h, v), = [(h, v) for h in (0, 1) for v in (0, 1)
                   if np.array_equal(out["mask"], _flip(mask, h, v))]
        flips["h"] += h
        flips["v"] += v
        # The teacher embedding followed the same flips as the mask.
        assert np.array_equal(out["teacher_embedding"], _flip(example["teacher_embedding"], h, v))
    # p = 0.7 each (reference: random() > 0.3); 120 draws: mean 84, sd 5.
    assert 62 <= flips["h"] <= 106 and 62 <= flips["v"] <= 106
    again = aug.augment_example(example, np.random.default_rng(5), aug.FINETUNE_AUGMENT)
    same = aug.augment_example(example, np.random.default_rng(5), aug.FINETUNE_AUGMENT)
    assert all(np.array_equal(again[k], same[k]) for k in again)
    assert np.array_equal(example["image"], _example(np.random.default_rng(4))["image"])


def test_distillation_preset_does_not_jitter_colour():
    example = _example(np.random.default_rng(6))
    for seed in range(20):
        out = aug.augment_example(example, np.random.default_rng(seed), aug.DISTILL_AUGMENT)
        candidates = [example["image"], example["image"][:, ::-1], example["image"][::-1],
                      example["image"][::-1, ::-1]]
        assert any(np.array_equal(out["image"], c) for c in candidates)
        assert np.array_equal(out["box"], aug.box_from_mask(out["mask"]))
