"""The errors of reading one case: every one is a :class:`CaseError` (a ``ValueError``) whose
message names the file, so a caller can report the case and go on with the next one."""

from __future__ import annotations

import numpy as np


class CaseError(ValueError):
    """A problem with one input case: report it and skip the case."""


class CaseReadError(CaseError):
    """The file cannot be read or decoded (corrupt, truncated, unsupported format)."""


class MissingKeyError(CaseError):
    """A required key is missing from a challenge npz."""

    def __init__(self, message: str, key: str):
        super().__init__(message)
        self.key = key


class MissingBoxesError(CaseError):
    """A case has no boxes: no ``boxes`` key, no JSON sidecar, no override, or an empty list."""


class SidecarError(CaseError):
    """The JSON sidecar is malformed or does not follow the schema."""


class ImageShapeError(CaseError):
    """The image has the wrong number of dimensions or channels for its case type."""


class EmptyImageError(ImageShapeError):
    """The image has a zero-size axis."""


class ImageDtypeError(CaseError):
    """The image is not uint8 and cannot be converted without changing its values."""


class NonFiniteImageError(CaseError):
    """The image contains NaN or infinite values."""


class SpacingError(CaseError):
    """The stored spacing is not three finite numbers."""


class BoxError(CaseError):
    """Base class of the box problems."""


class BoxShapeError(BoxError):
    """Boxes are not an (N, 4) / (N, 6) array of finite numbers."""


class BoxOutOfBoundsError(BoxError):
    """A box lies (partly) outside the image."""


class InvertedBoxError(BoxError):
    """A box has min > max on some axis."""


class LabelMapError(CaseError):
    """A label map does not fit its image (shape, geometry) or is not integer labels 0..65535."""


class SegmentationError(CaseError):
    """A label map handed to the writer does not fit its case."""


def check_not_empty(array: np.ndarray, where: str) -> None:
    """EmptyImageError when ``array`` has a zero-size axis."""
    if array.size == 0:
        raise EmptyImageError(f"{where}: image is empty (shape {array.shape})")
