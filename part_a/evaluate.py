"""Evaluate a trained checkpoint, of Part A or Part B, on the test split and draw the report's figures.

    python part_a/evaluate.py --checkpoint runs/NAME/best.pt [--data_dir data] [--out_dir DIR]
    python part_a/evaluate.py --checkpoint runs/NAME/best.pt --images photo.jpg other.png

The work is in common/evaluate.py, since it serves both parts.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the repo root

from common.evaluate import get_args_parser, main  # noqa: E402,F401  (the options, for --help and the docs)

if __name__ == "__main__":
    sys.exit(main())
