"""Tests for lrft.doctor: synthetic curves of each kind get the right verdict and overrides."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lrft import doctor
from lrft.doctor import Diagnosis, diagnose, format_diagnosis, plot_diagnosis, read_metrics

LR = 5e-5  # the run's optim.learning_rate in every synthetic start record
LOG_EVERY = 10  # optimizer steps between train records
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _records(losses, *, grad_norms=None, evals=(), warmup=0, guards=(), status="completed",
             lr_mult=None):
    """A metrics.jsonl record list: start, one train record per loss, evals, guards, end.

    Two groups, backbone at LR and head at 10x LR, times lr_mult(fraction) (constant by default).
    """
    n = len(losses)
    grad_norms = np.ones(n) if grad_norms is None else grad_norms
    scales = {"backbone": 1.0, "head": 10.0}
    records = [{"kind": "start", "time": 0.0, "num_training_steps": n * LOG_EVERY,
                "groups": {k: LR * s for k, s in scales.items()}, "learning_rate": LR,
                "optimizer": "adamw", "lr_scheduler_type": "constant", "warmup_steps": warmup,
                "effective_batch_size": 32}]
    for i, (loss, norm) in enumerate(zip(losses, grad_norms), 1):
        mult = lr_mult(i / n) if lr_mult else 1.0
        records.append({"kind": "train", "step": i * LOG_EVERY, "epoch": i / n,
                        "loss": float(loss), "lr": {k: LR * s * mult for k, s in scales.items()},
                        "grad_norm": float(norm), "samples_per_s": 50.0, "tokens_per_s": 3000.0,
                        "time": float(i)})
    for step, eval_loss, acc in evals:
        records.append({"kind": "eval", "step": step, "epoch": step / (n * LOG_EVERY),
                        "metrics": {"eval_loss": eval_loss, "accuracy": acc},
                        "main_metric": "accuracy", "higher_is_better": True})
    records += list(guards)
    records.append({"kind": "end", "step": n * LOG_EVERY, "status": status})
    return records


def _healthy_losses(n=60, noise=0.05, seed=0):
    rng = np.random.default_rng(seed)
    i = np.arange(n)
    return (0.1 + 0.6 * np.exp(-i / 15)) * (1 + noise * rng.standard_normal(n))


def _grad_norms(n=60, seed=1):
    return np.exp(0.2 * np.random.default_rng(seed).standard_normal(n))  # ~1, no spikes


def _lr_override(d: Diagnosis) -> float:
    (value,) = [o.split("=", 1)[1] for o in d.overrides if o.startswith("optim.learning_rate=")]
    return float(value)


def test_healthy_run():
    evals = [(100 * k, 0.6 - 0.05 * k, 0.6 + 0.04 * k) for k in range(1, 7)]
    d = diagnose(_records(_healthy_losses(), grad_norms=_grad_norms(), evals=evals))
    assert d.verdict == "healthy", d
    assert d.overrides == [] and d.region is None and d.learning_rate == LR


def test_converged_run_with_hard_batches_at_constant_lr_stays_healthy():
    """Near zero loss, hard batches make big relative jumps in loss and grad norm: not a problem."""
    rng = np.random.default_rng(8)
    n = 120
    losses = (0.01 + 0.7 * np.exp(-np.arange(n) / 10)) * np.exp(0.5 * rng.standard_normal(n))
    norms = np.maximum(0.05, 3 * np.exp(-np.arange(n) / 10)) * np.exp(0.5 * rng.standard_normal(n))
    hard = rng.choice(np.arange(40, n), size=6, replace=False)
    losses[hard] *= 6
    norms[hard] *= 6
    d = diagnose(_records(losses, grad_norms=norms))
    assert d.verdict == "healthy", d


def test_tiny_rise_near_zero_loss_is_not_exploding():
    losses = np.concatenate([np.geomspace(0.7, 0.01, 30), np.full(30, 0.01),
                             np.linspace(0.01, 0.03, 30)])
    d = diagnose(_records(losses, grad_norms=_grad_norms(90)))
    assert d.verdict == "healthy", d  # ~3x its minimum, but only 3% of the initial loss


def test_nan_loss_is_diverged_and_lr_divided_by_ten():
    losses = np.concatenate([_healthy_losses(30), [np.nan, np.inf, np.nan]])
    d = diagnose(_records(losses, grad_norms=_grad_norms(33)))
    assert d.verdict == "diverged"
    assert _lr_override(d) == pytest.approx(LR / doctor.DIVERGED_LR_DIVISOR, rel=1e-3)
    assert f"schedule.warmup_ratio={doctor.WARMUP_RATIO}" in d.overrides  # the run had none
    assert d.region == (30 * LOG_EVERY, 33 * LOG_EVERY)  # from the last finite loss
    assert "step 310" in d.evidence[0]


def test_loss_blowing_up_is_diverged_without_warmup_override_when_run_had_warmup():
    rng = np.random.default_rng(2)
    losses = np.concatenate([np.full(10, 0.7), 0.7 * np.exp(np.linspace(0, 2.5, 30))])
    losses *= 1 + 0.02 * rng.standard_normal(40)
    d = diagnose(_records(losses, grad_norms=_grad_norms(40), warmup=20))
    assert d.verdict == "diverged"
    assert _lr_override(d) == pytest.approx(LR / 10, rel=1e-3)
    assert not any(o.startswith("schedule.warmup") for o in d.overrides)


def test_batch_scaled_lr_turns_scaling_off_in_the_override():
    records = _records(np.concatenate([_healthy_losses(20), [np.nan]]))
    records[0]["lr_note"] = "2 processes x 32 x 1 = 64 vs reference 32: lr 5e-05 -> 0.0001"
    d = diagnose(records)
    assert _lr_override(d) == pytest.approx(LR / 10) and "optim.scale_lr=none" in d.overrides


def test_guard_stop_is_diverged():
    guards = [{"kind": "guard", "step": 200, "event": "stop", "detail": "3 rollbacks",
               "lr_scale": 0.125}]
    d = diagnose(_records(_healthy_losses(20), guards=guards, status="stopped"))
    assert d.verdict == "diverged"
    assert any("guard stopped" in e for e in d.evidence)
    assert d.region == (200, 200)


def test_grad_norm_spikes_are_exploding():
    norms = _grad_norms()
    spikes = [15, 22, 31, 40, 47, 55]
    norms[spikes] = 20.0
    d = diagnose(_records(_healthy_losses(), grad_norms=norms))
    assert d.verdict == "exploding", d
    assert _lr_override(d) == pytest.approx(LR / doctor.EXPLODING_LR_DIVISOR, rel=1e-3)
    assert f"train.max_grad_norm={doctor.CLIP_NORM}" in d.overrides
    assert d.region == ((spikes[0] + 1) * LOG_EVERY, (spikes[-1] + 1) * LOG_EVERY)


def test_loss_rising_at_high_lr_is_exploding():
    rng = np.random.default_rng(3)
    losses = np.concatenate([np.linspace(0.7, 0.3, 30), np.linspace(0.3, 0.9, 30)])
    losses *= 1 + 0.02 * rng.standard_normal(60)
    d = diagnose(_records(losses, grad_norms=_grad_norms()))
    assert d.verdict == "exploding", d
    assert any("rose from" in e for e in d.evidence)


def test_loss_rising_after_lr_decayed_is_not_blamed_on_the_lr():
    losses = np.concatenate([np.linspace(0.7, 0.3, 30), np.linspace(0.3, 0.9, 30)])
    d = diagnose(_records(losses, lr_mult=lambda f: 1.0 if f < 0.4 else 0.01))
    assert d.verdict != "exploding"


@pytest.mark.parametrize("shape", ["periodic", "random"])
def test_bouncing_loss_is_oscillating_and_lr_divided_by_three(shape):
    rng = np.random.default_rng(4)
    if shape == "periodic":
        losses = 0.6 + 0.2 * np.sin(2.1 * np.arange(60)) + 0.05 * rng.standard_normal(60)
    else:
        losses = 0.6 * (1 + 0.3 * rng.standard_normal(60))
    d = diagnose(_records(losses, grad_norms=_grad_norms()))
    assert d.verdict == "oscillating", d
    assert _lr_override(d) == pytest.approx(LR / doctor.OSC_LR_DIVISOR, rel=1e-2)
    assert d.region == (31 * LOG_EVERY, 60 * LOG_EVERY)


def test_flat_loss_is_stalled_and_lr_raised():
    rng = np.random.default_rng(5)
    losses = 0.693 * (1 - 0.01 * np.linspace(0, 1, 60)) + 0.004 * rng.standard_normal(60)
    d = diagnose(_records(losses, grad_norms=_grad_norms()))
    assert d.verdict == "stalled", d
    assert _lr_override(d) == pytest.approx(LR * doctor.STALL_LR_FACTOR, rel=1e-2)
    assert "Caution" not in d.advice  # 5e-5 is a normal fine-tuning LR


def test_flat_chance_loss_after_an_early_bump_is_a_collapse_not_a_stall():
    """Shaped like a real MiniLM run at LR 3e-3: a jump, then flat at ln 2 (label prior)."""
    rng = np.random.default_rng(10)
    losses = np.log(2) + 0.003 * rng.standard_normal(40)
    losses[2:8] += [0.10, 0.06, 0.03, -0.01, 0.08, 0.02]
    d = diagnose(_records(losses, warmup=5))
    assert d.verdict == "diverged", d
    assert _lr_override(d) == pytest.approx(LR / doctor.DIVERGED_LR_DIVISOR, rel=1e-3)
    assert any("ln 2" in e for e in d.evidence)
    assert d.region == (3 * LOG_EVERY, 40 * LOG_EVERY)


def test_flat_loss_at_a_high_lr_warns_of_collapse(monkeypatch):
    losses = np.full(30, 0.6931) + 0.001 * np.random.default_rng(9).standard_normal(30)
    monkeypatch.setattr(doctor, "STALL_CAUTION_LR", LR / 2)  # as if the run's LR were high
    d = diagnose(_records(losses))
    assert d.verdict == "stalled" and "collapsed" in d.advice


def test_guard_nan_events_are_exploding():
    guards = [{"kind": "guard", "step": 150, "event": "nan_loss", "detail": "loss=nan",
               "lr_scale": 1.0},
              {"kind": "guard", "step": 150, "event": "rollback", "detail": "to step 100",
               "lr_scale": 0.5}]
    d = diagnose(_records(_healthy_losses(), grad_norms=_grad_norms(), guards=guards))
    assert d.verdict == "exploding" and d.region == (150, 150)


def test_without_start_record_no_lr_override_is_invented():
    records = [r for r in _records(_healthy_losses(30), grad_norms=_grad_norms(30))
               if r["kind"] != "start"] + [{"kind": "train", "step": 310, "loss": float("nan")}]
    d = diagnose(records)
    assert d.verdict == "diverged" and d.learning_rate is None
    assert not any(o.startswith("optim.learning_rate") for o in d.overrides)
    assert "unknown" in d.advice


def test_rising_eval_loss_with_falling_train_loss_is_overfitting():
    eval_losses = [0.6, 0.5, 0.45, 0.42, 0.44, 0.47, 0.5, 0.55]
    accs = [0.7, 0.75, 0.78, 0.8, 0.79, 0.78, 0.77, 0.76]
    evals = [(75 * (k + 1), v, a) for k, (v, a) in enumerate(zip(eval_losses, accs))]
    d = diagnose(_records(_healthy_losses(), grad_norms=_grad_norms(), evals=evals))
    assert d.verdict == "overfitting", d
    assert _lr_override(d) == pytest.approx(LR / doctor.OVERFIT_LR_DIVISOR, rel=1e-3)
    assert f"optim.weight_decay={doctor.OVERFIT_WEIGHT_DECAY}" in d.overrides
    assert "train.max_steps=300" in d.overrides  # the best evaluation
    assert d.region == (300, 600)


def test_overfitting_on_the_main_split_of_several_eval_splits():
    """MNLI-style evals log <split>_eval_loss; the doctor watches the main metric's split."""
    evals = [(75 * (k + 1), v, 0.8) for k, v in enumerate([0.6, 0.5, 0.42, 0.45, 0.5, 0.55])]
    records = _records(_healthy_losses(), grad_norms=_grad_norms(), evals=evals)
    for rec in (r for r in records if r["kind"] == "eval"):
        loss = rec["metrics"]["eval_loss"]
        rec["metrics"] = {"m_eval_loss": loss, "m_accuracy": 0.8, "mm_eval_loss": 0.3,
                          "mm_accuracy": 0.8}
        rec["main_metric"] = "m_accuracy"
    d = diagnose(records)
    assert d.verdict == "overfitting" and d.evidence[0].startswith("m_eval_loss")


def test_few_evals_worse_is_not_overfitting():
    evals = [(100, 0.5, 0.7), (200, 0.45, 0.75), (300, 0.46, 0.74)]
    d = diagnose(_records(_healthy_losses(), grad_norms=_grad_norms(), evals=evals))
    assert d.verdict == "healthy"


def test_too_few_records_is_insufficient_data():
    d = diagnose(_records([0.7, 0.6, 0.5]))
    assert d.verdict == "insufficient_data"
    assert d.overrides == []


def test_smooth_loss_is_the_debiased_ema():
    x = np.random.default_rng(6).standard_normal(20)
    beta, avg, expected = 0.9, 0.0, []
    for i, v in enumerate(x, 1):
        avg = beta * avg + (1 - beta) * v
        expected.append(avg / (1 - beta**i))
    np.testing.assert_allclose(doctor.smooth_loss(x, beta), expected)
    np.testing.assert_allclose(doctor.smooth_loss(np.full(5, 2.0)), 2.0)  # no startup bias


def _write(path, records, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def test_read_metrics_skips_truncated_last_line(tmp_path):
    records = _records(_healthy_losses(), grad_norms=_grad_norms())
    _write(tmp_path / "metrics.jsonl", records, tail='{"kind": "train", "step": 61')
    with pytest.warns(UserWarning, match="truncated"):
        assert read_metrics(tmp_path) == records
    with pytest.warns(UserWarning):
        assert diagnose(tmp_path).verdict == "healthy"


def test_read_metrics_skips_a_corrupt_middle_line_and_rejects_non_jsonl(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "start"}\n{"kind": "tr{"kind": "end"}\n{"kind": "end"}\n')
    with pytest.warns(UserWarning, match=":2: skipping a corrupt line"):
        assert read_metrics(path) == [{"kind": "start"}, {"kind": "end"}]
    path.write_text("step,loss\n1,0.7\n")
    with pytest.raises(ValueError, match="not a metrics.jsonl"), pytest.warns(UserWarning):
        read_metrics(path)


def test_plot_diagnosis_writes_png(tmp_path):
    evals = [(75 * (k + 1), v, 0.8) for k, v in enumerate([0.6, 0.5, 0.42, 0.45, 0.5, 0.55])]
    losses = np.concatenate([_healthy_losses(40), [np.nan]])
    records = _records(losses, evals=evals, lr_mult=lambda f: min(1.0, 5 * f))
    d = diagnose(records)
    out = plot_diagnosis(records, d, tmp_path / "plots" / "doctor.png")
    assert d.region is not None
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_format_diagnosis_gives_a_ready_command():
    d = diagnose(_records(np.concatenate([_healthy_losses(20), [np.nan]])))
    text = format_diagnosis(d, recipe="recipes/bert/standard.yaml")
    assert text.startswith("LR doctor: DIVERGED")
    assert "lrft train recipes/bert/standard.yaml optim.learning_rate=5e-06" in text
    assert all(f"  - {e}" in text for e in d.evidence)


def test_diagnose_run_prints_and_plots(tmp_path, capsys):
    losses = np.concatenate([_healthy_losses(20), [np.nan]])
    _write(tmp_path / "metrics.jsonl", _records(losses))
    (tmp_path / "recipe.yaml").write_text("optim:\n  learning_rate: 5.0e-5\n")
    assert doctor.diagnose_run(tmp_path) == 0
    out = capsys.readouterr().out
    assert "LR doctor: DIVERGED" in out
    assert f"lrft train {tmp_path / 'recipe.yaml'} optim.learning_rate=5e-06" in out
    assert (tmp_path / "doctor.png").read_bytes()[:8] == PNG_MAGIC
