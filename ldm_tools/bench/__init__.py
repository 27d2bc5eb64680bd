"""``ldm-bench``: every engine and its peers on the same weights, batch sizes and resolution, in one run.

    ldm-bench --model runs/ldm --batch-sizes 1,4,8 --steps 10 --json bench.json
    ldm-bench --preset sd15 --latent-size 16 --batch-sizes 1,8 --threads 1 --json sd15.json

``cli`` parses and checks the arguments (no torch: ``--help`` is instant), ``sources`` makes the folders the
engines read (a random-weight preset checkpoint, an engine dir exported from it), ``memory`` estimates each
engine's resident size and plans the groups of engines that fit in memory together, ``workers`` holds one
engine per process and times it, ``report`` turns the samples into the table, the JSON and the plot.
"""

from ldm_tools.bench.cli import main

__all__ = ["main"]
