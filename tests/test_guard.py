"""The divergence guard's decisions and its rollback, on a tiny model without the training loop."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from lrft.guard import MIN_HISTORY, DivergenceGuard
from lrft.recipe import GuardConfig


def _setup(action="rollback", snapshot_steps=2, max_rollbacks=2):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    groups = [{"params": list(model[0].parameters()), "lr": 1e-2, "name": "backbone"},
              {"params": list(model[1].parameters()), "lr": 1e-1, "name": "head"}]
    optimizer = torch.optim.AdamW(groups)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    cfg = GuardConfig(enabled=True, action=action, snapshot_steps=snapshot_steps,
                      max_rollbacks=max_rollbacks, window=10)
    state = SimpleNamespace(lr_scale=1.0, rollbacks=0)
    return model, optimizer, scheduler, DivergenceGuard(cfg, model, optimizer, scheduler, state)


def _train_step(model, optimizer):
    x = torch.randn(8, 4)
    loss = model(x).pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def test_healthy_steps_pass():
    _, _, _, guard = _setup()
    assert all(guard.check(s, 1.0 - 0.01 * s, 1.0) == "ok" for s in range(1, 30))
    assert guard.drain_events() == []


@pytest.mark.parametrize("loss, grad, event", [
    (float("nan"), 1.0, "nan_loss"), (float("inf"), 1.0, "nan_loss"),
    (1.0, float("nan"), "nan_grad"), (50.0, 1.0, "loss_spike"), (1.0, 500.0, "grad_spike")])
def test_each_problem_is_detected(loss, grad, event):
    _, _, _, guard = _setup()
    for s in range(1, MIN_HISTORY + 2):
        assert guard.check(s, 1.0, 1.0) == "ok"
    assert guard.check(MIN_HISTORY + 2, loss, grad) == "rollback"
    assert guard.drain_events()[0]["event"] == event


def test_no_spike_verdict_without_history():
    _, _, _, guard = _setup()
    assert guard.check(1, 1.0, 1.0) == "ok"
    assert guard.check(2, 100.0, 1.0) == "ok"  # two losses are no baseline
    assert guard.check(3, float("nan"), 1.0) == "rollback"  # but NaN always is


def test_skip_action():
    _, _, _, guard = _setup(action="skip")
    assert guard.check(1, float("nan"), 1.0) == "skip"
    assert [e["event"] for e in guard.drain_events()] == ["nan_loss", "skip"]


def test_rollback_restores_snapshot_and_backs_off_lr_keeping_ratios():
    model, optimizer, scheduler, guard = _setup(snapshot_steps=2)
    for step in range(1, 4):  # snapshot taken when step 3 is checked: weights after step 2
        assert guard.check(step, 1.0, 1.0) == "ok"
        _train_step(model, optimizer)
    good = {n: p.detach().clone() for n, p in model.named_parameters()}
    # the state after step 3 is not the snapshot; wreck the weights as a divergence would
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e3)
    assert guard.check(4, float("nan"), 1.0) == "rollback"
    guard.rollback()
    assert guard.snapshot_step == 2
    for n, p in model.named_parameters():
        assert not torch.equal(p, good[n] + 1e3)
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs == pytest.approx({"backbone": 5e-3, "head": 5e-2})
    assert scheduler.base_lrs == pytest.approx([5e-3, 5e-2])
    assert guard.state.rollbacks == 1 and guard.state.lr_scale == 0.5
    scheduler.step()  # the schedule keeps the backoff
    assert optimizer.param_groups[1]["lr"] == pytest.approx(5e-2)


def test_rollback_returns_exact_snapshot_weights():
    model, optimizer, _, guard = _setup(snapshot_steps=1)
    assert guard.check(1, 1.0, 1.0) == "ok"
    _train_step(model, optimizer)
    assert guard.check(2, 1.0, 1.0) == "ok"  # snapshot of the weights after step 1
    after_1 = {n: p.detach().clone() for n, p in model.named_parameters()}
    state_1 = optimizer.state_dict()["state"][0]["exp_avg"].clone()
    _train_step(model, optimizer)
    assert guard.check(3, float("inf"), 1.0) == "rollback"
    guard.rollback()
    for n, p in model.named_parameters():
        assert torch.equal(p, after_1[n])
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], state_1)


def test_stops_after_max_rollbacks():
    _, _, _, guard = _setup(max_rollbacks=2)
    verdicts = []
    for step in range(1, 4):
        verdicts.append(guard.check(step, float("nan"), 1.0))
        if verdicts[-1] == "rollback":
            guard.rollback()
    assert verdicts == ["rollback", "rollback", "stop"]
    assert math.isclose(guard.state.lr_scale, 0.25)
    assert guard.drain_events()[-1]["event"] == "stop"


# ---- in a real training run: inject a NaN batch, force a huge LR; the run must recover -----

def _inject(monkeypatch, nan_at_call=None, huge_lr_at_step=None):
    """Patch the tiny BERT's forward (NaN loss on one training call) and the schedule (x1e3 LR)."""
    import transformers

    import lrft.schedule

    forward = transformers.BertForSequenceClassification.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] == nan_at_call:
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(transformers.BertForSequenceClassification, "forward", poisoned)
    build = lrft.schedule.build_scheduler

    def spiking(*args, **kwargs):
        scheduler = build(*args, **kwargs)
        scheduler.lr_lambdas = [
            (lambda s, f=f: f(s) * (1e3 if s == huge_lr_at_step else 1.0))
            for f in scheduler.lr_lambdas]
        return scheduler

    monkeypatch.setattr(lrft.schedule, "build_scheduler", spiking)


def _run(tmp_path, tiny_bert, tiny_glue, guard: dict | None):
    import json

    from conftest import bert_recipe, write_recipe
    from lrft.train import train

    recipe = bert_recipe(tiny_bert, tiny_glue, tmp_path / "run", max_steps=60, eval_steps=None)
    if guard:
        recipe["guard"] = {"enabled": True, **guard}
    results = train(write_recipe(tmp_path / "r.yaml", recipe))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    return results, records


def test_guard_recovers_from_nan_batch_and_lr_spike(tmp_path, tiny_bert, tiny_glue, monkeypatch):
    _inject(monkeypatch, nan_at_call=15, huge_lr_at_step=30)
    results, records = _run(tmp_path, tiny_bert, tiny_glue,
                            {"action": "rollback", "snapshot_steps": 5, "max_rollbacks": 4})
    events = [r["event"] for r in records if r["kind"] == "guard"]
    assert "nan_loss" in events and "rollback" in events
    assert any(e in events for e in ("loss_spike", "grad_spike"))  # the x1e3 LR step
    assert results["status"] == "completed" and results["step"] == 60
    assert results["rollbacks"] >= 2 and results["lr_scale"] < 1.0
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert all(math.isfinite(x) for x in losses[-10:])
    assert results["final"]["validation"]["accuracy"] >= 0.9


def test_without_guard_the_same_nan_ruins_the_run(tmp_path, tiny_bert, tiny_glue, monkeypatch):
    _inject(monkeypatch, nan_at_call=15)
    results, records = _run(tmp_path, tiny_bert, tiny_glue, guard=None)
    assert not any(r["kind"] == "guard" for r in records)
    assert math.isnan(results["final"]["validation"]["eval_loss"])  # NaN weights from step 15 on
    assert results["final"]["validation"]["accuracy"] <= 0.6


def test_guard_skip_action_drops_the_nan_step(tmp_path, tiny_bert, tiny_glue, monkeypatch):
    _inject(monkeypatch, nan_at_call=15)
    results, records = _run(tmp_path, tiny_bert, tiny_glue, {"action": "skip"})
    events = [r["event"] for r in records if r["kind"] == "guard"]
    assert events == ["nan_loss", "skip"]
    assert results["status"] == "completed" and results["final"]["validation"]["accuracy"] >= 0.9
