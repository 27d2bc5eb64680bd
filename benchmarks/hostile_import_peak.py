"""Peak memory of ``ldm-import`` refusing hostile single files, each run in a process of its own.

    python benchmarks/hostile_import_peak.py [--work DIR] [--json results.json]

Cases (all written sparse, so the disk holds almost nothing): 3 GiB of fp16 tensors under names no SD file has;
a header listing 600,000 tensors; a 3 GiB UNet-named tensor whose file stops after the header. Each run must exit 2
with one line on stderr; the table gives each process's peak resident memory (ru_maxrss).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

GIB = 1024 ** 3


def write_header_file(path: Path, header: dict | str, data_bytes: int = 0) -> Path:
    """A safetensors file: the header, then ``data_bytes`` never written (a sparse hole)."""
    text = (header if isinstance(header, str) else json.dumps(header)).encode()
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)) + text)
        handle.truncate(8 + len(text) + data_bytes)
    return path


def wrong_names(path: Path) -> Path:
    header, offset = {}, 0
    for index in range(3):
        size = GIB
        header[f"transformer.h.{index}.weight"] = {"dtype": "F16", "shape": [1024, 1024, 512],
                                                  "data_offsets": [offset, offset + size]}
        offset += size
    return write_header_file(path, header, offset)


def many_tensors(path: Path) -> Path:
    entry = '"t%d": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}'
    return write_header_file(path, "{" + ", ".join(entry % index for index in range(600_000)) + "}")


def truncated_unet(path: Path) -> Path:
    name = "model.diffusion_model.input_blocks.0.0.weight"
    header = {name: {"dtype": "F32", "shape": [1024, 1024, 768], "data_offsets": [0, 3 * GIB]}}
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text)  # the data the header promises is not there
    return path


CASES = {"3 GiB under wrong names": wrong_names, "600,000 tensors in the header": many_tensors,
         "3 GiB tensor, file cut after the header": truncated_unet}


def run_import(source: Path, out: Path, tokenizer: Path) -> tuple[int, str, int]:
    """(exit status, stderr, peak resident KiB) of one ldm-import process."""
    script = Path(sys.executable).with_name("ldm-import")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "ldm_export.sd_import"]
    process = subprocess.Popen([*command, str(source), "--out", str(out), "--tokenizer", str(tokenizer)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, stderr, usage.ru_maxrss


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="folder for the hostile files (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="ldm-hostile-"))
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = work / "tokenizer"
    tokenizer.mkdir(exist_ok=True)
    results, failed = [], False
    for index, (name, build) in enumerate(CASES.items()):
        source = build(work / f"case{index}.safetensors")
        code, stderr, peak_kib = run_import(source, work / f"out{index}", tokenizer)
        lines = stderr.strip().splitlines()
        ok = code == 2 and len(lines) == 1 and not (work / f"out{index}").exists()
        failed |= not ok
        results.append({"case": name, "exit": code, "stderr": stderr.strip(), "peak_rss_mib": peak_kib / 1024,
                        "one_line_exit_2_nothing_written": ok})
        print(f"{name:42s} exit {code}  peak {peak_kib / 1024:7.1f} MiB  {'ok' if ok else 'NOT OK'}  "
              f"{lines[-1][:110] if lines else ''}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.work is None:
        shutil.rmtree(work)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
