"""The commands' edge: a ``UserError`` is one line ``PROG: error: ...`` and exit status 2; any other exception is a
bug and reaches the caller with its traceback instead of being dressed up as the user's mistake."""

from __future__ import annotations

import pytest

from ldm_runtime import sample
from ldm_runtime.command_line import OneLineArgumentParser, report_user_error
from ldm_runtime.errors import CheckpointError, EngineLoadError, RequestError, UsageError, UserError
from ldm_runtime.serve import cli as serve_cli


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

    monkeypatch.setattr(serve_cli, "load_engine", load_engine)
    with pytest.raises(type(bug)):
        serve_cli.main(["--model", str(tmp_path), "--port", "0"])
