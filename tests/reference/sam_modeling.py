"""Import segment-anything==1.0's model classes without its package ``__init__``.

The package ``__init__`` imports the predictor, which needs torchvision (not installable beside
the CPU torch here). The modeling files only need torch and numpy, so we register empty parent
packages in ``sys.modules`` and import ``segment_anything.modeling`` directly.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types


def load_sam_modeling() -> types.ModuleType:
    """Return the ``segment_anything.modeling`` module (ImageEncoderViT, PromptEncoder, ...)."""
    if "segment_anything.modeling" in sys.modules:
        return sys.modules["segment_anything.modeling"]
    spec = importlib.util.find_spec("segment_anything")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("segment-anything==1.0 is not installed (pip install '.[test]')")
    package = types.ModuleType("segment_anything")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules.setdefault("segment_anything", package)
    return importlib.import_module("segment_anything.modeling")
