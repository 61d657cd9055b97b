"""`lrft compare RECIPE --executor slurm`: one SLURM job array through submitit, one array task per
unfinished cell.

    prepare (lrft.compare.run) -> cell_resources -> submitit executor -> map_array(CellTask)
         -> the job id and how to follow it; `lrft compare --report DIR` collects, any time

Each array task asks for one node with its cell's processes, GPUs and CPUs
(`lrft.compare.executors.cell_resources`), in `cluster.partition` and `cluster.account`, for
`cluster.time_min` minutes, and runs its cell through the same idempotent cell runner as
`lrft compare` (`run_job`: claim, skip when finished, resume, train, record, clean). A cell that
fails fails its task (sacct shows FAILED; the task's log ends with the cell's log). Near the time
limit, or when preempted, SLURM signals the task (submitit asks for USR2 90 s ahead): the task
stops its training, releases the cell's claim and requeues itself, and the cell resumes from its
last checkpoint. Submitting again sends only the unfinished cells; a cell submitted twice runs
once (its claim).

The submission code is the same for every submitit cluster: `cluster="slurm"` submits with
sbatch, `cluster="local"` runs each task as a process on this machine (the tests; a try-out).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from lrft.compare.cells import LOG_FILE, Outcome, log_tail
from lrft.compare.claims import Claim, claim_path, owner_name
from lrft.compare.executors import (CellJob, GroupRunner, Resources, cell_jobs, cell_resources,
                                    require, run_job)
from lrft.compare.run import prepare, say_done
from lrft.compare.spec import Comparison
from lrft.errors import UserError

LOG_DIR = "slurm"  # under the comparison's output_dir: submitit's scripts, pickles and logs
JOBS_FILE = "jobs.tsv"  # in LOG_DIR: job id, cell, the task's log; one line per submitted task


class CellFailed(RuntimeError):
    """A cell's training failed: its array task fails with the end of the cell's log."""


class CellTask:
    """What one array task runs: its cell, through `run_job`. submitit calls :meth:`checkpoint`
    when SLURM signals the time limit or a preemption; the task is then requeued."""

    def __init__(self) -> None:
        self.runner: GroupRunner | None = None

    def __call__(self, job: CellJob) -> Outcome:
        self.runner = GroupRunner()
        done = run_job(job, self.runner)
        name = job.cell.name
        if done.status == "failed":
            log = job.cell.dir / LOG_FILE
            raise CellFailed(f"{name}: training exited {done.code} ({done.how}); last lines of "
                             f"{log}:\n{log_tail(job.cell_dir / LOG_FILE)}")
        if done.status == "finished":
            say_done(name, done)
        else:
            print(f"{name}: {done.how or 'finished by another worker'}; left to it", flush=True)
        return done

    def checkpoint(self, job: CellJob):
        """Stop the training and release the claim *before* the requeue, so the requeued task
        (on any node) claims the cell at once and resumes it from its last checkpoint."""
        from submitit.helpers import DelayedSubmission

        if self.runner is not None:
            self.runner.stop()
        Claim(claim_path(job.cell_dir), owner_name()).release()
        print(f"{job.cell.name}: stopped for a requeue; it resumes from its last checkpoint",
              flush=True)
        return DelayedSubmission(CellTask(), job)

    def __getstate__(self) -> dict:
        return {}  # a running child process is not shipped: a requeued task starts a new one

    def __setstate__(self, state: dict) -> None:
        self.runner = None


def executor_parameters(c: Comparison, res: Resources) -> dict:
    """submitit parameters of one array task: one node, one task (the launcher starts the
    processes), the cell's GPUs and CPUs, the spec's partition, account and time limit."""
    params = {"name": f"lrft-{Path(c.output_dir).name}", "timeout_min": c.cluster.time_min,
              "nodes": 1, "tasks_per_node": 1, "cpus_per_task": res.cpus}
    if res.gpus:
        params["gpus_per_node"] = res.gpus
    if c.cluster.partition:
        params["slurm_partition"] = c.cluster.partition
    if c.cluster.account:
        params["slurm_account"] = c.cluster.account
    return params


def submit_slurm(path: str | Path, overrides: list[str] | None = None, *,
                 shard: str | None = None, cluster: str = "slurm",
                 parameters: dict | None = None) -> list:
    """Submit every unfinished cell of a comparison (or of one shard) as one job array.

    Args:
        path: the comparison spec.
        overrides: `key=value` overrides (see `lrft.compare.load.load_comparison`), including
            `cluster.*` keys.
        shard: "I/N": submit only that shard's cells (see `lrft.compare.run.shard_cells`).
        cluster: submitit's cluster: "slurm" (sbatch), or "local" (a process per task here).
        parameters: more submitit parameters, applied last, e.g. {"slurm_qos": "high",
            "mem_gb": 64, "slurm_constraint": "a100"}.

    Returns:
        The submitit jobs, one per submitted cell (none when every cell is finished).

    Raises:
        UserError: submitit is not installed (the message names the extra), the comparison is
            invalid, or its launcher spans several machines.
    """
    submitit = require("submitit")
    if cluster == "slurm" and not (shutil.which("sbatch") and shutil.which("srun")):
        raise UserError("--executor slurm: no SLURM here (sbatch and srun are not on PATH); run "
                        "it on a login node of the cluster, or spread the grid with --shard I/N")
    p, todo = prepare(path, overrides, shard)
    c = p.comparison
    out = Path(c.output_dir)
    if not todo:
        print(f"nothing to submit: every cell is finished; tables: lrft compare --report {out}",
              flush=True)
        return []
    res = cell_resources(c)
    executor = submitit.AutoExecutor(folder=out / LOG_DIR, cluster=cluster)
    executor.update_parameters(**{**executor_parameters(c, res), **(parameters or {})})
    try:
        jobs = executor.map_array(CellTask(), cell_jobs(p, todo))
    except submitit.core.utils.FailedJobError as e:  # sbatch said no: a partition, an account
        raise UserError(f"sbatch refused the job array: {str(e).strip()}") from None
    with (out / LOG_DIR / JOBS_FILE).open("a") as f:
        f.writelines(f"{job.job_id}\t{cell.name}\t{job.paths.stdout}\n"
                     for job, cell in zip(jobs, todo))
    _say_submitted(jobs, c, res, cluster)
    return jobs


def _say_submitted(jobs: list, c: Comparison, res: Resources, cluster: str) -> None:
    out = Path(c.output_dir)
    where = ", ".join(f"{k} {v}" for k, v in (("partition", c.cluster.partition),
                                              ("account", c.cluster.account)) if v)
    limits = f"{where + '; ' if where else ''}time limit {c.cluster.time_min} min"
    array = jobs[0].job_id.split("_")[0]
    if cluster == "slurm":
        head = f"SLURM job array {array} (tasks {jobs[0].job_id}..{jobs[-1].job_id})"
        log = str(jobs[0].paths.stdout).replace(jobs[0].job_id, f"{array}_<task>")
        follow = [f"  follow:  squeue -j {array}    logs: {log}",
                  f"  cancel:  scancel {array}    (submit again to resume: only unfinished "
                  f"cells are sent, each from its last checkpoint)"]
    else:
        head = f"{cluster} jobs {', '.join(job.job_id for job in jobs)}"
        follow = [f"  logs:    {out / LOG_DIR}/<job id>_0_log.out"]
    print(f"submitted {len(jobs)} cell(s) as {head}; each on one node: {res}; {limits}\n"
          + "\n".join(follow) + "\n"
          f"  cells:   {out / LOG_DIR / JOBS_FILE} (job id, cell, log)\n"
          f"  results: lrft compare --report {out}    (any time: the cells finished so far)",
          flush=True)
