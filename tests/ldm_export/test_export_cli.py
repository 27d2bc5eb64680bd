"""ldm-export end to end on a tiny random-weight checkpoint: the validation numbers at fp32 and fp16, the
manifest, the fp32 islands of the fp16 graphs, and every bad input (one line, non-zero exit, nothing at --out)."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

import ldm_export.engine_dir
import ldm_export.onnx_export
from ldm_export.cli import main
from ldm_export.validate import GraphCheck, ValidationReport
from tests.ldm_export.tiny_checkpoint import IMAGE_SIZE_MULTIPLE, TINY_CONFIG


def manifest_of(engine: Path) -> dict:
    return json.loads((engine / "manifest.json").read_text())


def leftovers(parent: Path, name: str) -> list[str]:
    """Anything an export left beside --out (its staging or set-aside folders)."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def test_fp32_export_matches_eager_within_1e4_and_40_db(fp32_export):
    _, engine, code, output = fp32_export
    assert code == 0, output
    validation = manifest_of(engine)["validation"]
    assert validation["passed"]
    assert set(validation["graphs"]) == {"text_encoder", "unet", "unet_shallow", "vae_decoder", "vae_encoder"}
    for name, check in validation["graphs"].items():
        assert 0 < check["relative_error"] <= 1e-4, (name, check)
        assert len(check["cases"]) == 2, check  # opt sizes and the range's edges
    assert validation["sample"]["steps"] == 25
    assert validation["sample"]["psnr_db"] >= 40
    assert "unet" in output and "PSNR" in output and "rel. error" in output  # the table was printed


def test_fp16_export_matches_eager_within_1e2_and_30_db(fp16_export):
    _, engine, code, output = fp16_export
    assert code == 0, output
    manifest = manifest_of(engine)
    assert manifest["precision"] == "fp16" and manifest["io_dtype"] == "float16"
    validation = manifest["validation"]
    for name, check in validation["graphs"].items():
        assert 0 < check["relative_error"] <= 1e-2, (name, check)
    assert validation["sample"]["psnr_db"] >= 30
    unet_inputs = {t["name"]: t["dtype"] for t in manifest["graphs"]["unet"]["inputs"]}
    assert unet_inputs == {"latents": "float16", "timesteps": "int64", "context": "float16", "context_mask": "bool"}
    assert manifest["graphs"]["vae_decoder"]["notes"]["activation_peak"] > 0


def _input_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.input]}
    types.update({t.name: t.data_type for t in inferred.graph.initializer})
    return types


def test_fp16_unet_keeps_norms_softmax_and_timestep_sinusoids_in_fp32(fp16_export):
    model = onnx.load(str(fp16_export[1] / "unet.onnx"))
    onnx.checker.check_model(model)  # e.g. the converter's Cast nodes sorted before their consumers
    types = _input_types(model)
    kept = [node for node in model.graph.node
            if node.op_type in ("InstanceNormalization", "LayerNormalization", "Softmax", "Sin", "Cos")]
    assert {node.op_type for node in kept} >= {"InstanceNormalization", "LayerNormalization", "Softmax", "Sin", "Cos"}
    for node in kept:
        assert types[node.input[0]] == TensorProto.FLOAT, (node.op_type, node.name)
    producers = {output: node for node in model.graph.node for output in node.output}
    sinusoids = [node for node in kept if node.op_type in ("Sin", "Cos")]
    # t * frequency feeds the sinusoids directly in fp32, never through an fp16 round trip
    assert all(producers[node.input[0]].op_type == "Mul" for node in sinusoids), \
        [producers[node.input[0]].op_type for node in sinusoids]
    convolutions = [node for node in model.graph.node if node.op_type == "Conv"]
    assert convolutions and all(types[node.input[1]] == TensorProto.FLOAT16 for node in convolutions)


def test_manifest_records_graphs_ranges_schedule_and_checkpoint_digest(fp32_export):
    checkpoint, engine, code, _ = fp32_export
    assert code == 0
    manifest = manifest_of(engine)
    for graph in manifest["graphs"].values():
        onnx.checker.check_model(str(engine / graph["file"]))
        for file, digest in graph["files"].items():
            assert hashlib.sha256((engine / file).read_bytes()).hexdigest() == digest
        assert graph["sizes"] == {file: (engine / file).stat().st_size for file in graph["files"]}
    tokenizer = manifest["tokenizer"]
    assert tokenizer["sizes"] == {name: (engine / "tokenizer" / name).stat().st_size for name in tokenizer["files"]}
    # what defines the model, each part's sha256 over its JSON with sorted keys and no spaces: not default_sampler,
    # the defaults a user may change
    assert manifest["definition_sha256"] == {
        part: hashlib.sha256(json.dumps(manifest[part], sort_keys=True, separators=(",", ":")).encode()).hexdigest()
        for part in ("model", "schedule", "sampler")}
    assert manifest["graphs"]["unet"]["inputs"][0] == {"name": "latents", "dtype": "float32",
                                                       "shape": ["batch", 4, "latent_height", "latent_width"]}
    # the definition: sha256 of sha256sum-style lines for model.json and the weight files, sorted by name
    names = ["autoencoder.safetensors", "model.json", "text_encoder.safetensors", "unet.safetensors"]
    lines = "".join(f"{hashlib.sha256((checkpoint / n).read_bytes()).hexdigest()}  {n}\n" for n in names)
    assert manifest["source"]["sha256"] == hashlib.sha256(lines.encode()).hexdigest()
    assert manifest["dims"]["batch"] == {"min": 1, "opt": 2, "max": 8, "multiple": 1}
    size = TINY_CONFIG.image_size
    assert manifest["dims"]["image_height"] == {"min": size, "opt": size, "max": 2 * size,
                                                "multiple": IMAGE_SIZE_MULTIPLE}
    assert manifest["schedule"] == json.loads((checkpoint / "model.json").read_text())["schedule"]
    assert manifest["model"]["latent_scale_factor"] == TINY_CONFIG.latent_scale_factor
    assert {"torch", "onnx", "onnxruntime"} <= set(manifest["tools"])
    assert sorted(p.name for p in (engine / "tokenizer").iterdir()) == sorted(manifest["tokenizer"]["files"])


# --- bad input: one line, non-zero exit, nothing written ---------------------------------------------------


def run_cli(argv, capsys) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_existing_out_is_refused_without_force(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "engine"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = run_cli([tiny_checkpoint, "--out", out], capsys)
    assert code == 2
    assert err.strip().count("\n") == 0 and "already exists" in err and "--force" in err
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("flags, message", [([], "already exists; pass --force"),
                                            (["--force"], "is not an engine dir")])
def test_a_taken_out_is_refused_before_torch_and_onnx_are_imported(flags, message, tiny_checkpoint, tmp_path):
    out = tmp_path / "engine"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    probe = textwrap.dedent(f"""
        import sys
        from ldm_export.cli import main
        code = main([{str(tiny_checkpoint)!r}, "--out", {str(out)!r}, *{flags!r}])
        heavy = sorted(name for name in ("torch", "onnx", "transformers") if name in sys.modules)
        print(code, heavy)
    """)
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "2 []", (result.stdout, result.stderr)
    assert message in result.stderr and result.stderr.count("\n") == 1
    assert (out / "keep.txt").read_text() == "mine"


def test_force_does_not_replace_a_folder_that_is_not_an_engine_dir(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "engine"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = run_cli([tiny_checkpoint, "--out", out, "--force"], capsys)
    assert code == 2 and "not an engine dir" in err
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("manifest", ['{"name": "pwa", "start_url": "/"}', '{"format_version": 1}', "not json", "[]"],
                         ids=["web app", "partial engine manifest", "not json", "a list"])
def test_force_does_not_replace_a_folder_whose_manifest_json_is_not_an_engine_manifest(manifest, tiny_checkpoint,
                                                                                       tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ldm_export.engine_dir, "load_checkpoint_to_export", lambda folder: pytest.fail("work started"))
    out = tmp_path / "webapp"
    out.mkdir()
    (out / "manifest.json").write_text(manifest)
    (out / "index.html").write_text("precious")
    code, err = run_cli([tiny_checkpoint, "--out", out, "--force", "--skip-validation"], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"ldm-export: error: --out {out} exists and is not an engine dir") and "--force" in err
    assert sorted(os.listdir(out)) == ["index.html", "manifest.json"]
    assert (out / "index.html").read_text() == "precious" and (out / "manifest.json").read_text() == manifest


def test_force_over_an_empty_folder_holding_the_working_directory_is_one_line(tiny_checkpoint, tmp_path, capsys,
                                                                              monkeypatch):
    monkeypatch.setattr(ldm_export.engine_dir, "load_checkpoint_to_export", lambda folder: pytest.fail("work started"))
    out = tmp_path / "engine"
    out.mkdir()
    monkeypatch.chdir(out)
    code, err = run_cli([tiny_checkpoint, "--out", out, "--force", "--skip-validation"], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert f"--out {out} is the working directory or holds it; expected a folder elsewhere" in err
    assert out.is_dir()


@pytest.mark.parametrize("case", ["existing_file", "existing_file_with_force", "under_a_file", "unwritable"])
def test_an_out_that_cannot_be_written_is_one_line_before_any_work(case, tiny_checkpoint, tmp_path, capsys,
                                                                   monkeypatch):
    monkeypatch.setattr(ldm_export.engine_dir, "load_checkpoint_to_export", lambda folder: pytest.fail("work started"))
    blocker = tmp_path / "a_file"
    blocker.write_text("mine")
    out = {"existing_file": blocker, "existing_file_with_force": blocker, "under_a_file": blocker / "engine"}.get(case)
    if out is None:  # root ignores permission bits: /proc is not writable even for root
        locked = tmp_path / "read_only"
        locked.mkdir(mode=0o500)
        out = locked / "engine" if os.geteuid() != 0 else Path("/proc/ldm-no-such-process/engine")
    code, err = run_cli([tiny_checkpoint, "--out", out, *(["--force"] if case.endswith("force") else [])], capsys)
    assert code == 2 and err.startswith("ldm-export: error: --out") and err.count("\n") == 1, err
    assert str(out.parent if case in ("under_a_file", "unwritable") else out) in err and "Traceback" not in err
    assert blocker.read_text() == "mine"


@pytest.mark.parametrize("validation_seed", [2**64, -1])
def test_a_validation_seed_out_of_range_is_refused_before_any_work(validation_seed, tiny_checkpoint, tmp_path, capsys,
                                                                  monkeypatch):
    monkeypatch.setattr(ldm_export.engine_dir, "load_checkpoint_to_export", lambda folder: pytest.fail("work started"))
    code, err = run_cli([tiny_checkpoint, "--out", tmp_path / "engine", "--validation-seed", validation_seed], capsys)
    assert err == (f"ldm-export: error: --validation-seed is {validation_seed}; expected an integer from 0 to "
                   f"2**32 - 1\n")
    assert code == 2 and not (tmp_path / "engine").exists()


def test_missing_checkpoint_is_one_line_error(tmp_path, capsys):
    code, err = run_cli([tmp_path / "nowhere", "--out", tmp_path / "engine"], capsys)
    assert code == 2 and err.strip().count("\n") == 0 and "nowhere" in err
    assert not (tmp_path / "engine").exists()


def test_truncated_weight_file_is_refused_naming_it(tiny_checkpoint, tmp_path, capsys):
    broken = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint, broken)
    weights = broken / "unet.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, err = run_cli([broken, "--out", tmp_path / "engine"], capsys)
    assert code == 2 and err.strip().count("\n") == 0 and "unet.safetensors" in err
    assert not (tmp_path / "engine").exists() and leftovers(tmp_path, "engine") == []


def test_checkpoint_without_unet_is_refused(tiny_checkpoint, tmp_path, capsys):
    broken = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint, broken)
    (broken / "unet.safetensors").unlink()
    code, err = run_cli([broken, "--out", tmp_path / "engine"], capsys)
    assert code == 2 and "unet.safetensors" in err


def test_tensorrt_backend_without_tensorrt_is_one_line_error(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", None)  # import tensorrt -> ImportError
    code, err = run_cli([tiny_checkpoint, "--out", tmp_path / "engine", "--backend", "tensorrt"], capsys)
    assert code == 2
    assert err.strip().count("\n") == 0 and "tensorrt Python package" in err
    assert not (tmp_path / "engine").exists()


def test_rebuild_plans_without_tensorrt_is_one_line_error(fp32_export, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", None)
    engine = fp32_export[1]
    before = (engine / "manifest.json").read_text()
    code, err = run_cli(["--rebuild-plans", engine], capsys)
    assert code == 2 and err.strip().count("\n") == 0 and "--rebuild-plans needs the tensorrt" in err
    assert (engine / "manifest.json").read_text() == before


@pytest.mark.parametrize("flags, message", [
    (["--engine", "int8"], "invalid choice"),
    (["--backend", "openvino"], "invalid choice"),
    (["--batch-range", "1:8"], "MIN:OPT:MAX"),
    (["--opset", "eighteen"], "argument --opset: invalid int value: 'eighteen'"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
])
def test_unknown_engine_backend_or_malformed_range_is_refused(flags, message, tiny_checkpoint, tmp_path, capsys):
    code, err = run_cli([tiny_checkpoint, "--out", tmp_path / "engine", *flags], capsys)
    assert code == 2 and message in err and err.count("\n") == 1 and err.startswith("ldm-export: error: ")


@pytest.mark.parametrize("flags, message", [
    (["--batch-range", "4:2:8"], "1 <= MIN <= OPT <= MAX"),
    (["--batch-range", "1:1:1"], "at least 2"),
    (["--batch-range", "1:8:257"], "expected at most 256 UNet rows"),
    (["--size-range", "16:8200"], "expected at most 8192 pixels"),
    (["--size-range", "16:30"], f"multiples of {IMAGE_SIZE_MULTIPLE}"),
    (["--size-range", "24:32"], "image size 16"),
    (["--fp32-io"], "--engine fp16"),
])
def test_ranges_that_do_not_fit_the_model_are_refused(flags, message, tiny_checkpoint, tmp_path, capsys):
    code, err = run_cli([tiny_checkpoint, "--out", tmp_path / "engine", *flags], capsys)
    assert code == 2 and message in err and err.strip().count("\n") == 0
    assert not (tmp_path / "engine").exists() and leftovers(tmp_path, "engine") == []


# --- failures mid-export, with the slow tracing replaced by stand-in graphs ----------------------------------


def stand_in_graph(spec, modules, dims, opset) -> onnx.ModelProto:
    """A valid graph with the spec's input and output names whose outputs are constants."""
    element = {"float32": TensorProto.FLOAT, "int64": TensorProto.INT64, "bool": TensorProto.BOOL}
    inputs = [helper.make_tensor_value_info(t.name, element[t.dtype], list(t.shape)) for t in spec.inputs]
    outputs = [helper.make_tensor_value_info(t.name, TensorProto.FLOAT, None) for t in spec.outputs]
    nodes = [helper.make_node("Constant", [], [t.name], value=helper.make_tensor(t.name, TensorProto.FLOAT, [1], [0.5]))
             for t in spec.outputs]
    return helper.make_model(helper.make_graph(nodes, spec.name, inputs, outputs),
                             opset_imports=[helper.make_opsetid("", 18)])


def test_failure_mid_export_leaves_nothing_at_out(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    exported = []

    def fail_on_third_graph(spec, modules, dims, opset):
        if len(exported) == 2:
            raise RuntimeError("injected failure while exporting the third graph")
        exported.append(spec.name)
        return stand_in_graph(spec, modules, dims, opset)

    monkeypatch.setattr(ldm_export.onnx_export, "export_graph", fail_on_third_graph)
    out = tmp_path / "engine"
    with pytest.raises(RuntimeError, match="injected"):
        main([str(tiny_checkpoint), "--out", str(out)])
    assert exported == ["text_encoder", "unet"]  # two graphs had been written before the failure
    assert not out.exists() and leftovers(tmp_path, "engine") == []


def test_the_export_holds_no_written_graph_in_memory_while_it_validates(tiny_checkpoint, tmp_path, capsys,
                                                                        monkeypatch):
    # At SD 1.5's size the UNet graph alone is 1.7 GB (fp16) or 3.4 GB (fp32): what the export keeps of each graph
    # once it is written must be its files and dtypes, not the graph.
    kept = {}
    real_export_all = ldm_export.onnx_export.export_all

    def remembering_export_all(*args, **kwargs):
        kept.update(real_export_all(*args, **kwargs))
        return kept

    def look_at_what_was_kept(staging, specs, modules, dims, precision_of, precision, seed):
        # every graph written before validating
        assert set(kept) == {"text_encoder", "unet", "unet_shallow", "vae_decoder", "vae_encoder"}
        return ValidationReport(seed=seed, graphs=[], sample=None)

    monkeypatch.setattr(ldm_export.onnx_export, "export_graph", stand_in_graph)
    monkeypatch.setattr(ldm_export.engine_dir, "export_all", remembering_export_all)
    monkeypatch.setattr(ldm_export.engine_dir, "validate_engine", look_at_what_was_kept)
    code, err = run_cli([tiny_checkpoint, "--out", tmp_path / "engine"], capsys)
    assert code == 0, err
    for name, graph in kept.items():
        assert not any(isinstance(value, onnx.ModelProto) for value in vars(graph).values()), name
        assert graph.files == [f"{name}.onnx"] and graph.opset == 18
        assert graph.input_dtypes and all(dtype in ("float32", "int64", "bool") for dtype in graph.input_dtypes)
    manifest = manifest_of(tmp_path / "engine")
    assert manifest["graphs"]["unet"]["inputs"][1]["dtype"] == "int64"


def _failing_report(*args, **kwargs) -> ValidationReport:
    return ValidationReport(seed=0, graphs=[GraphCheck("unet", "fp32", 3e-3, 1e-4)], sample=None)


def test_failed_validation_exits_1_and_leaves_nothing_at_out(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ldm_export.onnx_export, "export_graph", stand_in_graph)
    monkeypatch.setattr(ldm_export.engine_dir, "validate_engine", _failing_report)
    out = tmp_path / "engine"
    code, err = run_cli([tiny_checkpoint, "--out", out], capsys)
    assert code == 1 and "unet relative error 3.0e-03 > 1.0e-04" in err and "nothing was written" in err
    assert not out.exists() and leftovers(tmp_path, "engine") == []


def test_failed_export_with_force_keeps_the_old_engine(fp32_export, tmp_path, capsys, monkeypatch):
    old = tmp_path / "engine"
    shutil.copytree(fp32_export[1], old)
    before = (old / "manifest.json").read_text()
    monkeypatch.setattr(ldm_export.onnx_export, "export_graph", stand_in_graph)
    monkeypatch.setattr(ldm_export.engine_dir, "validate_engine", _failing_report)
    code, _ = run_cli([fp32_export[0], "--out", old, "--force"], capsys)
    assert code == 1
    assert (old / "manifest.json").read_text() == before and leftovers(tmp_path, "engine") == []


def test_force_replaces_an_engine_dir_once_the_new_one_is_complete(fp32_export, tmp_path, capsys, monkeypatch):
    old = tmp_path / "engine"
    shutil.copytree(fp32_export[1], old)
    old_unet = manifest_of(old)["graphs"]["unet"]["files"]["unet.onnx"]
    monkeypatch.setattr(ldm_export.onnx_export, "export_graph", stand_in_graph)
    code, err = run_cli([fp32_export[0], "--out", old, "--force", "--skip-validation"], capsys)
    assert code == 0, err
    manifest = manifest_of(old)
    assert manifest["validation"] == {"skipped": True}
    new_unet = manifest["graphs"]["unet"]["files"]["unet.onnx"]
    assert new_unet != old_unet and hashlib.sha256((old / "unet.onnx").read_bytes()).hexdigest() == new_unet
    assert leftovers(tmp_path, "engine") == []


# --- an export killed with SIGKILL (no cleanup runs) ---------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]

# ldm-export in a child process that exports its first graph for real, announces it, and waits to be killed
# before the second: the test kills it while its .partial folder holds a graph, whatever the machine's speed.
EXPORT_THEN_WAIT = textwrap.dedent("""
    import sys
    import ldm_export.onnx_export
    from ldm_export.cli import main

    real_export_graph, calls = ldm_export.onnx_export.export_graph, []

    def export_graph(*args):
        if calls:
            print("first graph written", flush=True)
            sys.stdin.read()
        calls.append(args[0].name)
        return real_export_graph(*args)

    ldm_export.onnx_export.export_graph = export_graph
    sys.exit(main(sys.argv[1:]))
""")


def test_the_next_export_of_a_target_removes_what_a_killed_export_left(tiny_checkpoint, tmp_path, capsys,
                                                                        monkeypatch):
    out = tmp_path / "engine"
    with open(tmp_path / "killed-export.log", "w") as log:
        killed = subprocess.Popen([sys.executable, "-c", EXPORT_THEN_WAIT, str(tiny_checkpoint), "--out", str(out)],
                                  cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
        try:
            lines = iter(killed.stdout.readline, "")
            assert "first graph written\n" in lines, (tmp_path / "killed-export.log").read_text()
        finally:
            os.kill(killed.pid, signal.SIGKILL)
            killed.wait()
            killed.stdin.close()
            killed.stdout.close()
    [partial] = leftovers(tmp_path, "engine")
    assert partial.startswith(".engine.partial-") and (tmp_path / partial / "text_encoder.onnx").stat().st_size > 0
    assert not out.exists()

    monkeypatch.setattr(ldm_export.onnx_export, "export_graph", stand_in_graph)
    code, err = run_cli([tiny_checkpoint, "--out", out, "--skip-validation"], capsys)
    assert code == 0, err
    assert (out / "manifest.json").is_file() and leftovers(tmp_path, "engine") == []
