"""``ldm-serve``'s OpenAPI schema says what the server does: schemathesis, with every check it has, generates
requests from ``/openapi.json`` (valid ones, invalid ones, boundary values, unsupported methods, missing and wrong
credentials) against a real server and must find nothing; and the bounds in the schema are the server's own.

The server allows 2 steps and 2 images at most, so that the valid requests schemathesis sends stay quick, and its
default sampler is not ddim, so that the schema's rule on eta covers a body that names no sampler; the run's seed
comes from the test's ``seed`` fixture, so a failure replays with ``LDM_TEST_SEED``. The rules JSON Schema cannot
state, a guidance_interval's low below its high and an upload that is an image the model edits, are
``schemathesis_hooks.py``'s."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from PIL import Image
from schemathesis.core.warnings import SchemathesisWarning

from ldm_runtime.schedulers import SAMPLER_NAMES
from ldm_serve.errors import OPENAI_IMAGES_PATH
from tests.ldm_serve.gated_server import JSON, Server

API_KEY = "sesame"
HOOKS = Path(__file__).with_name("schemathesis_hooks.py")
EXAMPLES_PER_OPERATION = 10
REQUEST_TIMEOUT_S = 300
DEFAULT_SAMPLER = next(name for name in SAMPLER_NAMES if name != "ddim")


@pytest.fixture(scope="module")
def schema_server(engine_dir):
    running = Server(engine_dir, "--max-steps", "2", "--default-steps", "2", "--max-n", "2",
                     "--sampler", DEFAULT_SAMPLER, env={"LDM_SERVE_API_KEY": API_KEY}).wait_ready()
    yield running
    running.stop()


def schemathesis_command() -> list[str]:
    script = Path(sys.executable).with_name("schemathesis")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "schemathesis.cli"]


@pytest.mark.slow
def test_schemathesis_with_all_checks_finds_nothing(schema_server, seed, tmp_path):
    result = subprocess.run(
        schemathesis_command() + [
            "run", f"{schema_server.url}/openapi.json", "--checks", "all", "--mode", "all",
            "--header", f"Authorization: Bearer {API_KEY}", "--max-examples", str(EXAMPLES_PER_OPERATION),
            "--seed", str(seed), "--workers", "1", "--generation-database", "none", "--no-color",
            # The checks are about what the server answers, not how fast this machine is: "--checks all" would
            # also time every answer against a 10 s limit, which a busy 2-core machine can exceed.
            "--request-timeout", str(REQUEST_TIMEOUT_S), "--max-response-time", str(REQUEST_TIMEOUT_S),
            # DELETE /v1/images/{id} takes the id of a request still queued or running, which no request
            # schemathesis makes leaves it: 404 for every id it sends is the right answer, not missing test data;
            # and every image it makes for POST /v1/images/edits (random bytes, a 1x1 PNG) is one no model edits,
            # so that route refuses most of its valid-looking forms naming the image (schemathesis_hooks.py)
            "--warnings", ",".join(kind.value for kind in SchemathesisWarning
                                   if kind.value not in ("missing_test_data", "validation_mismatch"))],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env={**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS)})
    report = result.stdout[-8000:] + result.stderr[-2000:]
    assert result.returncode == 0, report
    counts = re.search(r"(\d+) generated, (\d+) passed", result.stdout)
    assert counts and int(counts.group(1)) == int(counts.group(2)) >= 50, report  # it did send requests
    assert "No issues found" in result.stdout, report
    assert "Traceback" not in schema_server.log and "Exception" not in schema_server.log


def test_the_schema_bounds_and_media_types_are_the_servers_own(schema_server):
    schema = httpx.get(f"{schema_server.url}/openapi.json", headers=schema_server.auth).json()
    request = schema["paths"]["/v1/images"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    fields = request["properties"]
    seed = fields["seed"]["anyOf"][0]
    assert (seed["minimum"], seed["maximum"]) == (0, 2**63 - 1) and isinstance(seed["maximum"], int)
    assert (fields["steps"]["maximum"], fields["n"]["maximum"]) == (2, 2)
    assert all(isinstance(fields[name]["maximum"], int) for name in ("steps", "n"))
    assert fields["prompt"]["pattern"] and fields["prompt"]["minLength"] == 1
    interval = fields["guidance_interval"]["anyOf"][0]
    assert (interval["minItems"], interval["maxItems"], interval["items"]) == (2, 2, {"type": "number", "minimum": 0})
    assert fields["cache_interval"]["minimum"] == 1 and isinstance(fields["cache_interval"]["maximum"], int)
    assert list(schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    metrics = httpx.get(f"{schema_server.url}/metrics", headers=schema_server.auth)
    assert metrics.headers["content-type"].startswith("text/plain")
    # the largest seed is a seed, as the schema says, and so are whole numbers written as floats
    images = httpx.post(f"{schema_server.url}/v1/images", headers={**schema_server.auth, **JSON}, timeout=60,
                        content=b'{"prompt": "a red circle", "seed": 9223372036854775807, "n": 2.0, "steps": 1e0}')
    assert images.status_code == 200, images.text
    assert images.json()["seeds"] == [2**63 - 1, 0]


def test_the_schema_lists_the_samplers_and_a_body_without_one_gets_the_servers_default(schema_server):
    schema = httpx.get(f"{schema_server.url}/openapi.json", headers=schema_server.auth).json()
    for path in ("/v1/images", OPENAI_IMAGES_PATH):
        request = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        sampler = request["properties"]["sampler"]
        assert (sampler["enum"], sampler["default"]) == (list(SAMPLER_NAMES), DEFAULT_SAMPLER)
        assert request["properties"]["steps"]["maximum"] == 2
        eta_rule = request["allOf"][0]
        assert "required" not in eta_rule["if"] and eta_rule["then"]["properties"]["eta"] == {"const": 0}
    answer = httpx.post(f"{schema_server.url}/v1/images", headers={**schema_server.auth, **JSON}, timeout=60,
                        content=b'{"prompt": "a red circle", "seed": 3}')
    assert answer.status_code == 200, answer.text
    png = Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0])))
    assert json.loads(png.text["parameters"])["sampler"] == DEFAULT_SAMPLER
    refused = httpx.post(f"{schema_server.url}/v1/images", headers={**schema_server.auth, **JSON}, timeout=60,
                         content=b'{"prompt": "a red circle", "eta": 0.5}')
    assert refused.status_code == 422 and refused.json()["error"]["field"] == "eta", refused.text
    ddim = httpx.post(f"{schema_server.url}/v1/images", headers={**schema_server.auth, **JSON}, timeout=60,
                      content=b'{"prompt": "a red circle", "seed": 3, "sampler": "ddim", "eta": 0.5}')
    assert ddim.status_code == 200 and ddim.json()["images"] != answer.json()["images"], ddim.text
    tcd = httpx.post(f"{schema_server.url}/v1/images", headers={**schema_server.auth, **JSON}, timeout=60,
                     content=b'{"prompt": "a red circle", "seed": 3, "sampler": "tcd", "steps": 2, "eta": 0.3}')
    assert tcd.status_code == 200 and json.loads(Image.open(io.BytesIO(base64.b64decode(
        tcd.json()["images"][0]))).text["parameters"])["eta"] == 0.3, tcd.text
