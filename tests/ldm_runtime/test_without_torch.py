"""The engine-dir path of the runtime runs on a machine without torch: in a child process where importing torch
(and the training, export and tool packages, and transformers) fails, the tiny engine dir is loaded through
``load_engine``, sampled through the pipeline and ``ldm-sample``, and served: ``ldm-serve``'s own setup builds the
app and a request through it gets its PNG."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ldm_export.tiny_checkpoint import shared_tiny_engine

REPO = Path(__file__).resolve().parents[2]
BLOCKED = ("torch", "transformers", "safetensors", "ldm_kernels", "ldm_train", "ldm_export", "ldm_tools")
SCRIPT = """
import sys
for name in {blocked!r}:
    sys.modules[name] = None  # `import name` (and of any submodule) now raises ImportError

import base64, io, time
from PIL import Image
from fastapi.testclient import TestClient

from ldm_runtime import sample
from ldm_runtime.engines import load_engine
from ldm_runtime.pipeline import GenerationRequest, Pipeline
from ldm_serve import cli
from ldm_serve.server import prepare_server

engine_dir, out = sys.argv[1], sys.argv[2]
engine = load_engine(engine_dir, device="cpu", intra_op_threads=1)
images = Pipeline(engine).generate([GenerationRequest(prompt="a red circle", seed=3, steps=3)])
assert images[0].shape == (16, 16, 3) and images[0].std() > 0, images[0].shape

assert sample.main(["--model", engine_dir, "a blue square", "a green star", "--steps", "2", "--out", out]) == 0

server, sock = prepare_server(cli.build_parser().parse_args(["--model", engine_dir, "--port", "0", "--threads", "1"]))
try:
    # the lifespan starts the worker, which warms the engine up; the server answers loopback Host names only
    with TestClient(server.config.app, base_url="http://127.0.0.1") as client:
        deadline = time.monotonic() + 120
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "never ready"
            time.sleep(0.05)
        response = client.post("/v1/images", json={{"prompt": "a red circle", "seed": 1, "steps": 2}})
        assert response.status_code == 200, response.text
        image = Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0])))
        assert image.size == (16, 16)
finally:
    sock.close()
print("loaded, sampled and served without", ", ".join({blocked!r}))
"""


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory) -> Path:
    _, engine, code, output = shared_tiny_engine(tmp_path_factory, "fp32")
    assert code == 0, output
    return engine


def test_an_engine_dir_loads_samples_and_serves_with_torch_and_the_stages_blocked(engine_dir, tmp_path):
    result = subprocess.run([sys.executable, "-c", SCRIPT.format(blocked=BLOCKED), str(engine_dir),
                             str(tmp_path / "images")], cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert "loaded, sampled and served without torch" in result.stdout
    assert sorted(path.name for path in (tmp_path / "images").iterdir()) == ["000-seed0.png", "001-seed1.png",
                                                                            "grid.png"]


def test_the_block_works_a_torch_import_fails_in_the_child():
    script = f"import sys\nfor name in {BLOCKED!r}:\n    sys.modules[name] = None\nimport torch\n"
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "import of torch halted" in result.stderr, result.stderr
