import sys

from ldm_tools.bench.cli import main

sys.exit(main())
