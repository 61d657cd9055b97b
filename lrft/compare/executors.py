"""What the cluster executors share: the unit of work they ship, what a cell asks for, and how a
worker runs it.

`lrft compare --executor slurm` (`lrft.compare.slurm`, one SLURM array task per cell) and
`--executor ray` (`lrft.compare.ray_exec`, one Ray task per cell) both send each unfinished cell
as a :class:`CellJob` to a worker, which runs it with :func:`run_job`: the same idempotent
`lrft.compare.cells.run_cell` as the sequential loop (claim, skip when finished, resume from its
checkpoint, train, record, clean). Claims make a cell sent twice (a double submission, a shard
running beside a cluster) harmless: the second worker finds it held or finished.

On a worker the training child runs in a process group of its own (:class:`GroupRunner`), so an
interruption — a Ray cancel, a SLURM requeue at the time limit — ends the whole training tree
(`accelerate launch` and its processes) before the cell's claim is released, and the cell resumes
from its last checkpoint wherever it runs next. Paths in a cell are relative to the folder the
grid was submitted from; every worker must see that folder (a shared file system).

The engines are optional extras, imported only when used (:func:`require`).
"""

from __future__ import annotations

import importlib
import os
import shlex
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from lrft.compare.cells import LOG_FILE, Outcome, run_cell
from lrft.compare.grid import Cell, Plan, glue_task_of
from lrft.compare.spec import Comparison, LauncherConfig
from lrft.config import read_yaml
from lrft.errors import UserError

EXTRAS = {"submitit": ("slurm", "submitit>=1.5"), "ray": ("ray", "ray>=2.9")}
POLL_S = 0.5  # a worker waits on its child in short polls: Ray's cancel is seen between them
STOP_GRACE_S = 10.0  # SIGTERM -> SIGKILL: time for accelerate launch to end its processes


def require(module: str):
    """Import an optional engine, or fail with the extra that installs it.

    Raises:
        UserError: the module is not installed; the message names `pip install -e ".[extra]"`.
    """
    extra, requirement = EXTRAS[module]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"--executor {extra} needs {module}, which is not installed: "
                        f"pip install -e \".[{extra}]\" (or pip install '{requirement}')") from None


@dataclass(frozen=True)
class Resources:
    """What one cell asks for: one node, `processes` training processes, `gpus` and `cpus` in
    all (the same for every cell of a comparison: they share the launcher)."""

    processes: int
    gpus: int
    cpus: int

    def __str__(self) -> str:
        return f"{self.processes} process(es), {self.gpus} GPU(s), {self.cpus} CPU(s)"


def cell_resources(c: Comparison) -> Resources:
    """A cell's request: `launcher.num_processes` processes (else its config file's, else 1),
    `cluster.gpus_per_process` GPUs each (none under a config with `use_cpu: true`) and
    `cluster.cpus_per_process` cores each.

    Raises:
        UserError: the launcher config spans several machines (a cell runs on one node).
    """
    launcher = c.launcher or LauncherConfig()
    config = {}
    if launcher.config_file:
        problems: list[str] = []
        config = read_yaml(Path(launcher.config_file), problems) or {}
        if problems:
            raise UserError("; ".join(problems))
    if (config.get("num_machines") or 1) > 1:
        raise UserError(f"launcher.config_file: {launcher.config_file} spans "
                        f"{config['num_machines']} machines; --executor slurm | ray run each cell "
                        f"on one node: use a one-node config, e.g. "
                        f"accelerate_configs/multi_gpu_8xa100.yaml")
    processes = launcher.num_processes or config.get("num_processes") or 1
    gpus = 0 if config.get("use_cpu") else c.cluster.gpus_per_process
    return Resources(processes, processes * gpus, processes * c.cluster.cpus_per_process)


@dataclass
class CellJob:
    """One cell and all its worker needs to run it (pickled to the worker)."""

    cell: Cell
    launcher: LauncherConfig | None
    keep_models: bool
    glue_task: str | None
    cwd: str  # where the grid was submitted from: the cell's relative paths start here

    @property
    def cell_dir(self) -> Path:
        """The cell's folder as an absolute path (its claim file lies beside it)."""
        return Path(self.cwd) / self.cell.dir


def cell_jobs(p: Plan, cells: list[Cell]) -> list[CellJob]:
    c, cwd = p.comparison, os.getcwd()
    return [CellJob(cell, c.launcher, c.keep_models, glue_task_of(c, cell.task), cwd)
            for cell in cells]


class GroupRunner:
    """Runs a cell's training command in a process group of its own, its output appended to the
    cell's train.log (as `lrft.compare.cells.run_process` does). It waits in short polls, so an
    exception raised without a signal (Ray's cancel) reaches it, and on any exception or
    :meth:`stop` it ends the whole group: SIGTERM, then SIGKILL after `STOP_GRACE_S`."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None

    def __call__(self, cmd: list[str], log_path: Path) -> int:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        with log_path.open("a") as log:
            # on a line of its own: an interrupted attempt's last line is a progress bar
            log.write(f"{chr(10) if log.tell() else ''}$ {shlex.join(cmd)}\n")
            log.flush()
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
            try:
                while True:
                    try:
                        return self.proc.wait(timeout=POLL_S)
                    except subprocess.TimeoutExpired:
                        continue
            except BaseException:
                self.stop()
                raise

    def stop(self) -> None:
        """End the training group (no-op when none runs)."""
        proc = self.proc
        if proc is None:
            return
        for sig, wait in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, None)):
            try:
                os.killpg(proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        proc.poll()


def run_job(job: CellJob, runner: GroupRunner) -> Outcome:
    """Bring one cell to finished on a worker (see `lrft.compare.cells.run_cell`), from the
    folder it was submitted from; the worker's own folder is restored after (Ray reuses it)."""
    back = os.getcwd()
    os.chdir(job.cwd)
    try:
        cell = job.cell
        return run_cell(cell, job.launcher, keep_models=job.keep_models, glue_task=job.glue_task,
                        run=runner, on_start=lambda how: print(
                            f"{cell.name}: {how} (log: {cell.dir / LOG_FILE})",
                            flush=True))
    finally:
        os.chdir(back)
