"""``python -m ldm_train``: the same as ``ldm-train`` (handy under ``torchrun -m ldm_train``)."""

import sys

from ldm_train.cli import main

sys.exit(main())
