"""The three ways to make the teacher's input agree with scikit-image's reference
(``teacher_input(region, T, keep_aspect=True)``): the grey path to ~1e-13, the device path
(interpolation matrices + clip + min-max under jax.jit) to float32 rounding; also the tiny
ViT's embedding of the device input against the embedding of the reference input."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from input_pipeline.teacher_inputs import (device_teacher_inputs, grey_teacher_input,
                                           interpolation_matrix, is_grey, prepare_batch)
from rep_medsam_jax.preprocess import teacher_input

FRAME = 48


def _slices() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Stored (FRAME, FRAME, 3) uint8 slices with valid regions of several shapes: grey and
    colour, one without zeros (scikit-image's clip then widens to include 0), one constant."""
    rng = np.random.default_rng(0)
    images, hws = [], []
    for h, w, grey, low in [(48, 30, True, 0), (20, 48, False, 0), (48, 48, True, 40),
                            (33, 48, False, 90), (48, 11, True, 7)]:
        image = np.zeros((FRAME, FRAME, 3), np.uint8)
        region = rng.integers(low, 256, (h, w, 1 if grey else 3))
        image[:h, :w] = region
        images.append(image)
        hws.append(np.array([h, w]))
    images[-1][:48, :11] = 7                    # constant region: min-max gives all zeros
    return images, hws


def _reference(images, hws, size) -> np.ndarray:
    return np.stack([teacher_input(image[:h, :w], size=size, keep_aspect=True)
                     for image, (h, w) in zip(images, hws)])


@pytest.mark.parametrize("size", [192, 32])         # enlarging 4x (as 256 -> 1024); shrinking
def test_grey_and_device_paths_match_the_reference(size):
    images, hws = _slices()
    reference = _reference(images, hws, size)
    grey = prepare_batch(images, hws, "grey", size)["inputs"]
    assert np.abs(grey - reference).max() < 1e-6
    device = np.asarray(jax.jit(device_teacher_inputs)(prepare_batch(images, hws, "device",
                                                                     size)))
    assert device.shape == reference.shape == (5, size, size, 3)
    assert np.abs(device - reference).max() < 2e-6
    assert not device[-1].any()                      # the constant slice


def test_interpolation_matrix_is_the_resize_of_unit_vectors():
    from skimage import transform

    matrix = interpolation_matrix(10, 40)
    assert matrix.shape == (40, 10)
    unit = np.zeros(10)
    unit[3] = 1.0
    resized = transform.resize(np.stack([unit] * 4, axis=1), (40, 4), order=3, mode="constant",
                               anti_aliasing=True, clip=False)
    assert np.allclose(matrix[:, 3], resized[:, 0], atol=1e-12)
    # Linear: the matrix times any vector is the (unclipped) resize of that vector.
    vector = np.random.default_rng(0).normal(size=10)
    resized = transform.resize(np.stack([vector] * 4, axis=1), (40, 4), order=3,
                               mode="constant", anti_aliasing=True, clip=False)
    assert np.allclose(matrix @ vector, resized[:, 0], atol=1e-12)


def test_grey_detection():
    grey = np.repeat(np.arange(12, dtype=np.uint8).reshape(3, 4, 1), 3, axis=-1)
    assert is_grey(grey) and is_grey(grey[..., 0])
    colour = grey.copy()
    colour[1, 1, 2] += 1
    assert not is_grey(colour)
    assert np.array_equal(grey_teacher_input(colour, 16),
                          teacher_input(colour, size=16, keep_aspect=True))


def test_device_input_gives_the_reference_embedding():
    from input_pipeline.teacher_cache import load_teacher, make_encode_fn

    teacher = load_teacher(variant="vit_tiny", random_seed=0)
    size = teacher.config.img_size
    images, hws = _slices()
    from rep_medsam_jax.models.vit import ViTImageEncoder

    model = ViTImageEncoder(teacher.config)
    reference = np.asarray(jax.jit(lambda v, x: model.apply(v, x)[0])(
        teacher.variables, _reference(images, hws, size)))
    device = make_encode_fn(teacher, 8, "device")(prepare_batch(images, hws, "device", size))
    scale = np.abs(reference).max()
    assert np.abs(device - reference).max() < 1e-4 * scale
