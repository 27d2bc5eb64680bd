"""``python -m train``: the same as ``ldm-train`` (handy under ``torchrun -m train``)."""

import sys

from train.cli import main

sys.exit(main())
