"""Run state, the output folder, and atomic checkpoints: save, discover, load.

A checkpoint `OUTPUT_DIR/checkpoint-N/` holds Accelerate's state (model, optimizer, RNG, fp16
scaler), the LR scheduler's state as JSON, and `lrft_state.json`: where the run is (`RunState`)
and the logging window (so a resumed run logs the same averages). It is written as
`checkpoint-N.tmp` and renamed only once complete, so a crash mid-save leaves nothing that
:func:`list_checkpoints` (and so resume and `lrft compare`) would pick.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from lrft.errors import CheckpointError, RecipeError, UserError

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "lrft_state.json"  # written last inside a checkpoint: its presence marks it complete
SCHEDULER_FILE = "scheduler.json"  # the LR scheduler's state_dict (plain numbers and lists)
RUN_FILES = ("metrics.jsonl", "results.json")  # a folder holding one of these holds a run
LOCK_FILE = ".lrft-run.lock"  # held for the life of a run: one run per folder at a time


@dataclass
class RunState:
    """Where the run is: saved in every checkpoint next to Accelerate's state."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    best_score: float | None = None
    best_step: int | None = None
    lr_scale: float = 1.0  # product of the guard's backoffs so far
    rollbacks: int = 0


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints in `out`, oldest first (a checkpoint is complete once renamed)."""
    out = Path(out)
    if not out.is_dir():
        return []
    found = []
    for d in out.glob(f"{CHECKPOINT_PREFIX}*"):
        suffix = d.name[len(CHECKPOINT_PREFIX):]
        if d.is_dir() and suffix.isdigit() and (d / STATE_FILE).is_file():
            found.append((int(suffix), d))
    return [d for _, d in sorted(found)]


def holds_run(out: Path) -> bool:
    """Whether `out` holds (part of) a run: a metrics log, results or a checkpoint (a lock alone
    is the current run's)."""
    out = Path(out)
    return out.is_dir() and any((out / n).exists() for n in RUN_FILES) or bool(list_checkpoints(out))


def prepare_output_dir(train, is_main: bool) -> Path | None:
    """Check the output folder before any work; return the checkpoint to resume from, if any.

    Args:
        train: the recipe's `train` section (output_dir, resume_from_checkpoint,
            overwrite_output_dir).
        is_main: only the main process deletes or creates anything.

    Raises:
        RecipeError: the folder holds a run and neither resume nor overwrite was asked for,
            the checkpoint to resume from does not exist, or the folder is not writable.
    """
    out = Path(train.output_dir)
    resume = _checkpoint_to_resume(train, out)
    if resume is None and holds_run(out) and not train.resume_from_checkpoint:
        if not train.overwrite_output_dir:
            raise RecipeError([f"train.output_dir: {out} already holds a run; resume it with "
                               f"train.resume_from_checkpoint=latest, or replace it with "
                               f"train.overwrite_output_dir=true, or choose another folder"])
        if is_main:
            _empty(out)
    if is_main:
        _make_writable(out)
        for stale in out.glob(f"{CHECKPOINT_PREFIX}*.tmp"):  # left by a crash during a save
            shutil.rmtree(stale, ignore_errors=True)
    return resume


def _checkpoint_to_resume(train, out: Path) -> Path | None:
    if train.resume_from_checkpoint == "latest":
        found = list_checkpoints(out)
        if not found and (out / "results.json").exists() and not train.overwrite_output_dir:
            raise RecipeError([f"train.resume_from_checkpoint: {out} holds a finished run with no "
                               f"checkpoint to resume from; starting over would replace it: set "
                               f"train.overwrite_output_dir=true or choose another folder"])
        return found[-1] if found else None
    if train.resume_from_checkpoint:
        resume = Path(train.resume_from_checkpoint)
        if not (resume / STATE_FILE).is_file():
            raise RecipeError([f"train.resume_from_checkpoint: {resume} is not a complete lrft "
                               f"checkpoint (no {STATE_FILE}); use latest or a "
                               f"{CHECKPOINT_PREFIX}N folder"])
        return resume
    return None


def _empty(out: Path) -> None:
    """Delete a run folder's contents, keeping this run's lock."""
    for item in out.iterdir():
        if item.name == LOCK_FILE:
            continue
        if item.is_dir() and not item.is_symlink():
            shutil.rmtree(item)
        else:
            item.unlink()


def _make_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".lrft-write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise RecipeError([f"train.output_dir: cannot write to {out} ({e.strerror or e}); "
                           f"choose a writable folder"]) from e


def save_checkpoint(accelerator, out: Path, state: RunState, limit: int | None, *,
                    scheduler, log_state: dict | None = None) -> Path:
    """Save model, optimizer, scheduler and RNG states atomically, then prune old checkpoints.

    Everything is written to `checkpoint-N.tmp`; the state file goes in last and the folder is
    renamed to `checkpoint-N` only then. Old checkpoints are deleted only after the new one is
    complete, each losing its state file first, so a crash mid-delete leaves no half-deleted
    checkpoint that looks complete.

    Args:
        accelerator: saves what it prepared (model, optimizer, RNG, scaler).
        out: the run's output folder.
        state: where the run is.
        limit: keep this many checkpoints (None: all).
        scheduler: its `state_dict()` is saved as JSON (no pickle).
        log_state: the logging window's state (`LogWindow.state_dict()`).

    Raises:
        CheckpointError: the write failed (disk full, ...); the partial folder is removed and
            the previous checkpoint is left as it was.
    """
    final = Path(out) / f"{CHECKPOINT_PREFIX}{state.step}"
    tmp = final.with_name(f"{final.name}.tmp")
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / SCHEDULER_FILE).write_text(json.dumps(scheduler.state_dict()))
            (tmp / STATE_FILE).write_text(json.dumps({"run": asdict(state),
                                                      "log": log_state or {}}))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = list_checkpoints(out)
        kept = (f"the previous checkpoint {previous[-1]} is intact" if previous
                else "there is no earlier checkpoint")
        raise CheckpointError(f"cannot save {final.name} in {out} ({e.strerror or e}); {kept}; "
                              f"free disk space (or fix the folder) and resume with "
                              f"train.resume_from_checkpoint=latest") from e
    if accelerator.is_main_process and limit:
        for old in list_checkpoints(out)[:-limit]:
            (old / STATE_FILE).unlink(missing_ok=True)
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, checkpoint: Path, scheduler) -> tuple[RunState, dict]:
    """Restore a checkpoint into the prepared objects; return the run state and log state.

    Reads checkpoints of earlier lrft versions too (a flat state file with the log sums in it).
    """
    accelerator.load_state(str(checkpoint))
    scheduler.load_state_dict(json.loads((checkpoint / SCHEDULER_FILE).read_text()))
    saved = json.loads((checkpoint / STATE_FILE).read_text())
    if "run" not in saved:  # earlier versions: RunState fields and log sums side by side
        saved = {"run": saved, "log": {"loss_sum": saved.get("log_loss_sum", 0.0),
                                       "loss_count": saved.get("log_loss_count", 0)}}
    fields = {f.name for f in dataclasses.fields(RunState)}
    state = RunState(**{k: v for k, v in saved["run"].items() if k in fields})
    return state, saved.get("log", {})


# ---------------------------------------------------------------------------------------------
# One run per folder
# ---------------------------------------------------------------------------------------------

class RunLock:
    """An exclusive lock on a run folder, held for the life of the run (main process only).

    The lock is a file created with O_EXCL (atomic on local and NFS v3+ file systems) holding the
    holder's pid, host and start time. A second run on the same folder gets a clear error naming
    the holder. A lock left by a process that is gone is taken over when the holder ran on this
    host (its pid no longer exists); from another host lrft cannot tell, and the error says how to
    remove it.
    """

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK_FILE
        self.held = False

    def acquire(self) -> str | None:
        """Take the lock; return a note when a stale lock was taken over.

        Raises:
            UserError: another live run holds the folder.
        """
        note = None
        for _ in range(2):
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if not self._stale(holder):
                    raise UserError(self._busy(holder)) from None
                note = (f"took over the lock of a run that is gone (pid {holder.get('pid')} on "
                        f"{holder.get('host')}, started {holder.get('started')})")
                self.path.unlink(missing_ok=True)
                continue
            except OSError as e:
                raise RecipeError([f"train.output_dir: cannot write to {self.path.parent} "
                                   f"({e.strerror or e}); choose a writable folder"]) from e
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
            self.held = True
            return note
        raise UserError(self._busy(self._holder()))

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def _holder(self) -> dict:
        try:
            holder = json.loads(self.path.read_text())
            return holder if isinstance(holder, dict) else {}
        except (OSError, ValueError):
            return {}

    @staticmethod
    def _stale(holder: dict) -> bool:
        pid = holder.get("pid")
        if holder.get("host") != socket.gethostname() or not isinstance(pid, int):
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return False

    def _busy(self, holder: dict) -> str:
        who = (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
               if holder else "unknown holder")
        return (f"train.output_dir: {self.path.parent} is in use by another run ({who}); wait "
                f"for it or choose another folder. If that process is gone (a crashed node), "
                f"delete {self.path} and run again")


@contextlib.contextmanager
def hold_run_folder(accelerator, out: Path):
    """Hold the run folder's lock for the body of the `with` (taken by the main process; every
    process learns whether it was taken, so a refused run stops everywhere).

    Yields:
        A note when a stale lock was taken over, else None.

    Raises:
        UserError: another run holds the folder.
    """
    lock = RunLock(out)
    outcome: list = [None, None]  # [error message, note]
    if accelerator.is_main_process:
        try:
            outcome[1] = lock.acquire()
        except UserError as e:
            outcome[0] = str(e)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(outcome, from_process=0)
    if outcome[0]:
        raise UserError(outcome[0])
    try:
        yield outcome[1]
    finally:
        lock.release()
