"""`lrft compare RECIPE --executor ray`: each unfinished cell a Ray task, on the cluster `ray.init`
finds (`RAY_ADDRESS`, or a cluster started with `ray start` on this machine) or a local one.

    prepare (lrft.compare.run) -> cell_resources -> one task per cell, asking for its CPUs and
         GPUs -> results gathered as cells finish (progress printed) -> finish: the report

Each task runs its cell through the same idempotent cell runner as `lrft compare`
(`lrft.compare.executors.run_job`: claim, skip when finished, resume, train, record, clean), so
a cell sent twice (two drivers, a shard beside them) runs once. A failed cell does not stop the
others (on a cluster they run at once); the failures are listed at the end.

Ctrl-C cancels cleanly: the tasks not started are dropped, the running ones interrupted (their
training group ended, their claims released), and the command to rerun is printed; rerunning
resumes each unfinished cell from its last checkpoint. A worker that dies instead (a node lost)
leaves its cell's claim to expire (`lrft.compare.claims`). Tasks are not retried by Ray: a retry
would find the dead worker's claim still fresh.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path

from lrft.compare.cells import Outcome
from lrft.compare.claims import STALE_AFTER_S
from lrft.compare.executors import (CellJob, GroupRunner, cell_jobs, cell_resources, require,
                                    run_job)
from lrft.compare.grid import Plan
from lrft.compare.run import finish, prepare, say_done, say_failed
from lrft.compare.tables import duration

CANCEL_WAIT_S = 60.0  # after Ctrl-C: how long cancelled cells get to stop and release claims


def ray_cell(job: CellJob) -> Outcome:
    """The body of one Ray task (a cancel raises KeyboardInterrupt in it: the runner ends the
    training group and `run_cell` releases the claim on the way out)."""
    return run_job(job, GroupRunner())


def run_on_ray(path: str | Path, overrides: list[str] | None = None, *,
               shard: str | None = None) -> dict:
    """Run every unfinished cell of a comparison (or of one shard) as Ray tasks; report.

    Connects to the Ray cluster `ray.init()` finds, or starts a local one (and stops it at the
    end); an already initialised Ray (`ray.init(...)` in the caller) is used as it is.

    Returns:
        The aggregate of every finished cell (as `run_comparison`), plus `failed`: the first cell
        that failed or None, `failures`: every failed cell, `held`: cells other workers hold.

    Raises:
        UserError: ray is not installed (the message names the extra), or the comparison is
            invalid.
        KeyboardInterrupt: after Ctrl-C, once the outstanding cells are cancelled.
    """
    ray = require("ray")
    p, todo = prepare(path, overrides, shard)
    rerun = shlex.join(["lrft", "compare", str(path), *(overrides or []),
                        *(["--shard", shard] if shard else []), "--executor", "ray"])
    started = not ray.is_initialized()
    if started and todo:
        ray.init()
    try:
        done = _gather(ray, p, cell_jobs(p, todo), rerun)
    finally:
        if started and ray.is_initialized():
            ray.shutdown()
    summary = finish(p)
    failures = [o.cell.name for o in done if o.status in ("failed", "lost")]
    summary["failed"] = failures[0] if failures else None
    summary["failures"] = failures
    summary["held"] = [o.cell.name for o in done if o.status == "held"]
    return summary


def _gather(ray, p: Plan, jobs: list[CellJob], rerun: str) -> list[Outcome]:
    """Submit one task per cell, print each as it finishes; on Ctrl-C cancel the rest."""
    if not jobs:
        return []
    res = cell_resources(p.comparison)
    have = ray.cluster_resources()
    print(f"Ray: {len(jobs)} task(s), each {res}; the cluster has {have.get('CPU', 0):g} CPU(s), "
          f"{have.get('GPU', 0):g} GPU(s)", flush=True)
    if res.gpus > have.get("GPU", 0):
        print(f"warning: each cell asks for {res.gpus} GPU(s) and the cluster has "
              f"{have.get('GPU', 0):g}: cells wait until GPU nodes join (an autoscaler); to train "
              f"on CPUs, rerun with --gpus 0", flush=True)
    task = ray.remote(max_retries=0)(ray_cell)
    pending = {task.options(num_cpus=res.cpus, num_gpus=res.gpus, name=job.cell.name)
               .remote(job): job for job in jobs}
    outcomes: list[Outcome] = []
    t0 = time.perf_counter()
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(ready[0])
            outcomes.append(_outcome(ray, ready[0], job))
            _say(outcomes[-1], f"[{len(outcomes)}/{len(jobs)} done] {job.cell.name}")
    except KeyboardInterrupt:
        _cancel(ray, pending, rerun)
        raise
    trained = sum(o.status == "finished" for o in outcomes)
    print(f"Ray: trained {trained} cell(s) in {duration(time.perf_counter() - t0)}", flush=True)
    return outcomes


def _outcome(ray, ref, job: CellJob) -> Outcome:
    """The task's Outcome. An error raised in the task counts as failed (its claim was released
    on the way out); a task that died with its worker or node is `lost`."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        last = (str(e).strip().splitlines() or [""])[-1]
        return Outcome(job.cell, "failed", code=-1, how=f"the task raised: {last}")
    except ray.exceptions.RayError as e:
        return Outcome(job.cell, "lost", code=-1, how=f"its Ray task died ({e.__class__.__name__})")


def _say(done: Outcome, at: str) -> None:
    if done.status == "finished":
        say_done(at, done)
    elif done.status == "failed":
        say_failed(at, done, "the other cells go on; rerun the comparison to resume this one")
    elif done.status == "lost":
        print(f"{at}: {done.how}; its claim expires {STALE_AFTER_S / 60:.0f} min after its last "
              f"heartbeat (at once on the same host), then a rerun resumes it", flush=True)
    else:
        print(f"{at}: {done.how or 'finished by another worker'}; left to it", flush=True)


def _cancel(ray, pending: dict, rerun: str) -> None:
    """Cancel the outstanding tasks and wait (briefly) until they have let go of their cells."""
    print(f"\ninterrupted: cancelling {len(pending)} cell(s) ...", flush=True)
    for ref in pending:
        ray.cancel(ref)
    stopping = list(pending)
    try:
        stopping = ray.wait(stopping, num_returns=len(stopping), timeout=CANCEL_WAIT_S)[1]
    except KeyboardInterrupt:
        pass  # a second Ctrl-C: leave now
    names = ", ".join(job.cell.name for job in pending.values())
    how = "their training stopped and their claims were released" if not stopping else \
        (f"{len(stopping)} still stopping: a claim is released when its cell stops, else it "
         f"expires {STALE_AFTER_S / 60:.0f} min after its last heartbeat")
    print(f"cancelled {len(pending)} cell(s): {names}\n{how}; finished cells are kept\n"
          f"rerun to finish (each unfinished cell resumes from its last checkpoint):\n"
          f"  {rerun}", flush=True)
