"""Several processes opening one engine dir with the openvino engine at once, sharing a fresh compile cache: how many
of them fail. Each round starts ``--processes`` processes that compile every graph at UNet batches 1 to 8.

    python benchmarks/openvino_cache_race.py ENGINE_DIR --processes 4 --rounds 6            # the engine as shipped
    python benchmarks/openvino_cache_race.py ENGINE_DIR --processes 4 --rounds 6 --no-lock  # without its cache lock

The engine writes each cache entry whole (a temporary file renamed into place) and checks its sha256 when it reads
it, so processes without the lock should not fail either: they compile the same graphs at the same time instead of
one compiling while the others wait and then load its entries.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one_process(engine_dir: str, cache_dir: str, lock: bool) -> None:
    import numpy as np

    from ldm_runtime.engines import compile_cache, openvino_engine

    if not lock:
        compile_cache.fcntl = None
    engine = openvino_engine.OpenVinoEngine(engine_dir, intra_op_threads=1, verify=False, cache_dir=cache_dir)
    rng = np.random.default_rng(0)
    latent_size = engine.manifest.dims["latent_height"].opt
    channels = engine.info.latent_channels
    context, mask = engine.encode_text(["a red circle"])
    for rows in (1, 2, 3, 4, 8):
        latents = rng.standard_normal((rows, channels, latent_size, latent_size)).astype(np.float32)
        engine.unet(latents, np.full(rows, 10), context.repeat(rows, 0), mask.repeat(rows, 0))
        engine.decode(latents)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("engine_dir")
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--no-lock", action="store_true", help="compile without the engine's cache lock")
    parser.add_argument("--child", nargs=2, metavar=("CACHE_DIR", "LOCK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        one_process(args.engine_dir, args.child[0], args.child[1] == "lock")
        return 0
    failures = []
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="ov-cache-race-") as cache:
            children = [subprocess.Popen([sys.executable, __file__, args.engine_dir, "--child", cache,
                                          "nolock" if args.no_lock else "lock"], cwd=ROOT,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                        for _ in range(args.processes)]
            for child in children:
                _, err = child.communicate()
                if child.returncode != 0:
                    lines = err.strip().splitlines()
                    failures.append(f"exit {child.returncode}: {lines[-1] if lines else '(no message)'}")
    total = args.processes * args.rounds
    print(f"{len(failures)} of {total} processes failed ({'without' if args.no_lock else 'with'} the cache lock)")
    for failure in failures:
        print(f"  {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
