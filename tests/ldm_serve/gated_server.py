"""``ldm-serve`` as the server tests run it: ``Server``, the real server in a subprocess whose worker the test
holds and releases with the step gate and whose state it reads from ``/metrics``, the requests they send it, and
``StreamedRequest``, a plain server-sent-events client for streamed requests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterable, Iterator

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

    def send_held(self, bodies: list[dict]) -> tuple[list[httpx.Response], float, float, float]:
        """Post ``bodies`` to /v1/images while the worker is held, let it make one UNet call once all are queued,
        then release it: (the responses, the rows of that first call, the UNet calls and the rows made for them in
        all)."""
        async def send() -> tuple[list[httpx.Response], float, float, float]:
            with self.held():
                sending = asyncio.ensure_future(post_all(self.url, bodies))
                await asyncio.to_thread(self.wait_for, "ldm_serve_queue_depth", lambda value: value == len(bodies),
                                        "the requests never all queued")
                rows_before = self.metric("ldm_serve_batch_size_sum")
                calls_before = self.metric("ldm_serve_batch_size_count")
                self.hold(more_calls=1)
                await asyncio.to_thread(self.wait_for, "ldm_serve_batch_size_count",
                                        lambda value: value == calls_before + 1, "the first UNet call never ran")
                first_call_rows = self.metric("ldm_serve_batch_size_sum") - rows_before
            responses = await sending
            return (responses, first_call_rows, self.metric("ldm_serve_batch_size_count") - calls_before,
                    self.metric("ldm_serve_batch_size_sum") - rows_before)

        return asyncio.run(send())


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


def sse_events(lines: Iterable[str]) -> Iterator[tuple[str, dict]]:
    """Server-sent events from the lines of a ``text/event-stream`` body, as the HTML standard parses them: each
    event's name ("message" when it has none) and its data lines joined, here read as JSON."""
    name, data = "message", []
    for line in lines:
        if not line:
            if data:
                yield name, json.loads("\n".join(data))
            name, data = "message", []
        elif not line.startswith(":"):
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                name = value
            elif field == "data":
                data.append(value)


class StreamedRequest:
    """A streamed ``POST path`` read by a thread of its own: ``response`` has its status and headers, ``next()``
    gives its events in order as ``(name, data)``, then ``("end", {})`` once the server ends the stream;
    ``close()`` drops the connection (the client leaving)."""

    def __init__(self, url: str, payload: dict, path: str = "/v1/images", headers: dict = JSON):
        self.events: queue.Queue = queue.Queue()
        self._client = httpx.Client(timeout=STATE_TIMEOUT_S)
        self._stream = self._client.stream("POST", f"{url}{path}", content=json.dumps(payload), headers=headers)
        self.response = self._stream.__enter__()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for event in sse_events(self.response.iter_lines()):
                self.events.put(event)
        except Exception as error:  # closed by close() while reading
            self.events.put(("closed", {"error": repr(error)}))
        else:
            self.events.put(("end", {}))

    def next(self) -> tuple[str, dict]:
        return self.events.get(timeout=STATE_TIMEOUT_S)

    def until(self, name: str) -> list[tuple[str, dict]]:
        """The events up to and including the next one called ``name``."""
        events = [self.next()]
        while events[-1][0] != name:
            assert events[-1][0] not in ("end", "closed"), events
            events.append(self.next())
        return events

    def rest(self) -> list[tuple[str, dict]]:
        """Every event left, up to the end of the stream (its "end" left out)."""
        events = [self.next()]
        while events[-1][0] not in ("end", "closed"):
            events.append(self.next())
        assert events[-1][0] == "end", events
        return events[:-1]

    def close(self) -> None:
        self._stream.__exit__(None, None, None)
        self._client.close()
        self._reader.join(STATE_TIMEOUT_S)
