"""Where the loader's data goes: several hosts read exactly the batches one host would (host i
of n loads rows i*b..(i+1)*b-1 of every global batch, augmentation included, and an evaluation
pass covers every example once), and images sent to the device as uint8 and finished there
(normalisation, colour jitter) equal the host's float32 images.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from input_pipeline import augment as host
from input_pipeline import device_augment as device
from input_pipeline.augment import FINETUNE_AUGMENT
from input_pipeline.loader import make_loader


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    from tests.phantom_data import build_2d_phantoms

    return build_2d_phantoms(tmp_path_factory.mktemp("hosts"), n2d=8).dataset_dir


def _batches(dataset_dir, split, hosts, count=None, **options):
    """Per host, its batches (global batch 4 split over ``hosts``)."""
    out = []
    for index in range(hosts):
        loader = make_loader(dataset_dir, split, batch_size=4 // hosts, process_index=index,
                             process_count=hosts, **options)
        iterator = iter(loader)
        out.append([next(iterator) for _ in range(count)] if count else list(iterator))
    return out


def test_two_hosts_train_on_the_batches_of_one(dataset_dir):
    # 15 training slices, global batch 4: 6 batches cross an epoch boundary (and a reshuffle).
    options = dict(seed=3, augment=FINETUNE_AUGMENT, shuffle=True, num_epochs=None)
    (one,) = _batches(dataset_dir, "train", 1, count=6, **options)
    two = _batches(dataset_dir, "train", 2, count=6, **options)
    for step in range(6):
        for key in ("index", "image", "mask", "box"):
            joined = np.concatenate([two[0][step][key], two[1][step][key]])
            np.testing.assert_array_equal(joined, one[step][key], err_msg=f"{key} {step}")


def test_two_hosts_evaluate_every_example_once(dataset_dir):
    # 5 validation objects (evaluation reads every object), global batch 4: host 0 gets rows
    # 0-1 and 4, host 1 rows 2-3.
    options = dict(shuffle=False, num_epochs=1, drop_remainder=False, sampling="object")
    (one,) = _batches(dataset_dir, "validation", 1, **options)
    two = _batches(dataset_dir, "validation", 2, **options)
    assert [len(b["index"]) for b in one] == [4, 1]
    assert [[len(b["index"]) for b in host] for host in two] == [[2, 1], [2]]
    pairs = sorted((int(i), int(k)) for host in two for b in host
                   for i, k in zip(b["index"], b["label"]))
    assert pairs == sorted((int(i), int(k)) for b in one for i, k in zip(b["index"], b["label"]))
    assert len(set(pairs)) == 5


def _jitter_cases():
    """Six images (colourful, grey, with a padded border) and jitter draws covering every
    adjustment in every position."""
    rng = np.random.default_rng(0)
    images = rng.random((6, 16, 16, 3)).astype(np.float32)
    images[1] = images[1, :, :, :1]                      # grey
    images[2, 12:] = 0.0                                 # a zero-padded border
    draws = [host.draw_jitter(rng, FINETUNE_AUGMENT) for _ in range(6)]
    order = np.stack([d[0] for d in draws])
    factors = np.stack([d[1] for d in draws])
    order[:4] = [np.roll(np.arange(4), k) for k in range(4)]  # each adjustment first once
    return images, order, factors


def test_device_jitter_equals_host_jitter():
    images, order, factors = _jitter_cases()
    expected = np.stack([host.apply_jitter(image, o, f)
                         for image, o, f in zip(images, order, factors)])
    got = np.asarray(jax.jit(device.jitter_images)(images, order, factors))
    np.testing.assert_allclose(got, expected, atol=2e-6)
    # Each adjustment alone, against the host function.
    each = jax.jit(device.adjustments)(images[0], factors[0])
    for index, adjust in enumerate((host.adjust_brightness, host.adjust_contrast,
                                    host.adjust_saturation, host.adjust_hue)):
        alone = np.asarray(each)[index]
        np.testing.assert_allclose(alone, adjust(images[0], float(factors[0, index])),
                                   atol=2e-6, err_msg=adjust.__name__)


def test_device_images_equal_host_images(dataset_dir):
    """The same stream with the images finished on the host (float32) and on the device (uint8
    + region + jitter drawn on the host): equal images, identical masks and boxes."""
    options = dict(batch_size=4, seed=1, augment=FINETUNE_AUGMENT, shuffle=True)
    host_batches = iter(make_loader(dataset_dir, "train", **options))
    device_batches = iter(make_loader(dataset_dir, "train", device_images=True, **options))
    for _ in range(3):
        on_host, on_device = next(host_batches), next(device_batches)
        assert on_host["image"].dtype == np.float32 and on_device["image"].dtype == np.uint8
        finished = np.asarray(jax.jit(device.finish_images)(
            {k: on_device[k] for k in ("image", "image_region", "jitter_order",
                                       "jitter_factors")}))
        np.testing.assert_allclose(finished, on_host["image"], atol=2e-6)
        for key in ("mask", "box", "index"):
            np.testing.assert_array_equal(on_device[key], on_host[key])
    # Without jitter (evaluation): the normalisation alone.
    plain = dict(batch_size=5, shuffle=False, num_epochs=1, drop_remainder=False)
    on_host = next(iter(make_loader(dataset_dir, "validation", **plain)))
    on_device = next(iter(make_loader(dataset_dir, "validation", device_images=True, **plain)))
    finished = np.asarray(device.finish_images({k: on_device[k]
                                                for k in ("image", "image_region")}))
    np.testing.assert_allclose(finished, on_host["image"], atol=1e-7)
