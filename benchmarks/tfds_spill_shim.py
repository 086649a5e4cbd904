"""``python -m input_pipeline.build`` with tensorflow-datasets' shuffle spill on plain files.

tensorflow-datasets' writer (``tensorflow_datasets/core/shuffle.py``, the non-Beam path, also
used by a local Beam build) keeps a split's serialized records in memory up to 1 GB and then
spills them to bucket files through ``tf.io.gfile``, which needs TensorFlow. This project
installs tensorflow-datasets without TensorFlow, so a build whose split passes 1 GB of records
(about 4,000 slices) fails with ``No module named 'tensorflow'``. This wrapper gives that module
a ``tf.io.gfile`` made of Python's own file functions (all the spill uses: open, exists,
remove), so ``benchmarks/data_scale.py`` can measure builds past that size; the build is
otherwise run exactly as ``python -m input_pipeline.build ARGS``.

    python benchmarks/tfds_spill_shim.py ARGS...
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

# This folder holds benchmarks/input_pipeline.py: keep it off the front of the import path.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]


def install() -> bool:
    """Patch the spill when TensorFlow is missing; whether it was patched."""
    try:
        import tensorflow  # noqa: F401, PLC0415
        return False
    except ImportError:
        pass
    from tensorflow_datasets.core import shuffle  # noqa: PLC0415

    gfile = types.SimpleNamespace(GFile=open, exists=os.path.exists, remove=os.remove)
    shuffle.tf = types.SimpleNamespace(
        io=types.SimpleNamespace(gfile=gfile),
        errors=types.SimpleNamespace(ResourceExhaustedError=OSError))
    return True


if __name__ == "__main__":
    patched = install()
    print(f"tfds shuffle spill on plain files: {patched}", file=sys.stderr)
    from input_pipeline.build import main  # noqa: E402

    sys.exit(main(sys.argv[1:]))
