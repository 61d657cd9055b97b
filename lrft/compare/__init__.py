"""`lrft compare`: optimizers (x LRs) x tasks x seeds; each optimizer at its best LR, ties named.

    spec.py     the comparison spec: its typed sections and what each key means
    rules.py    every check of a spec, reported at once
    load.py     reading a spec: YAML, `key=value` overrides, typed, validated (lrft.config)
    grid.py     the plan: cells, each optimizer's LR grid, each cell a validated training recipe
    cells.py    one cell as an idempotent unit: claim it, then skip, resume or run it
    claims.py   atomic claims: two workers on one folder never run the same cell
    records.py  a finished cell's record (cell.json) from its results.json and metrics.jsonl
    results.py  mean ± std over seeds, each optimizer's LR picked, ties, LR sensitivity
    tables.py   results.md, results.csv and the terminal tables
    report.py   the report folder: tables and figures (lrft.plots), `lrft compare --report`
    run.py      `lrft compare RECIPE [--shard I/N]`: plan, run the unfinished cells, report
    executors.py  the cluster executors' shared part: the job a worker gets, a cell's resources
    slurm.py      `--executor slurm`: a submitit job array, a task per cell, requeued at its limit
    ray_exec.py   `--executor ray`: a Ray task per cell, gathered as they finish; Ctrl-C cancels
"""

from lrft.compare.cells import Outcome, cell_state, run_cell
from lrft.compare.grid import Cell, Plan, plan
from lrft.compare.load import load_comparison
from lrft.compare.ray_exec import run_on_ray
from lrft.compare.records import build_cell_record, load_cell, task_score
from lrft.compare.report import report
from lrft.compare.results import aggregate, mean_std, select, verdict
from lrft.compare.run import run_comparison, shard_cells
from lrft.compare.slurm import submit_slurm
from lrft.compare.spec import Comparison
from lrft.compare.tables import format_csv, format_markdown, format_terminal

__all__ = ["run_comparison", "submit_slurm", "run_on_ray", "report", "plan", "aggregate",
           "select", "verdict", "format_markdown", "format_csv", "format_terminal", "task_score",
           "load_comparison", "build_cell_record", "load_cell", "run_cell", "cell_state",
           "shard_cells", "mean_std", "Cell", "Plan", "Comparison", "Outcome"]
