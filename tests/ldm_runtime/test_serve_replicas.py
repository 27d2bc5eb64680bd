"""``ldm-serve --replicas N`` on a real local Ray instance on loopback: two replicas answer concurrent requests,
both take work, and every image is byte for byte the one single-process ``ldm-serve`` makes; SIGTERM ends it
with status 0. Without Ray, ``--replicas`` says in one line what to install.

The Ray test skips where Ray is not installed, unless ``LDM_REQUIRE_RAY=1`` (as ``.ci/run`` sets it, after
installing the ``ray`` extra), when it fails instead."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys

import pytest

from tests.ldm_runtime.test_serve import Server, body, engine_dir, post_all  # noqa: F401

REQUIRE_ENV = "LDM_REQUIRE_RAY"
RAY_START_TIMEOUT_S = 300  # a local Ray instance and two replicas, each loading the engine, on two shared cores


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_replicas_without_ray_say_what_to_install_in_one_line(engine_dir):
    hide_ray = ("import sys; sys.modules['ray'] = None; from ldm_runtime.serve.cli import main; "
                f"sys.exit(main(['--model', {str(engine_dir)!r}, '--replicas', '2']))")
    result = subprocess.run([sys.executable, "-c", hide_ray], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2, result.stderr
    assert result.stderr == ("ldm-serve: error: --replicas needs Ray Serve, which is not installed; expected pip "
                             "install 'ldm-runtime[ray]'\n")


@pytest.mark.slow
def test_two_replicas_share_concurrent_work_and_give_single_process_bytes(engine_dir, rng):
    try:
        import ray  # noqa: F401
    except ImportError:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"ray is not installed, and {REQUIRE_ENV}=1 requires the replica tests to run")
        pytest.skip("ray is not installed (pip install 'ldm-runtime[ray]')")
    bodies = [body(seed=int(rng.integers(0, 2**62)), steps=2, n=1 + index % 2) for index in range(16)]
    replicas = Server(engine_dir, "--replicas", "2", "--port", str(free_port()), "--max-queue", "64",
                      start_timeout_s=RAY_START_TIMEOUT_S)
    try:
        replicas.wait_ready()
        together = asyncio.run(post_all(replicas.url, bodies))
        assert [response.status_code for response in together] == [200] * len(bodies), together[0].text
        assert len({response.headers["x-ldm-replica"] for response in together}) == 2  # both took work
    finally:
        status = replicas.stop(timeout_s=120)
    assert status == 0, replicas.log
    single = Server(engine_dir).wait_ready()
    try:
        alone = asyncio.run(post_all(single.url, bodies))
    finally:
        single.stop()
    assert [response.json()["images"] for response in together] == [response.json()["images"] for response in alone]
