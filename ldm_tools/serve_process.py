"""``ldm-serve`` in a child process on a free loopback port: what the server's tests and the load test run.

The child gets ``--port 0`` (the kernel picks a free port), one engine thread (``--threads 1`` and
``OMP_NUM_THREADS=1``, so several servers on one machine do not fight over cores) and no API key from the
environment unless ``env`` sets one. Its stderr is read by a thread as it comes: ``lines`` holds it so far,
and the address is taken from the line that says it listens. Readiness and metrics are read over HTTP with
the standard library only.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from ldm_serve.server import API_KEY_ENV, LISTENING_LINE

START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 30.0
POLL_S = 0.05


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now, for a server that needs a fixed one (Ray Serve's proxy)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


class ServeProcessError(RuntimeError):
    """The server did not start, never became ready, or died; the message ends with its log."""


class ServeProcess:
    """``ldm-serve --model MODEL FLAGS...`` in a child process; ``url`` once it listens, ``log`` its stderr so far.

    Waits until the server listens (``ServeProcessError`` with its log if it does not within
    ``start_timeout_s``); ``wait_ready()`` then waits for ``/readyz``. ``env`` adds to the child's environment.
    """

    def __init__(self, model: str | Path, *flags: str, env: dict[str, str] | None = None,
                 start_timeout_s: float = START_TIMEOUT_S):
        script = Path(sys.executable).with_name("ldm-serve")
        command = [str(script)] if script.is_file() else [sys.executable, "-m", "ldm_serve.cli"]
        environment = {**os.environ, "OMP_NUM_THREADS": "1"}
        environment.pop(API_KEY_ENV, None)
        environment.update(env or {})
        self.start_timeout_s = start_timeout_s
        self.process = subprocess.Popen(
            command + ["--model", str(model), "--port", "0", "--threads", "1", "--log-level", "warning", *flags],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=environment)
        self.lines: list[str] = []
        self._listening = threading.Event()
        threading.Thread(target=self._read_stderr, daemon=True).start()
        self._listening.wait(start_timeout_s)
        listening = next((line for line in self.lines if LISTENING_LINE in line), None)
        if listening is None:  # still starting after the timeout, or it exited
            self.stop()
            raise ServeProcessError(f"ldm-serve did not start (exit status {self.process.returncode}):\n{self.log}")
        self.url = re.search(r"on (http://\S+)", listening).group(1)

    def _read_stderr(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line)
            if LISTENING_LINE in line:
                self._listening.set()
        self._listening.set()  # stderr closed: the server exited (__init__ then says so with its log)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def get(self, path: str, timeout_s: float = 10.0) -> tuple[int, str]:
        """(status, body text) of ``GET path`` (e.g. "/readyz"); an HTTP error status is returned, not raised."""
        try:
            with urllib.request.urlopen(f"{self.url}{path}", timeout=timeout_s) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def wait_ready(self) -> "ServeProcess":
        """Wait until ``/readyz`` answers 200 (the engine is warmed up); ``ServeProcessError`` if the server dies
        or is not ready within the start timeout."""
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServeProcessError(f"ldm-serve exited with status {self.process.returncode}:\n{self.log}")
            try:
                if self.get("/readyz", timeout_s=5)[0] == 200:
                    return self
            except OSError:  # not accepting connections yet
                pass
            time.sleep(POLL_S)
        raise ServeProcessError(f"ldm-serve never became ready:\n{self.log}")

    def metric(self, name: str) -> float:
        """The value of one sample of ``/metrics``, by its name and labels as exposed (e.g.
        ``ldm_serve_requests_total{outcome="ok"}``); ``ServeProcessError`` if the server does not expose it."""
        match = re.search(rf"^{re.escape(name)} (\S+)$", self.get("/metrics")[1], re.MULTILINE)
        if not match:
            raise ServeProcessError(f"{name} is not in /metrics")
        return float(match.group(1))

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM (the server drains and exits), then SIGKILL if it has not exited within ``timeout_s``;
        returns its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()
