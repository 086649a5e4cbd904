#!/usr/bin/env python
"""Export a model directory to a verified ONNX export directory (``rep-medsam export``).

    python export.py MODEL_DIR -o EXPORT_DIR [--int8] [--calibration DIR]
"""

import sys

from rep_medsam_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
