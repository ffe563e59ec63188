"""`isynth` commands as real processes, without paying Python's and torch's start-up for each.

A multiprocessing fork server imports `isynth.cli` once (and runs no torch operation, so no thread pool
exists to break on fork); each command is a process forked from it, with its own pid, working directory,
environment, stdin/stdout/stderr files, signals and exit status, running what `python -m isynth ARGS` runs.
Only interpreter start-up and imports are shared: a command takes tens of milliseconds instead of two
seconds, which is most of the time of a command that fails on bad input. `ISYNTH_TEST_EXEC=1` runs every
command through `python -m isynth` instead.
"""
from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

EXEC = os.environ.get("ISYNTH_TEST_EXEC") == "1"
_context = None


def _ctx():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(["isynth.cli"])
    return _context


def _child(args: list[str], cwd: str | None, env: dict[str, str], prelude: str, out: str, err: str,
           status: str) -> None:
    """The forked command: `python -m isynth ARGS` in all that it can observe, then its exit status."""
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_TRUNC)
        os.dup2(f, fd)
        os.close(f)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    os.environ.clear()
    os.environ.update(env)
    if cwd is not None:
        os.chdir(cwd)
    sys.argv = [str(Path(sys.executable).parent / "isynth"), *args]
    code = 1
    try:
        import torch  # imported by the server already; its thread count follows the command's environment

        torch.set_num_threads(int(env.get("OMP_NUM_THREADS") or 0) or os.cpu_count() or 1)
        exec(prelude, {"__name__": "__prelude__"})
        from isynth.cli import main

        code = main(args)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # what the interpreter prints for an uncaught exception, and its status
        traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    with open(status, "w") as f:  # besides the exit status the fork server relays (which it can lose: 255)
        f.write(str(code))
    os._exit(code)


def run(args: list[str], cwd: Path | None, env: dict[str, str], prelude: str = "", timeout: float = 300,
        signal_when: tuple[int, Path] | None = None) -> subprocess.CompletedProcess:
    """Run `isynth ARGS` and return what a subprocess.run would: exit status, stdout and stderr text. With
    `signal_when` = (signum, path) the command gets the signal once the path exists."""
    if EXEC:
        return _run_exec(args, cwd, env, prelude, timeout, signal_when)
    with tempfile.TemporaryDirectory(prefix="isynth-cli-") as d:
        out, err, status = Path(d) / "out", Path(d) / "err", Path(d) / "status"
        out.touch()
        err.touch()
        proc = _ctx().Process(target=_child, args=(args, None if cwd is None else str(cwd), env, prelude,
                                                   str(out), str(err), str(status)))
        proc.start()
        deadline = time.monotonic() + timeout
        if signal_when is not None:
            signum, path = signal_when
            while not path.exists() and proc.is_alive() and time.monotonic() < deadline:
                time.sleep(0.02)
            if proc.is_alive():
                os.kill(proc.pid, signum)
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join()
            raise subprocess.TimeoutExpired(["isynth", *args], timeout)
        # The command's own exit status where it got to write it; else it ended by a signal.
        code = int(status.read_text()) if status.is_file() else proc.exitcode
        return subprocess.CompletedProcess(["isynth", *args], code, out.read_text(), err.read_text())


def _run_exec(args, cwd, env, prelude, timeout, signal_when) -> subprocess.CompletedProcess:
    head = ["-c", f"{prelude}\nimport sys\nfrom isynth.cli import main\nsys.exit(main(sys.argv[1:]))", "isynth"] \
        if prelude else ["-m", "isynth"]
    proc = subprocess.Popen([sys.executable, *head, *args], cwd=cwd, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    if signal_when is not None:
        signum, path = signal_when
        deadline = time.monotonic() + timeout
        while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if proc.poll() is None:
            proc.send_signal(signum)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
