"""The commands' edge: a ``UserError`` is one line ``PROG: error: ...`` and exit status 2; any other exception is a
bug and reaches the caller with its traceback instead of being dressed up as the user's mistake."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ldm_runtime import command_line, sample
from ldm_runtime.command_line import OneLineArgumentParser, check_writable_folder, report_user_error
from ldm_runtime.errors import CheckpointError, EngineLoadError, RequestError, UsageError, UserError
from ldm_serve import cli as serve_cli
from ldm_serve import server as serve_server


def test_a_user_error_is_reported_as_its_first_line_with_status_2(capsys):
    assert report_user_error("ldm-x", CheckpointError("model.json is missing\nsecond line")) == 2
    assert capsys.readouterr().err == "ldm-x: error: model.json is missing\n"


def test_a_bad_command_line_raises_a_usage_error_not_systemexit():
    parser = OneLineArgumentParser(prog="ldm-x")
    parser.add_argument("--steps", type=int)
    with pytest.raises(UsageError, match="--steps: invalid int value: 'many'"):
        parser.parse_args(["--steps", "many"])


def test_every_user_error_of_the_library_is_a_user_error_and_request_errors_carry_their_field():
    assert all(issubclass(kind, UserError) for kind in (CheckpointError, EngineLoadError, RequestError, UsageError))
    error = RequestError("steps is 0; expected an integer from 1 to 999", "steps")
    assert (error.field, str(error)) == ("steps", "steps is 0; expected an integer from 1 to 999")


@pytest.mark.parametrize("bug", [ValueError("a bug's message"), OSError(5, "a bug's I/O error"),
                                 ImportError("a bug's import")])
def test_ldm_sample_lets_a_bug_show_its_traceback(bug, tmp_path, monkeypatch):
    def load_engine(*args, **kwargs):
        raise bug

    monkeypatch.setattr(sample, "load_engine", load_engine)
    with pytest.raises(type(bug)):
        sample.main(["--model", str(tmp_path), "a red circle", "--out", str(tmp_path / "out")])


def test_ldm_sample_reports_a_user_error_from_loading_in_one_line(tmp_path, monkeypatch, capsys):
    def load_engine(*args, **kwargs):
        raise EngineLoadError("the onnxruntime engine needs the onnxruntime package, which is not installed here")

    monkeypatch.setattr(sample, "load_engine", load_engine)
    assert sample.main(["--model", str(tmp_path), "a red circle", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == ("ldm-sample: error: the onnxruntime engine needs the onnxruntime package, "
                                       "which is not installed here\n")


@pytest.mark.parametrize("bug", [ValueError("a bug's message"), OSError(5, "a bug's I/O error")])
def test_ldm_serve_lets_a_bug_show_its_traceback(bug, tmp_path, monkeypatch):
    def load_engine(*args, **kwargs):
        raise bug

    monkeypatch.setattr(serve_server, "load_engine", load_engine)
    with pytest.raises(type(bug)):
        serve_cli.main(["--model", str(tmp_path), "--port", "0"])


def test_the_out_check_keeps_a_folder_another_process_made_first_and_leaves_it_to_them(tmp_path, monkeypatch):
    """Two ranks of one torchrun job check the same --out at once: the one whose mkdir loses must not fail, nor
    remove the folder the other is probing."""
    out = tmp_path / "run"
    real_mkdir = Path.mkdir

    def the_other_rank_is_first(self, *args, **kwargs):
        if self == out and not out.exists():
            real_mkdir(self)  # the other process, between this one's exists() and its mkdir()
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", the_other_rank_is_first)
    check_writable_folder("--out", out)
    assert out.is_dir()


def test_the_out_check_tries_again_when_another_process_removes_the_folder_under_it(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()  # made by the other process, which removes it when its own check is done
    real_mkstemp = command_line.tempfile.mkstemp
    calls = []

    def the_other_rank_cleans_up(*args, **kwargs):
        calls.append(kwargs["dir"])
        if len(calls) == 1:
            out.rmdir()
        return real_mkstemp(*args, **kwargs)

    monkeypatch.setattr(command_line.tempfile, "mkstemp", the_other_rank_cleans_up)
    check_writable_folder("--out", out)
    assert len(calls) == 2 and not out.exists() and list(tmp_path.iterdir()) == []


def test_the_out_check_gives_up_in_one_line_when_the_folder_keeps_vanishing(tmp_path, monkeypatch):
    out = tmp_path / "run"

    def always_gone(*args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr(command_line.tempfile, "mkstemp", always_gone)
    with pytest.raises(UsageError, match=r"^--out .*/run cannot be written \(No such file or directory\)"):
        check_writable_folder("--out", out)
    assert not out.exists()


def test_ranks_checking_one_out_at_the_same_time_all_pass(tmp_path):
    """Real processes racing on the same missing --out (what a torchrun job's ranks do at start-up)."""
    out = tmp_path / "a" / "run"
    script = ("import sys, pathlib; from ldm_runtime.command_line import check_writable_folder as c\n"
              "for _ in range(200): c('--out', pathlib.Path(sys.argv[1]))\n")
    workers = [subprocess.Popen([sys.executable, "-c", script, str(out)], stderr=subprocess.PIPE, text=True)
               for _ in range(4)]
    errors = [worker.communicate(timeout=300)[1] for worker in workers]
    assert [worker.returncode for worker in workers] == [0] * 4, errors
