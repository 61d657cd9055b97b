"""`lrft compare RECIPE [--shard I/N]`: plan the grid, bring its cells to finished one after
another, report.

    prepare: plan (lrft.compare.grid) -> comparison.json -> the unfinished cells
    run_cell per cell (lrft.compare.cells) -> finish: report (lrft.compare.report)

`prepare`, the progress lines and `finish` are shared with the cluster executors
(`lrft.compare.slurm`, `lrft.compare.ray_exec`), which run the same cells elsewhere.

Finished cells are skipped and interrupted ones resumed (`run_cell` decides from each cell's
folder), so running the command again resumes a comparison. A failed cell stops it: the error is
usually systematic (a data path, memory); rerunning the command resumes from that cell. Shards
spread a grid over workers (a SLURM array, a shell loop over machines, two processes on two
cores): each runs every N-th cell, and cells are claimed, so no cell runs twice.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import statistics
import time
from pathlib import Path

from lrft.compare.cells import LOG_FILE, Outcome, RunProcess, cell_state, log_tail, run_cell
from lrft.compare.grid import Cell, Plan, glue_task_of, plan
from lrft.compare.records import load_cell
from lrft.compare.report import PLAN_FILE, write_atomic, write_report
from lrft.compare.tables import duration
from lrft.errors import RecipeError


def _cell_summary(record: dict) -> str:
    score = record["score"]["final"]
    if score is None:
        return f"no score (status {record['status']})"
    shown = ", ".join(f"{k} {v:.4f}" for k, v in record["metrics"]["final"].items())
    holdout = record["score"].get("holdout")
    shown += f"; holdout {holdout * 100:.1f}" if holdout is not None else ""
    losses = [v for v in record["loss_curve"]["loss"] if v is not None]
    first, last = (losses[0], losses[-1]) if losses else (float("nan"), float("nan"))
    return (f"score {score * 100:.1f} ({shown}); loss {first:.3f} -> {last:.3f}; "
            f"{record['samples_per_s']:.1f} samples/s")


def write_plan_file(p: Plan, path: str | Path, overrides: list[str] | None) -> None:
    """comparison.json: what was asked (source, overrides), the order of rows and tasks, the
    selection rule, and every cell with its folder, command and what its record needs."""
    c = p.comparison
    data = {"source": str(path), "overrides": list(overrides or []), "output_dir": c.output_dir,
            "tasks": c.tasks, "titles": p.titles, "seeds": c.seeds, "rows": p.rows,
            "selection": {"split": c.selection.split,
                          "holdout_fraction": c.selection.holdout_fraction},
            "reference": dataclasses.asdict(c.reference) if c.reference else None,
            "cells": [{"name": cell.name, "dir": cell.dir.as_posix(),
                       "command": shlex.join(cell.command()), "meta": cell_meta(c, cell)}
                      for cell in p.cells]}
    write_atomic(Path(c.output_dir) / PLAN_FILE, json.dumps(data, indent=2))


def shard_cells(cells: list[Cell], shard: str | None) -> list[Cell]:
    """The cells of shard `I/N` (1 <= I <= N): every N-th cell from the I-th, so each shard gets
    a share of every optimizer and task; all cells without a shard.

    Raises:
        RecipeError: `shard` is not I/N.
    """
    if shard is None:
        return list(cells)
    i, _, n = str(shard).partition("/")
    if not (i.isdigit() and n.isdigit() and 1 <= int(i) <= int(n)):
        raise RecipeError([f"--shard {shard!r}: expected I/N with 1 <= I <= N, e.g. 1/4 "
                           f"(a SLURM array: $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)"])
    return cells[int(i) - 1::int(n)]


def prepare(path: str | Path, overrides: list[str] | None = None,
            shard: str | None = None) -> tuple[Plan, list[Cell]]:
    """Plan the grid, write comparison.json and say what there is to do.

    Returns:
        The plan, and the unfinished cells of this shard (all cells without one), in plan order.

    Raises:
        RecipeError: the comparison or a cell's recipe is invalid, or a bad shard.
    """
    p = plan(path, overrides)
    c = p.comparison
    out = Path(c.output_dir)
    mine = shard_cells(p.cells, shard)
    out.mkdir(parents=True, exist_ok=True)
    write_plan_file(p, path, overrides)
    todo = [cell for cell in mine if cell_state(cell.dir) != "finished"]
    skipped = [cell.name for cell in mine if cell not in todo]
    part = f"; shard {shard}: {len(mine)} of them" if shard else ""
    print(f"lrft compare: {len(p.cells)} cells ({len(p.rows)} rows x {len(c.tasks)} tasks x "
          f"{len(c.seeds)} seeds) in {out}{part}; {len(todo)} to run", flush=True)
    if skipped:
        print(f"skipping {len(skipped)} finished cell(s): {', '.join(skipped)}", flush=True)
    return p, todo


def say_done(at: str, done: Outcome, eta: str = "") -> None:
    """The progress line of a finished cell."""
    print(f"{at}: done in {duration(done.wall_time_s)}: {_cell_summary(done.record)}{eta}",
          flush=True)


def say_failed(at: str, done: Outcome, then: str) -> None:
    """A failed cell: exit code, how it started, the end of its log, how to reproduce it."""
    log = done.cell.dir / LOG_FILE
    print(f"{at}: FAILED (exit {done.code}) after {duration(done.wall_time_s)} ({done.how}); "
          f"last lines of {log}:\n{log_tail(log)}\n"
          f"reproduce: {shlex.join(done.cell.command(done.extra))}\n{then}", flush=True)


def cell_meta(c, cell: Cell) -> dict:
    """What a cell's record stores besides its run's files: the same whoever builds it (the
    worker that ran it, or another worker's report finding it finished first)."""
    return {"optimizer": cell.optimizer, "title": cell.title,
            "glue_task": glue_task_of(c, cell.task), "learning_rate": cell.learning_rate}


def finish(p: Plan) -> dict:
    """Write the report from every finished cell of the plan; return its aggregate."""
    c = p.comparison
    cells = [r for r in (load_cell(cell.dir, **cell_meta(c, cell)) for cell in p.cells)
             if r is not None]
    return write_report(Path(c.output_dir), cells, c.tasks, p.rows, c.selection.split,
                        reference=dataclasses.asdict(c.reference) if c.reference else None)


def run_comparison(path: str | Path, overrides: list[str] | None = None, *,
                   run: RunProcess | None = None, shard: str | None = None) -> dict:
    """Run every unfinished cell of a comparison (or of one shard), then write the report.

    Each cell is claimed before it runs (`lrft.compare.claims`), so several workers on one
    folder (shards, or the same command started twice) never run a cell twice; a cell another
    live worker holds is left to it.

    Args:
        path: the comparison spec.
        overrides: `key=value` overrides (see `lrft.compare.load.load_comparison`).
        run: runs one cell's command with its log file (see `lrft.compare.cells.run_cell`);
            None: a child process per cell.
        shard: "I/N": run only every N-th cell from the I-th (see `shard_cells`).

    Returns:
        The aggregate of every finished cell (as in results.json), plus `failed`: the cell that
        failed, or None; and `held`: the cells left to other workers.

    Raises:
        RecipeError: the comparison or a cell's recipe is invalid (before any training), or a
            bad shard.
    """
    p, todo = prepare(path, overrides, shard)
    c = p.comparison
    failed, held, durations, t_all = None, [], [], time.perf_counter()
    index = {cell.name: i + 1 for i, cell in enumerate(p.cells)}
    for k, cell in enumerate(todo):
        at = f"[cell {index[cell.name]}/{len(p.cells)}] {cell.name}"
        done = run_cell(cell, c.launcher, keep_models=c.keep_models,
                        glue_task=glue_task_of(c, cell.task), run=run,
                        on_start=lambda how, at=at, cell=cell: print(
                            f"{at}: {how} (log: {cell.dir / LOG_FILE})", flush=True))
        if done.status in ("held", "skipped"):
            held += [cell.name] if done.status == "held" else []
            print(f"{at}: {done.how or 'finished by another worker'}; left to it", flush=True)
            continue
        if done.status == "failed":
            failed = cell.name
            say_failed(at, done, "rerun the comparison to resume from this cell")
            break
        durations.append(done.wall_time_s)
        left = len(todo) - k - 1
        eta = f"; ETA {duration(statistics.mean(durations) * left)} for {left} more" \
            if left else ""
        say_done(at, done, eta)
    if durations and failed is None:
        print(f"trained {len(durations)} cell(s) in {duration(time.perf_counter() - t_all)}",
              flush=True)
    summary = finish(p)
    summary["failed"], summary["held"] = failed, held
    return summary
