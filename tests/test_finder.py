"""Tests for lrft.finder: one multiplier for all groups, early stop, suggestions, exact restore."""

from __future__ import annotations

import copy
import csv
import math

import numpy as np
import pytest
import torch
from torch import nn

from lrft.finder import RangeTestResult, lr_range_test, save_range_test_csv
from lrft.plots import plot_range_test

BODY_LR, HEAD_LR = 1e-3, 1e-2  # two groups, a head at 10x the body
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _groups(model: nn.Module, head_prefix: str, body_lr: float, head_lr: float) -> list[dict]:
    """Two param groups in the shared format: "head" (names starting with head_prefix), "body"."""
    named = list(model.named_parameters())
    head = [(n, p) for n, p in named if n.startswith(head_prefix)]
    body = [(n, p) for n, p in named if not n.startswith(head_prefix)]
    return [
        {"params": [p for _, p in body], "lr": body_lr, "weight_decay": 0.0, "name": "body",
         "param_names": [n for n, _ in body]},
        {"params": [p for _, p in head], "lr": head_lr, "weight_decay": 0.0, "name": "head",
         "param_names": [n for n, _ in head]},
    ]


def _regression(optimizer_cls=torch.optim.SGD):
    """A small MLP on a linear regression problem: 4 batches of 16, two groups, SGD by default."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    x = torch.randn(64, 8)
    y = x @ torch.randn(8, 1) + 0.01 * torch.randn(64, 1)
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    optimizer = optimizer_cls(_groups(model, "2.", BODY_LR, HEAD_LR), lr=BODY_LR)
    return model, optimizer, batches


def _recording_mse(optimizer, seen: list):
    """An MSE loss_fn that also records every group's LR at each step (group name -> lr)."""
    def loss_fn(model, batch):
        seen.append({g["name"]: g["lr"] for g in optimizer.param_groups})
        x, y = batch
        return nn.functional.mse_loss(model(x), y)
    return loss_fn


def _state_copy(model, optimizer):
    return copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())


def _assert_same(a, b):
    """Recursive equality of state dicts, tensors compared exactly."""
    if torch.is_tensor(a):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


def test_one_multiplier_keeps_group_ratio_and_ramps_geometrically():
    model, optimizer, batches = _regression()
    seen: list[dict] = []
    result = lr_range_test(model, optimizer, batches, loss_fn=_recording_mse(optimizer, seen),
                           num_steps=40, end_mult=1.0)
    assert len(seen) == len(result.losses) == 40  # 4 batches, cycled
    ratios = [s["head"] / s["body"] for s in seen]
    np.testing.assert_allclose(ratios, HEAD_LR / BODY_LR, rtol=1e-12)
    np.testing.assert_allclose([s["head"] for s in seen], result.lrs)  # reported on HEAD_LR
    assert result.base_lr == HEAD_LR and result.group_base_lrs == {"body": BODY_LR, "head": HEAD_LR}
    assert np.all(np.diff(result.lrs) > 0)
    np.testing.assert_allclose(np.diff(np.log(result.lrs)), math.log(1e3) / 39)  # geometric
    assert result.lrs[0] == pytest.approx(HEAD_LR * 1e-3)
    assert not result.stopped_early


def test_linear_mode_and_explicit_base_lr():
    model, optimizer, batches = _regression()
    seen: list[dict] = []
    result = lr_range_test(model, optimizer, batches, loss_fn=_recording_mse(optimizer, seen),
                           num_steps=10, start_mult=0.1, end_mult=1.0, mode="linear", base_lr=5e-3)
    np.testing.assert_allclose(np.diff(result.lrs), 5e-3 * 0.1)  # evenly spaced
    np.testing.assert_allclose([s["body"] for s in seen], BODY_LR * np.array(result.multipliers))


def test_divergence_stops_early_and_suggestions_lie_before_the_blow_up():
    model, optimizer, batches = _regression()
    result = lr_range_test(model, optimizer, batches, loss_fn=_recording_mse(optimizer, []),
                           num_steps=60)
    assert result.stopped_early and len(result.losses) < 60
    smoothed = np.array(result.smoothed)
    assert not np.isfinite(smoothed[-1]) or smoothed[-1] > 4 * np.nanmin(smoothed)
    blow_up = result.lrs[-1]
    for lr in (result.suggestion_steepest, result.suggestion_min_div10):
        assert result.lrs[0] <= lr <= blow_up
    assert result.suggestion_steepest < blow_up
    i_min = int(np.nanargmin(smoothed))
    assert result.suggestion_min_div10 == pytest.approx(result.lrs[i_min] / 10)
    assert result.losses[i_min] < result.losses[0]  # the curve did come down before blowing up


def test_non_finite_loss_stops_at_once():
    model, optimizer, batches = _regression()
    calls = []

    def loss_fn(model, batch):
        calls.append(1)
        x, y = batch
        loss = nn.functional.mse_loss(model(x), y)
        return loss * float("nan") if len(calls) == 8 else loss

    result = lr_range_test(model, optimizer, batches, loss_fn=loss_fn, num_steps=30)
    assert result.stopped_early and len(result.losses) == 8 and math.isnan(result.losses[-1])


def test_model_optimizer_lrs_and_rng_are_restored_exactly():
    model, optimizer, batches = _regression(torch.optim.AdamW)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.1)  # sets initial_lr
    x, y = batches[0]
    nn.functional.mse_loss(model(x), y).backward()
    optimizer.step()  # so AdamW has state to restore
    optimizer.zero_grad()
    scheduler.step()
    before = _state_copy(model, optimizer)
    lrs_before = [(g["lr"], g["initial_lr"]) for g in optimizer.param_groups]
    rng_before = torch.get_rng_state()
    seen: list[dict] = []
    result = lr_range_test(model, optimizer, batches, loss_fn=_recording_mse(optimizer, seen),
                           num_steps=20)
    _assert_same(before, _state_copy(model, optimizer))
    assert [(g["lr"], g["initial_lr"]) for g in optimizer.param_groups] == lrs_before
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert result.lrs[0] == pytest.approx(HEAD_LR * 1e-3)  # from initial_lr, not the scaled lr
    assert seen[0]["head"] == pytest.approx(HEAD_LR * 1e-3)


def test_frozen_weights_and_buffers_lora_style():
    """Only trainable params and buffers (BatchNorm statistics) move; all come back exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 1))
    model[0].requires_grad_(False)  # a frozen base, as under LoRA
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([
        {"params": [p for n, p in trainable if n.startswith("1.")], "lr": BODY_LR,
         "name": "norm"},
        {"params": [p for n, p in trainable if n.startswith("3.")], "lr": HEAD_LR,
         "name": "head"}])
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    before = _state_copy(model, optimizer)
    result = lr_range_test(model, optimizer, [(x, y)], num_steps=15,
                           loss_fn=lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]))
    assert len(result.losses) > 1
    _assert_same(before, _state_copy(model, optimizer))  # incl. running_mean, num_batches_tracked


def _tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, num_labels=2)
    model = BertForSequenceClassification(config)
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(1, 64, (8, 12), generator=g),
                "attention_mask": torch.ones(8, 12, dtype=torch.long),
                "labels": torch.randint(0, 2, (8,), generator=g)} for _ in range(3)]
    return model, batches


def test_bert_default_loss_keeps_ratio_and_restores_fresh_optimizer():
    model, batches = _tiny_bert()
    optimizer = torch.optim.AdamW(_groups(model, "classifier.", 2e-5, 2e-4))
    seen: list[dict] = []
    optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: seen.append({g["name"]: g["lr"] for g in opt.param_groups}))
    model.eval()
    before = _state_copy(model, optimizer)
    result = lr_range_test(model, optimizer, batches, num_steps=12)  # model(**batch).loss
    assert len(seen) == 12 and all(np.isfinite(result.losses))
    np.testing.assert_allclose([s["head"] / s["body"] for s in seen], 10.0, rtol=1e-12)
    _assert_same(before, _state_copy(model, optimizer))  # AdamW state empty again
    assert not model.training  # mode restored


def test_plot_and_csv(tmp_path):
    model, optimizer, batches = _regression()
    result = lr_range_test(model, optimizer, batches, loss_fn=_recording_mse(optimizer, []),
                           num_steps=60, output_dir=tmp_path / "find")
    for path in (tmp_path / "find" / "lr_range_test.png",
                 plot_range_test(result, tmp_path / "again.png", current_lr=HEAD_LR)):
        assert path.read_bytes()[:8] == PNG_MAGIC
    rows = list(csv.DictReader(save_range_test_csv(result, tmp_path / "curve.csv").open()))
    assert len(rows) == len(result.losses)
    assert float(rows[3]["lr_body"]) == pytest.approx(BODY_LR * result.multipliers[3])
    assert float(rows[3]["lr"]) == pytest.approx(result.lrs[3])
    assert (tmp_path / "find" / "lr_range_test.csv").exists()


@pytest.fixture
def accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(reset_partial_state=True)  # other tests build their own


def test_accelerator_single_process(accelerator, tmp_path):
    model, optimizer, batches = _regression()
    dataset = torch.utils.data.TensorDataset(torch.cat([b[0] for b in batches]),
                                             torch.cat([b[1] for b in batches]))
    loader = torch.utils.data.DataLoader(dataset, batch_size=16)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    before = _state_copy(model, optimizer)
    result = lr_range_test(model, optimizer, loader, loss_fn=_recording_mse(optimizer, []),
                           num_steps=60, max_grad_norm=1.0, accelerator=accelerator,
                           output_dir=tmp_path)
    assert isinstance(result, RangeTestResult) and len(result.losses) > 10
    _assert_same(before, _state_copy(model, optimizer))
    assert (tmp_path / "lr_range_test.png").exists()


@pytest.mark.parametrize("kwargs", [{"mode": "cosine"}, {"start_mult": 10.0, "end_mult": 1.0},
                                    {"smooth": 1.0}, {"num_steps": 1}])
def test_bad_arguments_raise(kwargs):
    model, optimizer, batches = _regression()
    with pytest.raises(ValueError, match="lr_range_test"):
        lr_range_test(model, optimizer, batches, loss_fn=_recording_mse(optimizer, []), **kwargs)


# ---- `lrft find-lr` on a recipe: the real model, data, groups and optimizer ------------------

def _find_lr_recipe(tmp_path, tiny_bert, tiny_glue):
    from conftest import bert_recipe, write_recipe

    recipe = bert_recipe(tiny_bert, tiny_glue, tmp_path / "run")
    recipe["optim"]["layer_decay"] = 0.5
    recipe["optim"]["head_lr_scale"] = 2.0
    return write_recipe(tmp_path / "bert.yaml", recipe)


def test_find_lr_cli_writes_curve_and_new_recipe(tmp_path, tiny_bert, tiny_glue, capsys):
    from lrft.cli import main
    from lrft.recipe import load_recipe

    path = _find_lr_recipe(tmp_path, tiny_bert, tiny_glue)
    original = path.read_text()
    assert main(["find-lr", str(path), "train.seed=3", "--num_steps", "20", "--apply"]) == 0
    shown = capsys.readouterr().out
    assert "recipe's optim.learning_rate  3.00e-03" in shown and "min loss / 10" in shown
    out = tmp_path / "run" / "find_lr"
    assert (out / "lr_range_test.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = (out / "lr_range_test.csv").read_text().splitlines()
    assert len(rows) == 21  # header + one row per step
    assert path.read_text() == original  # never over the original
    (written,) = tmp_path.glob("bert.lr-*.yaml")
    new = load_recipe(written)
    assert new.train.seed == 3  # the CLI's overrides carry over
    assert new.optim.layer_decay == 0.5  # and the rest through base:
    assert f"{new.optim.learning_rate:.2e}" in shown
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # a range test is not a run


@pytest.mark.slow
def test_find_lr_under_two_processes(tmp_path, tiny_bert, tiny_glue):
    """Two CPU processes: losses averaged across ranks, one curve written by the main process."""
    import os
    import subprocess
    import sys

    path = _find_lr_recipe(tmp_path, tiny_bert, tiny_glue)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
           "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "lrft.cli", "find-lr", str(path), "train.per_device_train_batch_size=4",
           "--num_steps", "12"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("LR range test:") == 1  # printed once, by the main process
    rows = (tmp_path / "run" / "find_lr" / "lr_range_test.csv").read_text().splitlines()
    assert len(rows) == 13
