"""Tests for lrft.doctor's rules: synthetic runs of each kind, written as the training loop writes
them (`lrft.runlog.MetricsLog`) and read back through `lrft.runlog.read_log`, get the right
verdict, evidence, region and overrides.

The synthetic-run builders here are shared by tests/test_doctor_*.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from lrft import doctor
from lrft.doctor import Diagnosis, diagnose, format_diagnosis, plot_diagnosis, read_curves
from lrft.doctor import thresholds as T
from lrft.runlog import METRICS_FILE, MetricsLog

LR = 5e-5  # the run's optim.learning_rate in every synthetic start record
LOG_EVERY = 10  # optimizer steps between train records
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
GROUP_SCALES = {"backbone": 1.0, "head": 10.0}


def records(losses, *, grad_norms=None, evals=(), warmup=0, guards=(), status="completed",
            lr_mult=None, learning_rate=LR):
    """A metrics.jsonl record list: start, one train record per loss, evals, guards, end.

    Two groups, backbone at the LR and head at 10x, times lr_mult(fraction) (constant by
    default). `evals` holds (step, eval_loss, accuracy) triples, one validation split.
    """
    n = len(losses)
    grad_norms = np.ones(n) if grad_norms is None else grad_norms
    out = [{"kind": "start", "time": 0.0, "num_training_steps": n * LOG_EVERY,
            "groups": {k: learning_rate * s for k, s in GROUP_SCALES.items()},
            "learning_rate": learning_rate, "optimizer": "adamw", "lr_scheduler_type": "constant",
            "warmup_steps": warmup, "effective_batch_size": 32}]
    for i, (loss, norm) in enumerate(zip(losses, grad_norms), 1):
        mult = lr_mult(i / n) if lr_mult else 1.0
        out.append({"kind": "train", "step": i * LOG_EVERY, "epoch": i / n, "loss": float(loss),
                    "lr": {k: learning_rate * s * mult for k, s in GROUP_SCALES.items()},
                    "grad_norm": float(norm), "samples_per_s": 50.0, "tokens_per_s": 3000.0,
                    "time": float(i)})
    for step, eval_loss, acc in evals:
        out.append({"kind": "eval", "step": step, "epoch": step / (n * LOG_EVERY),
                    "splits": {"validation": {"eval_loss": eval_loss, "accuracy": acc}},
                    "score": acc, "score_name": "accuracy", "higher_is_better": True})
    out += list(guards)
    out.append({"kind": "end", "step": n * LOG_EVERY, "status": status})
    return out


def write_run(folder, recs, tail: str = ""):
    """Write records as lrft's training loop does (then `tail`, raw); return the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(folder / METRICS_FILE, enabled=True)
    for rec in recs:
        log.write(rec)
    if tail:
        with (folder / METRICS_FILE).open("a") as f:
            f.write(tail)
    return folder


def healthy_losses(n=60, noise=0.05, seed=0):
    rng = np.random.default_rng(seed)
    i = np.arange(n)
    return (0.1 + 0.6 * np.exp(-i / 15)) * (1 + noise * rng.standard_normal(n))


def grad_norms(n=60, seed=1):
    return np.exp(0.2 * np.random.default_rng(seed).standard_normal(n))  # ~1, no spikes


def lr_change(d: Diagnosis) -> float:
    return float(d.changes["learning_rate"])


@pytest.fixture
def diag(tmp_path):
    """diag(records) -> Diagnosis: the records written to a run folder, then diagnosed."""
    runs = iter(range(1000))

    def run(recs) -> Diagnosis:
        return diagnose(write_run(tmp_path / f"run{next(runs)}", recs))

    return run


def test_healthy_run(diag):
    evals = [(100 * k, 0.6 - 0.05 * k, 0.6 + 0.04 * k) for k in range(1, 7)]
    d = diag(records(healthy_losses(), grad_norms=grad_norms(), evals=evals))
    assert d.verdict == "healthy", d
    assert d.overrides == [] and d.region is None and d.learning_rate == LR


def test_converged_run_with_hard_batches_at_constant_lr_stays_healthy(diag):
    """Near zero loss, hard batches make big relative jumps in loss and grad norm: not a problem."""
    rng = np.random.default_rng(8)
    n = 120
    losses = (0.01 + 0.7 * np.exp(-np.arange(n) / 10)) * np.exp(0.5 * rng.standard_normal(n))
    norms = np.maximum(0.05, 3 * np.exp(-np.arange(n) / 10)) * np.exp(0.5 * rng.standard_normal(n))
    hard = rng.choice(np.arange(40, n), size=6, replace=False)
    losses[hard] *= 6
    norms[hard] *= 6
    d = diag(records(losses, grad_norms=norms))
    assert d.verdict == "healthy", d


def test_tiny_rise_near_zero_loss_is_not_exploding(diag):
    losses = np.concatenate([np.geomspace(0.7, 0.01, 30), np.full(30, 0.01),
                             np.linspace(0.01, 0.03, 30)])
    d = diag(records(losses, grad_norms=grad_norms(90)))
    assert d.verdict == "healthy", d  # ~3x its minimum, but only 3% of the initial loss


def test_nan_loss_is_diverged_and_lr_divided_by_ten(diag):
    losses = np.concatenate([healthy_losses(30), [np.nan, np.inf, np.nan]])
    d = diag(records(losses, grad_norms=grad_norms(33)))
    assert d.verdict == "diverged"
    assert lr_change(d) == pytest.approx(LR / T.DIVERGED_LR_DIVISOR, rel=1e-3)
    assert f"schedule.warmup_ratio={T.WARMUP_RATIO}" in d.overrides  # the run had none
    assert d.region == (30 * LOG_EVERY, 33 * LOG_EVERY)  # from the last finite loss
    assert "step 310" in d.evidence[0]


def test_loss_blowing_up_is_diverged_without_warmup_override_when_run_had_warmup(diag):
    rng = np.random.default_rng(2)
    losses = np.concatenate([np.full(10, 0.7), 0.7 * np.exp(np.linspace(0, 2.5, 30))])
    losses *= 1 + 0.02 * rng.standard_normal(40)
    d = diag(records(losses, grad_norms=grad_norms(40), warmup=20))
    assert d.verdict == "diverged"
    assert lr_change(d) == pytest.approx(LR / 10, rel=1e-3)
    assert not any(o.startswith("schedule.warmup") for o in d.overrides)


def test_batch_scaled_lr_turns_scaling_off_in_the_override(diag):
    recs = records(np.concatenate([healthy_losses(20), [np.nan]]))
    recs[0]["lr_note"] = "2 processes x 32 x 1 = 64 vs reference 32: lr 5e-05 -> 0.0001"
    d = diag(recs)
    assert lr_change(d) == pytest.approx(LR / 10) and "optim.scale_lr=none" in d.overrides


def test_guard_stop_is_diverged(diag):
    guards = [{"kind": "guard", "step": 200, "event": "stop", "detail": "3 rollbacks",
               "lr_scale": 0.125}]
    d = diag(records(healthy_losses(20), guards=guards, status="stopped"))
    assert d.verdict == "diverged"
    assert any("guard stopped" in e for e in d.evidence)
    assert d.region == (200, 200)


def test_grad_norm_spikes_are_exploding(diag):
    norms = grad_norms()
    spikes = [15, 22, 31, 40, 47, 55]
    norms[spikes] = 20.0
    d = diag(records(healthy_losses(), grad_norms=norms))
    assert d.verdict == "exploding", d
    assert lr_change(d) == pytest.approx(LR / T.EXPLODING_LR_DIVISOR, rel=1e-3)
    assert f"train.max_grad_norm={T.CLIP_NORM}" in d.overrides
    assert d.region == ((spikes[0] + 1) * LOG_EVERY, (spikes[-1] + 1) * LOG_EVERY)


def test_loss_rising_at_high_lr_is_exploding(diag):
    rng = np.random.default_rng(3)
    losses = np.concatenate([np.linspace(0.7, 0.3, 30), np.linspace(0.3, 0.9, 30)])
    losses *= 1 + 0.02 * rng.standard_normal(60)
    d = diag(records(losses, grad_norms=grad_norms()))
    assert d.verdict == "exploding", d
    assert any("rose from" in e for e in d.evidence)


def test_loss_rising_after_lr_decayed_is_not_blamed_on_the_lr(diag):
    losses = np.concatenate([np.linspace(0.7, 0.3, 30), np.linspace(0.3, 0.9, 30)])
    d = diag(records(losses, lr_mult=lambda f: 1.0 if f < 0.4 else 0.01))
    assert d.verdict != "exploding"


@pytest.mark.parametrize("shape", ["periodic", "random"])
def test_bouncing_loss_is_oscillating_and_lr_divided_by_three(diag, shape):
    rng = np.random.default_rng(4)
    if shape == "periodic":
        losses = 0.6 + 0.2 * np.sin(2.1 * np.arange(60)) + 0.05 * rng.standard_normal(60)
    else:
        losses = 0.6 * (1 + 0.3 * rng.standard_normal(60))
    d = diag(records(losses, grad_norms=grad_norms()))
    assert d.verdict == "oscillating", d
    assert lr_change(d) == pytest.approx(LR / T.OSC_LR_DIVISOR, rel=1e-2)
    assert d.region == (31 * LOG_EVERY, 60 * LOG_EVERY)


def test_flat_loss_is_stalled_and_lr_raised(diag):
    rng = np.random.default_rng(5)
    losses = 0.693 * (1 - 0.01 * np.linspace(0, 1, 60)) + 0.004 * rng.standard_normal(60)
    d = diag(records(losses, grad_norms=grad_norms()))
    assert d.verdict == "stalled", d
    assert lr_change(d) == pytest.approx(LR * T.STALL_LR_FACTOR, rel=1e-2)
    assert "Caution" not in d.advice  # 5e-5 is a normal fine-tuning LR


def test_flat_chance_loss_after_an_early_bump_is_a_collapse_not_a_stall(diag):
    """Shaped like a real MiniLM run at LR 3e-3: a jump, then flat at ln 2 (label prior)."""
    rng = np.random.default_rng(10)
    losses = np.log(2) + 0.003 * rng.standard_normal(40)
    losses[2:8] += [0.10, 0.06, 0.03, -0.01, 0.08, 0.02]
    d = diag(records(losses, warmup=5))
    assert d.verdict == "diverged", d
    assert lr_change(d) == pytest.approx(LR / T.DIVERGED_LR_DIVISOR, rel=1e-3)
    assert any("ln 2" in e for e in d.evidence)
    assert d.region == (3 * LOG_EVERY, 40 * LOG_EVERY)


def test_flat_loss_at_a_high_lr_warns_of_collapse(diag):
    losses = np.full(30, 0.6931) + 0.001 * np.random.default_rng(9).standard_normal(30)
    d = diag(records(losses, learning_rate=2 * T.STALL_CAUTION_LR))
    assert d.verdict == "stalled" and "collapsed" in d.advice


def test_guard_nan_events_are_exploding(diag):
    guards = [{"kind": "guard", "step": 150, "event": "nan_loss", "detail": "loss=nan",
               "lr_scale": 1.0},
              {"kind": "guard", "step": 150, "event": "rollback", "detail": "to step 100",
               "lr_scale": 0.5}]
    d = diag(records(healthy_losses(), grad_norms=grad_norms(), guards=guards))
    assert d.verdict == "exploding" and d.region == (150, 150)


def test_without_start_record_no_lr_override_is_invented(diag):
    recs = [r for r in records(healthy_losses(30), grad_norms=grad_norms(30))
            if r["kind"] not in ("start", "end")] + [{"kind": "train", "step": 310,
                                                      "loss": float("nan")}]
    d = diag(recs)
    assert d.verdict == "diverged" and d.learning_rate is None
    assert "learning_rate" not in d.changes
    assert not any(o.startswith("optim.learning_rate") for o in d.overrides)
    assert "unknown" in d.advice


def test_rising_eval_loss_with_falling_train_loss_is_overfitting(diag):
    eval_losses = [0.6, 0.5, 0.45, 0.42, 0.44, 0.47, 0.5, 0.55]
    accs = [0.7, 0.75, 0.78, 0.8, 0.79, 0.78, 0.77, 0.76]
    evals = [(75 * (k + 1), v, a) for k, (v, a) in enumerate(zip(eval_losses, accs))]
    d = diag(records(healthy_losses(), grad_norms=grad_norms(), evals=evals))
    assert d.verdict == "overfitting", d
    assert lr_change(d) == pytest.approx(LR / T.OVERFIT_LR_DIVISOR, rel=1e-3)
    assert f"optim.weight_decay={T.OVERFIT_WEIGHT_DECAY}" in d.overrides
    assert "train.max_steps=300" in d.overrides  # the best evaluation
    assert d.region == (300, 600)


def test_overfitting_on_the_mean_eval_loss_of_several_eval_splits(diag):
    """MNLI-style evals have a split each; the doctor watches their mean eval loss, as the
    score averages the splits."""
    evals = [(75 * (k + 1), v, 0.8) for k, v in enumerate([0.6, 0.5, 0.42, 0.45, 0.5, 0.55])]
    recs = records(healthy_losses(), grad_norms=grad_norms(), evals=evals)
    for rec in (r for r in recs if r["kind"] == "eval"):
        loss = rec["splits"]["validation"]["eval_loss"]
        rec["splits"] = {"validation_matched": {"eval_loss": loss, "accuracy": 0.8},
                         "validation_mismatched": {"eval_loss": 0.3, "accuracy": 0.8}}
    d = diag(recs)
    assert d.verdict == "overfitting", d
    assert d.evidence[0].startswith("eval_loss (mean of validation_matched, validation_mismatched)"
                                    " was best at step 225")


def test_overfitting_in_an_old_format_log(diag):
    """Logs of earlier lrft versions (flat `metrics`, `main_metric`) are read as before."""
    evals = [(75 * (k + 1), v, 0.8) for k, v in enumerate([0.6, 0.5, 0.42, 0.45, 0.5, 0.55])]
    recs = records(healthy_losses(), grad_norms=grad_norms(), evals=evals)
    for rec in (r for r in recs if r["kind"] == "eval"):
        metrics = rec.pop("splits")["validation"]
        del rec["score"], rec["score_name"]
        rec.update(metrics=metrics, main_metric="accuracy")
    d = diag(recs)
    assert d.verdict == "overfitting" and d.evidence[0].startswith("eval_loss was best at step 225")


def test_falling_score_without_eval_loss_is_overfitting(diag):
    accs = [0.7, 0.75, 0.8, 0.78, 0.77, 0.75]
    evals = [(75 * (k + 1), float("nan"), a) for k, a in enumerate(accs)]
    d = diag(records(healthy_losses(), grad_norms=grad_norms(), evals=evals))
    assert d.verdict == "overfitting" and d.evidence[0].startswith("accuracy was best at step 225")


def test_few_evals_worse_is_not_overfitting(diag):
    evals = [(100, 0.5, 0.7), (200, 0.45, 0.75), (300, 0.46, 0.74)]
    d = diag(records(healthy_losses(), grad_norms=grad_norms(), evals=evals))
    assert d.verdict == "healthy"


def test_too_few_records_is_insufficient_data(diag):
    d = diag(records([0.7, 0.6, 0.5]))
    assert d.verdict == "insufficient_data"
    assert d.overrides == [] and "train.logging_steps" in d.advice


def test_smooth_loss_is_the_debiased_ema():
    x = np.random.default_rng(6).standard_normal(20)
    beta, avg, expected = 0.9, 0.0, []
    for i, v in enumerate(x, 1):
        avg = beta * avg + (1 - beta) * v
        expected.append(avg / (1 - beta**i))
    np.testing.assert_allclose(doctor.smooth_loss(x, beta), expected)
    np.testing.assert_allclose(doctor.smooth_loss(np.full(5, 2.0)), 2.0)  # no startup bias


def test_truncated_last_line_is_skipped_with_a_warning(tmp_path):
    run = write_run(tmp_path, records(healthy_losses(), grad_norms=grad_norms()),
                    tail='{"kind": "train", "step": 61')
    with pytest.warns(UserWarning, match="not a record, skipped"):
        d = diagnose(run)
    assert d.verdict == "healthy"


def test_plot_diagnosis_writes_png(tmp_path):
    evals = [(75 * (k + 1), v, 0.8) for k, v in enumerate([0.6, 0.5, 0.42, 0.45, 0.5, 0.55])]
    losses = np.concatenate([healthy_losses(40), [np.nan]])
    run = write_run(tmp_path / "run", records(losses, evals=evals,
                                              lr_mult=lambda f: min(1.0, 5 * f)))
    d = diagnose(run)
    out = plot_diagnosis(read_curves(run), d, tmp_path / "plots" / "doctor.png")
    assert d.region is not None
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_a_long_curve_is_drawn_as_its_envelope_keeping_spikes():
    from lrft.plots import MAX_POINTS, thin

    x = np.arange(100_000)
    y = np.random.default_rng(0).random(100_000)
    y[54_321], y[70_000:70_500] = 50.0, np.nan
    tx, ty = thin(x, y)
    assert len(tx) <= MAX_POINTS and 54_321 in tx and np.isnan(ty).any()
    assert len(thin(x[:100], y[:100])[0]) == 100  # a short curve is drawn as it is


def test_format_diagnosis_gives_a_ready_command(diag):
    d = diag(records(np.concatenate([healthy_losses(20), [np.nan]])))
    text = format_diagnosis(d, recipe="recipes/bert/standard.yaml")
    assert text.startswith("LR doctor: DIVERGED")
    assert "lrft train recipes/bert/standard.yaml optim.learning_rate=5e-06" in text
    assert all(f"  - {e}" in text for e in d.evidence)


def test_diagnose_run_prints_and_plots(tmp_path, capsys):
    losses = np.concatenate([healthy_losses(20), [np.nan]])
    write_run(tmp_path, records(losses))
    (tmp_path / "recipe.yaml").write_text("optim:\n  learning_rate: 5.0e-5\n")
    assert doctor.diagnose_run(tmp_path) == 0
    out = capsys.readouterr().out
    assert "LR doctor: DIVERGED" in out
    assert f"lrft train {tmp_path / 'recipe.yaml'} optim.learning_rate=5e-06" in out
    assert f"train.output_dir={tmp_path.as_posix()}-retry" in out
    assert (tmp_path / "doctor.png").read_bytes()[:8] == PNG_MAGIC
