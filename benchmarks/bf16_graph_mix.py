"""Which of the openvino engine's graphs, computed in bf16, move whole sampling runs off fp32's images: ldm-eval's
held-out demo prompts sampled at fp32 (and on onnxruntime's fp32 engine, for scale), at bf16 (every graph), at bf16
with some graphs kept at fp32 (the text encoder, the autoencoder, or both), and with only the UNet's calls below a
timestep in bf16 (the noisier calls, where a sample's layout is decided, at fp32), each run's images against fp32's
as ``benchmarks/bf16_fidelity.py`` judges them (the PSNR of all of a run's uint8 images together; the bar is 40 dB).

    ldm-export models/shapes-demo --out demo-fp32 --engine fp32
    OMP_NUM_THREADS=2 python benchmarks/bf16_graph_mix.py demo-fp32 --threads 2 \\
        --json benchmarks/results/cpu-openvino-bf16-graph-mix.json
    OMP_NUM_THREADS=2 python benchmarks/bf16_graph_mix.py demo-fp32 --threads 2 --prompts 1000 --seed 10000 \\
        --variants bf16,unet-bf16-below-900,unet-bf16-below-300 \\
        --json benchmarks/results/cpu-openvino-bf16-graph-mix-validation.json

Every run uses ldm-eval's defaults (prompts of data seed 0, seeds 0..N-1, the model's default sampler and steps,
guidance and eta, batches of 16); one engine is in memory at a time.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

NOT_UNET = ("text_encoder", "vae_decoder", "vae_encoder")
VARIANTS = {  # name: (what it is, the engine's precision, the graphs compiled at fp32 whatever it is, the UNet's
    #                   calls at timesteps >= this go to fp32 (None: none))
    "fp32": ("fp32", "fp32", (), None),
    "onnxruntime": ("onnxruntime's engine, fp32", "onnxruntime", (), None),
    "bf16": ("bf16, every graph", "bf16", (), None),
    "text-encoder-fp32": ("bf16, text encoder at fp32", "bf16", ("text_encoder",), None),
    "autoencoder-fp32": ("bf16, autoencoder at fp32", "bf16", ("vae_decoder", "vae_encoder"), None),
    "unet-bf16": ("bf16 UNet only (text encoder and autoencoder at fp32)", "bf16", NOT_UNET, None),
    **{f"unet-bf16-below-{low}": (f"bf16 UNet below timestep {low} only", "bf16", NOT_UNET, low)
       for low in (900, 700, 500, 300)},
}


def mixed_engine(engine_dir: str, precision: str, fp32_graphs: tuple[str, ...], threads: int,
                 fp32_from_timestep: int | None = None):
    """onnxruntime's engine where ``precision`` is "onnxruntime", else an openvino engine at ``precision`` that
    compiles ``fp32_graphs`` with an fp32 inference precision and, given ``fp32_from_timestep``, runs the UNet's calls
    at that timestep or above on an fp32 engine of the same dir."""
    from ldm_runtime.engines.openvino_engine import PRECISIONS, OpenVinoEngine

    if precision == "onnxruntime":
        from ldm_runtime.engines.onnxruntime_engine import OnnxRuntimeEngine

        return OnnxRuntimeEngine(engine_dir, intra_op_threads=threads)

    class Mixed(OpenVinoEngine):
        fp32 = None if fp32_from_timestep is None else OpenVinoEngine(
            engine_dir, precision="fp32", intra_op_threads=threads, cache_dir=None)

        def _compile(self, graph, shapes, **extra_config):
            if graph in fp32_graphs:
                extra_config = {**extra_config, "INFERENCE_PRECISION_HINT": PRECISIONS["fp32"]}
            return super()._compile(graph, shapes, **extra_config)

        def run(self, graph, feeds):
            if self.fp32 is not None and graph.startswith("unet") and feeds["timesteps"].max() >= fp32_from_timestep:
                return self.fp32.run(graph, feeds)
            return super().run(graph, feeds)

    return Mixed(engine_dir, precision=precision, intra_op_threads=threads, cache_dir=None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("engine_dir", help="the demo model's fp32 engine dir")
    parser.add_argument("--prompts", type=int, default=200, help="ldm-eval's held-out prompts to sample")
    parser.add_argument("--seed", type=int, default=None, help="image i's seed is seed + i (default: ldm-eval's)")
    parser.add_argument("--variants", default=None,
                        help="comma-separated names of VARIANTS to run besides fp32 (default: every one)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    from benchmarks.bf16_fidelity import PSNR_BAR_DB, image_psnrs
    from ldm_runtime.pipeline import Pipeline
    from ldm_tools.bench.cli import machine_info
    from ldm_tools.evaluate import EvalSettings, generate_images, heldout_prompts

    defaults = EvalSettings(model=args.engine_dir, json="")
    seed = defaults.seed if args.seed is None else args.seed
    names = list(VARIANTS) if args.variants is None else ["fp32", *args.variants.split(",")]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        parser.error(f"--variants names {', '.join(map(repr, unknown))}; expected names from {', '.join(VARIANTS)}")
    report = {"machine": machine_info(), "prompts": args.prompts, "seed": seed, "bar_db": PSNR_BAR_DB, "runs": {}}
    samples = {}
    for name in names:
        what, precision, fp32_graphs, fp32_from_timestep = VARIANTS[name]
        engine = mixed_engine(args.engine_dir, precision, fp32_graphs, args.threads, fp32_from_timestep)
        pipeline = Pipeline(engine)
        sampler = pipeline.default_sampler
        steps = pipeline.default_steps_for(sampler)
        captions, _ = heldout_prompts(args.prompts, engine.info.image_size, defaults.data_seed)
        started = time.perf_counter()
        samples[name] = list(generate_images(engine, captions, [seed + i for i in range(args.prompts)],
                                             steps, defaults.guidance, defaults.eta, defaults.batch_size, sampler))
        run = {"what": what, "precision": precision, "fp32_graphs": list(fp32_graphs),
               "unet_fp32_from_timestep": fp32_from_timestep, "sampler": sampler, "steps": steps,
               "seconds": round(time.perf_counter() - started, 2)}
        if name != "fp32":
            psnrs = image_psnrs(samples[name], samples["fp32"])
            run.update(run_psnr_db=round(psnrs["run_psnr_db"], 3),
                       worst_image_psnr_db=round(psnrs["min_image_psnr_db"], 3),
                       images_under_bar=sum(value < PSNR_BAR_DB for value in psnrs["image_psnr_db"]))
            print(f"{what}: run {run['run_psnr_db']:.2f} dB, worst image {run['worst_image_psnr_db']:.1f} dB, "
                  f"{run['images_under_bar']} of {args.prompts} under {PSNR_BAR_DB:g} dB", flush=True)
        report["runs"][name] = run
        del engine, pipeline
        gc.collect()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
