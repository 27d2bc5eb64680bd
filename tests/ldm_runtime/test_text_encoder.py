"""The text encoder next to Hugging Face transformers: our top-level ``kernels`` package is never taken for the
optional ``kernels`` (hub kernels) library, whatever version number ldm-runtime carries."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# A fresh interpreter (transformers decides once per process) in which ldm-runtime's distribution claims the
# lowest version inside transformers' supported kernels window, then builds a text encoder (imports BertModel).
PRETEND_IN_WINDOW = """
import importlib.metadata
from transformers.utils import import_utils

real_version = importlib.metadata.version
importlib.metadata.version = lambda name: (import_utils.KERNELS_MIN_VERSION if name.replace("_", "-") == "ldm-runtime"
                                           else real_version(name))
found, version = import_utils._is_package_available("kernels", return_version=True)
assert found and version == import_utils.KERNELS_MIN_VERSION, (found, version)  # the pretence is what transformers sees

from ldm_runtime.config import TextEncoderConfig
from ldm_runtime.models import TextEncoder

encoder = TextEncoder(TextEncoderConfig(kind="scratch", max_length=8, hidden_size=32, num_layers=1, num_heads=2,
                                        intermediate_size=64))
context, mask = encoder.encode(["a red circle"])
print("is_kernels_available", import_utils.is_kernels_available(), tuple(context.shape))
"""


def test_transformers_keeps_hub_kernels_off_when_our_version_is_inside_its_kernels_window():
    result = subprocess.run([sys.executable, "-c", PRETEND_IN_WINDOW], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "is_kernels_available False (1, 8, 32)"
