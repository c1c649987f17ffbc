"""One run per output directory: the main process holds ``OUTPUT/run.lock`` (its pid, host and start time)
until it exits.

A lock whose holder is gone from this host (no such process, or its pid now belongs to a later process)
is taken over; a lock taken on another host is refused, since whether its holder still runs cannot be
checked from here (the message says to delete it if that run is gone). ``new_file.create_new`` publishes the
lock with its content complete and fails when one exists.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import os
import socket
import sys
import time

from .new_file import create_new

LOCK = "run.lock"
_held: list[str] = []


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) of ``pid`` from /proc; None where unavailable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the command name may hold spaces and parentheses
        return fields[0], fields[19]
    except (OSError, IndexError):
        return None


def _alive(holder: dict) -> bool | None:
    """Whether the lock's holder still runs; None when it ran on another host (unknown from here)."""
    if holder.get("host") != socket.gethostname():
        return None
    pid = int(holder["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    stat = _proc_stat(pid)
    if stat is None:
        return True
    state, started = stat
    return state != "Z" and holder.get("pid_start") in (None, started)


def _read(path: str) -> dict | None:
    """The lock's content: None when there is no lock, {} when it cannot be read."""
    try:
        with open(path) as f:
            holder = json.load(f)
        return holder if isinstance(holder, dict) and "pid" in holder else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def _create(path: str, me: dict) -> bool:
    """Publish ``me`` as the lock at ``path``; False when a lock exists."""
    return create_new(path, lambda f: f.write(json.dumps(me).encode()))


def _remove_stale(path: str, holder: dict) -> None:
    """Delete the dead ``holder``'s lock unless another process replaced it meanwhile (which of two
    processes breaking the same stale lock deletes it is decided under a lock on the directory)."""
    fd = os.open(os.path.dirname(path), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if _read(path) == holder:
            os.unlink(path)
    finally:
        os.close(fd)


def acquire(output_dir: str) -> str:
    """Take ``output_dir``'s run lock for this process (released at exit or by ``release_held``); SystemExit
    naming the holder (pid, host, start time) when another run holds it. Returns the lock's path."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(os.path.abspath(output_dir), LOCK)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
          "pid_start": (_proc_stat(os.getpid()) or (None, None))[1], "argv": sys.argv}
    for _ in range(50):
        if _create(path, me):
            if not _held:
                atexit.register(release_held)
            _held.append(path)
            return path
        holder = _read(path)
        if holder == {}:  # being written by a filesystem without hard links: look again
            time.sleep(0.1)
            continue
        if holder is None:  # released meanwhile
            continue
        alive = _alive(holder)
        if alive is False:
            _remove_stale(path, holder)
            continue
        elsewhere = "" if alive else f"; it ran on another host: if that run is gone, delete {path}"
        raise SystemExit(f"{output_dir} is in use by another run: pid {holder['pid']} on {holder.get('host')}, "
                         f"started {holder.get('started')}{elsewhere}. Wait for it to end or choose another "
                         "--output-dir")
    raise SystemExit(f"{path} cannot be read or taken: if no run uses {output_dir}, delete it")


def release_held() -> None:
    """Remove the locks this process took (a lock that is not its own stays, e.g. in a forked child)."""
    while _held:
        path = _held.pop()
        holder = _read(path)
        if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
