import sys

from ldm_runtime.bench.cli import main

sys.exit(main())
