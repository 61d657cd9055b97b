"""The comparison's tables as text: results.md, results.csv and what the terminal shows.

Pure functions of the aggregate (`lrft.compare.results.aggregate`). Scores are x100 in tables
and 0..1 in the CSV; ± is the sample standard deviation over seeds (ddof=1), left out with one
seed. Every table says under it what its numbers are, how each optimizer's LR was chosen and
what counts as a tie.
"""

from __future__ import annotations

import csv
import io

from lrft.compare.results import mean_std


def pct(stat: dict) -> str:
    """A mean ± std stat x100: "81.2 ± 0.5", "81.2" with one seed, "-" without."""
    if stat["mean"] is None:
        return "-"
    text = f"{stat['mean'] * 100:.1f}"
    return text + (f" ± {stat['std'] * 100:.1f}" if stat["std"] is not None else "")


def mib(n: float) -> str:
    if n < 2**20:
        return f"{n / 2**10:,.0f} KiB"
    return f"{n / 2**20:,.0f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def duration(seconds: float) -> str:
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _seed_note(agg: dict) -> str:
    ns = {s["n"] for r in agg["rows"] for s in (t["score"] for t in r["tasks"].values())}
    if len(ns) > 1:
        return f"{min(ns)}-{max(ns)} seeds"
    return "1 seed" if ns == {1} else f"{max(ns)} seeds"


def _bold(text: str, flag: bool | None) -> str:
    return f"**{text}**" if flag and text != "-" else text


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _md_table(head: list[str], body: list[list[str]]) -> list[str]:
    return [_md_row(head), _md_row(["---"] * len(head)), *[_md_row(r) for r in body]]


def _titles(agg: dict) -> list[str]:
    return [agg.get("titles", {}).get(t, t) for t in agg["tasks"]]


def _avg(agg: dict) -> str:
    """The average column: "GLUE avg" when every task is a GLUE task, else "task avg"."""
    return agg.get("titles", {}).get("glue_avg", "GLUE avg")


# --------------------------------------------------------------------------------------------
# Chosen LRs and the LR sensitivity (what the LR axis adds)
# --------------------------------------------------------------------------------------------

def _chosen_cell(task_sel: dict, label: str, markdown: bool) -> str:
    c = task_sel["chosen"].get(label)
    if c is None:
        return "-"
    text = f"{pct(c['score'])} @ {num(c['learning_rate'])}" + (" (edge)" if c["at_edge"] else "")
    if markdown and task_sel["winner"] == label:
        return f"**{text}**"
    return text + (" =" if c.get("tied") or label in task_sel["tied"] else "")


def selection_lines(agg: dict, markdown: bool = True) -> list[str]:
    """The chosen-LR table: per task, each optimizer at its chosen LR (dev mean ± std @ LR),
    the verdict per task, and the rules under it."""
    sel = agg["selection"]
    titles = _titles(agg)
    body = [[label, *[_chosen_cell(sel["tasks"][t], label, markdown) for t in agg["tasks"]]]
            for label in sel["optimizers"]]
    body.append(["verdict", *[sel["tasks"][t]["verdict"] for t in agg["tasks"]]])
    notes = [f"{agg['titles'].get(t, t)}: {sel['tasks'][t]['note']}" for t in agg["tasks"]
             if sel["tasks"][t]["note"]]
    rules = [f"Selection ({sel['split']}): {sel['rule']}.",
             f"Ties ('=' marks the tied): {sel['tie_rule']}.", *notes]
    if any(c["at_edge"] for t in agg["tasks"] for c in sel["tasks"][t]["chosen"].values()):
        rules.append("(edge): the chosen LR is the smallest or largest one tried; the "
                     "optimizer's best may lie beyond it: widen lr_grid.width")
    if markdown:
        return ["## Each optimizer at its chosen LR (dev score x100 @ LR; mean ± std over "
                f"{_seed_note(agg)}; **bold**: the winner)", "",
                *_md_table(["optimizer", *titles], body), "", *[f"- {r}" for r in rules]]
    return [*_aligned(["optimizer", *titles], body), *rules]


def sensitivity_lines(agg: dict, markdown: bool = True) -> list[str]:
    """The LR sensitivity as a compact table: per task, one line per optimizer, each LR with its
    dev score x100 (mean ± std); the chosen LR in [brackets]."""
    lines = []
    for task, title in zip(agg["tasks"], _titles(agg)):
        chosen = agg["selection"]["tasks"][task]["chosen"]
        body = []
        for label, points in agg["sensitivity"][task].items():
            pick = (chosen.get(label) or {}).get("learning_rate")
            shown = [f"{num(p['lr'])}: {pct(p)}" for p in points]
            body.append([label, *[f"[{s}]" if p["lr"] == pick else s
                                  for s, p in zip(shown, points)]])
        if not body or max(len(b) for b in body) <= 2:
            continue  # one LR per optimizer: nothing to show beyond the chosen-LR table
        width = max(len(b) for b in body)
        body = [b + [""] * (width - len(b)) for b in body]
        head = [title, *[f"LR {i}" for i in range(1, width)]]
        lines += (["", f"**{title}**", "", *_md_table(head, body)] if markdown
                  else ["", *_aligned(head, body)])
    if lines:
        head = "## LR sensitivity (dev score x100 per LR; [chosen])" if markdown \
            else "LR sensitivity (dev score x100 per LR, mean ± std over seeds; [chosen]):"
        lines = [head, *lines]
    return lines


# --------------------------------------------------------------------------------------------
# results.md
# --------------------------------------------------------------------------------------------

def format_markdown(agg: dict) -> str:
    """results.md: the chosen-LR table (when the comparison has an LR axis or ties to name), the
    scores of every row, the LR sensitivity, the best evaluations, the official metrics per
    task, and a footer saying what the numbers are."""
    tasks = agg["tasks"]
    head = ["optimizer", "lr", "wd", *_titles(agg), _avg(agg), "train time", "samples/s",
            "peak memory", "optimizer state"]
    body = [[r["row"], num(r["optim"].get("learning_rate")), num(r["optim"].get("weight_decay")),
             *[_bold(pct(r["tasks"][t]["score"]), r["tasks"][t].get("is_best")) for t in tasks],
             _bold(pct(r["glue_avg"]), r.get("is_best_avg")), duration(r["train_time_s"]),
             f"{r['samples_per_s']:.1f}" if r["samples_per_s"] is not None else "-",
             mib(r["peak_memory_bytes"]), mib(r["optimizer_state_bytes"])] for r in agg["rows"]]
    lines = [*selection_lines(agg), ""] if agg.get("selection") else []
    lines += [f"## Validation scores (final checkpoint, x100; mean ± std over {_seed_note(agg)})",
              "", *_md_table(head, body)]
    if agg.get("reference"):
        lines += ["", *reference_lines(agg)]
    if agg.get("sensitivity"):
        sens = sensitivity_lines(agg)
        lines += ["", *sens] if sens else []
    if any(t["best_score"]["mean"] != t["score"]["mean"]
           for r in agg["rows"] for t in r["tasks"].values()):
        lines += ["", "## Best evaluation of each run (x100; an oracle pick on the validation set)",
                  "", *_md_table(["optimizer", *_titles(agg)],
                                 [[r["row"], *[pct(r["tasks"][t]["best_score"]) for t in tasks]]
                                  for r in agg["rows"]])]
    lines += ["", "## Official metrics (final checkpoint, x100)"]
    for t, title in zip(tasks, _titles(agg)):
        names = list(dict.fromkeys(k for r in agg["rows"] for k in r["tasks"][t]["metrics"]))
        lines += ["", f"**{title}**", "", *_md_table(
            ["optimizer", *names], [[r["row"], *[pct(r["tasks"][t]["metrics"].get(n, mean_std([])))
                                                 for n in names]] for r in agg["rows"]])]
    lines += ["", footer(agg), ""]
    return "\n".join(lines)


def reference_lines(agg: dict, markdown: bool = True) -> list[str]:
    """The published reference beside the rows: its task scores (the mean of its numbers, as
    the task's score is) and the numbers themselves."""
    ref = agg["reference"]
    scores = ref.get("scores") or {}
    cells = []
    for t in agg["tasks"]:
        values = scores.get(t)
        if not values:
            cells.append("-")
            continue
        mean = sum(values) / len(values)
        cells.append(f"{mean:.1f}" + (f" ({'/'.join(f'{v:g}' for v in values)})"
                                      if len(values) > 1 else ""))
    head, body = ["reference", *_titles(agg)], [[ref.get("name") or "reference", *cells]]
    title = ("## Reference (published; a task's score is the mean of its numbers, as above; not "
             "run here)")
    if markdown:
        return [title, "", *_md_table(head, body)]
    return [title.removeprefix("## "), *_aligned(head, body)]


def footer(agg: dict) -> str:
    diverged = sum(t["diverged"] for r in agg["rows"] for t in r["tasks"].values())
    note = (f" {diverged} run(s) were stopped by the divergence guard; their last evaluation "
            f"counts." if diverged else "")
    return ("Scores are on the validation (dev) split x100: for GLUE tasks the GLUE score "
            "(Matthews correlation for CoLA, the mean of F1 and accuracy for MRPC and QQP, of "
            "Pearson and Spearman for STS-B, of matched and mismatched accuracy for MNLI, "
            "accuracy otherwise), accuracy for other classification. ± is the sample "
            "standard deviation (ddof=1) over seeds, left out with one seed. " + _avg(agg) +
            ": the mean over the tasks run, per seed, then mean ± std over the seeds that "
            "finished every task. **Bold**: the best mean in its column. Train time: the sum over "
            "the row's cells (training loop only); samples/s: their mean; peak memory (process "
            "RSS on CPU, CUDA max allocated on GPU) and optimizer state: their maximum." + note)


# --------------------------------------------------------------------------------------------
# results.csv and the terminal
# --------------------------------------------------------------------------------------------

def format_csv(agg: dict) -> str:
    """results.csv: one row per optimizer (x LR); scores on a 0..1 scale; `best_in` lists the
    tasks (and glue_avg) where the row has the best mean, `chosen_for` those where it is its
    optimizer's chosen LR."""
    tasks = agg["tasks"]
    metric_names = {t: list(dict.fromkeys(k for r in agg["rows"] for k in r["tasks"][t]["metrics"]))
                    for t in tasks}
    header = ["optimizer", "name", "learning_rate", "weight_decay"]
    for t in tasks:
        header += [f"{t}_mean", f"{t}_std", f"{t}_n", f"{t}_best_eval_mean", f"{t}_holdout_mean"]
        header += [f"{t}_{m}_{s}" for m in metric_names[t] for s in ("mean", "std")]
    header += ["glue_avg_mean", "glue_avg_std", "glue_avg_n", "best_in", "chosen_for",
               "train_time_s", "wall_time_s", "samples_per_s", "peak_memory_bytes",
               "optimizer_state_bytes"]
    sel = (agg.get("selection") or {}).get("tasks", {})
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in agg["rows"]:
        line = [r["row"], r["optim"].get("name"), r["optim"].get("learning_rate"),
                r["optim"].get("weight_decay")]
        for t in tasks:
            s = r["tasks"][t]
            line += [s["score"]["mean"], s["score"]["std"], s["score"]["n"],
                     s["best_score"]["mean"], s.get("holdout", mean_std([]))["mean"]]
            for m in metric_names[t]:
                stat = s["metrics"].get(m, mean_std([]))
                line += [stat["mean"], stat["std"]]
        best_in = [t for t in tasks if r["tasks"][t].get("is_best")]
        best_in += ["glue_avg"] if r.get("is_best_avg") else []
        chosen = [t for t in tasks if (sel.get(t, {}).get("chosen", {})
                                       .get(r["optimizer"], {}).get("row")) == r["row"]]
        line += [r["glue_avg"]["mean"], r["glue_avg"]["std"], r["glue_avg"]["n"],
                 ";".join(best_in), ";".join(chosen), r["train_time_s"], r["wall_time_s"],
                 r["samples_per_s"], r["peak_memory_bytes"], r["optimizer_state_bytes"]]
        w.writerow(["" if v is None else v for v in line])
    return buf.getvalue()


def _aligned(head: list[str], body: list[list[str]]) -> list[str]:
    """A plain-text table: first column left, the rest right, a rule under the head."""
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(x, widths))).rstrip() for x in [head, *body]]
    lines.insert(1, "-" * len(lines[0]))
    return lines


def format_terminal(agg: dict) -> str:
    """What `lrft compare` prints at the end: every row's scores x100 (`*` = best mean), then,
    with an LR axis, the LR sensitivity and each optimizer at its chosen LR with the verdict."""
    tasks = agg["tasks"]
    head = ["optimizer", *_titles(agg), _avg(agg), "time", "peak mem", "opt state"]
    body = [[r["row"], *[pct(r["tasks"][t]["score"]) + ("*" if r["tasks"][t].get("is_best")
                                                       else " ") for t in tasks],
             pct(r["glue_avg"]) + ("*" if r.get("is_best_avg") else " "),
             duration(r["train_time_s"]), mib(r["peak_memory_bytes"]),
             mib(r["optimizer_state_bytes"])] for r in agg["rows"]]
    lines = _aligned(head, body)
    lines.append("scores x100 on the validation split (final checkpoint); ± = sample std "
                 "(ddof=1) over seeds; * = best mean")
    if agg.get("reference"):
        lines += ["", *reference_lines(agg, markdown=False)]
    if agg.get("sensitivity"):
        sens = sensitivity_lines(agg, markdown=False)
        lines += ["", *sens] if sens else []
    if agg.get("selection"):
        lines += ["", *selection_lines(agg, markdown=False)]
    return "\n".join(lines)
