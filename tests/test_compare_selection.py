"""Tests for the comparison's results: each optimizer's LR picked (on dev or on holdout), ties
named by the seed-noise rule, the LR sensitivity table and figure. All on synthetic cell records:
no training here (tests/test_compare_grid.py runs cells)."""

from __future__ import annotations

import json
import math

import pytest

from lrft.compare import aggregate, format_markdown, format_terminal, select, verdict
from lrft.compare.report import sensitivity_panels, write_report
from lrft.compare.results import SELECTION_RULES, TIE_RULE

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def record(opt: str, lr: float, task: str, seed: int, dev: float | None,
           holdout: float | None = None, status: str = "completed") -> dict:
    """A cell record as lrft.compare.records builds it, with only what aggregation reads."""
    return {"row": f"{opt}-lr{lr:.3g}", "optimizer": opt, "task": task, "seed": seed,
            "status": status, "title": {"rt": "Rotten Tomatoes"}.get(task, ""),
            "optim": {"name": opt, "learning_rate": lr, "weight_decay": 0.01},
            "score": {"final": dev, "best": dev, "holdout": holdout},
            "metrics": {"final": {"accuracy": dev} if dev is not None else {}},
            "train_time_s": 10.0, "wall_time_s": 12.0, "samples_per_s": 5.0,
            "peak_memory_bytes": 2**30, "optimizer_state_bytes": 2**20,
            "loss_curve": {"step": [1, 2], "loss": [0.7, 0.6]},
            "lr_curve": {"group": "body", "step": [1, 2], "lr": [lr, lr]}}


def grid(scores: dict[tuple[str, float], list[float]], task: str = "rte",
         holdout: dict[tuple[str, float], list[float]] | None = None) -> list[dict]:
    """Records for {(optimizer, lr): [dev score per seed]} (seeds 1, 2, ...)."""
    out = []
    for (opt, lr), values in scores.items():
        for seed, dev in enumerate(values, 1):
            h = holdout[(opt, lr)][seed - 1] if holdout else None
            out.append(record(opt, lr, task, seed, dev, h))
    return out


# ---------------------------------------------------------------------------- selection


def test_dev_rule_picks_each_optimizers_best_mean_and_reports_it():
    cells = grid({("adamw", 1e-5): [0.60, 0.62, 0.64], ("adamw", 3e-5): [0.70, 0.72, 0.74],
                  ("adamw", 1e-4): [0.66, 0.70, 0.68],
                  ("lion", 3e-6): [0.61, 0.63, 0.65], ("lion", 1e-5): [0.55, 0.50, 0.60]})
    sel = aggregate(cells)["selection"]
    assert sel["split"] == "dev" and sel["rule"] == SELECTION_RULES["dev"]
    chosen = sel["tasks"]["rte"]["chosen"]
    assert chosen["adamw"]["learning_rate"] == 3e-5 and chosen["adamw"]["lrs"] == 3
    assert not chosen["adamw"]["at_edge"] and chosen["lion"]["at_edge"]
    assert chosen["adamw"]["score"] == {"n": 3, "mean": pytest.approx(0.72),
                                        "std": pytest.approx(0.02)}
    assert chosen["lion"]["learning_rate"] == 3e-6
    assert chosen["lion"]["selected_on"]["split"] == "dev"


def test_holdout_rule_picks_on_holdout_and_reports_dev_at_that_lr():
    dev = {("adamw", 1e-5): [0.80, 0.82, 0.84], ("adamw", 1e-4): [0.70, 0.70, 0.70]}
    held = {("adamw", 1e-5): [0.60, 0.60, 0.60], ("adamw", 1e-4): [0.75, 0.77, 0.79]}
    cells = grid(dev, holdout=held)
    assert aggregate(cells)["selection"]["tasks"]["rte"]["chosen"]["adamw"]["learning_rate"] \
        == 1e-5, "on dev the better dev LR wins"
    sel = aggregate(cells, select_on="holdout")["selection"]
    pick = sel["tasks"]["rte"]["chosen"]["adamw"]
    assert pick["learning_rate"] == 1e-4, "on holdout the better holdout LR wins"
    assert pick["score"]["mean"] == pytest.approx(0.70), "the dev score at the chosen LR"
    assert pick["selected_on"] == {"split": "holdout", "n": 3, "mean": pytest.approx(0.77),
                                   "std": pytest.approx(0.02)}
    assert sel["rule"] == SELECTION_RULES["holdout"] and sel["tasks"]["rte"]["note"] is None


def test_holdout_rule_without_holdout_scores_falls_back_to_dev_and_says_so():
    cells = grid({("adamw", 1e-5): [0.6, 0.7], ("adamw", 1e-4): [0.8, 0.9]})
    sel = aggregate(cells, select_on="holdout")["selection"]["tasks"]["rte"]
    assert sel["chosen"]["adamw"]["learning_rate"] == 1e-4
    assert sel["note"] == "no holdout scores for adamw: picked on dev"
    assert "no holdout scores for adamw: picked on dev" in format_markdown(
        aggregate(cells, select_on="holdout"))


def test_an_optimizer_that_did_not_run_a_task_is_not_said_to_be_picked_on_dev():
    # muon ran only SST-2 (a study extended with a second spec): RTE has no note about it
    cells = grid({("adamw", 1e-4): [0.6, 0.7]}, holdout={("adamw", 1e-4): [0.6, 0.7]})
    cells += grid({("muon", 1e-3): [0.8, 0.9]}, task="sst2", holdout={("muon", 1e-3): [0.8, 0.9]})
    sel = aggregate(cells, select_on="holdout")["selection"]["tasks"]
    assert sel["rte"]["note"] is None and "muon" not in sel["rte"]["chosen"]
    assert sel["sst2"]["chosen"]["muon"]["selected_on"]["split"] == "holdout"


def test_a_partly_finished_lr_is_not_picked_and_exact_ties_go_to_the_smaller_lr():
    # 1e-4 has one lucky seed so far; 3e-5 and 1e-5 have all three, with equal means.
    cells = grid({("adamw", 1e-5): [0.70, 0.72, 0.74], ("adamw", 3e-5): [0.74, 0.72, 0.70],
                  ("adamw", 1e-4): [0.95]})
    chosen = aggregate(cells)["selection"]["tasks"]["rte"]["chosen"]["adamw"]
    assert chosen["learning_rate"] == 1e-5


def test_diverged_cells_without_a_score_do_not_count_as_seeds():
    cells = grid({("sgd", 0.1): [0.9, 0.9, 0.9], ("sgd", 0.01): [0.7, 0.7, 0.7]})
    cells[1]["score"]["final"], cells[1]["status"] = None, "diverged"
    chosen = aggregate(cells)["selection"]["tasks"]["rte"]["chosen"]["sgd"]
    assert chosen["learning_rate"] == 0.01, "0.1 has 2 scored seeds of 3"


# ---------------------------------------------------------------------------- ties


def _chosen(**stats) -> dict:
    return {label: {"score": {"n": 3, "mean": m, "std": s}} for label, (m, s) in stats.items()}


def test_a_gap_within_the_larger_seed_std_is_a_tie():
    # gap 0.01 <= max(0.02, 0.005): tie, no winner named
    out = verdict(_chosen(adamw=(0.80, 0.02), lion=(0.79, 0.005), sgd=(0.60, 0.01)))
    assert out["winner"] is None and out["tied"] == ["adamw", "lion"]
    assert out["verdict"] == "tie: adamw, lion (within the seed noise)"


def test_a_gap_beyond_both_seed_stds_names_the_winner():
    chosen = _chosen(adamw=(0.80, 0.005), lion=(0.78, 0.01))
    out = verdict(chosen)
    assert out["winner"] == "adamw" and out["tied"] == []
    assert chosen["lion"]["gap"] == pytest.approx(0.02) and chosen["lion"]["tied"] is False


def test_the_boundary_gap_equal_to_the_noise_is_a_tie():
    assert verdict(_chosen(a=(0.75, 0.25), b=(0.5, 0.125)))["tied"] == ["a", "b"]


def test_one_seed_names_no_winner():
    chosen = {"a": {"score": {"n": 1, "mean": 0.9, "std": None}},
              "b": {"score": {"n": 1, "mean": 0.5, "std": None}}}
    out = verdict(chosen)
    assert out["winner"] is None and "one seed" in out["verdict"]


def test_ties_are_flagged_per_task_and_the_rules_are_stated():
    cells = grid({("adamw", 1e-4): [0.80, 0.82, 0.84], ("lion", 1e-5): [0.80, 0.81, 0.82]})
    cells += grid({("adamw", 1e-4): [0.90, 0.90, 0.91], ("lion", 1e-5): [0.70, 0.71, 0.70]},
                  task="rt")
    agg = aggregate(cells)
    assert agg["selection"]["tasks"]["rte"]["tied"] == ["adamw", "lion"]
    assert agg["selection"]["tasks"]["rt"]["winner"] == "adamw"
    md = format_markdown(agg)
    assert "| optimizer | RTE | Rotten Tomatoes |" in md
    assert "| adamw | 82.0 ± 2.0 @ 0.0001 = | **90.3 ± 0.6 @ 0.0001** |" in md
    assert "| lion | 81.0 ± 1.0 @ 1e-05 = | 70.3 ± 0.6 @ 1e-05 |" in md
    assert ("| verdict | tie: adamw, lion (within the seed noise) "
            "| adamw (beyond the seed noise) |") in md
    assert SELECTION_RULES["dev"] in md and TIE_RULE in md and "| task avg |" in md
    terminal = format_terminal(agg)
    assert SELECTION_RULES["dev"] in terminal and TIE_RULE in terminal
    assert "tie: adamw, lion" in terminal


# ---------------------------------------------------------------------------- sensitivity


def _sweep() -> list[dict]:
    scores = {("adamw", 1e-5): [0.60, 0.64], ("adamw", 1e-4): [0.80, 0.84],
              ("adamw", 1e-3): [0.50, 0.52], ("sgd", 1e-2): [0.55, 0.57],
              ("sgd", 1e-1): [0.70, 0.76]}
    return grid(scores) + grid(scores, task="rt")


def test_sensitivity_lists_each_lr_with_its_seed_spread():
    agg = aggregate(_sweep())
    adamw = agg["sensitivity"]["rte"]["adamw"]
    assert [p["lr"] for p in adamw] == [1e-5, 1e-4, 1e-3]
    assert adamw[1] == {"lr": 1e-4, "n": 2, "mean": pytest.approx(0.82),
                        "std": pytest.approx(0.04 / math.sqrt(2)), "min": 0.80, "max": 0.84}
    terminal = format_terminal(agg)
    assert "LR sensitivity" in terminal
    line = next(ln for ln in terminal.splitlines() if ln.startswith("adamw  ") and "1e-05" in ln)
    assert "[0.0001: 82.0 ± 2.8]" in line and "1e-05: 62.0 ± 2.8" in line
    # SGD's best is its largest LR: the table says its best may lie beyond
    assert "73.0 ± 4.2 @ 0.1 (edge)" in terminal and "widen lr_grid.width" in terminal


def test_sensitivity_figure_has_a_panel_per_task_a_line_per_optimizer_and_is_written(tmp_path):
    agg = aggregate(_sweep())
    panels = sensitivity_panels(agg)
    assert list(panels) == ["RTE", "Rotten Tomatoes"]
    adamw, sgd = panels["RTE"]
    assert (adamw.label, adamw.x) == ("adamw", [1e-5, 1e-4, 1e-3])
    assert adamw.y == pytest.approx([62.0, 82.0, 51.0]) and adamw.lo == pytest.approx([60, 80, 50])
    assert adamw.marks == [(1e-4, pytest.approx(82.0))] and sgd.marks[0][0] == 1e-1
    summary = write_report(tmp_path, _sweep())
    png = tmp_path / "sensitivity.png"
    assert str(png) in summary["files"] and png.read_bytes()[:8] == PNG_MAGIC
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["selection"]["tasks"]["rte"]["chosen"]["sgd"]["learning_rate"] == 0.1
    assert "## LR sensitivity" in (tmp_path / "results.md").read_text()


def test_an_optimizer_keeps_its_colour_in_panels_that_lack_others():
    from lrft.plots import Series, label_styles

    def line(label):
        return Series(label=label, x=[1e-4], y=[0.8])

    styles = label_styles({"SST-2": [line("adamw"), line("muon"), line("sgd")],
                           "IMDB": [line("adamw"), line("sgd")]})  # muon did not run IMDB
    assert styles["sgd"] == ("C2", styles["sgd"][1]) and styles["muon"][0] == "C1"
    assert len(set(styles.values())) == 3


def test_no_lr_axis_draws_no_sensitivity_figure(tmp_path):
    cells = grid({("adamw", 1e-4): [0.8, 0.82], ("lion", 1e-5): [0.7, 0.72]})
    write_report(tmp_path, cells)
    assert (tmp_path / "scores.png").is_file() and not (tmp_path / "sensitivity.png").exists()
    assert "LR sensitivity" not in (tmp_path / "results.md").read_text()


def test_select_is_usable_on_rows_alone():
    rows = aggregate(grid({("a", 1e-4): [0.5, 0.6], ("a", 1e-3): [0.7, 0.8]}))["rows"]
    assert select(rows, ["rte"])["tasks"]["rte"]["chosen"]["a"]["row"] == "a-lr0.001"


def test_a_published_reference_is_printed_beside_the_rows():
    agg = aggregate(grid({("adamw", 5e-5): [0.81, 0.82]}, task="mrpc"), ["mrpc"])
    agg["reference"] = {"name": "run_glue.py bert-base-cased", "scores": {"mrpc": [88.85, 84.07]}}
    for text in (format_markdown(agg), format_terminal(agg)):
        assert "run_glue.py bert-base-cased" in text and "86.5 (88.85/84.07)" in text
