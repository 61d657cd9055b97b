"""One cell as an idempotent unit: `run_cell(cell) -> its folder -> its record`.

Any executor (the sequential loop of `lrft compare`, its shards, and later SLURM or Ray) runs a
cell through :func:`run_cell`, which first claims the cell (`lrft.compare.claims`: a cell another
live worker holds is left to it) and then decides from the cell's folder alone what to do:

- **finished** (results.json with status completed or diverged; the guard stopping a run is a
  result too): nothing is trained, the record is read back;
- **partial** (a folder without a finished results.json: interrupted): resume from its latest
  complete checkpoint (`lrft.checkpoint.list_checkpoints`) if it has one, else the folder is
  deleted and the cell runs from scratch;
- **new**: run.

Every cell trains in a fresh child process, `python -m lrft.train BASE overrides...` or
`accelerate launch -m lrft.train ...` with a launcher (`lrft.launch`), its output appended to
the cell's `train.log`. Peak memory (`ru_maxrss` on CPU) is a per-process high-water mark that
never goes down, so in-process runs would report the largest cell so far for every later cell;
a child process also isolates library caches and crashes. On success the cell's `cell.json` is
written and what only served the run (checkpoints; weights unless kept) is deleted.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lrft.checkpoint import CHECKPOINT_PREFIX, list_checkpoints
from lrft.compare.claims import claim_path, read_owner, try_claim
from lrft.compare.grid import Cell, shown_path
from lrft.compare.records import is_finished, load_cell, write_cell_record
from lrft.compare.spec import LauncherConfig
from lrft.launch import accelerate_command, in_process_command

LOG_FILE = "train.log"
RunProcess = Callable[[list[str], Path], int]  # (command, log file) -> exit code


@dataclass
class Outcome:
    """What became of one cell: `finished`, `skipped` (finished before), `held` (by another
    worker) or `failed`; its record when finished, the exit code and wall time of this attempt."""

    cell: Cell
    status: str
    record: dict | None = None
    code: int = 0
    wall_time_s: float = 0.0
    how: str = ""  # starting / resuming from checkpoint-N / restarting (interrupted, no checkpoint)
    extra: tuple[str, ...] = ()  # overrides added for this attempt (resume)


def cell_state(cell_dir: Path) -> str:
    """`finished` (results.json with a finished status), `partial` (a folder without one), `new`."""
    if is_finished(cell_dir):
        return "finished"
    return "partial" if cell_dir.exists() else "new"


def resume_args(cell_dir: Path) -> tuple[list[str], str]:
    """Extra overrides and a word for how an unfinished cell starts: resume its latest complete
    checkpoint, restart (interrupted without one: `run_cell` deletes the folder), or start."""
    checkpoints = list_checkpoints(cell_dir)
    if checkpoints:
        return ["train.resume_from_checkpoint=latest"], f"resuming from {checkpoints[-1].name}"
    if cell_dir.exists():
        return [], "restarting (interrupted, no checkpoint)"
    return [], "starting"


def child_command(cell: Cell, launcher: LauncherConfig | None, extra: list[str]) -> list[str]:
    """The command that trains the cell in a child process."""
    args = [*cell.overrides, *extra]
    if launcher is None:
        return in_process_command(shown_path(cell.base), args)
    return accelerate_command(shown_path(cell.base), args, config_file=launcher.config_file,
                              num_processes=launcher.num_processes)


def run_process(cmd: list[str], log_path: Path) -> int:
    """Run one cell's training process, its output appended to the cell's train.log."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    with log_path.open("a") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        return subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def run_cell(cell: Cell, launcher: LauncherConfig | None = None, *, keep_models: bool = False,
             glue_task: str | None = None, run: RunProcess | None = None,
             on_start: Callable[[str], None] | None = None) -> Outcome:
    """Bring one cell to finished: skip it, resume it or run it; record it.

    Args:
        cell: the cell (its folder is all the state there is).
        launcher: how to launch the child; None: one plain process.
        keep_models: keep the fine-tuned weights in the cell's folder.
        glue_task: the GLUE task whose score the cell reports, None for other data.
        run: runs a command with its log file and returns the exit code (an executor's hook);
            None: :func:`run_process`, a child process.
        on_start: called with how the cell starts (see `resume_args`) once it is claimed.

    Returns:
        The :class:`Outcome`: `skipped` (finished before), `held` (another worker holds its
        claim: see `lrft.compare.claims`), `finished`, or `failed` when the child exited
        non-zero or left no finished results.json.
    """
    if cell_state(cell.dir) == "finished":
        return Outcome(cell, "skipped", load_cell(cell.dir))
    claim = try_claim(cell.dir)
    if claim is None:
        return Outcome(cell, "held", how=f"held by {read_owner(claim_path(cell.dir))}")
    with claim:
        if cell_state(cell.dir) == "finished":  # another worker finished it meanwhile
            return Outcome(cell, "skipped", load_cell(cell.dir))
        claim.heartbeat()
        extra, how = resume_args(cell.dir)
        if on_start is not None:
            on_start(how)
        return _run_claimed(cell, launcher, keep_models, glue_task, run, extra, how)


def _run_claimed(cell: Cell, launcher: LauncherConfig | None, keep_models: bool,
                 glue_task: str | None, run: RunProcess | None, extra: list[str],
                 how: str) -> Outcome:
    if not extra and cell.dir.exists():
        # Deleted here rather than with train.overwrite_output_dir, so the train.log opened
        # below is the only one and survives.
        shutil.rmtree(cell.dir)
    cell.dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    code = (run or run_process)(child_command(cell, launcher, extra), cell.dir / LOG_FILE)
    wall = time.perf_counter() - t0
    if code != 0 or cell_state(cell.dir) != "finished":
        return Outcome(cell, "failed", None, code, wall, how, tuple(extra))
    record = write_cell_record(
        cell.dir, cell.row, cell.task, cell.seed, optimizer=cell.optimizer, title=cell.title,
        glue_task=glue_task, learning_rate=cell.learning_rate, wall_time_s=wall,
        command=cell.command())
    clean_cell(cell.dir, keep_models)
    return Outcome(cell, "finished", record, code, wall, how, tuple(extra))


def clean_cell(cell_dir: Path, keep_models: bool) -> None:
    """Drop what only served the run: checkpoints (resume), and weights unless kept."""
    for ckpt in cell_dir.glob(f"{CHECKPOINT_PREFIX}*"):
        shutil.rmtree(ckpt, ignore_errors=True)
    if not keep_models:
        for weights in [*cell_dir.glob("*.safetensors"), *cell_dir.glob("*.bin"),
                        *cell_dir.glob("*.safetensors.index.json")]:
            weights.unlink(missing_ok=True)


def log_tail(path: Path, lines: int = 25) -> str:
    """The last non-empty lines of a cell's train.log, indented (progress bars split)."""
    try:
        text = path.read_text(errors="replace").replace("\r", "\n")
    except OSError:
        return ""
    kept = [ln for ln in text.splitlines() if ln.strip()]
    return "\n".join(f"    {ln}" for ln in kept[-lines:])
