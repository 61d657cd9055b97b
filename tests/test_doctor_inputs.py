"""lrft.doctor on bad and unusual input (issue 18, items 7 and 17, and the 1M-line log): a bad
line is a warning, a path with no run or a file with no record is a clear user error, a loss
that is not a number is no evidence, and a long log is read in one streaming pass."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_doctor import LOG_EVERY, grad_norms, healthy_losses, records, write_run

from lrft.doctor import diagnose, diagnose_run
from lrft.doctor.stats import grad_spikes
from lrft.doctor.thresholds import GRAD_SPIKE_FACTOR, GRAD_SPIKE_WINDOW, INITIAL_RECORDS
from lrft.errors import USER_ERROR_EXIT, UserError, run_command
from lrft.runlog import METRICS_FILE


def healthy_run(folder, **kwargs):
    return write_run(folder, records(healthy_losses(), grad_norms=grad_norms(), **kwargs))


def run_diagnose(path, capsys) -> tuple[int, str, str]:
    """`lrft diagnose PATH` through the one error handler the CLI uses."""
    code = run_command("diagnose", lambda: diagnose_run(path, plot=False))
    out = capsys.readouterr()
    return code, out.out, out.err


# --- issue 18 #7: what is not a run is a clear error; one bad line is a warning ----------------

@pytest.mark.parametrize("content", [b"hello world\nthis is not json\n", b"step,loss\n1,0.7\n",
                                     bytes(range(256)) * 4, b"[1, 2]\n\"text\"\n42\n",
                                     b'{"kind": "nonsense"}\n{"no_kind": 1}\n'],
                         ids=["text", "csv", "binary", "non_objects", "unknown_kinds"])
def test_a_file_with_no_record_is_a_user_error_naming_it(tmp_path, capsys, content):
    path = tmp_path / METRICS_FILE
    path.write_bytes(content)
    with pytest.raises(UserError, match="none of its .* line\\(s\\) is a run record"):
        diagnose(path)
    code, out, err = run_diagnose(path, capsys)
    assert code == USER_ERROR_EXIT and out == ""
    assert err.startswith(f"lrft diagnose: {path}: none of its") and "expected" in err
    assert "Traceback" not in err


def test_an_empty_file_is_a_user_error(tmp_path):
    (tmp_path / METRICS_FILE).write_text("\n")
    with pytest.raises(UserError, match="empty, no record yet"):
        diagnose(tmp_path)


@pytest.mark.parametrize("where", ["empty_folder", "metrics_is_a_folder", "missing"])
def test_a_path_that_is_no_run_names_what_was_expected(tmp_path, capsys, where):
    path = tmp_path / "run"
    if where != "missing":
        path.mkdir()
    if where == "metrics_is_a_folder":
        (path / METRICS_FILE).mkdir()
    with pytest.raises(FileNotFoundError, match="run"):
        diagnose(path)
    code, _, err = run_diagnose(path, capsys)
    assert code == USER_ERROR_EXIT and err.startswith(f"lrft diagnose: {path}")
    assert "Traceback" not in err


@pytest.mark.parametrize("stray", ["[1, 2, 3]", "42", '"a string"', "null", "not json at all",
                                   '{"kind": "train", "step": "twenty", "loss": 0.5}',
                                   '{"kind": "train", "loss": 0.5}'])
def test_one_stray_line_is_skipped_with_a_warning(tmp_path, capsys, stray):
    run = healthy_run(tmp_path)
    lines = (run / METRICS_FILE).read_text().splitlines()
    lines.insert(20, stray)
    (run / METRICS_FILE).write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning, match=":21: not a record, skipped"):
        assert diagnose(run).verdict == "healthy"
    code, out, err = run_diagnose(run, capsys)
    assert code == 0 and "LR doctor: HEALTHY" in out
    assert err.count("\n") == 1 and err.startswith("warning: ") and ":21: not a record" in err


def test_many_bad_lines_give_a_few_warnings_and_a_count(tmp_path, capsys):
    run = healthy_run(tmp_path, evals=[])
    with (run / METRICS_FILE).open("a") as f:
        f.write("garbage\n" * 50)
    code, out, err = run_diagnose(run, capsys)
    lines = err.splitlines()
    assert code == 0 and "LR doctor:" in out
    assert len(lines) == 6 and lines[-1].endswith("45 more line(s) skipped (50 in all)")


def test_latin1_and_binary_bytes_in_a_valid_log_are_read(tmp_path):
    run = healthy_run(tmp_path)
    raw = (run / METRICS_FILE).read_bytes().replace(
        b'"optimizer": "adamw"', '"optimizer": "adamw caf\xe9"'.encode("latin-1"))
    (run / METRICS_FILE).write_bytes(raw + b"\x00\xff\xfe binary tail\n")
    with pytest.warns(UserWarning, match="not a record"):
        d = diagnose(run)
    assert d.verdict == "healthy" and d.learning_rate == pytest.approx(5e-5)


def test_string_and_mixed_step_values(tmp_path):
    """String steps are skipped with a warning; int and float steps mix (the old doctor's
    sort raised TypeError on the mix)."""
    recs = records(np.concatenate([healthy_losses(30), [np.nan, np.nan]]))
    for i, rec in enumerate(recs):
        if rec["kind"] == "train" and i % 2:
            rec["step"] = float(rec["step"])
    recs[5]["step"] = "50"
    run = write_run(tmp_path, recs)
    with pytest.warns(UserWarning, match="not a record"):
        d = diagnose(run)
    assert d.verdict == "diverged" and d.region == (30 * LOG_EVERY, 32 * LOG_EVERY)


def test_hostile_start_and_guard_fields_do_not_crash(tmp_path):
    recs = records(np.concatenate([healthy_losses(20), [np.nan]]))
    recs[0].update(learning_rate="5e-5", warmup_steps="ten")
    recs.insert(-1, {"kind": "guard", "step": None, "event": "stop", "detail": 3})
    recs[-1]["step"] = "end"
    d = diagnose(write_run(tmp_path, recs))
    assert d.verdict == "diverged" and d.learning_rate is None  # a string is not an LR
    assert "learning_rate" not in d.changes and "warmup_ratio" in d.changes


def test_a_guard_stop_without_a_usable_step_or_any_train_record(tmp_path):
    """Found by the property test: no train record and a guard step beyond int64."""
    recs = [{"kind": "guard", "step": 4.7e18, "event": "stop"}]
    d = diagnose(write_run(tmp_path, recs))
    assert d.verdict == "diverged" and d.region is None
    assert d.evidence == ["the guard stopped the run"]


def test_a_huge_step_is_left_out_with_a_note(tmp_path):
    recs = records(healthy_losses())
    recs.insert(-1, {"kind": "train", "step": 1e30, "loss": 0.1, "lr": {}, "grad_norm": 1.0})
    with pytest.warns(UserWarning, match="beyond 2\\*\\*62"):
        d = diagnose(write_run(tmp_path, recs))
    assert d.verdict == "healthy"


# --- issue 18 #17: a loss that is not a number is no evidence ---------------------------------

@pytest.mark.parametrize("loss", ["DIVERGED", None, "missing"])
def test_losses_that_are_not_numbers_are_insufficient_data_not_diverged(tmp_path, loss):
    recs = records(healthy_losses(30))
    for rec in recs:
        if rec["kind"] == "train":
            if loss == "missing":
                del rec["loss"]
            else:
                rec["loss"] = loss
    d = diagnose(write_run(tmp_path, recs))
    assert d.verdict == "insufficient_data", d
    assert d.changes == {} and d.overrides == []
    assert "none of the 30 training record(s) has a finite loss" in d.evidence[0]


def test_a_missing_loss_mid_run_is_not_a_blow_up(tmp_path):
    recs = records(healthy_losses(), grad_norms=grad_norms())
    for rec in recs[10:13]:
        rec["loss"] = "n/a"
    d = diagnose(write_run(tmp_path, recs))
    assert d.verdict == "healthy", d


def test_no_finite_loss_but_the_loop_said_diverged_is_diverged(tmp_path):
    recs = records([float("nan")] * 20, status="diverged")
    d = diagnose(write_run(tmp_path, recs))
    assert d.verdict == "diverged" and "status 'diverged' at step 200" in d.evidence[0]
    assert float(d.changes["learning_rate"]) == pytest.approx(5e-6)


# --- a long log: one streaming pass, vectorised statistics ------------------------------------

def test_a_200k_line_log_is_diagnosed(tmp_path):
    n, blown = 200_000, 700
    rng = np.random.default_rng(0)
    i = np.arange(n)
    losses = (0.1 + 0.6 * np.exp(-i / 20_000)) * (1 + 0.05 * rng.standard_normal(n))
    losses[-blown:] = np.nan
    norms = np.exp(0.2 * rng.standard_normal(n))
    path = tmp_path / METRICS_FILE
    with path.open("w") as f:
        f.write(json.dumps({"kind": "start", "learning_rate": 5e-5, "warmup_steps": 100}) + "\n")
        for k in range(n):
            f.write(json.dumps({"kind": "train", "step": k + 1, "loss": losses[k],
                                "lr": {"backbone": 5e-5, "head": 5e-4},
                                "grad_norm": norms[k]}) + "\n")
    d = diagnose(tmp_path)
    assert d.verdict == "diverged"
    assert d.region == (n - blown, n)
    assert f"non-finite or missing at {blown} logged step(s), first at step {n - blown + 1}" \
        in d.evidence[0]
    assert d.overrides == ["optim.learning_rate=5e-06"]  # the run had warmup


def _grad_spikes_reference(steps, norms):
    """The doctor's spike rule, written as the plain loop it was before vectorising."""
    spikes, history = [], []
    for step, norm in zip(steps, norms):
        if not np.isfinite(norm):
            continue
        window = history[-GRAD_SPIKE_WINDOW:]
        if len(window) >= INITIAL_RECORDS and norm > GRAD_SPIKE_FACTOR * np.median(window):
            spikes.append((int(step), float(norm), float(np.median(window))))
        history.append(norm)
    return spikes


@pytest.mark.parametrize("n, noise", [(3, 1.0), (12, 1.0), (21, 1.0), (2_000, 1.0), (2_000, 2.5)])
def test_vectorised_grad_spikes_equal_the_plain_loop(n, noise):
    rng = np.random.default_rng(n)
    norms = np.exp(noise * rng.standard_normal(n))
    norms[INITIAL_RECORDS + 1::17] *= 100  # spikes, once the window has filled
    norms[rng.choice(n, size=max(1, n // 30), replace=False)] = np.nan  # unlogged
    steps = np.arange(1, n + 1) * 10
    expected = _grad_spikes_reference(steps, norms)
    assert grad_spikes(steps, norms) == expected
    assert n <= INITIAL_RECORDS + 1 or expected  # the longer cases do have spikes
