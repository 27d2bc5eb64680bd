"""ldm-bench through its command line on the tiny checkpoint: a run of seconds writes a table, a JSON file with
sane figures and a PNG plot; every kind of bad input is one line on stderr and exit status 2. The memory the runs
plan with is given (``AVAILABLE_MIB``), never this machine's."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ldm_runtime.schedulers import SAMPLER_NAMES
from ldm_tools.bench import main
from ldm_tools.bench.workers import cpu_info
from tests.ldm_export.tiny_checkpoint import shared_tiny_checkpoint, shared_tiny_engine

REPO = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
AVAILABLE_MIB = 64 * 1024  # what --memory-budget auto plans with in these runs: every tiny engine fits at once


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return shared_tiny_checkpoint(tmp_path_factory)


def run_bench(capsys, *argv, available_mib=AVAILABLE_MIB):
    code = main([str(arg) for arg in argv], available_mib=available_mib)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, *fragments, after_progress=False):
    """Exit 2 and one error line on stderr; ``after_progress``: progress lines of a run that started may come first."""
    assert code == 2, err
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("ldm-bench: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in err, err
    assert after_progress or len(lines) == 1, err
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_help_is_instant_and_imports_neither_torch_nor_onnxruntime():
    script = ("import sys\nfrom ldm_tools.bench import main\n"
              "try:\n    main(['--help'])\nexcept SystemExit as exit:\n    assert exit.code == 0\n"
              "print('heavy imports:', sorted(m for m in ('torch', 'onnxruntime', 'ldm_train', 'matplotlib') "
              "if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--batch-sizes" in result.stdout and "heavy imports: []" in result.stdout


def test_tiny_bench_writes_table_json_and_png_plot(checkpoint, tmp_path, capsys):
    out = tmp_path / "results" / "bench.json"
    code, stdout, err = run_bench(capsys, "--model", checkpoint, "--engines", "torch,diffusers", "--batch-sizes", "2,1",
                                  "--steps", 2, "--repeats", 2, "--threads", 1, "--json", out, "--profile")
    assert code == 0, err
    assert "| torch | 1 |" in stdout and "| diffusers | 2 |" in stdout
    assert "profile diffusers batch 2: " in stdout

    report = json.loads(out.read_text())
    assert report["settings"]["batch_sizes"] == [1, 2] and report["settings"]["threads"] == 1
    assert report["command"].startswith("ldm-bench --model ")
    assert report["machine"]["cores"] >= 1 and report["machine"]["cpu"]
    flags, recorded = cpu_info()[1], report["machine"]["cpu_flags"]  # the SIMD flags lscpu shows, with the figures
    assert set(recorded) <= set(flags) and ("avx2" in recorded) == ("avx2" in flags), recorded
    engines = {entry["name"]: entry for entry in report["engines"]}
    assert [entry["status"] for entry in engines.values()] == ["ok", "ok"]
    for entry in engines.values():
        assert 0 < entry["load_s"] < entry["time_to_first_image_s"]  # the first image comes after the load
        assert entry["peak_rss_mib"] > 50  # a process that has imported torch holds more: the unit is MiB
        assert entry["image_std"] > 0  # the first image is not blank
        for ops in entry["profile"].values():
            assert 0 < sum(op["share"] for op in ops) <= 1 + 1e-9 and all(op["ms"] > 0 for op in ops)
    assert any("conv" in op["op"] or "mm" in op["op"] for op in engines["torch"]["profile"]["1"])  # the UNet's work
    assert engines["diffusers"]["unet_relative_error"] < 1e-4  # the same weights in diffusers' blocks

    rows = {(row["engine"], row["batch_size"]): row for row in report["results"]}
    assert set(rows) == {(engine, batch) for engine in ("torch", "diffusers") for batch in (1, 2)}
    for (engine, batch), row in rows.items():
        step, latency = row["step_seconds"], row["latency_seconds"]
        assert len(step["samples"]) == len(latency["samples"]) == 2
        assert 0 < step["min"] <= step["median"] <= step["max"]
        assert step["median"] == pytest.approx(sum(step["samples"]) / 2)  # the median of two samples
        assert row["unet_steps_per_s"] == pytest.approx(1 / step["median"])
        assert row["images_per_s"] == pytest.approx(batch / latency["median"])
        spread = max(step["spread"], latency["spread"])
        assert step["spread"] == pytest.approx((step["max"] - step["min"]) / step["median"])
        assert row["wide_spread"] == (spread > 0.10 or len(step["samples"]) < 3)
        baseline = rows[("torch", batch)]
        assert row["steps_speedup_vs_torch"] == pytest.approx(baseline["step_seconds"]["median"] / step["median"])
        assert row["latency_speedup_vs_torch"] == pytest.approx(
            baseline["latency_seconds"]["median"] / latency["median"])
    assert any("indicative only" in note for note in report["notes"]) == any(row["wide_spread"] for row in rows.values())

    plot = out.with_suffix(".png")
    assert report["plot"] == str(plot) and plot.read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.parametrize("argv, fragments", [
    (["--engines", "torch,tensorflow"], ["'tensorflow'", "torch.compile"]),
    (["--batch-sizes", "1,64"], ["batch size 64", "1 to 32"]),
    (["--batch-sizes", "1,x"], ["'1,x'", "positive integers"]),
    (["--steps", "0"], ["--steps is 0"]),
    (["--latent-size", "8"], ["--latent-size applies to --preset only"]),
    (["--sampler", "heun"], ["argument --sampler: invalid choice: 'heun'"]),
    (["--memory-budget", "0"], ["--memory-budget '0'", "auto, all or a positive number of GiB"]),
    (["--memory-budget", "-4"], ["--memory-budget '-4'", "auto, all or a positive number of GiB"]),
    (["--memory-budget", "20GB"], ["--memory-budget '20GB'", "auto, all or a positive number of GiB"]),
    (["--memory-budget", "inf"], ["--memory-budget 'inf'", "auto, all or a positive number of GiB"]),
], ids=["unknown-engine", "batch-too-large", "batch-not-a-number", "zero-steps", "latent-size-without-preset",
        "unknown-sampler", "zero-memory-budget", "negative-memory-budget", "memory-budget-with-unit",
        "infinite-memory-budget"])
def test_bad_argument_is_one_line_and_exit_2(checkpoint, capsys, argv, fragments):
    code, _, err = run_bench(capsys, "--model", checkpoint, *argv)
    assert_one_line_error(code, err, *fragments)


@pytest.mark.parametrize("flag, text, fragment", [
    ("--engines", "", "--engines '' has an empty item; expected comma-separated engine names from torch, "),
    ("--engines", ",torch", "--engines ',torch' has an empty item"),
    ("--engines", "torch,diffusers,", "--engines 'torch,diffusers,' has an empty item"),
    ("--engines", "torch,torch", "--engines 'torch,torch' names engine torch twice; expected each engine once"),
    ("--engines", "diffusers,torch,diffusers", "names engine diffusers twice"),
    ("--batch-sizes", "1,1", "--batch-sizes '1,1' names batch size 1 twice; expected each batch size once"),
    ("--batch-sizes", "4,1,4", "names batch size 4 twice"),
])
def test_an_empty_or_repeated_list_item_is_refused_before_the_benchmark(checkpoint, capsys, monkeypatch, flag, text,
                                                                        fragment):
    import ldm_tools.bench.cli

    monkeypatch.setattr(ldm_tools.bench.cli, "run", lambda *args, **kwargs: pytest.fail("the benchmark ran"))
    code, _, err = run_bench(capsys, "--model", checkpoint, flag, text)
    assert_one_line_error(code, err, fragment)


def test_preset_latent_size_the_unet_cannot_halve_is_refused(capsys):
    code, _, err = run_bench(capsys, "--preset", "sd15", "--latent-size", 12)
    assert_one_line_error(code, err, "--latent-size 12", "multiple of 8")


@pytest.mark.parametrize("preset, latent_size, largest", [("shapes", 0, 1024), ("shapes", -8, 1024),
                                                           ("shapes", 100000, 1024), ("sd15", 520, 512)])
def test_preset_latent_size_out_of_range_is_refused_before_any_process_starts(capsys, monkeypatch, preset,
                                                                             latent_size, largest):
    import ldm_tools.bench.cli

    monkeypatch.setattr(ldm_tools.bench.cli, "run", lambda *args, **kwargs: pytest.fail("the benchmark ran"))
    code, _, err = run_bench(capsys, "--preset", preset, "--latent-size", latent_size, "--engines", "torch")
    assert_one_line_error(code, err, f"--latent-size {latent_size} does not fit preset {preset}; expected a positive "
                                     f"integer up to {largest} (images of at most 4096 px)")


@pytest.mark.parametrize("flag", ["--json", "--plot"])
def test_an_output_folder_that_refuses_a_file_is_refused_before_the_benchmark_even_for_root(checkpoint, capsys,
                                                                                          monkeypatch, flag):
    import ldm_tools.bench.cli

    monkeypatch.setattr(ldm_tools.bench.cli, "run", lambda *args, **kwargs: pytest.fail("the benchmark ran"))
    code, _, err = run_bench(capsys, "--model", checkpoint, "--engines", "torch", flag, "/proc/ldm-bench-out")
    assert_one_line_error(code, err, f"{flag} /proc/ldm-bench-out: the folder /proc cannot be written")


@pytest.mark.parametrize("failing", ["write_json", "write_plot"])
def test_an_output_that_cannot_be_written_at_the_end_is_one_line_after_the_table(checkpoint, tmp_path, capsys,
                                                                               monkeypatch, failing):
    import errno

    import ldm_tools.bench.cli

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ldm_tools.bench.cli, failing, full_disk)
    out = tmp_path / "bench.json"
    code, stdout, err = run_bench(capsys, "--model", checkpoint, "--engines", "torch", "--batch-sizes", 1,
                                  "--steps", 1, "--repeats", 1, "--threads", 1, "--json", out)
    path, flag = (out, "--json") if failing == "write_json" else (out.with_suffix(".png"), "--plot")
    assert_one_line_error(code, err, f"{flag} {path} cannot be written (No space left on device); the figures are "
                                     f"in the table above", after_progress=True)
    assert "| torch | 1 |" in stdout


def test_folder_that_is_not_a_model_is_refused(tmp_path, capsys):
    code, _, err = run_bench(capsys, "--model", tmp_path)
    assert_one_line_error(code, err, str(tmp_path), "neither model.json nor manifest.json")
    code, _, err = run_bench(capsys, "--model", tmp_path / "missing")
    assert_one_line_error(code, err, "missing", "does not exist")


def test_checkpoint_with_damaged_weights_is_one_line(checkpoint, tmp_path, capsys):
    damaged = tmp_path / "checkpoint"
    shutil.copytree(checkpoint, damaged)
    (damaged / "unet.safetensors").write_bytes(b"not a safetensors file")
    code, _, err = run_bench(capsys, "--model", damaged, "--engines", "torch", "--batch-sizes", 1, "--steps", 1,
                             "--repeats", 1, "--threads", 1)
    assert_one_line_error(code, err, "the torch engine cannot run", str(damaged), "unet.safetensors",
                          after_progress=True)


def test_a_worker_that_died_between_commands_fails_as_a_worker_not_the_run(checkpoint):
    from ldm_runtime.checkpoint import load_model_config
    from ldm_tools.bench.workers import Worker, WorkerFailed, WorkerSpec

    # the kernel's out-of-memory killer takes a worker while the parent is between two commands: the next command
    # meets a closed pipe, which must be that worker's failure (recorded, the others go on), not a traceback
    worker = Worker(WorkerSpec(engine="torch", folder=str(checkpoint), device="cpu", threads=1, steps=1,
                               image_size=load_model_config(checkpoint).image_size, guidance_scale=5.0))
    try:
        worker.ask()  # loaded, first image made
        worker.process.kill()
        worker.process.join()
        with pytest.raises(WorkerFailed, match=r"the process exited with code -9 \(killed: out of memory\?\)"):
            worker.ask("step", 1, 1)
    finally:
        worker.stop()


@pytest.mark.slow  # the tiny export with validation: shared with the export and onnxruntime tests of the same run
def test_engine_dir_runs_against_its_checkpoint_and_refuses_what_it_cannot(checkpoint, tmp_path_factory, tmp_path,
                                                                          capsys):
    _, engine_dir, export_code, output = shared_tiny_engine(tmp_path_factory, "fp32")
    assert export_code == 0, output
    out = tmp_path / "bench.json"
    code, stdout, err = run_bench(capsys, "--model", engine_dir, "--engines", "torch", "--batch-sizes", 1,
                                  "--steps", 2, "--repeats", 1, "--threads", 1, "--json", out, "--profile")
    assert code == 0, err
    report = json.loads(out.read_text())
    engines = {entry["name"]: entry for entry in report["engines"]}
    assert set(engines) == {"torch", "onnxruntime"}  # an engine dir is timed even when --engines leaves it out
    assert engines["onnxruntime"]["status"] == "ok" and engines["onnxruntime"]["unet_relative_error"] < 1e-4
    assert "| onnxruntime | 1 |" in stdout
    assert {op["op"] for op in engines["onnxruntime"]["profile"]["1"]} & {"Conv", "MatMul", "Gemm", "FusedConv"}
    from ldm_tools.bench.cli import _check_model_folder

    named = ["torch", "openvino"]  # another engine of engine dirs named: onnxruntime is not added beside it
    _check_model_folder(Path(engine_dir), None, named)
    assert named == ["torch", "openvino"]

    code, _, err = run_bench(capsys, "--model", engine_dir, "--batch-sizes", "1,5")
    assert_one_line_error(code, err, "batch size 5", "1 to 4 images")

    moved = tmp_path / "engine"
    shutil.copytree(engine_dir, moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["source"]["checkpoint"] = str(tmp_path / "gone")
    (moved / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = run_bench(capsys, "--model", moved)
    assert_one_line_error(code, err, "is an engine dir", "--checkpoint DIR")

    other = tmp_path / "other-checkpoint"
    shutil.copytree(checkpoint, other)
    (other / "unet.safetensors").write_bytes((other / "unet.safetensors").read_bytes() + b" ")
    code, _, err = run_bench(capsys, "--model", moved, "--checkpoint", other)
    assert_one_line_error(code, err, f"--checkpoint {other}", "sha256")


@pytest.mark.slow  # the tiny export with validation: shared with the export and onnxruntime tests of the same run
def test_an_engine_that_fails_to_load_keeps_its_row_and_makes_the_exit_status_1(checkpoint, tmp_path_factory, tmp_path,
                                                                               capsys):
    from tests.ldm_runtime.file_damage import flip_middle_bytes

    _, engine_dir, export_code, output = shared_tiny_engine(tmp_path_factory, "fp32")
    assert export_code == 0, output
    damaged = tmp_path / "engine"
    shutil.copytree(engine_dir, damaged)
    flip_middle_bytes(damaged / "vae_decoder.onnx")
    code, stdout, err = run_bench(capsys, "--model", damaged, "--engines", "torch", "--batch-sizes", 1, "--steps", 1,
                                  "--repeats", 1, "--threads", 1)
    assert code == 1, err
    assert "| onnxruntime | failed: " in stdout and "vae_decoder.onnx does not match the sha256" in stdout
    assert "| torch | 1 |" in stdout  # the engines that ran are still timed
    assert err.strip().splitlines()[-1] == "ldm-bench: onnxruntime failed (the table and notes say why)", err


def test_only_engines_that_were_to_run_and_failed_count_against_the_exit_status():
    from ldm_tools.bench.cli import failed_engines

    report = {"engines": [{"name": "torch", "status": "ok"},
                          {"name": "openvino-bf16", "status": "failed", "reason": "this CPU has no native bf16"},
                          {"name": "torch.compile", "status": "skipped", "reason": "more than the memory budget"},
                          {"name": "onnxruntime", "status": "failed", "reason": "EngineDirError: ..."},
                          {"name": "openvino", "status": "failed", "reason": "at batch size 8: exited with code -9"}]}
    assert failed_engines(report, {"unavailable": ["openvino-bf16"]}) == ["onnxruntime", "openvino"]


def test_openvino_and_the_bf16_peers_run_where_this_machine_can_and_are_skipped_with_the_reason_elsewhere(
        checkpoint, tmp_path, capsys):
    pytest.importorskip("openvino")  # the dev extra installs it
    from ldm_tools.bench.workers import native_bf16_refusal

    out = tmp_path / "bench.json"
    code, stdout, err = run_bench(capsys, "--model", checkpoint, "--engines", "torch,openvino,torch-bf16,openvino-bf16",
                                  "--batch-sizes", 1, "--steps", 2, "--repeats", 1, "--threads", 1, "--json", out,
                                  "--profile")
    assert code == 0, err
    report = json.loads(out.read_text())
    engines = {entry["name"]: entry for entry in report["engines"]}
    assert engines["openvino"]["status"] == "ok" and engines["openvino"]["unet_relative_error"] < 1e-4
    assert engines["openvino"]["version"].startswith("openvino ") and engines["openvino"]["precision"] == "fp32"
    assert {op["op"] for op in engines["openvino"]["profile"]["1"]} & {"Convolution", "MatMul", "FullyConnected"}
    assert "| openvino | 1 |" in stdout
    refusal = native_bf16_refusal("cpu")
    for name in ("torch-bf16", "openvino-bf16"):
        if refusal is None:  # a CPU with AVX-512 BF16 or AMX: bf16 runs, at bf16's error
            assert engines[name]["status"] == "ok" and engines[name]["unet_relative_error"] < 0.1
        else:
            assert engines[name]["status"] == "failed" and engines[name]["reason"] == refusal
            assert f"{name} did not run: {refusal}" in report["notes"]


def test_torch_compile_bf16_is_the_compiled_unet_under_bf16_autocast(checkpoint):
    import torch

    from ldm_tools.bench.workers import WorkerSpec, build_engine

    spec = WorkerSpec(engine="torch.compile-bf16", folder=str(checkpoint), device="cpu", threads=1, steps=2,
                      image_size=16, guidance_scale=5.0)
    unet = build_engine(spec).unet_model  # compiled lazily: nothing is compiled until it is called
    assert isinstance(unet, torch._dynamo.eval_frame.OptimizedModule)
    assert type(unet._orig_mod).__name__ == "_Bf16Autocast" and isinstance(unet._orig_mod.model, torch.nn.Module)


def test_torch_bf16_is_judged_on_the_device_auto_resolves_to_and_openvino_bf16_on_the_cpu(monkeypatch):
    import torch

    from ldm_tools.bench.cli import _bf16_refusal
    from ldm_tools.bench.workers import native_bf16_refusal

    on_the_cpu = native_bf16_refusal("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _bf16_refusal("torch-bf16", "auto") == _bf16_refusal("torch.compile-bf16", "auto") == on_the_cpu
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _bf16_refusal("torch-bf16", "auto") is None  # a CUDA GPU: autocast runs there, whatever the CPU has
    assert _bf16_refusal("torch.compile-bf16", "auto") is None
    assert _bf16_refusal("openvino-bf16", "auto") == on_the_cpu
    assert _bf16_refusal("openvino-bf16", "cuda") == on_the_cpu
    assert _bf16_refusal("torch", "auto") is None


def test_the_notes_compare_our_fastest_engine_with_the_fastest_peer():
    from ldm_tools.bench.cli import _notes
    from ldm_tools.bench.report import result_rows

    names = ["torch", "torch.compile", "diffusers", "onnxruntime", "openvino"]
    seconds = {"torch": 1.0, "torch.compile": 0.8, "diffusers": 0.9, "onnxruntime": 0.4, "openvino": 0.2}
    steps = {(name, 1): [value] * 3 for name, value in seconds.items()}
    rows = result_rows(steps, {key: [10 * value[0]] * 3 for key, value in steps.items()}, names, [1], "torch")
    report = {"results": rows, "engines": [{"name": name, "status": "ok"} for name in names],
              "settings": {"batch_sizes": [1]}}
    notes = _notes(report)
    assert ("batch 1: fastest is openvino at 5.00× eager PyTorch's UNet steps/s (round by round 5.00-5.00×), "
            "4.00× torch.compile") in notes
    assert "batch 1: our fastest engine, openvino, makes 4.00× the UNet steps/s of the fastest peer, torch.compile" \
        in notes


def test_summary_and_ratios_follow_their_definitions_on_known_samples():
    from ldm_tools.bench.report import result_rows, summarize

    steady = summarize([1.00, 1.05, 1.02])
    assert (steady["median"], steady["min"], steady["max"]) == (1.02, 1.00, 1.05)
    assert steady["spread"] == pytest.approx(0.05 / 1.02) and not steady["wide"]
    assert summarize([1.0, 1.2, 1.05])["wide"]  # 19% apart
    assert summarize([1.0, 1.0])["wide"]  # two samples cannot show a spread
    rows = result_rows({("torch", 1): [2.0, 2.2, 1.8], ("onnxruntime", 1): [0.5, 0.5, 0.5]},
                       {("torch", 1): [10.0, 10.0, 10.0], ("onnxruntime", 1): [4.0, 4.0, 4.0]},
                       ["torch", "onnxruntime"], [1], "torch")
    fast = next(row for row in rows if row["engine"] == "onnxruntime")
    assert fast["steps_speedup_vs_torch"] == pytest.approx(4.0)
    assert fast["latency_speedup_vs_torch"] == pytest.approx(2.5)
    assert fast["images_per_s"] == pytest.approx(0.25) and fast["unet_steps_per_s"] == pytest.approx(2.0)
    assert next(row for row in rows if row["engine"] == "torch")["wide_spread"]  # 2.2 and 1.8 around 2.0
    assert fast["steps_speedup_per_round"] == pytest.approx([4.0, 4.4, 3.6])  # round i against round i


def test_the_table_keeps_the_rows_of_an_engine_that_failed_at_a_later_batch_size():
    from ldm_tools.bench.cli import _notes
    from ldm_tools.bench.report import format_table, result_rows

    # openvino timed at batch 1, then its process died at batch 8 (the kernel's OOM killer): it never reported
    # its peak memory, and the table must still print, not raise
    rows = result_rows({("torch", 1): [1.0] * 3, ("openvino", 1): [0.4] * 3, ("torch", 8): [4.0] * 3},
                       {("torch", 1): [3.0] * 3, ("openvino", 1): [2.0] * 3, ("torch", 8): [9.0] * 3},
                       ["torch", "openvino"], [1, 8], "torch")
    report = {"results": rows, "settings": {"batch_sizes": [1, 8]}, "engines": [
        {"name": "torch", "status": "ok", "reason": None, "time_to_first_image_s": 9.0, "peak_rss_mib": 500.0,
         "unet_relative_error": 0.0},
        {"name": "openvino", "status": "failed", "time_to_first_image_s": 3.0, "unet_relative_error": 5e-7,
         "reason": "at batch size 8: the process exited with code -9"}]}
    table = format_table(report)
    assert "| openvino | 1 | 2.5 ±0% | 2.50× |" in table
    assert "| openvino | failed: at batch size 8: the process exited with code -9 |" in table
    assert "openvino stopped: at batch size 8: the process exited with code -9" in _notes(report)


def test_per_round_ratios_cancel_a_machine_that_slows_down_for_a_round():
    from ldm_tools.bench.report import result_rows

    # the second round ran at half speed for every engine: the engines' own spreads are wide, their ratio is not
    rows = result_rows({("torch", 8): [1.0, 2.0, 1.0], ("openvino", 8): [0.5, 1.0, 0.5]},
                       {("torch", 8): [3.0, 6.0, 3.0], ("openvino", 8): [2.0, 4.0, 2.0]},
                       ["torch", "openvino"], [8], "torch")
    fast = next(row for row in rows if row["engine"] == "openvino")
    assert fast["wide_spread"] and fast["steps_speedup_per_round"] == pytest.approx([2.0, 2.0, 2.0])


# --- fitting the engines in memory: estimates, the machine's available memory, groups ----------------------------

def test_the_memory_plan_packs_peers_largest_first_beside_the_baseline_within_the_budget():
    from ldm_tools.bench.memory import plan_groups

    peaks = {"torch": 5.0, "a": 6.0, "b": 4.0, "c": 3.0, "e": 9.0, "d": 2.0}  # the run's order
    groups, skipped = plan_groups(peaks, "torch", 12.0)  # 7 beside the baseline: e never fits
    assert skipped == ["e"]
    assert groups == [["torch", "a"], ["torch", "b", "c"], ["torch", "d"]]
    assert plan_groups(peaks, "torch", None) == ([["torch", "a", "b", "c", "e", "d"]], [])  # no bound: all at once
    assert plan_groups(peaks, "torch", 100.0) == ([["torch", "a", "b", "c", "e", "d"]], [])
    assert plan_groups(peaks, "torch", 4.0) == ([["torch"]], ["a", "b", "c", "e", "d"])  # the baseline alone is over
    assert plan_groups({"torch": 5.0}, "torch", 6.0) == ([["torch"]], [])


@pytest.mark.parametrize("trial", range(20))
def test_every_memory_plan_fits_its_budget_uses_each_peer_once_and_has_no_two_groups_that_fit_together(trial):
    import random

    from ldm_tools.bench.memory import plan_groups

    rng = random.Random(trial)
    peaks = {"torch": rng.uniform(1, 8), **{f"peer{index}": rng.uniform(0.5, 12) for index in range(rng.randint(0, 9))}}
    budget = rng.uniform(4, 30)
    groups, skipped = plan_groups(peaks, "torch", budget)
    peers = [name for group in groups for name in group[1:]]
    assert sorted(peers + skipped) == sorted(set(peaks) - {"torch"}) and len(set(peers)) == len(peers)
    order = list(peaks)
    for group in groups:
        assert group[0] == "torch" and group[1:] == sorted(group[1:], key=order.index)
        assert len(group) == 1 or sum(peaks[name] for name in group) <= budget
    assert all(peaks["torch"] + peaks[name] > budget for name in skipped)
    for first, later in zip(groups, groups[1:]):  # first fit: a later group's peers did not fit in an earlier one
        assert sum(peaks[name] for name in first + later[1:]) > budget


def sd15_workload(**changes):
    from ldm_tools.bench.memory import Workload

    # SD 1.5's parameter counts (the UNet's, the autoencoder's and the 12-layer BERT's) at 16x16 latents
    sizes = dict(unet_parameters=859_520_964, other_parameters=83_653_863 + 108_557_568, batch_sizes=(1, 8),
                 latent_size=16, image_size=128, unet_channels=320, decoder_channels=128)
    return Workload(**{**sizes, **changes})


def test_memory_estimates_cover_every_engine_and_grow_with_weights_shapes_and_activations():
    from ldm_tools.bench.memory import ENGINE_MEMORY, MIB, activation_mib, estimate_rss_mib, map_mib, unet_shapes
    from ldm_tools.bench.workers import PEERS

    assert set(ENGINE_MEMORY) == set(PEERS)
    base = sd15_workload()
    assert unet_shapes((1, 8)) == 3 and unet_shapes((1, 4, 8)) == 4 and unet_shapes((1,)) == 2  # 1, 2, 16 rows
    larger = sd15_workload(other_parameters=base.other_parameters + 2**28)
    for engine in PEERS:  # fp32 weights, in the checkpoint and the engine dir alike
        assert estimate_rss_mib(engine, larger) - estimate_rss_mib(engine, base) == pytest.approx(
            ENGINE_MEMORY[engine].weight_copies * 2**28 * 4 / MIB)
    # openvino prepares the UNet once more for each batch bucket, bf16's at half the bytes; the largest request is
    # the same, so the activations are too
    more_shapes = sd15_workload(batch_sizes=(1, 4, 8))
    for engine, bytes_per_parameter in (("openvino", 4), ("openvino-bf16", 2)):
        assert estimate_rss_mib(engine, more_shapes) - estimate_rss_mib(engine, base) == pytest.approx(
            ENGINE_MEMORY[engine].copies_per_unet_shape * base.unet_parameters * bytes_per_parameter / MIB)
    assert estimate_rss_mib("torch", more_shapes) == estimate_rss_mib("torch", base)
    # an fp16 engine dir halves what onnxruntime reads; the checkpoint the torch engines read stays fp32
    fp16 = sd15_workload(engine_dir_bytes=2)
    parameters = base.unet_parameters + base.other_parameters
    assert estimate_rss_mib("onnxruntime", base) - estimate_rss_mib("onnxruntime", fp16) == pytest.approx(
        ENGINE_MEMORY["onnxruntime"].weight_copies * parameters * 2 / MIB)
    assert estimate_rss_mib("torch", fp16) == estimate_rss_mib("torch", base)
    # activations: the engine's maps of the largest request's UNet rows (2 per image) and images, 4 bytes each
    wide = sd15_workload(latent_size=64, image_size=512, batch_sizes=(2, 8))
    assert map_mib(wide) == pytest.approx(4 * (16 * 64**2 * 320 + 8 * 512**2 * 128) / MIB)
    for engine in PEERS:
        assert activation_mib(engine, wide) == pytest.approx(ENGINE_MEMORY[engine].maps * map_mib(wide))
        shapes_apart = (ENGINE_MEMORY[engine].copies_per_unet_shape * base.unet_parameters
                        * ENGINE_MEMORY[engine].compute_bytes / MIB)  # (2, 8) adds the 4-row bucket to (1, 8)'s
        assert estimate_rss_mib(engine, wide) - estimate_rss_mib(engine, base) == pytest.approx(
            activation_mib(engine, wide) - activation_mib(engine, base) + shapes_apart)


def write_files(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


GIB = 2**30


@pytest.mark.parametrize("cgroup, files, expected", [
    ("", {}, (8192, "MemAvailable")),  # no cgroup file: MemAvailable alone
    ("0::/\n", {}, (8192, "MemAvailable")),  # cgroup v2 without a memory.max at its root
    ("0::/bench.slice/job\n", {"bench.slice/job/memory.max": "max\n", "bench.slice/job/memory.current": "0\n"},
     (8192, "MemAvailable")),
    ("0::/bench.slice/job\n", {"bench.slice/job/memory.max": f"{4 * GIB}\n",
                               "bench.slice/job/memory.current": f"{3 * GIB}\n",
                               "bench.slice/job/memory.stat": f"anon 1\ninactive_file {GIB}\nactive_file 5\n"},
     (2048, "the limit of cgroup {root}/bench.slice/job")),  # 4 GiB less 3 used of which 1 is reclaimable cache
    ("0::/bench.slice/job\n", {"bench.slice/job/memory.max": f"{4 * GIB}\n",
                               "bench.slice/job/memory.current": f"{GIB}\n",
                               "bench.slice/memory.max": f"{3 * GIB}\n", "bench.slice/memory.current": f"{GIB}\n"},
     (1024 * 2, "the limit of cgroup {root}/bench.slice")),  # the parent's limit leaves less room
    ("4:memory:/docker/abc\n2:cpu,cpuacct:/docker/abc\n",
     {"memory/docker/abc/memory.limit_in_bytes": f"{6 * GIB}\n", "memory/docker/abc/memory.usage_in_bytes": f"{GIB}\n",
      "memory/docker/abc/memory.stat": "total_inactive_file 0\n",
      "memory/memory.limit_in_bytes": "9223372036854771712\n", "memory/memory.usage_in_bytes": "1\n"},
     (5120, "the limit of cgroup {root}/memory/docker/abc")),  # cgroup v1; its root's "no limit" is not a limit
], ids=["no-cgroup", "v2-root", "v2-no-limit", "v2-limit", "v2-parent-limit", "v1-limit"])
def test_available_memory_is_mem_available_or_less_where_a_cgroup_limit_leaves_less(tmp_path, cgroup, files,
                                                                                      expected):
    from ldm_tools.bench.memory import available_memory_mib

    proc, root = tmp_path / "proc", tmp_path / "cgroup"
    write_files(proc, {"meminfo": f"MemTotal:  33554432 kB\nMemAvailable:  {8 * 2**20} kB\nCached: 1 kB\n"})
    if cgroup:
        write_files(proc, {"self/cgroup": cgroup})
    write_files(root, files)
    mib, source = available_memory_mib(proc, root)
    assert mib == pytest.approx(expected[0]) and source == expected[1].format(root=root)
    assert available_memory_mib(tmp_path / "elsewhere", root) is None  # no /proc/meminfo: nothing to plan with


def test_bench_runs_engines_in_groups_that_fit_a_memory_budget_with_eager_pytorch_in_each(tmp_path, capsys,
                                                                                         monkeypatch):
    pytest.importorskip("openvino")  # the dev extra installs it
    from ldm_tools.bench import cli

    # estimates that force groups whatever this machine's engines really take: openvino and onnxruntime do not fit
    # together beside eager PyTorch in the 18 GiB budget (90% of the 20 GiB given), torch.compile fits nowhere
    estimates = {"openvino": 12 * 1024, "onnxruntime": 10 * 1024, "torch.compile": 40 * 1024}
    monkeypatch.setattr(cli, "estimate_rss_mib", lambda engine, workload: estimates.get(engine, 1024))
    out = tmp_path / "bench.json"
    code, stdout, err = run_bench(capsys, "--preset", "shapes", "--engines", "torch,onnxruntime,openvino,torch.compile",
                                  "--batch-sizes", 1, "--steps", 1, "--repeats", 1, "--threads", 1, "--json", out,
                                  available_mib=20 * 1024)
    assert code == 0, err
    said = [line for line in err.splitlines() if "resident together" in line]
    assert len(said) == 1, err
    assert said[0].startswith("ldm-bench: 4 engines need ~") and "this machine has 20.0 GiB available" in said[0]
    assert ("a budget of 18.0 GiB with 10% kept free: running them in 2 groups, eager PyTorch timed in each: "
            "torch, openvino; torch, onnxruntime; skipped, too large beside eager PyTorch: torch.compile") in said[0]

    report = json.loads(out.read_text())
    grouping = report["grouping"]
    assert grouping["groups"] == [["torch", "openvino"], ["torch", "onnxruntime"]]
    assert grouping["skipped"] == ["torch.compile"] and grouping["budget_mib"] == pytest.approx(0.9 * 20 * 1024)
    assert report["settings"]["memory_budget"] == "auto"
    for group in grouping["groups"]:
        assert sum(grouping["planned_rss_mib"][name] for name in group) <= grouping["budget_mib"]
    engines = {entry["name"]: entry for entry in report["engines"]}
    # the baseline's plan is its measured peak (with its largest request's activations), not its estimate
    assert engines["torch"]["estimated_rss_mib"] == 1024 and grouping["planned_rss_mib"]["torch"] != 1024
    assert grouping["planned_rss_mib"]["torch"] > 50
    assert engines["torch.compile"]["status"] == "skipped" and "time_to_first_image_s" not in engines["torch.compile"]
    assert "memory budget of 18.0 GiB" in engines["torch.compile"]["reason"]
    assert f"torch.compile did not run: {engines['torch.compile']['reason']}" in report["notes"]
    for name in ("openvino", "onnxruntime"):
        assert engines[name]["status"] == "ok" and engines[name]["estimated_rss_mib"] == estimates[name]
        assert engines[name]["peak_rss_mib"] > 50 and engines[name]["unet_relative_error"] < 1e-4

    rows = {(row["engine"], row["group"]): row for row in report["results"]}
    assert set(rows) == {("torch", 1), ("openvino", 1), ("torch", 2), ("onnxruntime", 2)}
    for group, peer in ((1, "openvino"), (2, "onnxruntime")):  # each against the eager PyTorch of its own rounds
        base, row = rows[("torch", group)], rows[(peer, group)]
        assert row["steps_speedup_vs_torch"] == pytest.approx(base["step_seconds"]["median"]
                                                              / row["step_seconds"]["median"])
    assert "| torch | 2 | 1 |" in stdout and "| onnxruntime | 2 | 1 |" in stdout and "| openvino | 1 | 1 |" in stdout
    assert any(note.startswith("to fit the memory budget the engines ran in 2 groups") for note in report["notes"])
    # one group at a time: onnxruntime's process starts after openvino's group is timed
    assert err.index("openvino: first image after") < err.index("onnxruntime: loading")


def test_notes_compare_engines_of_different_groups_through_their_own_groups_eager():
    from ldm_tools.bench.cli import _notes
    from ldm_tools.bench.report import format_table, result_rows

    # the machine ran at half speed during group 2: eager and openvino alike
    rows = [dict(row, group=1) for row in result_rows({("torch", 1): [1.0] * 3, ("torch.compile", 1): [0.8] * 3},
                                                      {("torch", 1): [3.0] * 3, ("torch.compile", 1): [2.5] * 3},
                                                      ["torch", "torch.compile"], [1], "torch")]
    rows += [dict(row, group=2) for row in result_rows({("torch", 1): [2.0] * 3, ("openvino", 1): [0.5] * 3},
                                                       {("torch", 1): [6.0] * 3, ("openvino", 1): [3.0] * 3},
                                                       ["torch", "openvino"], [1], "torch")]
    entries = [{"name": name, "status": "ok", "reason": None, "time_to_first_image_s": 1.0, "peak_rss_mib": 100.0,
                "unet_relative_error": 0.0} for name in ("torch", "torch.compile", "openvino")]
    report = {"results": rows, "engines": entries, "settings": {"batch_sizes": [1]},
              "grouping": {"groups": [["torch", "torch.compile"], ["torch", "openvino"]]}}
    notes = _notes(report)
    # openvino is 4x its eager, torch.compile 1.25x its own: 3.2x, where the raw medians would say 1.6x
    assert ("batch 1: fastest is openvino at 4.00× eager PyTorch's UNet steps/s (round by round 4.00-4.00×), "
            "3.20× torch.compile") in notes
    assert "batch 1: our fastest engine, openvino, makes 3.20× the UNet steps/s of the fastest peer, torch.compile" \
        in notes
    assert notes[0].startswith("to fit the memory budget the engines ran in 2 groups (torch, torch.compile; torch, "
                               "openvino)")
    table = format_table(report)
    assert "| engine | group | batch |" in table and "| torch | 2 | 1 | 0.5 ±0% | 1.00× |" in table


# --- a Stable Diffusion checkpoint (ldm-import): diffusers' whole pipeline is timed beside ours --------------------

@pytest.fixture(scope="module")
def imported_sd(tmp_path_factory):
    """(the diffusers folder, the checkpoint dir ldm-import made of it): the SD 2.x-like tiny model (per-level
    heads, fp32 attention, v-prediction), where a pipeline rebuilt with the wrong settings would show."""
    from ldm_export.sd_import import import_source
    from tests.conftest import base_seed
    from tests.ldm_export.tiny_sd import SD2_LIKE, write_diffusers_folder

    root = tmp_path_factory.mktemp("sd")
    source = write_diffusers_folder(SD2_LIKE, root / "diffusers", base_seed())
    return source, import_source(source, root / "checkpoint")


def test_bench_of_an_imported_sd_checkpoint_times_diffusers_whole_pipeline(imported_sd, tmp_path, capsys):
    _, checkpoint = imported_sd
    out = tmp_path / "bench.json"
    code, stdout, err = run_bench(capsys, "--model", checkpoint, "--engines", "torch", "--batch-sizes", 1,
                                  "--steps", 2, "--repeats", 1, "--threads", 1, "--json", out)
    assert code == 0, err
    report = json.loads(out.read_text())
    engines = {entry["name"]: entry for entry in report["engines"]}
    assert set(engines) == {"torch", "diffusers-pipeline"}  # added for a Stable Diffusion model unasked
    pipeline = engines["diffusers-pipeline"]
    assert pipeline["status"] == "ok", pipeline["reason"]
    assert pipeline["unet_relative_error"] < 1e-4  # the same UNet call on the same weights, context included
    assert pipeline["image_std"] > 0 and "diffusers" in pipeline["version"]
    row = next(row for row in report["results"] if row["engine"] == "diffusers-pipeline")
    assert row["batch_size"] == 1 and row["images_per_s"] > 0 and row["latency_speedup_vs_torch"] > 0
    assert "| diffusers-pipeline | 1 |" in stdout


def test_the_rebuilt_pipeline_draws_what_the_source_pipeline_draws(imported_sd, seed):
    """The pipeline ldm-bench times is diffusers' own on the checkpoint's weights and the model's DDIM settings:
    its image equals that of the diffusers folder the checkpoint was imported from."""
    import numpy as np
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from ldm_runtime.checkpoint import load_checkpoint
    from ldm_tools.bench.diffusers_peers import pipeline_call_options, stable_diffusion_pipeline
    from tests.ldm_export.tiny_sd import IMAGE_SIZE, PROMPTS

    source, checkpoint = imported_sd
    networks = load_checkpoint(checkpoint)
    rebuilt = stable_diffusion_pipeline(checkpoint, networks.config, networks.unet, networks.autoencoder,
                                        networks.text_encoder)
    original = StableDiffusionPipeline.from_pretrained(str(source), safety_checker=None, requires_safety_checker=False)
    original.scheduler = DDIMScheduler.from_config(original.scheduler.config)
    original.set_progress_bar_config(disable=True)
    options = pipeline_call_options(networks.config, steps=3, guidance_scale=7.5, image_size=IMAGE_SIZE)
    images = [pipe(PROMPTS[0], generator=torch.Generator().manual_seed(seed), **options).images[0]
              for pipe in (original, rebuilt)]
    assert images[0].std() > 1e-3, "a flat image proves nothing"
    assert np.abs(images[0] - images[1]).max() < 1e-5


def test_the_rebuilt_pipeline_keeps_model_json_steps_offset_and_clip_sample(imported_sd):
    """StableDiffusionPipeline's constructor rewrites steps_offset to 1 and clip_sample to false; the peer keeps
    what model.json says."""
    import dataclasses

    from ldm_runtime.checkpoint import load_checkpoint
    from ldm_tools.bench.diffusers_peers import stable_diffusion_pipeline

    _, checkpoint = imported_sd
    networks = load_checkpoint(checkpoint)
    config = dataclasses.replace(networks.config, sampler=dataclasses.replace(
        networks.config.sampler, steps_offset=0, clip_sample=True, clip_sample_range=1.5))
    pipe = stable_diffusion_pipeline(checkpoint, config, networks.unet, networks.autoencoder, networks.text_encoder)
    settings = pipe.scheduler.config
    assert (settings.steps_offset, settings.clip_sample, settings.clip_sample_range) == (0, True, 1.5)


def test_the_rebuilt_pipeline_of_a_clip_skip_import_encodes_prompts_as_ours(imported_sd, tmp_path, seed):
    import torch

    from ldm_export.sd_import import import_source
    from ldm_runtime.checkpoint import load_checkpoint
    from ldm_tools.bench.diffusers_peers import pipeline_call_options, stable_diffusion_pipeline
    from tests.ldm_export.tiny_sd import IMAGE_SIZE, PROMPTS

    source, _ = imported_sd
    checkpoint = import_source(source, tmp_path / "clip-skip", clip_skip=1)
    networks = load_checkpoint(checkpoint)
    with torch.no_grad():
        ours = networks.text_encoder.encode([PROMPTS[0]])[0]
        pipe = stable_diffusion_pipeline(checkpoint, networks.config, networks.unet, networks.autoencoder,
                                         networks.text_encoder)
        options = pipeline_call_options(networks.config, steps=1, guidance_scale=7.5, image_size=IMAGE_SIZE)
        assert options["clip_skip"] == 1
        theirs = pipe.encode_prompt(PROMPTS[0], "cpu", 1, False, clip_skip=options["clip_skip"])[0]
        last_layer = pipe.encode_prompt(PROMPTS[0], "cpu", 1, False)[0]
        assert torch.equal(networks.text_encoder.encode([PROMPTS[0]])[0], ours), "the peer leaves ours as it was"
    assert float((theirs - ours).norm() / ours.norm()) < 1e-5
    assert float((last_layer - ours).norm() / ours.norm()) > 1e-3, "clip skip 1 must change the context"
    image = pipe(PROMPTS[0], generator=torch.Generator().manual_seed(seed), **options).images[0]
    assert image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and image.std() > 0


def test_every_worker_request_uses_the_sampler_of_its_spec():
    from types import SimpleNamespace

    from ldm_tools.bench.workers import WorkerSpec, _EngineBench

    for sampler in SAMPLER_NAMES:
        spec = WorkerSpec(engine="torch", folder="unused", device="cpu", threads=1, steps=3, image_size=16,
                          guidance_scale=5.0, sampler=sampler)
        requests = _EngineBench.requests(SimpleNamespace(spec=spec, inpainting=False), 2)
        assert [(request.sampler, request.steps) for request in requests] == [(sampler, 3)] * 2


def test_an_inpainting_model_is_timed_on_inpainting_requests_and_the_pipeline_peer_says_why_not(tmp_path, capsys):
    import dataclasses

    from ldm_runtime.config import inpainting_channels
    from ldm_train.checkpoint import write_random_checkpoint
    from ldm_tools.bench.diffusers_peers import pipeline_refusal
    from tests.ldm_export.tiny_checkpoint import TINY_CONFIG

    channels = inpainting_channels(TINY_CONFIG.autoencoder.latent_channels)
    config = dataclasses.replace(TINY_CONFIG, unet=dataclasses.replace(TINY_CONFIG.unet, in_channels=channels))
    folder = tmp_path / "inpaint"
    write_random_checkpoint(folder, config, 0)
    out = tmp_path / "bench.json"
    code, _, err = run_bench(capsys, "--model", folder, "--engines", "torch,diffusers", "--batch-sizes", 1,
                             "--steps", 2, "--repeats", 1, "--threads", 1, "--json", out)
    assert code == 0, err
    engines = {entry["name"]: entry for entry in json.loads(out.read_text())["engines"]}
    assert [entry["status"] for entry in engines.values()] == ["ok", "ok"] and engines["torch"]["image_std"] > 0
    assert engines["diffusers"]["unet_relative_error"] < 1e-4  # the 9-channel input reaches both UNets alike
    assert "an inpainting one (unet.in_channels 9)" in pipeline_refusal(
        dataclasses.replace(config, text_encoder=dataclasses.replace(config.text_encoder, kind="clip")))


def test_the_pipeline_scheduler_of_each_sampler_is_the_diffusers_class_it_names():
    from ldm_runtime.config import preset
    from ldm_tools.bench.diffusers_peers import PIPELINE_SCHEDULERS, pipeline_sampler_refusal, pipeline_scheduler

    assert set(PIPELINE_SCHEDULERS) <= set(SAMPLER_NAMES) - {"ddim"}
    config = preset("sd15")
    assert type(pipeline_scheduler(config, "ddim")).__name__ == "DDIMScheduler"
    for sampler, (class_name, settings) in PIPELINE_SCHEDULERS.items():
        scheduler = pipeline_scheduler(config, sampler)
        assert type(scheduler).__name__ == class_name and pipeline_sampler_refusal(sampler) is None
        assert scheduler.config.prediction_type == config.schedule.prediction_type
        assert all(scheduler.config[key] == value for key, value in settings.items()), sampler
    refusal = pipeline_sampler_refusal("heun")
    assert "--sampler heun" in refusal and "\n" not in refusal


def bench_with_sampler(capsys, checkpoint: Path, sampler: str, out: Path) -> tuple[dict, str]:
    """A 2-step torch bench of ``checkpoint`` (with its diffusers peers) with ``--sampler``: (report, stdout)."""
    code, stdout, err = run_bench(capsys, "--model", checkpoint, "--engines", "torch", "--batch-sizes", 1,
                                  "--steps", 2, "--repeats", 1, "--threads", 1, "--sampler", sampler, "--json", out)
    assert code == 0, err
    return json.loads(out.read_text()), stdout


def test_bench_records_the_sampler_and_diffusers_pipeline_samples_with_its_scheduler(imported_sd, tmp_path, capsys):
    from ldm_tools.bench.diffusers_peers import PIPELINE_SCHEDULERS

    sampler = next(name for name in SAMPLER_NAMES if name in PIPELINE_SCHEDULERS)
    report, stdout = bench_with_sampler(capsys, imported_sd[1], sampler, tmp_path / "bench.json")
    assert (report["settings"]["sampler"], report["settings"]["steps"]) == (sampler, 2)
    assert report["notes"][0] == f"every request: 2 {sampler} steps, guidance 5" and f"- {report['notes'][0]}" in stdout
    engines = {entry["name"]: entry for entry in report["engines"]}
    assert engines["diffusers-pipeline"]["status"] == "ok", engines["diffusers-pipeline"]["reason"]
    assert engines["diffusers-pipeline"]["scheduler"] == PIPELINE_SCHEDULERS[sampler][0]


def test_a_sampler_diffusers_pipeline_has_no_scheduler_for_is_said_in_one_line_not_swapped(imported_sd, tmp_path,
                                                                                           capsys, monkeypatch):
    from ldm_tools.bench import diffusers_peers

    sampler = next(name for name in SAMPLER_NAMES if name != "ddim")
    monkeypatch.delitem(diffusers_peers.PIPELINE_SCHEDULERS, sampler, raising=False)
    report, stdout = bench_with_sampler(capsys, imported_sd[1], sampler, tmp_path / "bench.json")
    engines = {entry["name"]: entry for entry in report["engines"]}
    assert engines["diffusers-pipeline"]["status"] == "failed"
    assert not any(row["engine"] == "diffusers-pipeline" for row in report["results"])
    said = [line for line in stdout.splitlines() if "diffusers-pipeline did not run" in line]
    assert len(said) == 1 and f"--sampler {sampler}" in said[0], stdout


def test_diffusers_pipeline_peer_is_refused_for_a_model_without_clip(checkpoint, capsys):
    code, _, err = run_bench(capsys, "--model", checkpoint, "--engines", "torch,diffusers-pipeline")
    assert_one_line_error(code, err, "diffusers-pipeline runs Stable Diffusion checkpoints", "text encoder is CLIP")
