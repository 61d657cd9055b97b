"""Property test of `lrft diagnose` on hostile input (issue 18): any bytes, any JSON records, any
Trainer log give a verdict with well-formed advice, or a user error; never a traceback."""

from __future__ import annotations

import atexit
import json
import math
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_doctor import grad_norms, healthy_losses, records, write_run

from lrft.doctor import VERDICTS, diagnose, format_diagnosis
from lrft.doctor.trainer import TRAINER_STATE
from lrft.errors import UserError
from lrft.runlog import KINDS, METRICS_FILE

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Integers stay within +-2**62 here; a larger one is tested on its own at the end.
NUMBER = st.one_of(st.floats(), st.integers(-2**62, 2**62), st.text(max_size=6), st.none(),
                   st.booleans(), st.sampled_from(["NaN", "DIVERGED", "1e-5"]))
METRICS = st.dictionaries(st.sampled_from(["eval_loss", "accuracy", "f1"]), NUMBER, max_size=3)
FIELDS = {
    "step": NUMBER, "loss": NUMBER, "grad_norm": NUMBER, "learning_rate": NUMBER,
    "warmup_steps": NUMBER, "lr_note": NUMBER, "score": NUMBER, "score_name": NUMBER,
    "higher_is_better": NUMBER, "main_metric": NUMBER, "detail": NUMBER,
    "lr": st.one_of(NUMBER, st.dictionaries(st.text(max_size=4), NUMBER, max_size=3)),
    "status": st.one_of(st.sampled_from(["diverged", "completed"]), NUMBER),
    "event": st.one_of(st.sampled_from(["stop", "nan_loss", "rollback", "skip"]), NUMBER),
    "splits": st.one_of(NUMBER, st.dictionaries(st.text(max_size=4), st.one_of(NUMBER, METRICS),
                                                max_size=2)),
    "metrics": st.one_of(NUMBER, st.dictionaries(st.text(max_size=12), NUMBER, max_size=3)),
}
RECORD = st.fixed_dictionaries({"kind": st.sampled_from(KINDS + ("other",))}, optional=FIELDS)
JUNK = st.one_of(st.binary(max_size=60), st.text(max_size=40).map(str.encode),
                 st.sampled_from([b"[1, 2]", b"42", b"null", b'"text"', b"{", b"\xff\xfe\x00"]))
LINE = st.one_of(RECORD.map(lambda r: json.dumps(r).encode()), JUNK)
SHAPES = {"healthy": healthy_losses, "flat": lambda n: np.full(n, 0.693),
          "nan": lambda n: np.r_[healthy_losses(n)[: n // 2], np.full(n - n // 2, np.nan)]}


WORKDIR = Path(tempfile.mkdtemp(prefix="lrft-doctor-hostile-"))  # @given reuses it; removed at exit
atexit.register(shutil.rmtree, WORKDIR, True)


def _run_dir() -> Path:
    return Path(tempfile.mkdtemp(dir=WORKDIR))


def _check(path: Path) -> None:
    """The invariant: a verdict with well-formed advice, or a user error naming the input."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            d = diagnose(path)
    except (UserError, FileNotFoundError) as e:
        assert str(path) in str(e)
        return
    assert d.verdict in VERDICTS and d.evidence and all(isinstance(e, str) for e in d.evidence)
    if "learning_rate" in d.changes:
        assert 0 < float(d.changes["learning_rate"]) < math.inf
    assert format_diagnosis(d).startswith(f"LR doctor: {d.verdict.upper()}")


@SETTINGS
@given(shape=st.sampled_from(sorted(SHAPES)), n=st.integers(0, 40),
       hostile=st.lists(st.tuples(st.integers(0, 50), LINE), max_size=12))
def test_any_metrics_file_gives_a_verdict_or_a_user_error(shape, n, hostile):
    folder = write_run(_run_dir(), records(SHAPES[shape](n), grad_norms=grad_norms(n)) if n else [])
    path = folder / METRICS_FILE
    lines = path.read_bytes().splitlines() if path.exists() else []
    for at, line in hostile:
        lines.insert(at, line)
    if lines:
        path.write_bytes(b"\n".join(lines) + b"\n")
    _check(folder)


ENTRY = st.one_of(
    st.fixed_dictionaries({}, optional={"step": NUMBER, "loss": NUMBER, "grad_norm": NUMBER,
                                        "learning_rate": NUMBER, "eval_loss": NUMBER,
                                        "eval_accuracy": NUMBER, "eval_x_loss": NUMBER,
                                        "lr/head": NUMBER, "train_loss": NUMBER}),
    NUMBER, st.lists(NUMBER, max_size=2))


@SETTINGS
@given(n=st.integers(0, 40), hostile=st.lists(ENTRY, max_size=12),
       state=st.one_of(st.none(), st.dictionaries(st.sampled_from(["global_step", "max_steps"]),
                                                  NUMBER)))
def test_any_trainer_state_gives_a_verdict_or_a_user_error(n, hostile, state):
    history = [{"step": 10 * (i + 1), "loss": float(v), "learning_rate": 5e-5, "grad_norm": 1.0}
               for i, v in enumerate(healthy_losses(n))] + hostile
    folder = _run_dir()
    (folder / TRAINER_STATE).write_text(json.dumps({**(state or {}), "log_history": history}))
    _check(folder)


@pytest.mark.parametrize("field", ["loss", "step"])
def test_an_integer_too_large_for_a_float_is_skipped(tmp_path, field):
    folder = write_run(tmp_path, records(healthy_losses(), grad_norms=grad_norms()))
    lines = (folder / METRICS_FILE).read_text().splitlines()
    huge = {"kind": "train", "step": 305, "loss": 0.5, field: "HUGE"}
    lines.insert(31, json.dumps(huge).replace('"HUGE"', "1" + "0" * 400))  # mid-run
    (folder / METRICS_FILE).write_text("\n".join(lines) + "\n")
    if field == "step":  # no step to place it at: the reader names the line it skipped
        with pytest.warns(UserWarning, match=r"metrics\.jsonl:32: not a record, skipped"):
            assert diagnose(folder).verdict == "healthy"
    else:
        assert diagnose(folder).verdict == "healthy"
