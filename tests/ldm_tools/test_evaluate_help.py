"""``ldm-eval --help`` says what ``--engine auto`` really picks (``pick_engine``), in the words ldm-sample uses."""

from __future__ import annotations

import importlib.util

import pytest

from ldm_runtime.engines import AUTO_ENGINE_HELP, pick_engine
from ldm_tools import evaluate


def test_eval_help_says_auto_picks_openvino_on_the_cpu_for_an_engine_dir_as_pick_engine_does(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_status:
        evaluate.main(["--help"])
    assert exit_status.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert AUTO_ENGINE_HELP in text and "onnxruntime for an engine dir" not in text, text
    if importlib.util.find_spec("openvino") is None:
        pytest.skip("openvino is not installed, so auto would pick onnxruntime here")
    (tmp_path / "manifest.json").write_text("{}")  # on the CPU, auto reads no more of an engine dir than its marker
    assert pick_engine(tmp_path, "cpu")[0] == "openvino" and "openvino on the CPU" in AUTO_ENGINE_HELP
