"""The one format layer: every image, volume and label map enters and leaves the project here.

Inference cases (:mod:`.cases`), training sources (``input_pipeline.sources``) and evaluation
(``rep_medsam_jax.metrics``) all read through these modules, so one slice becomes one uint8
array everywhere:

* :mod:`.npz` challenge ``.npz``; :mod:`.nifti` NIfTI volumes; :mod:`.dicom` DICOM files and
  series; :mod:`.images` PNG / JPEG images and PNG label maps;
* :mod:`.sidecar` the JSON sidecar (boxes, label names, intensity rule);
* :mod:`.orientation` stored voxels <-> the (D, H, W) axial array; :mod:`.intensity` the uint8
  rules; :mod:`.boxes` box and spacing checks; :mod:`.labels` integer label maps;
* :mod:`.errors` the :class:`CaseError` family; :mod:`.atomic` writes that never leave half a
  file; :mod:`.formats` suffixes and case names.

NumPy, OpenCV, nibabel and pydicom only (the last two imported when first needed): never JAX.
"""

from rep_medsam_jax.io.atomic import atomic_write, write_bytes_atomic, write_text_atomic
from rep_medsam_jax.io.boxes import validate_boxes, validate_spacing
from rep_medsam_jax.io.cases import (Case, NiftiGeometry, discover_cases, read_case,
                                     write_segmentation)
from rep_medsam_jax.io.errors import (BoxError, BoxOutOfBoundsError, BoxShapeError, CaseError,
                                      CaseReadError, EmptyImageError, ImageDtypeError,
                                      ImageShapeError, InvertedBoxError, LabelMapError,
                                      MissingBoxesError, MissingKeyError, NonFiniteImageError,
                                      SegmentationError, SidecarError, SpacingError)
from rep_medsam_jax.io.formats import SUPPORTED_SUFFIXES, case_name
from rep_medsam_jax.io.intensity import (intensities_to_uint8, min_max_to_uint8,
                                         percentile_to_uint8, window_ct)
from rep_medsam_jax.io.labels import integer_labels
from rep_medsam_jax.io.orientation import dhw_to_volume, three_axes, volume_to_dhw
from rep_medsam_jax.io.sidecar import Sidecar, read_sidecar, sidecar_path

__all__ = [
    "BoxError", "BoxOutOfBoundsError", "BoxShapeError", "Case", "CaseError", "CaseReadError",
    "EmptyImageError", "ImageDtypeError", "ImageShapeError", "InvertedBoxError",
    "LabelMapError", "MissingBoxesError", "MissingKeyError", "NiftiGeometry",
    "NonFiniteImageError", "SUPPORTED_SUFFIXES", "SegmentationError", "Sidecar", "SidecarError",
    "SpacingError", "atomic_write", "case_name", "dhw_to_volume", "discover_cases",
    "integer_labels", "intensities_to_uint8", "min_max_to_uint8", "percentile_to_uint8",
    "read_case", "read_sidecar", "sidecar_path", "three_axes", "validate_boxes",
    "validate_spacing", "volume_to_dhw", "window_ct", "write_bytes_atomic", "write_segmentation",
    "write_text_atomic",
]
