"""Child processes for the tests, each with a deadline: a child that fails makes the test
fail with the child's own error, one that hangs makes it fail within `timeout` seconds,
and no child (nor a grandchild, such as torchrun's workers) outlives its test.

    spawn(fn, args, nprocs, timeout)   torch.multiprocessing workers (gloo tests)
    run(command, timeout, **popen)     one command: a CompletedProcess, output captured
    run_all(commands, timeout, ...)    several commands at once (torchrun agents)
"""
import os
import signal
import subprocess
import sys
import time

import torch.distributed as dist
import torch.multiprocessing as mp

TAIL = 6000  # characters of a hung child's output shown in the failure


class ChildTimeout(AssertionError):
    """A child still running at its deadline (it was killed, with its process group)."""


def spawn(fn, args=(), nprocs=2, timeout=120):
    """torch.multiprocessing.spawn with a deadline. A child that raises: its traceback, as
    torch.multiprocessing.ProcessRaisedException (the others are terminated); one that dies
    from a signal or os._exit: ProcessExitedException; all still running at the deadline:
    ChildTimeout, after every child is killed."""
    context = mp.start_processes(_run_then_leave, args=(fn, *args), nprocs=nprocs, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=max(0.0, min(1.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                alive = [rank for rank, p in enumerate(context.processes) if p.is_alive()]
                raise ChildTimeout(f"{fn.__name__}: process(es) {alive} of {nprocs} still running "
                                   f"after {timeout} s; killed")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join()


def _run_then_leave(rank, fn, *args):
    """A spawn() worker: fn(rank, *args), then os._exit(0), skipping the teardown of its
    process group and interpreter. On torch 2.4 that teardown can deadlock (seen with gdb):
    destroying a gloo group joins its threads while holding the GIL, and one of them waits
    for the GIL to free the last reference to a tensor of the last collective. So the
    workers never call destroy_process_group; their results are on disk by then. A raising
    fn reports through torch.multiprocessing as before."""
    fn(rank, *args)
    if dist.is_initialized():
        dist.barrier()  # no rank closes its sockets while another still talks to it
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _descendants(pid):
    """Every process below pid (Linux /proc; torchrun starts its workers in sessions of
    their own, out of reach of the agent's process group)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as handle:
                    children = [int(child) for child in handle.read().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found


def _kill_group(process):
    """The child, its process group and every descendant, wherever their session."""
    doomed = _descendants(process.pid)
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in doomed:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_all(commands, timeout=300, **popen):
    """Start every command (each in its own process group), wait for all with one deadline;
    a list of CompletedProcess (stdout and stderr together, as text). At the deadline every
    group is killed and ChildTimeout shows the tail of each command's output."""
    popen = dict(dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), **popen)
    processes = [subprocess.Popen(command, start_new_session=True, **popen) for command in commands]
    deadline = time.monotonic() + timeout
    outputs = [None] * len(processes)
    try:
        for i, process in enumerate(processes):
            try:
                outputs[i] = process.communicate(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                for other in processes:
                    _kill_group(other)
                shown = []
                for command, other, output in zip(commands, processes, outputs):
                    if output is None:
                        try:  # bounded: a process outside the tree may still hold the pipe
                            output = other.communicate(timeout=10)
                        except subprocess.TimeoutExpired as expired:
                            output = (expired.output, expired.stderr)
                    text = "".join(part if isinstance(part, str) else (part or b"").decode(errors="replace")
                                   for part in output)
                    shown.append(f"$ {' '.join(map(str, command))}\n{text[-TAIL:]}")
                raise ChildTimeout(f"still running after {timeout} s; killed. Output:\n"
                                   + "\n".join(shown)) from None
    finally:
        for process in processes:
            _kill_group(process)  # orphaned grandchildren too (torchrun's workers)
            if process.poll() is None:
                process.wait()
    return [subprocess.CompletedProcess(command, process.returncode, *output)
            for command, process, output in zip(commands, processes, outputs)]


def run(command, timeout=300, **popen):
    """One command, as subprocess.run(capture_output=True, text=True) with a deadline that
    kills its whole process group and shows its output in the failure."""
    return run_all([command], timeout, **dict(dict(stderr=subprocess.PIPE), **popen))[0]
