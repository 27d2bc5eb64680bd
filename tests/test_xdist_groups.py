"""``--dist loadgroup`` (scripts/test.sh) keeps every test of one ``xdist_group`` on one worker: the Ray tests rely on
it to run one Ray instance at a time. Some pytest releases silently break it (the tests are then spread as if
unmarked), so an inner run of two workers checks that it still holds with the installed pytest and xdist."""

import os
import subprocess
import sys
import textwrap

GROUPED = textwrap.dedent("""
    import os
    import pytest

    @pytest.mark.xdist_group(name="one_worker")
    @pytest.mark.parametrize("index", range(8))
    def test_grouped(index):
        with open(os.environ["WORKERS_FILE"], "a") as workers:
            workers.write(os.environ["PYTEST_XDIST_WORKER"] + "\\n")

    @pytest.mark.parametrize("index", range(8))
    def test_free(index):
        pass
""")


def test_loadgroup_runs_a_group_on_one_worker(tmp_path):
    (tmp_path / "test_grouped_a.py").write_text(GROUPED)
    (tmp_path / "test_grouped_b.py").write_text(GROUPED)
    workers_file = tmp_path / "workers.txt"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2", "--dist", "loadgroup",
         "--rootdir", str(tmp_path), str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "WORKERS_FILE": str(workers_file)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    workers = workers_file.read_text().split()
    assert len(workers) == 16, workers
    assert len(set(workers)) == 1, f"one xdist_group ran on several workers: {sorted(set(workers))}"
