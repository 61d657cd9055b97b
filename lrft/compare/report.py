"""The comparison's report: results.{md,csv,json} and its figures, from the finished cells.

    cell records -> aggregate (lrft.compare.results) -> tables (lrft.compare.tables)
                 -> figures (lrft.plots): loss.png, lr.png, scores.png, and with an LR axis
                    sensitivity.png (score against LR per task, one line per optimizer)

`report(dir)` rebuilds all of it from a comparison folder without training: row and task order,
titles and the selection rule come from the comparison.json the last run wrote, when there is
one; cells found on disk but not in it are added after.
"""

from __future__ import annotations

import json
import os
import statistics
import threading
from pathlib import Path

from lrft import plots
from lrft.compare.records import load_cell
from lrft.compare.results import aggregate
from lrft.compare.tables import format_csv, format_markdown, format_terminal

PLAN_FILE = "comparison.json"


def _curve_stats(curves: list[tuple[list[int], list[float | None]]]):
    """Mean, min and max over seeds at each logged step (steps any seed logged)."""
    by_step: dict[int, list[float]] = {}
    for steps, values in curves:
        for s, v in zip(steps, values):
            if v is not None and v == v:  # NaN != NaN
                by_step.setdefault(s, []).append(v)
    steps = sorted(by_step)
    return (steps, [statistics.mean(by_step[s]) for s in steps],
            [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps])


def _loss_series(row: str, mine: list[dict]) -> plots.Series:
    steps, mean, lo, hi = _curve_stats(
        [(c["loss_curve"]["step"], c["loss_curve"]["loss"]) for c in mine])
    band = len(mine) > 1
    return plots.Series(f"{row} (n={len(mine)})", steps, mean, lo if band else None,
                        hi if band else None)


def _lr_series(row: str, mine: list[dict]) -> plots.Series | None:
    curve = mine[0]["lr_curve"]
    if not curve["group"]:
        return None
    return plots.Series(f"{row} ({curve['group']} group)", curve["step"], curve["lr"])


def curve_panels(cells: list[dict], agg: dict, series) -> dict[str, list[plots.Series]]:
    """Per task title, one series per row from that row's cells: `series(row, cells)`."""
    panels = {}
    for task in agg["tasks"]:
        drawn = []
        for r in agg["rows"]:
            mine = [c for c in cells if c["row"] == r["row"] and c["task"] == task]
            line = series(r["row"], mine) if mine else None
            drawn += [line] if line is not None else []
        panels[agg["titles"][task]] = drawn
    return panels


def sensitivity_panels(agg: dict) -> dict[str, list[plots.Series]]:
    """The sensitivity figure's data: per task title, one series per optimizer: dev score x100
    against LR (mean, band min..max over seeds), its chosen LR marked."""
    panels = {}
    for task in agg["tasks"]:
        chosen = agg["selection"]["tasks"][task]["chosen"]
        series = []
        for label, points in agg["sensitivity"][task].items():
            pts = [p for p in points if p["mean"] is not None]
            pct = [[100 * p[k] for p in pts] for k in ("mean", "min", "max")]
            pick = (chosen.get(label) or {}).get("learning_rate")
            marks = [(p["lr"], 100 * p["mean"]) for p in pts if p["lr"] == pick]
            series.append(plots.Series(label, [p["lr"] for p in pts], *pct, marks=marks))
        panels[agg["titles"][task]] = series
    return panels


def _bars(agg: dict) -> tuple[list[str], dict[str, list]]:
    groups = [*agg["tasks"], "glue_avg"] if len(agg["tasks"]) > 1 else list(agg["tasks"])
    names = [agg["titles"].get(g, g) for g in groups]
    bars = {}
    for r in agg["rows"]:
        stats = [r["glue_avg"] if g == "glue_avg" else r["tasks"][g]["score"] for g in groups]
        bars[r["row"]] = [(100 * s["mean"] if s["mean"] is not None else None,
                           100 * s["std"] if s["std"] is not None else None) for s in stats]
    return names, bars


def _temp(path: Path) -> Path:
    """A private name beside `path` (same suffix: figures infer their format from it)."""
    return path.with_name(f".{path.stem}-{os.getpid()}-{threading.get_ident()}{path.suffix}")


def write_atomic(path: Path, text: str) -> Path:
    """Write a whole file or nothing: shards reporting at once never interleave their writes."""
    tmp = _temp(path)
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def _figure(draw, data, path: Path, **kwargs) -> Path:
    tmp = draw(*data, _temp(path), **kwargs)
    os.replace(tmp, path)
    return path


def has_lr_axis(agg: dict) -> bool:
    """Whether some optimizer ran at more than one LR on some task."""
    return any(len(points) > 1 for by_opt in agg["sensitivity"].values()
               for points in by_opt.values())


def write_report(out: Path, cells: list[dict], tasks: list[str] | None = None,
                 rows: list[str] | None = None, select_on: str = "dev", *,
                 reference: dict | None = None) -> dict:
    """Aggregate the finished cells; write the tables and figures to `out`; print the summary.

    `reference` ({"name", "scores": {task: [x100, ...]}}) is printed beside the rows.

    Returns:
        The aggregate (as in results.json) with `files`: the paths written.
    """
    if not cells:
        print(f"no finished cells in {out}: nothing to report", flush=True)
        return {"tasks": list(tasks or []), "rows": [], "best": {}, "files": []}
    agg = aggregate(cells, tasks, rows, select_on=select_on)
    agg["reference"] = reference
    used = [c for c in cells if c["task"] in agg["tasks"]]
    files = [write_atomic(out / "results.md", format_markdown(agg)),
             write_atomic(out / "results.csv", format_csv(agg)), out / "results.json",
             _figure(plots.plot_loss, [curve_panels(used, agg, _loss_series)], out / "loss.png"),
             _figure(plots.plot_lr, [curve_panels(used, agg, _lr_series)], out / "lr.png"),
             _figure(plots.plot_bars, _bars(agg), out / "scores.png",
                     ylabel="validation score x100",
                     title="Scores: mean over seeds, error bar = sample std")]
    if has_lr_axis(agg):
        files.append(_figure(plots.plot_sensitivity, [sensitivity_panels(agg)],
                             out / "sensitivity.png", ylabel="validation score x100"))
    agg["files"] = [str(f) for f in files]
    write_atomic(files[2], json.dumps(agg, indent=1))
    print("\n" + format_terminal(agg), flush=True)
    print(f"\nwrote {', '.join(f.name for f in files)} to {out}", flush=True)
    return agg


def _key(cell_dir: Path, out: Path, saved: dict) -> str:
    """A cell folder as comparison.json names it: under the output_dir the run was given."""
    root = Path(saved.get("output_dir") or out)
    return (root / cell_dir.relative_to(out)).as_posix()


def report(out_dir: str | Path) -> dict:
    """Rebuild results.{md,csv,json} and the figures from the finished cells under `out_dir`.

    Raises:
        FileNotFoundError: `out_dir` does not exist.
    """
    out = Path(out_dir)
    if not out.is_dir():
        raise FileNotFoundError(f"{out}: no such comparison folder")
    saved = {}
    if (out / PLAN_FILE).is_file():
        saved = json.loads((out / PLAN_FILE).read_text())
    meta = {Path(c["dir"]).as_posix(): c.get("meta", {}) for c in saved.get("cells", [])}
    folders = sorted(d.parent for d in out.glob("*/*/seed*/results.json"))
    cells = [c for c in (load_cell(d, **meta.get(_key(d, out, saved), {})) for d in folders)
             if c is not None]
    found = list(dict.fromkeys(c["task"] for c in cells))
    tasks = [t for t in saved.get("tasks") or [] if t in found]
    tasks += [t for t in found if t not in tasks]
    return write_report(out, cells, tasks, saved.get("rows"),
                        saved.get("selection", {}).get("split", "dev"),
                        reference=saved.get("reference"))
