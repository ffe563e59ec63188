"""Writing files so that a kill at any instant leaves either the old file or the new one, never half of one:
everything is written to a temporary name in the destination directory and renamed into place. Reading
JSON the user may have edited turns any problem into one clear error."""
from __future__ import annotations

import fcntl
import functools
import hashlib
import inspect
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import save_file

from isynth.errors import IsynthError


@contextmanager
def writer_lock(directory: str | os.PathLike) -> Iterator[None]:
    """Hold the one-writer lock of `directory` (a run, pair or token directory) for the block.

    An exclusive `flock` on `.<name>.lock` beside the directory, so it works before the directory exists
    and never touches its contents; the OS releases it when the process ends, however it ends, so a killed
    writer leaves no stale lock (at most an unlocked file, reused by the next writer). The file names its
    holder for the refusal a second writer gets, and is removed on release. A process that locked the file
    just as the holder removed it sees that the path no longer names its file, and tries again."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    path = directory.parent / f".{directory.name}.lock"
    while True:
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise IsynthError(f"{directory} is being written by {holder}; wait for it to end or use another "
                              "directory") from None
        try:
            same = os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        f.close()  # the holder removed the file between our open and our lock: lock the new one
    try:
        f.seek(0)
        f.truncate()
        f.write(f"process {os.getpid()} ({' '.join(Path(a).name if i == 0 else a for i, a in enumerate(sys.argv[:3]))}"
                f") since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        f.flush()
        yield
    finally:
        path.unlink(missing_ok=True)  # while still holding it: a waiting writer then re-opens a fresh file
        f.close()  # closing the descriptor releases the lock


def one_writer(arg: str):
    """Decorator: the function runs holding `writer_lock` on its directory argument `arg`."""
    def wrap(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def locked(*args, **kwargs):
            with writer_lock(sig.bind(*args, **kwargs).arguments[arg]):
                return fn(*args, **kwargs)
        return locked
    return wrap


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path`, on error it is removed.

    The name `.<name>.<pid>.<random>.tmp` lets a resumed run find and delete what a killed one left, and
    the file gets the usual umask permissions (tempfile.mkstemp would make it 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_dead_temporaries(directory: Path, name: str = "*") -> None:
    """Delete the `.<name>.<pid>.<random>.tmp` files and directories in `directory` (every name by default)
    but those of a live process: what writes killed before their rename left."""
    for tmp in Path(directory).glob(f".{name}.*.tmp"):
        pid = tmp.name.split(".")[-3]
        if not (pid.isdigit() and process_alive(int(pid))):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def new_directory(out: str | os.PathLike, fill: Callable[[Path], None]) -> None:
    """Make directory `out` holding what `fill(tmp)` writes into `tmp`, appearing whole at once: it is built
    beside `out` under `.<name>.<pid>.<random>.tmp` and renamed into place (over an empty directory, e.g. one
    the user made). A failure removes the build; what a killed build left is removed by the next."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temporaries(out.parent, out.name)
    if out.is_dir():
        remove_dead_temporaries(out)  # an empty directory but for what killed writes left in it
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir()
    try:
        fill(tmp)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _umask()


def atomic_save_tensors(path: str | os.PathLike, tensors: dict, metadata: dict | None = None) -> None:
    """A safetensors file written to a temporary name and renamed into place, with the usual permissions
    (safetensors creates its files 0600, unreadable to the rest of a team sharing runs)."""
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, tmp, metadata=metadata)
        except SafetensorError as e:  # its writer's I/O errors (a full disk) come as its own type
            raise OSError(f"writing {path}: {e}") from None
        os.chmod(tmp, 0o666 & ~UMASK)


def read_json(path: str | os.PathLike, what: str):
    """The parsed JSON file at `path`, or one IsynthError naming it as an unreadable `what`."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise IsynthError(f"{path}: unreadable {what} ({e})") from None


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks (checkpoints and weights can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
