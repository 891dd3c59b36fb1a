"""Children that fail or hang on purpose: the tests that start them fail with the child's
error, or within their deadline, and leave no process behind (tests/children.py and the
per-phase deadline of tests/conftest.py)."""
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from children import ChildTimeout, run, spawn

HERE = Path(__file__).resolve().parent


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def fail_or_wait_worker(rank, world, init_file, pid_dir):
    """Rank 1 fails on purpose; rank 0 waits for it in a collective that never completes
    (gloo's default timeout: 30 minutes)."""
    Path(pid_dir, f"rank{rank}").write_text(str(os.getpid()))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    if rank == 1:
        raise RuntimeError("rank 1 fails on purpose")
    dist.all_reduce(torch.ones(1))


def hang_worker(rank, pid_dir):
    Path(pid_dir, f"rank{rank}").write_text(str(os.getpid()))
    time.sleep(600)


def pids(directory):
    return [int(path.read_text()) for path in Path(directory).iterdir()]


def test_a_failing_gloo_child_fails_the_test_with_its_error(tmp_path):
    (tmp_path / "pids").mkdir()
    start = time.monotonic()
    with pytest.raises(mp.ProcessRaisedException, match="rank 1 fails on purpose"):
        spawn(fail_or_wait_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "pids")), nprocs=2,
              timeout=60)
    assert time.monotonic() - start < 60
    assert not any(alive(pid) for pid in pids(tmp_path / "pids"))  # rank 0 was not left waiting


def test_a_hanging_child_fails_the_test_at_its_deadline(tmp_path):
    start = time.monotonic()
    with pytest.raises(ChildTimeout, match=r"hang_worker: process\(es\) \[0, 1\] of 2 still running after 3 s"):
        spawn(hang_worker, args=(str(tmp_path),), nprocs=2, timeout=3)
    assert time.monotonic() - start < 30
    assert not any(alive(pid) for pid in pids(tmp_path))


def test_a_failing_command_returns_its_error():
    done = run([sys.executable, "-c", "import sys; print('out'); sys.exit('fails on purpose')"], timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (1, "out\n", "fails on purpose\n")


def test_a_hanging_command_and_its_children_are_killed_at_the_deadline(tmp_path):
    """The command starts a grandchild in a session of its own (as torchrun starts its
    workers) and hangs: both die."""
    script = (f"import subprocess, sys, time; print('started', flush=True); "
              f"child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True); "
              f"open({str(tmp_path / 'pid')!r}, 'w').write(str(child.pid)); time.sleep(600)")
    start = time.monotonic()
    with pytest.raises(ChildTimeout, match=r"(?s)still running after 3 s; killed.*started"):
        run([sys.executable, "-c", script], timeout=3)
    assert time.monotonic() - start < 30
    grandchild = int((tmp_path / "pid").read_text())
    deadline = time.monotonic() + 10
    while alive(grandchild) and time.monotonic() < deadline:  # killed; reaped by init
        time.sleep(0.05)
    assert not alive(grandchild)


def test_a_hanging_test_fails_at_the_per_test_deadline(tmp_path):
    """conftest.py's deadline: a test that waits forever in the main process fails with a
    TimeoutError and every thread's stack, and the run goes on to the next test."""
    shutil.copy(HERE / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_hang.py").write_text(
        "import threading, time\n"
        "def test_waits_forever():\n"
        "    threading.Event().wait()\n"
        "def test_next():\n"
        "    pass\n")
    start = time.monotonic()
    done = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
               cwd=tmp_path, env=dict(os.environ, PCR_TEST_TIMEOUT="2"), timeout=120)
    assert time.monotonic() - start < 60
    assert done.returncode == 1, done.stdout + done.stderr
    assert "TimeoutError: test_hang.py::test_waits_forever: call still running after 2 s" in done.stdout
    assert "1 failed, 1 passed" in done.stdout
    assert "line 3 in test_waits_forever" in done.stdout  # the stacks, under "Captured stderr"
