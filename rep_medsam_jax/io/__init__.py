"""Reading cases (challenge npz, NIfTI, PNG/JPEG + JSON boxes) and writing label maps atomically.

NumPy, nibabel and OpenCV only (the last two imported when first needed): never JAX.
See :mod:`rep_medsam_jax.io.cases` for the formats, the JSON sidecar schema and conventions.
"""

from rep_medsam_jax.io.cases import (
    BoxError,
    BoxOutOfBoundsError,
    BoxShapeError,
    Case,
    CaseError,
    CaseReadError,
    EmptyImageError,
    ImageDtypeError,
    ImageShapeError,
    InvertedBoxError,
    MissingBoxesError,
    MissingKeyError,
    NiftiGeometry,
    NonFiniteImageError,
    SegmentationError,
    Sidecar,
    SidecarError,
    SpacingError,
    atomic_write,
    case_name,
    discover_cases,
    dhw_to_volume,
    intensities_to_uint8,
    min_max_to_uint8,
    percentile_to_uint8,
    read_case,
    read_sidecar,
    sidecar_path,
    three_axes,
    validate_boxes,
    volume_to_dhw,
    window_ct,
    write_bytes_atomic,
    write_segmentation,
    write_text_atomic,
)

__all__ = [
    "BoxError", "BoxOutOfBoundsError", "BoxShapeError", "Case", "CaseError", "CaseReadError",
    "EmptyImageError", "ImageDtypeError", "ImageShapeError", "InvertedBoxError",
    "MissingBoxesError", "MissingKeyError", "NiftiGeometry", "NonFiniteImageError",
    "SegmentationError", "Sidecar", "SidecarError", "SpacingError", "atomic_write", "case_name",
    "discover_cases", "dhw_to_volume", "intensities_to_uint8", "min_max_to_uint8",
    "percentile_to_uint8",
    "read_case", "read_sidecar", "sidecar_path", "three_axes", "validate_boxes", "volume_to_dhw",
    "window_ct",
    "write_bytes_atomic", "write_segmentation", "write_text_atomic",
]
