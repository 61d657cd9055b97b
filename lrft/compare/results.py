"""From cell records to results: mean ± std over seeds, each optimizer's LR picked, ties named.

Plain functions of cell records (`lrft.compare.records`), no I/O:

- :func:`aggregate`: one row per optimizer (x LR): mean ± sample std (ddof=1) over seeds of each
  task's score, the GLUE average, the best row per task (the "best mean" marks of the tables);
  plus the selection and the LR sensitivity below.
- :func:`select`: per task, each optimizer at its best LR. The rule (SELECTION_RULES) is the
  best mean score over seeds, measured on the dev set or on the holdout split; among LRs with
  fewer finished seeds than the optimizer's best-covered LR none is picked, an exact tie goes
  to the smaller LR. The reported score is always the dev score at the chosen LR.
- ties (TIE_RULE): an optimizer whose mean is below the best mean by at most the larger of the
  two sample standard deviations over seeds is tied with the best; a task with a tie names no
  winner, and neither does a task with one seed (no noise estimate).
- :func:`sensitivity`: dev score against LR per task and optimizer, with the seeds' spread.
"""

from __future__ import annotations

import statistics
from typing import Any

from lrft import glue

SELECTION_RULES = {
    "dev": "each optimizer's LR is the one with the best mean dev score over seeds; the same dev "
           "scores are reported, so they are optimistic (the pick saw them)",
    "holdout": "each optimizer's LR is the one with the best mean score over seeds on the holdout "
               "split (carved from the training rows); the dev scores at that LR are reported, "
               "unseen by the pick",
}
TIE_RULE = ("an optimizer whose mean is below the best mean by at most the larger of the two "
            "sample standard deviations over seeds (ddof=1) is tied with the best; a task with a "
            "tie, or with one seed, names no winner")


def mean_std(values: list[float | None]) -> dict:
    """{"n", "mean", "std"}: std is the sample standard deviation (ddof=1), None for n < 2."""
    values = [v for v in values if v is not None]
    if not values:
        return {"n": 0, "mean": None, "std": None}
    return {"n": len(values), "mean": statistics.mean(values),
            "std": statistics.stdev(values) if len(values) > 1 else None}


def cell_lr(cell: dict) -> float | None:
    """The learning rate a cell ran at (its recipe's, else the LR axis's)."""
    lr = (cell.get("optim") or {}).get("learning_rate")
    return lr if lr is not None else cell.get("learning_rate")


def _label(cell: dict) -> str:
    return cell.get("optimizer") or (cell.get("optim") or {}).get("name") or cell["row"]


# --------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------

def aggregate(cells: list[dict], tasks: list[str] | None = None, rows: list[str] | None = None,
              *, select_on: str = "dev") -> dict:
    """Mean ± std over seeds per row and task, the GLUE average, the best row per task, each
    optimizer's chosen LR per task with ties, and the LR sensitivity.

    Args:
        cells: cell records (see `lrft.compare.records.build_cell_record`).
        tasks, rows: column and row order; default: as first seen in `cells`.
        select_on: "dev" or "holdout": where each optimizer's LR is picked (see `select`).

    Returns:
        {"tasks", "titles", "rows": [{"row", "optimizer", "learning_rate", "optim", "tasks":
        {task: {"score", "best_score", "holdout", "metrics", "is_best", ...}}, "glue_avg",
        "is_best_avg", "train_time_s", ...}], "best": {task: [rows]}, "selection", "sensitivity",
        "std"}. The GLUE average is taken per seed over the tasks (seeds that finished every
        task), then mean ± std over those seeds.
    """
    tasks = list(tasks or dict.fromkeys(c["task"] for c in cells))
    rows = list(rows or dict.fromkeys(c["row"] for c in cells))
    rows += [r for r in dict.fromkeys(c["row"] for c in cells) if r not in rows]
    out_rows = []
    for row in rows:
        mine = [c for c in cells if c["row"] == row and c["task"] in tasks]
        if mine:
            out_rows.append(_aggregate_row(row, mine, tasks))
    best = _mark_best(out_rows, tasks)
    titles = {t: next((c["title"] for c in cells if c["task"] == t and c.get("title")),
                      glue.title(t)) for t in tasks}
    titles["glue_avg"] = "GLUE avg" if all(t in glue.TASKS for t in tasks) else "task avg"
    used = [c for c in cells if c["task"] in tasks]
    return {"tasks": tasks, "titles": titles, "rows": out_rows, "best": best,
            "selection": select(out_rows, tasks, select_on),
            "sensitivity": sensitivity(used, tasks),
            "std": "sample standard deviation over seeds (ddof=1)"}


def _mark_best(rows: list[dict], tasks: list[str]) -> dict[str, list[str]]:
    best = {}
    for task in [*tasks, "glue_avg"]:
        means = {r["row"]: (r["glue_avg"] if task == "glue_avg" else r["tasks"][task]["score"])
                 ["mean"] for r in rows}
        top = max((m for m in means.values() if m is not None), default=None)
        best[task] = [row for row, m in means.items() if m is not None and m >= top - 1e-12]
        for r in rows:
            flag = r["row"] in best[task]
            if task == "glue_avg":
                r["is_best_avg"] = flag
            else:
                r["tasks"][task]["is_best"] = flag
    return best


def _aggregate_row(row: str, cells: list[dict], tasks: list[str]) -> dict:
    per_task = {}
    for task in tasks:
        mine = sorted((c for c in cells if c["task"] == task), key=lambda c: str(c["seed"]))
        names = list(dict.fromkeys(k for c in mine for k in c["metrics"]["final"]))
        per_task[task] = {
            "score": mean_std([c["score"]["final"] for c in mine]),
            "best_score": mean_std([c["score"].get("best") for c in mine]),
            "holdout": mean_std([c["score"].get("holdout") for c in mine]),
            "metrics": {k: mean_std([c["metrics"]["final"].get(k) for c in mine]) for k in names},
            "seeds": [c["seed"] for c in mine],
            "diverged": sum(c["status"] == "diverged" for c in mine),
        }
    by_seed: dict[Any, dict[str, float]] = {}
    for c in cells:
        if c["score"]["final"] is not None:
            by_seed.setdefault(c["seed"], {})[c["task"]] = c["score"]["final"]
    complete = [statistics.mean(s[t] for t in tasks) for s in by_seed.values()
                if all(t in s for t in tasks)]
    first = cells[0]
    return {
        "row": row, "optimizer": _label(first), "learning_rate": cell_lr(first),
        "optim": first["optim"], "tasks": per_task, "glue_avg": mean_std(complete),
        "cells": len(cells),
        "train_time_s": sum(c.get("train_time_s") or 0.0 for c in cells),
        "wall_time_s": sum(c.get("wall_time_s") or 0.0 for c in cells),
        "samples_per_s": mean_std([c.get("samples_per_s") for c in cells])["mean"],
        "peak_memory_bytes": max((c.get("peak_memory_bytes") or 0 for c in cells), default=0),
        "optimizer_state_bytes": max((c.get("optimizer_state_bytes") or 0 for c in cells),
                                     default=0),
    }


# --------------------------------------------------------------------------------------------
# Selection and ties
# --------------------------------------------------------------------------------------------

def _pick(rows: list[dict], task: str, key: str) -> dict | None:
    """The row with the best mean of `key` ("score" or "holdout") among those with the most
    finished seeds; an exact tie goes to the smaller LR."""
    scored = [r for r in rows if r["tasks"][task][key]["n"] > 0]
    if not scored:
        return None
    most = max(r["tasks"][task][key]["n"] for r in scored)
    full = [r for r in scored if r["tasks"][task][key]["n"] == most]
    return max(full, key=lambda r: (r["tasks"][task][key]["mean"], -(r["learning_rate"] or 0)))


def select(rows: list[dict], tasks: list[str], split: str = "dev") -> dict:
    """Each optimizer's LR per task, and the verdict per task (winner, or the tie).

    Args:
        rows: aggregated rows (see `aggregate`); an optimizer's rows are its LRs.
        tasks: the tasks.
        split: "dev" or "holdout" (see SELECTION_RULES). An optimizer without holdout scores on
            a task is picked on dev, and the task's `note` says so.

    Returns:
        {"split", "rule", "tie_rule", "optimizers": [labels], "tasks": {task: {"chosen":
        {label: {"row", "learning_rate", "lrs", "at_edge" (the smallest or largest LR tried:
        the best may lie beyond), "score" (dev mean/std/n), "selected_on" (the stat the pick
        used), "gap", "tied"}}, "winner": label | None, "tied": [labels],
        "verdict": text, "note": text | None}}}.
    """
    labels = list(dict.fromkeys(r["optimizer"] for r in rows))
    out = {"split": split, "rule": SELECTION_RULES[split], "tie_rule": TIE_RULE,
           "optimizers": labels, "tasks": {}}
    for task in tasks:
        chosen, fallback = {}, []
        for label in labels:
            mine = [r for r in rows if r["optimizer"] == label]
            key = "holdout" if split == "holdout" else "score"
            row = _pick(mine, task, key)
            if row is None and key == "holdout":
                row, key = _pick(mine, task, "score"), "score"
                if row is not None:  # none at all: the optimizer did not run this task
                    fallback.append(label)
            if row is not None:
                tried = sorted(r["learning_rate"] for r in mine if r["learning_rate"] is not None)
                edge = len(tried) > 1 and row["learning_rate"] in (tried[0], tried[-1])
                chosen[label] = {"row": row["row"], "learning_rate": row["learning_rate"],
                                 "lrs": len(mine), "at_edge": edge,
                                 "score": row["tasks"][task]["score"],
                                 "selected_on": {"split": "holdout" if key == "holdout" else "dev",
                                                 **row["tasks"][task][key]}}
        note = (f"no holdout scores for {', '.join(fallback)}: picked on dev"
                if fallback else None)
        out["tasks"][task] = {"chosen": chosen, **verdict(chosen), "note": note}
    return out


def verdict(chosen: dict[str, dict]) -> dict:
    """The winner among the chosen (label -> {"score": {"n", "mean", "std"}}), or the tie.

    Every entry gets `gap` (the best mean minus its mean) and `tied` (within the seed noise of
    the best, TIE_RULE). Returns {"winner", "tied", "verdict"}.
    """
    ranked = sorted(((label, c["score"]) for label, c in chosen.items()
                     if c["score"]["mean"] is not None), key=lambda x: -x[1]["mean"])
    if not ranked:
        return {"winner": None, "tied": [], "verdict": "no scores"}
    (lead, top), others = ranked[0], ranked[1:]
    tied = []
    for label, stat in ranked:
        gap = top["mean"] - stat["mean"]
        noise = None if top["std"] is None or stat["std"] is None else max(top["std"], stat["std"])
        chosen[label]["gap"] = gap
        chosen[label]["tied"] = label != lead and noise is not None and gap <= noise
        if chosen[label]["tied"]:
            tied.append(label)
    if not others:
        return {"winner": lead, "tied": [], "verdict": f"{lead} (the only optimizer)"}
    if top["std"] is None or any(s["std"] is None for _, s in others):
        return {"winner": None, "tied": [], "verdict": "no winner named: one seed gives no noise "
                                                       "estimate"}
    if tied:
        return {"winner": None, "tied": [lead, *tied],
                "verdict": f"tie: {', '.join([lead, *tied])} (within the seed noise)"}
    return {"winner": lead, "tied": [], "verdict": f"{lead} (beyond the seed noise)"}


# --------------------------------------------------------------------------------------------
# LR sensitivity
# --------------------------------------------------------------------------------------------

def sensitivity(cells: list[dict], tasks: list[str]) -> dict[str, dict[str, list[dict]]]:
    """Dev score against LR: {task: {optimizer: [{"lr", "n", "mean", "std", "min", "max"}]}},
    LRs ascending; min and max over the seeds."""
    out: dict[str, dict[str, list[dict]]] = {}
    for task in tasks:
        by_opt: dict[str, dict[float, list[float]]] = {}
        for c in cells:
            lr, score = cell_lr(c), c["score"]["final"]
            if c["task"] == task and lr is not None:
                by_opt.setdefault(_label(c), {}).setdefault(lr, [])
                if score is not None:
                    by_opt[_label(c)][lr].append(score)
        out[task] = {label: [{"lr": lr, **mean_std(v), "min": min(v, default=None),
                              "max": max(v, default=None)} for lr, v in sorted(points.items())]
                     for label, points in by_opt.items()}
    return out
