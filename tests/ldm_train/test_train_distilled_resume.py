"""``ldm-train lcm``, ``guidance`` and ``progressive`` with ``--resume``: a run stopped after a checkpoint and
continued lands on the uninterrupted run's weights and losses bit for bit (the student, the averaged weights, the
optimiser and the consistency target come back from the checkpoint), and the flags that cannot go with it are one
line."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import ldm_train.train_lcm
from ldm_train.cli import main
from tests.ldm_export.tiny_checkpoint import shared_tiny_checkpoint

COMMON = ["--data", "shapes:16", "--batch-size", "4", "--checkpoint-every", "2", "--device", "cpu"]
STAGE_FLAGS = {"lcm": [], "guidance": [], "progressive": ["--sample-steps", "2"]}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return shared_tiny_checkpoint(tmp_path_factory)


def losses(folder) -> dict[int, float]:
    records = map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
    return {record["step"]: record["loss"] for record in records}


def assert_same_tensors(first, second) -> None:
    for name in ("unet.safetensors", "train_state.safetensors"):
        a, b = load_file(first / name), load_file(second / name)
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a), name


@pytest.mark.parametrize("stage", sorted(STAGE_FLAGS))
def test_a_resumed_run_replays_the_uninterrupted_one_exactly(base, tmp_path, stage):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    common = [stage, "--base", str(base), *COMMON, *STAGE_FLAGS[stage], "--lr-schedule", "constant"]
    assert main([*common, "--out", str(straight), "--steps", "4"]) == 0
    assert main([*common, "--out", str(stopped), "--steps", "2"]) == 0
    assert main([*common, "--out", str(stopped), "--steps", "4", "--resume"]) == 0
    assert losses(stopped) == {**losses(straight), 2: losses(stopped)[2]}  # the shorter run also logged its end
    assert_same_tensors(straight, stopped)


def test_an_interrupted_cosine_run_resumes_exactly_and_the_interrupt_names_resume(base, tmp_path, capsys,
                                                                                 monkeypatch):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    common = ["guidance", "--base", str(base), *COMMON, "--steps", "4"]  # the default cosine schedule over 4 steps
    assert main([*common, "--out", str(straight)]) == 0
    check_finite = ldm_train.train_lcm.check_finite

    def stop_at_the_third_step(step, out, **values):
        if step == 2:
            raise KeyboardInterrupt
        check_finite(step, out, **values)

    monkeypatch.setattr(ldm_train.train_lcm, "check_finite", stop_at_the_third_step)
    assert main([*common, "--out", str(stopped)]) == 130
    assert "(continue with --resume)" in capsys.readouterr().err
    monkeypatch.setattr(ldm_train.train_lcm, "check_finite", check_finite)
    assert main([*common, "--out", str(stopped), "--resume"]) == 0
    assert losses(stopped) == losses(straight)
    assert_same_tensors(straight, stopped)


def test_resume_flags_that_cannot_hold_are_one_line(base, tmp_path, capsys):
    out = tmp_path / "guidance"
    common = ["guidance", "--base", str(base), *COMMON, "--steps", "2"]
    assert main([*common, "--out", str(out), "--resume"]) == 2
    assert f"cannot resume: --out {out} holds no checkpoint" in capsys.readouterr().err
    assert main([*common, "--out", str(out)]) == 0
    capsys.readouterr()
    cases = [(["--resume", "--overwrite"], "--resume and --overwrite contradict each other"),
             ([], "already holds a model; pass --overwrite to replace it, or --resume to continue its run"),
             (["--resume", "--guidance-scale", "3"], "with changed settings (guidance_scale: 5.0 -> 3.0)"),
             (["--resume", "--steps", "1"], "--steps 1 is below step 2")]
    for flags, message in cases:
        assert main([*common, "--out", str(out), *flags]) == 2, flags
        error = capsys.readouterr().err
        assert message in error and error.count("\n") == 1, (flags, error)
    assert main(["lcm", "--base", str(base), *COMMON, "--steps", "2", "--out", str(out), "--resume"]) == 2
    assert "cannot resume lcm training from" in capsys.readouterr().err
