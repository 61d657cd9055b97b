"""Atomic claims: two workers on one comparison folder never run the same cell.

A worker claims a cell before running it by creating ``<cell folder>.claim`` (beside the folder,
which a restart deletes) with ``O_CREAT | O_EXCL``: the file system lets exactly one creator win,
on one machine and on a shared file system alike (NFS v3+ honours O_EXCL). The claim names its
owner (`host:pid`) and is kept fresh: the owner touches it every `HEARTBEAT_S` while the cell
trains, and deletes it when the cell ends (finished, failed or interrupted).

A worker that died leaves its claim behind. It can be taken over when it is *stale*: its owner
ran on this host and that process is gone (a Ctrl-C'd or killed `lrft compare`: taken at once),
or nobody has touched it for `STALE_AFTER_S` (an owner on another machine that died; a live one
touches it every `HEARTBEAT_S`). Taking over renames the stale claim to a name of the taker's own
first (`os.rename` is atomic: of two takers, one rename fails), then claims as usual.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HEARTBEAT_S = 60.0
STALE_AFTER_S = 600.0  # ten missed heartbeats


def owner_name() -> str:
    """This worker's name in a claim: host and process id."""
    return f"{socket.gethostname()}:{os.getpid()}"


def claim_path(cell_dir: Path) -> Path:
    return Path(cell_dir).with_name(Path(cell_dir).name + ".claim")


@dataclass
class Claim:
    """A held claim; `release()` (or leaving the `with` block) gives it up."""

    path: Path
    owner: str
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)

    def heartbeat(self, every: float = HEARTBEAT_S) -> None:
        """Touch the claim every `every` seconds, in a daemon thread, until released."""
        def beat():
            while not self._stop.wait(every):
                try:
                    os.utime(self.path)
                except OSError:
                    return
        threading.Thread(target=beat, daemon=True, name=f"claim {self.path.name}").start()

    def release(self) -> None:
        self._stop.set()
        try:
            if read_owner(self.path) == self.owner:
                self.path.unlink()
        except OSError:
            pass

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def read_owner(path: Path) -> str | None:
    """The owner named in a claim file, None when it cannot be read (gone, or being written)."""
    try:
        return json.loads(path.read_text()).get("owner")
    except (OSError, ValueError, AttributeError):
        return None


def is_stale(path: Path, stale_after: float = STALE_AFTER_S) -> bool:
    """Whether a claim may be taken over: its owner's process on this host is gone, or it has not
    been touched for `stale_after` seconds."""
    try:
        age = time.time() - path.stat().st_mtime
    except OSError:
        return False  # gone: nothing to take over, a plain claim will do
    host, _, pid = (read_owner(path) or "").rpartition(":")
    if host == socket.gethostname() and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass  # alive, another user's
    return age > stale_after


def try_claim(cell_dir: Path, owner: str | None = None,
              stale_after: float = STALE_AFTER_S) -> Claim | None:
    """Claim a cell, taking over a stale claim; None when another worker holds it.

    Args:
        cell_dir: the cell's folder (the claim file goes beside it).
        owner: the claimant's name (default: this host and process).
        stale_after: seconds without a heartbeat after which a claim may be taken over.
    """
    owner = owner or owner_name()
    path = claim_path(cell_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):  # a plain claim, then once more after taking over a stale one
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            seen = read_owner(path)
            if not is_stale(path, stale_after) or not _take_over(path, seen, owner):
                return None
            continue
        with os.fdopen(fd, "w") as f:
            json.dump({"owner": owner, "since": time.time()}, f)
        return Claim(path, owner)
    return None


def _take_over(path: Path, seen: str | None, owner: str) -> bool:
    """Move the stale claim of `seen` out of the way; False when another worker got there first
    (its rename won, or its fresh claim is what stood at `path` by the time of ours: put back)."""
    tomb = path.with_name(f"{path.name}.stale-{owner.replace(':', '-')}-{time.time_ns()}")
    try:
        os.rename(path, tomb)  # of two takers, one wins; the other's rename fails
    except OSError:
        return False
    if read_owner(tomb) != seen:
        try:
            os.link(tomb, path)  # never replaces a claim that appeared meanwhile
        except OSError:
            pass
        tomb.unlink(missing_ok=True)
        return False
    tomb.unlink(missing_ok=True)
    return True
