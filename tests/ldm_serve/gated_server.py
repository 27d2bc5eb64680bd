"""``ldm-serve`` as the server tests run it: ``Server``, the real server in a subprocess whose worker the test
holds and releases with the step gate and whose state it reads from ``/metrics``, and the requests they send it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import tempfile
import time
from pathlib import Path

import httpx

from ldm_serve.server import API_KEY_ENV, STEP_GATE_ENV
from ldm_tools.serve_process import ServeProcess

JSON = {"Content-Type": "application/json"}
PROMPTS = ["a red circle", "a blue square on the left", "two yellow stars", "a small green triangle"]
STATE_TIMEOUT_S = 60  # how long a test waits for the server to reach a state it has set up


class Server(ServeProcess):
    """``ldm-serve`` in a subprocess (``ldm_tools.serve_process``) with its step gate in a file of its own:
    ``held()``/``hold(more_calls)``/``release()`` work the gate, ``wait_for`` waits on a metric; ``auth`` is the
    Authorization header its API key (``LDM_SERVE_API_KEY`` in ``env``) needs."""

    def __init__(self, model: Path, *flags: str, env: dict[str, str] | None = None, **options):
        self.gate = Path(tempfile.mkdtemp(prefix="ldm-serve-gate-")) / "gate"
        key = (env or {}).get(API_KEY_ENV)
        self.auth = {"Authorization": b"Bearer " + key.encode("utf-8", "surrogateescape")} if key else {}
        super().__init__(model, *flags, env={STEP_GATE_ENV: str(self.gate), **(env or {})}, **options)

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics", headers=self.auth, timeout=10).text
        match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
        assert match, f"{name} not in /metrics"
        return float(match.group(1))

    def wait_for(self, name: str, predicate, what: str) -> float:
        """Poll the metric ``name`` until ``predicate(value)``; fails with ``what`` if the server never gets there."""
        deadline = time.monotonic() + STATE_TIMEOUT_S
        while not predicate(value := self.metric(name)):
            assert self.process.poll() is None, self.log
            assert time.monotonic() < deadline, f"{what}: {name} is still {value}\n{self.log}"
            time.sleep(0.01)
        return value

    def hold(self, more_calls: int = 0) -> None:
        """Let the worker make ``more_calls`` more UNet calls (one per step here), then hold it at a step boundary.
        Call it while the worker is held (or idle), so that the count it starts from is settled."""
        partial = self.gate.with_suffix(".partial")
        partial.write_text(str(int(self.metric("ldm_serve_unet_calls_total")) + more_calls))
        partial.replace(self.gate)

    def release(self) -> None:
        self.gate.unlink(missing_ok=True)

    @contextlib.contextmanager
    def held(self):
        self.hold()
        try:
            yield self
        finally:
            self.release()


def body(**fields) -> dict:
    return {"prompt": PROMPTS[0], "seed": 1, "steps": 4, **fields}


def post(url: str, payload, headers=JSON, timeout: float = 60) -> httpx.Response:
    content = payload if isinstance(payload, (bytes, str)) else json.dumps(payload)
    return httpx.post(f"{url}/v1/images", content=content, headers=headers, timeout=timeout)


async def post_all(url: str, payloads: list[dict], headers=JSON) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(payloads) + 1)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        return await asyncio.gather(*(client.post(f"{url}/v1/images", content=json.dumps(payload), headers=headers)
                                      for payload in payloads))
