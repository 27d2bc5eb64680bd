"""``ldm-serve --lora NAME=FILE``: LoRA adapters chosen per request on the torch engine over the tiny checkpoint.
Requests with different adapters, or none, share UNet calls and each gets the image it gets alone; the OpenAI
routes take ``lora`` too (the edits form as a JSON part); a bad ``lora`` is a 422 naming it; ``/metrics`` counts
requests per adapter; and a bad ``--lora`` is one line and exit status 2 before the server listens.

The adapters are kohya files with fresh random weights (``write_kohya_adapter``); where requests must share a UNet
call, the test holds the server's worker with its step gate and waits on ``/metrics``."""

from __future__ import annotations

import base64
import hashlib
import io
import json

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ldm_serve import cli as serve_cli
from ldm_serve.errors import OPENAI_EDITS_PATH, OPENAI_IMAGES_PATH
from tests.conftest import base_seed
from tests.ldm_runtime.test_adapters_per_request import write_kohya_adapter
from tests.ldm_serve.gated_server import JSON, PROMPTS, Server, body, post

ADAPTERS = ("x", "y")


def _seed(name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{base_seed()}:serve-lora:{name}".encode()).digest()[:4], "little")


@pytest.fixture(scope="module")
def adapter_files(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-adapters")
    return {"x": write_kohya_adapter(tiny_checkpoint, root / "x.safetensors", _seed("x"), rank=4),
            "y": write_kohya_adapter(tiny_checkpoint, root / "y.safetensors", _seed("y"), rank=2, locon=False)}


@pytest.fixture(scope="module")
def lora_server(tiny_checkpoint, adapter_files):
    running = Server(tiny_checkpoint, "--engine", "torch", "--device", "cpu", "--max-batch", "4", "--max-steps", "8",
                     *[flag for name, path in adapter_files.items() for flag in ("--lora", f"{name}={path}")]
                     ).wait_ready()
    yield running
    running.stop()


def _pixels(b64_png: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64_png))))


def _images(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return response.json()["images"]


def _random_png(rng: np.random.Generator) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _adapter_count(server: Server, name: str) -> float:
    return server.metric(f'ldm_serve_adapter_requests_total{{adapter="{name}"}}')


def test_the_serving_line_and_the_schema_name_the_loaded_adapters(lora_server):
    assert "adapters x, y" in next(line for line in lora_server.lines if "serving" in line)
    schema = httpx.get(f"{lora_server.url}/openapi.json", timeout=10).json()
    for path in ("/v1/images", OPENAI_IMAGES_PATH):
        lora = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        lora = lora["properties"]["lora"]
        assert lora["items"]["properties"]["name"] == {"enum": list(ADAPTERS)} and lora["maxItems"] == 2
        scale = lora["items"]["properties"]["scale"]
        assert (scale["minimum"], scale["maximum"]) == (-10, 10)
    form = schema["paths"][OPENAI_EDITS_PATH]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["properties"]["lora"]["items"]["properties"]["name"] == {"enum": list(ADAPTERS)}


def test_requests_with_different_adapters_and_one_without_share_a_unet_call_and_each_image_is_its_own(lora_server,
                                                                                                     rng):
    """Three requests held until all are queued: the first UNet call holds all three (adapter x, adapters y and x,
    none), each image is the bytes that request gets alone, the adapters change the images, and /metrics counts
    each request once per adapter it names."""
    seeds = [int(seed) for seed in rng.integers(0, 2**62, 3)]
    lora = [[{"name": "x", "scale": 0.8}], [{"name": "y"}, {"name": "x", "scale": -0.5}], []]
    bodies = [body(prompt=PROMPTS[index], seed=seeds[index], steps=4, lora=choice)
              for index, choice in enumerate(lora)]
    server = lora_server
    counts_before = {name: _adapter_count(server, name) for name in (*ADAPTERS, "none")}

    together, first_call_rows, _, _ = server.send_held(bodies)
    assert [response.status_code for response in together] == [200] * len(bodies), together[0].text
    assert first_call_rows == len(bodies)  # one UNet call served all three adapter choices
    counts = {name: _adapter_count(server, name) - counts_before[name] for name in (*ADAPTERS, "none")}
    assert counts == {"x": 2, "y": 1, "none": 1}
    for payload, response in zip(bodies, together):
        assert _images(post(server.url, payload)) == response.json()["images"], payload["lora"]
        png = Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0])))
        assert json.loads(png.text["parameters"]).get("lora", []) == [[item["name"], item.get("scale", 1.0)]
                                                                      for item in payload["lora"]]
        if payload["lora"]:
            plain = _images(post(server.url, {**payload, "lora": []}))[0]
            difference = np.abs(_pixels(plain).astype(np.int16) - _pixels(response.json()["images"][0])).max()
            assert difference > 16, "the adapters must change the image visibly"


def test_openai_generations_and_edits_take_lora_as_our_route_does(lora_server, rng):
    seed = int(rng.integers(0, 2**62))
    lora = [{"name": "y", "scale": 1.5}]
    ours = _images(post(lora_server.url, body(seed=seed, lora=lora)))[0]
    generations = httpx.post(f"{lora_server.url}{OPENAI_IMAGES_PATH}", headers=JSON, timeout=60,
                             content=json.dumps({"prompt": PROMPTS[0], "seed": seed, "steps": 4, "lora": lora}))
    assert generations.status_code == 200, generations.text
    assert np.array_equal(_pixels(generations.json()["data"][0]["b64_json"]), _pixels(ours))

    init_image = _random_png(rng)
    fields = {"prompt": PROMPTS[1], "seed": str(seed), "steps": "4", "strength": "0.75"}
    edits = {}
    for name, lora_part in (("array", json.dumps(lora)), ("none", None)):
        data = {**fields, **({"lora": lora_part} if lora_part else {})}
        answer = httpx.post(f"{lora_server.url}{OPENAI_EDITS_PATH}", data=data, timeout=60,
                            files={"image": ("image.png", init_image, "image/png")})
        assert answer.status_code == 200, answer.text
        edits[name] = _pixels(answer.json()["data"][0]["b64_json"])
    as_json = _images(post(lora_server.url, body(prompt=PROMPTS[1], seed=seed, lora=lora, strength=0.75,
                                                 init_image=base64.b64encode(init_image).decode("ascii"))))
    assert np.array_equal(edits["array"], _pixels(as_json[0]))
    assert not np.array_equal(edits["array"], edits["none"])


@pytest.mark.parametrize("lora, named", [
    ([{"name": "w"}], "'w', which is not loaded; expected one of: x, y"),
    ([{"name": "x", "scale": 11}], "the scale 11.0; expected a number from -10 to 10"),
    ([{"name": "x"}, {"name": "x", "scale": 0.5}], "repeats; expected each adapter once"),
    ([{"name": "x"}, {"name": "y"}, {"name": "x"}], "lora is [{"),
    ([{"name": "x", "weight": 1}], "expected a list of at most 2 objects"),
    ([{"name": "x", "scale": True}], "expected a list of at most 2 objects"),
    ({"name": "x"}, "lora is {\"name\": \"x\"}; expected a list"),
    ("x", "lora is \"x\"; expected a list"),
])
def test_bad_lora_gets_a_422_naming_lora(lora_server, lora, named, rng):
    response = post(lora_server.url, body(lora=lora))
    assert response.status_code == 422 and response.json()["error"]["field"] == "lora", response.text
    assert named in response.json()["error"]["message"], response.text
    openai = httpx.post(f"{lora_server.url}{OPENAI_IMAGES_PATH}", headers=JSON, timeout=60,
                        content=json.dumps({"prompt": PROMPTS[0], "lora": lora}))
    assert openai.status_code == 400 and openai.json()["error"]["param"] == "lora", openai.text  # 400 where ours is 422
    if isinstance(lora, dict):
        return  # a form's part per adapter: one part of one object is a list of one
    form = httpx.post(f"{lora_server.url}{OPENAI_EDITS_PATH}", timeout=60, data={"prompt": PROMPTS[0],
                                                                                 "lora": json.dumps(lora)},
                      files={"image": ("image.png", _random_png(rng), "image/png")})
    assert form.status_code == 400 and form.json()["error"]["param"] == "lora", form.text


def test_a_server_without_adapters_refuses_a_request_naming_one_with_a_422(engine_dir):
    running = Server(engine_dir, "--max-steps", "2", "--default-steps", "2").wait_ready()
    try:
        response = post(running.url, body(steps=2, lora=[{"name": "x"}]))
        assert response.status_code == 422 and response.json()["error"]["field"] == "lora", response.text
        assert "loaded no LoRA adapters" in response.json()["error"]["message"]
        assert post(running.url, body(steps=2, lora=[])).status_code == 200
        assert running.metric('ldm_serve_adapter_requests_total{adapter="none"}') == 1
    finally:
        running.stop()


def _bad_adapter(tmp_path):
    path = tmp_path / "bad.safetensors"
    save_file({"lora_unet_conv_in.lora_down.weight": torch.zeros(2, 5, 3, 3),
               "lora_unet_conv_in.lora_up.weight": torch.zeros(16, 2, 1, 1)}, str(path))
    return path


@pytest.mark.parametrize("flags, message", [
    (["--lora", "x"], "argument --lora: 'x' is not NAME=FILE"),
    (["--lora", "x="], "argument --lora: 'x=' is not NAME=FILE"),
    (["--lora", "a b={x}"], "argument --lora: the name 'a b' of"),
    (["--lora", "none={x}"], "the name 'none' of"),
    (["--lora", "x={x}", "--lora", "x={y}"], "--lora x={y} repeats the name x"),
    (["--lora", "x={missing}"], "--lora: cannot read {missing}"),
    (["--lora", "x={bad}"], "--lora: {bad}: 'lora_unet_conv_in.lora_down.weight' [2, 5, 3, 3]"),
    (["--lora", "x={pickle}"], "--lora: {pickle} holds PyTorch pickle data (torch.save's zip archive), not "
                               "safetensors"),
])
def test_bad_lora_flags_exit_2_with_one_line(tiny_checkpoint, adapter_files, tmp_path, capsys, flags, message):
    values = {"x": adapter_files["x"], "y": adapter_files["y"], "missing": tmp_path / "missing.safetensors",
              "bad": _bad_adapter(tmp_path), "pickle": tmp_path / "renamed.safetensors"}
    torch.save({"lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4, 3, 3)}, values["pickle"])
    flags = [flag.format(**values) for flag in flags]
    assert serve_cli.main(["--model", str(tiny_checkpoint), "--engine", "torch", "--device", "cpu", "--port", "0",
                           *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ldm-serve: error: ") and err.count("\n") == 1, err
    assert message.format(**values) in err, err


def test_lora_on_an_engine_without_per_request_adapters_exits_2_with_one_line(engine_dir, adapter_files, capsys):
    assert serve_cli.main(["--model", str(engine_dir), "--engine", "onnxruntime", "--port", "0",
                           "--lora", f"x={adapter_files['x']}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ldm-serve: error: --lora: adapters x cannot be served") and err.count("\n") == 1, err
    assert "no LoRA slots" in err and "--lora-slots" in err and "ldm-import --lora" in err, err
