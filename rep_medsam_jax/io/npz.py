"""Challenge ``.npz`` files (the CVPR 2024 "Segment Anything in Medical Images on Laptop" format).

Keys: ``imgs`` ((H, W, 3) or grey (H, W) for 2D, (D, H, W) for 3D, uint8), ``boxes`` ((N, 4)
``[x_min, y_min, x_max, y_max]`` or (N, 6) ``[x_min, y_min, z_min, x_max, y_max, z_max]``),
optional ``spacing`` (3,) in the challenge's (x, y, z) order, ground truth ``gts`` and
predictions ``segs`` (label maps of the image's spatial shape). A name starting with ``3D`` is
a volume (:func:`rep_medsam_jax.io.formats.is_3d_name`).
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rep_medsam_jax.io.errors import (CaseReadError, ImageShapeError, MissingKeyError,
                                      check_not_empty)
from rep_medsam_jax.io.intensity import as_rgb, to_uint8


def read_npz(path: str | os.PathLike, keys: Sequence[str]
             ) -> tuple[dict[str, np.ndarray], list[str]]:
    """(the arrays of ``keys`` present in the archive, every key it holds, sorted).

    Pickled objects are refused; a corrupt file, or a bare ``.npy`` array under an ``.npz``
    name, raises CaseReadError naming the file.
    """
    path = Path(path)
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise CaseReadError(f"{path}: not an npz archive (a single array); save it with "
                                "np.savez(path, imgs=..., boxes=...)")
        with loaded as archive:
            return ({key: archive[key] for key in keys if key in archive.files},
                    sorted(archive.files))
    except CaseReadError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as err:
        raise CaseReadError(f"{path}: cannot read the npz: {err}") from None


def require(arrays: dict[str, np.ndarray], all_keys: list[str], key: str, path: Path,
            what: str) -> np.ndarray:
    """``arrays[key]``, or MissingKeyError naming the file and the keys it has."""
    if key not in arrays:
        raise MissingKeyError(f"{path}: missing key {key!r} ({what}); keys present: {all_keys}",
                              key=key)
    return arrays[key]


def challenge_image(image: np.ndarray, is_3d: bool, where: str) -> np.ndarray:
    """A stored ``imgs`` array -> (H, W, 3) uint8 for 2D, (D, H, W) uint8 for 3D."""
    check_not_empty(image, where)
    image = to_uint8(image, where)
    if not is_3d:
        return as_rgb(image, where)
    if image.ndim != 3:
        raise ImageShapeError(f"{where}: a 3D case needs imgs of shape (D, H, W), got "
                              f"{image.shape}")
    return image
