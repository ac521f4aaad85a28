"""How a grown model lands on disk: the manifest `expansion.json` — the only thing training needs to know about the
growth — and `atomic_folder`, which writes any output folder into a temporary one renamed into place, so nothing
is ever half-written.

    {"base": "smollm2", "plan": {...}, "new_layers": [5, 11, ...], ...}      # + "trained": {...} after training

`new_layers` are positions in the grown model: the blocks LLaMA Pro trains.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from deepen.plan import Plan

MANIFEST = "expansion.json"


@dataclass(frozen=True)
class Manifest:
    """The growth of a model folder: its base, the plan, and (after `deepen train`) how it was trained.

    `extra` holds what a writer adds beside (the files `deepen expand` wrote, their dtype, ...); it is kept as it is."""

    base: str
    plan: Plan
    trained: dict | None = None
    extra: dict = field(default_factory=dict)

    @property
    def new_layers(self) -> list[int]:
        return self.plan.new_layers

    def to_dict(self) -> dict:
        out = {"base": self.base, "plan": self.plan.to_dict(), "new_layers": self.new_layers, **self.extra}
        return out if self.trained is None else {**out, "trained": self.trained}

    @classmethod
    def from_dict(cls, data: dict, where: str = "manifest") -> Manifest:
        """Validate and read a manifest dict: the plan must be readable and its new layers the ones listed."""
        if not isinstance(data, dict) or not {"base", "plan", "new_layers"} <= set(data):
            raise ValueError(f"{where} is not a deepen manifest: it needs the keys base, plan and new_layers")
        try:
            plan = Plan.from_dict(data["plan"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: its plan cannot be read ({e})") from None
        if list(data["new_layers"]) != plan.new_layers:
            raise ValueError(f"{where}: new_layers {data['new_layers']} disagree with its plan's {plan.new_layers}; "
                             "the file was edited or damaged: grow the model again")
        extra = {k: v for k, v in data.items() if k not in ("base", "plan", "new_layers", "trained")}
        return cls(base=str(data["base"]), plan=plan, trained=data.get("trained"), extra=extra)

    def after_training(self, **trained) -> Manifest:
        """The same growth, marked as trained since (so `deepen verify` no longer expects the base's function)."""
        return replace(self, trained=trained)

    def write(self, folder: str | os.PathLike) -> Path:
        path = Path(folder, MANIFEST)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, folder: str | os.PathLike) -> Manifest:
        """The manifest of a grown model's folder; a clear error if it is missing, not JSON, or inconsistent."""
        path = Path(folder, MANIFEST)
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {folder} was not grown by deepen (run `deepen expand` first)")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON ({e}); grow the model again") from None
        manifest = cls.from_dict(data, str(path))
        config = Path(folder, "config.json")
        if config.is_file():
            layers = json.loads(config.read_text()).get("num_hidden_layers")
            if layers is not None and layers != manifest.plan.n_layers:
                raise ValueError(f"{path}: the plan makes {manifest.plan.n_layers} layers but config.json has {layers}")
        return manifest

    @classmethod
    def find(cls, folder: str | os.PathLike) -> Manifest | None:
        """The folder's manifest, or None when it has none (a model that was not grown)."""
        return cls.read(folder) if Path(folder, MANIFEST).is_file() else None


# ---------------------------------------------------------------------------------------------- atomic output

# A temporary folder is named after its output and its owner: .OUT.<pid>@<host>.<random>.partial (and .old for
# the previous OUT while --overwrite swaps), so a later run can tell a stale one (its process is gone) from a live one.
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)@(?P<host>[^.]*)\.[^.]+\.(?P<kind>partial|old)$")


def _host() -> str:
    return socket.gethostname().split(".")[0].replace("@", "_") or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def sweep_stale(out: str | os.PathLike, say=None) -> list[Path]:
    """Remove what an interrupted write into `out` left beside it (a killed process cannot clean up): temporary
    folders whose process on this machine is gone. If OUT itself is missing and a previous OUT was set aside by an
    --overwrite killed mid-swap, that is put back first. Returns what was removed; `say` gets one line each
    (default: stderr)."""
    out = Path(out)
    say = say or (lambda line: print(line, file=sys.stderr))
    removed = []
    if not out.parent.is_dir():
        return removed
    stale = []
    for path in out.parent.iterdir():
        m = _TEMP.match(path.name)
        if m and m["name"] == out.name and path.is_dir() and m["host"] == _host() and not _alive(int(m["pid"])):
            stale.append((m["kind"], path))
    for kind, path in sorted(stale, key=lambda item: item[0] != "old"):
        if kind == "old" and not out.exists():
            os.replace(path, out)
            say(f"restored {out}: an earlier --overwrite was interrupted before it finished")
            continue
        size = _size(path)
        shutil.rmtree(path, ignore_errors=True)
        say(f"removed {path.name} ({size / 1e6:,.1f} MB) beside {out}: left by an interrupted run")
        removed.append(path)
    return removed


class Terminated(BaseException):
    """SIGTERM (what job schedulers and `kill` send), raised as an exception so that cleanup runs as on Ctrl-C."""


@contextmanager
def terminate_as_exception():
    """While inside, SIGTERM raises `Terminated` (in the main thread, where the default would kill the process
    without cleaning up); elsewhere, or when a handler is already set, nothing changes."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def handler(signum, frame):
        raise Terminated(f"terminated by signal {signum}")

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


class FolderBusy(RuntimeError):
    """Another process is writing the folder."""


@contextmanager
def one_writer(folder: str | os.PathLike, say=None):
    """Hold `folder`'s lock while the block writes it: one writer at a time (a run folder, an expanded or merged
    OUT). The lock is a file beside the folder, `.NAME.lock`, locked with the OS's flock (so it dies with its
    process) and holding who has it (host, pid, since); it is removed when the block ends. A second process refuses
    at once with FolderBusy naming the holder; a lock file whose holder is gone without removing it (killed, the
    machine rebooted) is taken over, with a line saying so (`say`, default stderr)."""
    import fcntl

    folder = Path(folder)
    say = say or (lambda line: print(line, file=sys.stderr))
    lock_file = folder.parent / f".{folder.name}.lock"
    folder.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(lock_file)
            os.close(fd)
            raise FolderBusy(f"{folder} is being written by another process ({holder}); wait for it to finish, or "
                             f"choose another output folder") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_file).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed the file as this process opened it: lock the one there now
    try:
        previous = _holder(lock_file, missing=None)
        if previous is not None:  # left by a holder that never came to remove it: killed, or the machine rebooted
            say(f"took over {folder}: its last writer ({previous}) is gone without finishing")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"host": _host(), "pid": os.getpid(),
                                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
        yield folder
    finally:
        lock_file.unlink(missing_ok=True)  # before unlocking: a process waiting on this file then sees it is gone
        os.close(fd)


def _holder(lock_file: Path, missing: str | None = "holder unknown") -> str | None:
    try:
        info = json.loads(lock_file.read_text())
        return f"pid {info['pid']} on {info['host']}, since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return missing


@contextmanager
def atomic_folder(out: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary folder beside `out`; when the block succeeds it becomes `out`, on any error, Ctrl-C or
    SIGTERM it is removed and `out` is untouched. With overwrite, an existing `out` is kept until the new one is
    complete, then swapped out (renamed aside, the new one renamed in, the old one removed). Leftovers of a
    killed earlier write into `out` are removed first (`sweep_stale`)."""
    out = Path(out)
    with one_writer(out):
        with _atomic_folder(out, overwrite) as tmp:
            yield tmp


@contextmanager
def _atomic_folder(out: Path, overwrite: bool):
    sweep_stale(out)  # first: it may put back an OUT that an interrupted --overwrite had set aside
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file, not a folder; choose another output folder")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another output folder or pass overwrite=True (--overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    owner = f".{out.name}.{os.getpid()}@{_host()}."
    with terminate_as_exception():
        tmp = Path(tempfile.mkdtemp(prefix=owner, suffix=".partial", dir=out.parent))
        try:
            yield tmp
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
            if not out.exists():
                os.replace(tmp, out)
            else:  # swap: the old OUT aside, the new one in, the old one removed; put back if the swap fails
                old = Path(tempfile.mkdtemp(prefix=owner, suffix=".old", dir=out.parent))
                os.replace(out, old)  # onto an empty folder of its own
                try:
                    os.replace(tmp, out)
                except BaseException:
                    os.replace(old, out)
                    raise
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
