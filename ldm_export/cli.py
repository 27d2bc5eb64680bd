"""``ldm-export``: a checkpoint dir (ldm-train) -> an engine dir the runtime serves without torch.

    ldm-export runs/ldm --out engines/ldm-fp16 --engine fp16
    ldm-export runs/ldm --out engines/ldm-fp32 --engine fp32 --batch-range 1:2:16 --size-range 32:128
    ldm-export --rebuild-plans engines/ldm-fp16      # TensorRT plans again, for this GPU and TensorRT

Every export is validated against the eager PyTorch model (per-graph relative error and a full 25-step
sample's PSNR, printed as a table); a failed validation exits non-zero and leaves nothing at --out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from ldm_export.errors import ValidationFailedError
from ldm_export.options import DEFAULT_BATCH_RANGE, ExportOptions
from ldm_export.out_folder import check_out
from ldm_export.tensorrt_build import rebuild_plans
from ldm_runtime.command_line import OneLineArgumentParser, report_user_error, sigterm_as_ctrl_c
from ldm_runtime.errors import DiskFullError, UserError

PROG = "ldm-export"


def integer_range(form: str, example: str) -> Callable[[str], tuple[int, ...]]:
    """An argparse type for colon-separated integers, as many as ``form`` ("MIN:OPT:MAX") has parts; a bad
    value is refused naming ``form`` and ``example``."""
    count = len(form.split(":"))

    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(part) for part in text.split(":"))
        except ValueError:
            values = ()
        if len(values) != count:
            raise argparse.ArgumentTypeError(f"{text!r} is not {form} ({example})")
        return values

    return parse


def build_parser() -> argparse.ArgumentParser:
    defaults = ExportOptions()
    parser = OneLineArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?", metavar="CHECKPOINT_DIR",
                        help="checkpoint dir written by `ldm-train unet` (model.json + *.safetensors)")
    parser.add_argument("--out", metavar="ENGINE_DIR",
                        help="engine dir to write (refused if it exists, unless --force)")
    parser.add_argument("--engine", default=defaults.precision, choices=("fp32", "fp16"),
                        help="graph precision; fp16 keeps fp32 for normalisation statistics, softmax and the timestep "
                             "sinusoids (default: %(default)s)")
    parser.add_argument("--backend", choices=("onnxruntime", "tensorrt"), default=defaults.backend,
                        help="what the engine runs on; tensorrt also builds TensorRT plans (default: tensorrt where "
                             "it imports and a CUDA GPU is visible, else onnxruntime)")
    parser.add_argument("--batch-range", type=integer_range("MIN:OPT:MAX", "three integers, e.g. 1:2:8"),
                        default=defaults.batch_range, metavar="MIN:OPT:MAX",
                        help="UNet batch sizes the graphs accept, guidance doubling included (default: "
                             f"{':'.join(map(str, DEFAULT_BATCH_RANGE))})")
    parser.add_argument("--size-range", type=integer_range("MIN:MAX", "two integers in pixels, e.g. 32:64"),
                        default=defaults.size_range, metavar="MIN:MAX",
                        help="image side in pixels, multiples of the latent factor times the UNet's downsampling "
                             "(default: the model's image size up to the largest it is asked for, twice it)")
    parser.add_argument("--opset", type=int, default=defaults.opset, help="ONNX opset (default: the exporter's)")
    parser.add_argument("--force", action="store_true", help="replace an existing engine dir at --out")
    parser.add_argument("--fp32-io", action="store_true",
                        help="fp16 graphs with float32 inputs and outputs (a Cast at each edge)")
    parser.add_argument("--skip-validation", action="store_true",
                        help="do not compare the graphs with the eager model (the manifest records that)")
    parser.add_argument("--validation-seed", type=int, default=defaults.validation_seed,
                        help="seed of the validation inputs (default: a fresh one, recorded in the manifest)")
    parser.add_argument("--lora-slots", type=int, default=defaults.lora_slots, metavar="RANK",
                        help="give the UNet graphs per-row LoRA inputs of rank RANK, so that ldm-sample / ldm-serve "
                             "--lora adapters apply per request (the summed ranks of one request's adapters; costs "
                             "two thin matmuls per linear and 1x1 layer at every step; default: none)")
    parser.add_argument("--rebuild-plans", metavar="ENGINE_DIR", default=None,
                        help="rebuild the TensorRT plans of an existing engine dir from its ONNX graphs, on this GPU")
    return parser


def _log(line: str) -> None:
    print(f"{PROG}: {line}", file=sys.stderr, flush=True)


@sigterm_as_ctrl_c
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.rebuild_plans is not None:
            if args.checkpoint is not None or args.out is not None:
                parser.error("--rebuild-plans ENGINE_DIR takes no CHECKPOINT_DIR and no --out")
        elif args.checkpoint is None or args.out is None:
            parser.error("CHECKPOINT_DIR and --out ENGINE_DIR are required (or --rebuild-plans ENGINE_DIR)")
        else:
            check_out(Path(args.out), args.force)  # before the heavy imports: a taken --out is refused at once
    except UserError as error:
        return report_user_error(PROG, error)

    # The heavy imports (torch, onnx, transformers) come after argument parsing: --help stays instant.
    from ldm_export.engine_dir import export_engine

    try:
        if args.rebuild_plans is not None:
            rebuild_plans(Path(args.rebuild_plans), _log)
            _log(f"rebuilt the TensorRT plans of {args.rebuild_plans}")
            return 0
        options = ExportOptions(
            precision=args.engine, backend=args.backend, batch_range=args.batch_range,
            size_range=args.size_range, opset=args.opset, force=args.force, fp32_io=args.fp32_io,
            skip_validation=args.skip_validation, validation_seed=args.validation_seed, lora_slots=args.lora_slots)
        export_engine(args.checkpoint, args.out, options, log=_log, show_report=lambda table: print(table, flush=True))
    except ValidationFailedError as error:
        report_user_error(PROG, error)
        return 1  # the export ran and the model failed its checks: not a usage error
    except UserError as error:
        return report_user_error(PROG, error)
    except OSError as error:  # a full disk is one line; any other OSError is a bug and keeps its traceback
        outcome = ("free space and run --rebuild-plans again" if args.rebuild_plans is not None
                   else f"{args.out} is as it was: free space and export again")
        full = DiskFullError.from_os_error(error, args.out or args.rebuild_plans, outcome)
        if full is None:
            raise
        return report_user_error(PROG, full)
    except KeyboardInterrupt:
        _log(f"interrupted; nothing was written to {args.out or args.rebuild_plans}")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
