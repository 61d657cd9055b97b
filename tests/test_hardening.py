"""Hardening (issue 7): nothing lost on a crash, every bad input a clear error, safe by default.

Every test runs the real entry point (`lrft.train.train`, `lrft.cli.main`, or `python -m lrft.cli`
in a subprocess) on the tiny BERT and GLUE-shaped folder of conftest.py, on the CPU, offline.
Crashes are real (SIGKILL of a training process) or simulated in-process by raising
`SimulatedKill`, a BaseException no `except Exception`/`except OSError` in lrft can catch, at a
chosen point of `save_checkpoint`. docs/guarantees.md lists what these tests prove.
"""

from __future__ import annotations

import ast
import errno
import hashlib
import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from conftest import REPO, bert_recipe, write_recipe
from safetensors.torch import load_file

import lrft.cli
from lrft.data import DataError
from lrft.recipe import RecipeError
from lrft.checkpoint import CHECKPOINT_PREFIX, STATE_FILE, list_checkpoints
from lrft.train import train

# 24 optimizer steps, a checkpoint every 4, an evaluation every 8, a train record every 3: most
# checkpoints fall inside a logging window, whose running loss a resume must carry over.
RUN = {"max_steps": 24, "save_steps": 4, "eval_steps": 8, "logging_steps": 3,
       "save_total_limit": 2}
VOLATILE = {"time", "samples_per_s", "tokens_per_s"}  # wall-clock: differ between any two runs
CHECKPOINT_FILES = {"model.safetensors", "optimizer.bin", "random_states_0.pkl", "scheduler.json",
                    STATE_FILE}


class SimulatedKill(BaseException):
    """Stands for SIGKILL inside the process: no lrft `except` clause runs."""


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def _recipe(path: Path, tiny_bert: Path, tiny_glue: Path, out: Path, *, data: dict | None = None,
            model: dict | None = None, **train_keys) -> Path:
    recipe = bert_recipe(tiny_bert, tiny_glue, out, **{**RUN, **train_keys})
    recipe["data"].update(data or {})
    recipe["model"].update(model or {})
    return write_recipe(path, recipe)


def _records(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def _curve(out: Path) -> list[dict]:
    """metrics.jsonl without its wall-clock fields: what must match between two runs."""
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in _records(out)]


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    different = [n for n in wa if not torch.equal(wa[n], wb[n])]
    assert not different, f"tensors differ after resume: {different}"


def _assert_nothing_trained(out: Path) -> None:
    """The error came before training: no checkpoint, no model, no train record."""
    if not out.exists():
        return
    assert not list(out.glob(f"{CHECKPOINT_PREFIX}*")), sorted(out.iterdir())
    assert not (out / "model.safetensors").exists()
    assert not [r for r in _records(out) if r.get("kind") == "train"]


def _cli_train(capsys, recipe: Path, *overrides: str) -> tuple[int, str]:
    """`lrft train` in-process: (exit status, stderr)."""
    status = lrft.cli.main(["train", str(recipe), *overrides])
    return status, capsys.readouterr().err


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.is_file()}


def _csv(path: Path, header: str, rows: list[str]) -> str:
    path.write_text("\n".join([header, *rows]) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_bert, tiny_glue) -> Path:
    """An uninterrupted run of RUN: the result every interrupted-and-resumed run must equal."""
    root = tmp_path_factory.mktemp("reference")
    train(_recipe(root / "recipe.yaml", tiny_bert, tiny_glue, root / "run"))
    return root / "run"


# ---------------------------------------------------------------------------------------------
# 1. kill and resume
# ---------------------------------------------------------------------------------------------

def test_sigkill_at_a_random_step_then_resume_equals_the_uninterrupted_run(
        reference, tmp_path, tiny_bert, tiny_glue):
    """SIGKILL a real `lrft train` process, resume with `latest`: same weights, same metrics."""
    # Killed at the first logged step >= k, wherever in that step (training, logging, evaluating,
    # saving) the signal lands; k is seeded so a failure can be replayed.
    k = random.Random(7).randint(RUN["save_steps"] + 1, RUN["max_steps"] - 6)
    out = tmp_path / "run"
    recipe = _recipe(tmp_path / "recipe.yaml", tiny_bert, tiny_glue, out)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with (tmp_path / "stderr.txt").open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "lrft.cli", "train", str(recipe)],
                                cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=err)
        seen, deadline = 0, time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            lines = (out / "metrics.jsonl").read_text().splitlines() \
                if (out / "metrics.jsonl").exists() else []
            seen = max([json.loads(x).get("step", 0) for x in lines if x.endswith("}")], default=0)
            if seen >= k:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.01)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, (
        f"the run was not killed at step >= {k} (exit {proc.returncode}, last step {seen}): "
        f"{(tmp_path / 'stderr.txt').read_text()[-2000:]}")
    checkpoint = list_checkpoints(out)[-1]
    killed_at = int(checkpoint.name[len(CHECKPOINT_PREFIX):])
    assert 0 < killed_at <= seen < RUN["max_steps"]

    results = train(recipe, ["train.resume_from_checkpoint=latest"])

    assert results["train_steps_this_run"] == RUN["max_steps"] - killed_at
    _assert_same_weights(reference, out)
    # The steps the killed run logged after its checkpoint were dropped on resume: one curve.
    assert _curve(out) == _curve(reference)
    assert json.loads((out / "results.json").read_text())["final"] == \
        json.loads((reference / "results.json").read_text())["final"]


# ---------------------------------------------------------------------------------------------
# 2. crash during save
# ---------------------------------------------------------------------------------------------

def _die_in_save_state(monkeypatch, on_call: int):
    """Accelerator.save_state writes everything, then the process 'dies' with optimizer.bin cut
    in half: a checkpoint folder interrupted part-way."""
    real, calls = Accelerator.save_state, []

    def save_state(self, output_dir=None, **kwargs):
        result = real(self, output_dir, **kwargs)
        calls.append(output_dir)
        if len(calls) == on_call:
            opt = Path(output_dir) / "optimizer.bin"
            opt.write_bytes(opt.read_bytes()[: opt.stat().st_size // 2])
            raise SimulatedKill
        return result

    monkeypatch.setattr(Accelerator, "save_state", save_state)


def _die_in_rename(monkeypatch, on_call: int):
    """The state file is written but the process dies before `checkpoint-N.tmp` is renamed."""
    real, calls = os.replace, []

    def replace(src, dst, **kwargs):
        if Path(src).name.startswith(CHECKPOINT_PREFIX) and str(src).endswith(".tmp"):
            calls.append(src)
            if len(calls) == on_call:
                assert (Path(src) / STATE_FILE).is_file()
                raise SimulatedKill
        return real(src, dst, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


def _die_in_prune(monkeypatch, on_call: int):
    """save_total_limit deletes an old checkpoint; the process dies with it half deleted."""
    import shutil

    real, calls = shutil.rmtree, []

    def rmtree(path, *args, **kwargs):
        path = Path(path)
        if path.name.startswith(CHECKPOINT_PREFIX) and not path.name.endswith(".tmp"):
            calls.append(path)
            if len(calls) == on_call:
                (path / "model.safetensors").unlink()
                raise SimulatedKill
        return real(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", rmtree)


@pytest.mark.parametrize("where, on_call, resumed_from, limit", [
    (_die_in_save_state, 1, 0, 2),  # checkpoint-4 half written: no checkpoint at all
    (_die_in_save_state, 2, 4, 2),  # checkpoint-8 half written
    (_die_in_rename, 2, 4, 2),      # checkpoint-8 written, not yet renamed
    (_die_in_prune, 1, 8, 1),       # checkpoint-8 complete, checkpoint-4 half deleted
], ids=["first-save", "in-save_state", "before-rename", "while-pruning"])
def test_crash_during_save_leaves_nothing_resume_would_pick(
        where, on_call, resumed_from, limit, reference, tmp_path, tiny_bert, tiny_glue,
        monkeypatch):
    """Killed inside a save: resume picks the last complete checkpoint (or starts afresh when
    there is none) and ends identical to the uninterrupted run, metrics included."""
    out = tmp_path / "run"
    recipe = _recipe(tmp_path / "recipe.yaml", tiny_bert, tiny_glue, out, save_total_limit=limit)
    where(monkeypatch, on_call=on_call)
    with pytest.raises(SimulatedKill):
        train(recipe)
    monkeypatch.undo()

    complete = [f"{CHECKPOINT_PREFIX}{resumed_from}"] if resumed_from else []
    assert [p.name for p in list_checkpoints(out)] == complete
    if complete:
        assert set(os.listdir(out / complete[0])) == CHECKPOINT_FILES

    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: loads.append(kw) or real_load(*a, **kw))
    results = train(recipe, ["train.resume_from_checkpoint=latest"])
    monkeypatch.undo()

    assert results["train_steps_this_run"] == RUN["max_steps"] - resumed_from
    assert not list(out.glob("*.tmp")), "the partial folder is cleaned up on the next start"
    _assert_same_weights(reference, out)
    assert _curve(out) == _curve(reference)
    # Resume reads optimizer and RNG states with torch.load: only ever with weights_only=True.
    assert all(kw.get("weights_only") is True for kw in loads), loads
    assert bool(loads) == bool(resumed_from)


def test_save_total_limit_deletes_only_after_the_new_checkpoint_is_complete(
        tmp_path, tiny_bert, tiny_glue, monkeypatch):
    import shutil

    out = tmp_path / "run"
    recipe = _recipe(tmp_path / "recipe.yaml", tiny_bert, tiny_glue, out, max_steps=14,
                     eval_steps=None, save_total_limit=1)
    real, deleted = shutil.rmtree, []

    def rmtree(path, *args, **kwargs):
        path = Path(path)
        if path.name.startswith(CHECKPOINT_PREFIX) and not path.name.endswith(".tmp"):
            newest = list_checkpoints(out)[-1]
            assert int(newest.name.split("-")[1]) > int(path.name.split("-")[1])
            assert set(os.listdir(newest)) == CHECKPOINT_FILES
            deleted.append(path.name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    train(recipe)
    assert deleted == ["checkpoint-4", "checkpoint-8"]
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-12"]


# ---------------------------------------------------------------------------------------------
# 4. bad data: a clear DataError/RecipeError before training, `lrft train` exits 2
# ---------------------------------------------------------------------------------------------

GOOD_ROWS = [f"good fun movie {i},{i % 2}" for i in range(16)]
BAD_DATA = {  # name: (data section and model keys, fragments the message must hold)
    "missing text column": (
        lambda d: {"train_files": [_csv(d / "t.csv", "txt,label", GOOD_ROWS)],
                   "text_columns": ["sentence"]},
        ["text column 'sentence'", "columns are: txt, label"]),
    "missing label column": (
        lambda d: {"train_files": [_csv(d / "t.csv", "sentence,y", GOOD_ROWS)],
                   "text_columns": ["sentence"]},
        ["label column 'label'", "columns are: sentence, y"]),
    "empty eval split": (
        lambda d: {"train_files": [_csv(d / "t.csv", "sentence,label", GOOD_ROWS)],
                   "eval_files": [_csv(d / "e.csv", "sentence,label", [])],
                   "text_columns": ["sentence"]},
        ["validation split is empty", "e.csv"]),
    "empty (0-byte) train file": (
        lambda d: {"train_files": [str(d / "t.csv")], "text_columns": ["sentence"],
                   "_touch": d / "t.csv"},
        ["train file", "t.csv", "is empty"]),
    "labels beyond the GLUE task's classes": (
        lambda d: {"glue_task": "sst2", "path": None,
                   "train_files": [_csv(d / "t.csv", "sentence,label",
                                        [f"good {i},{i % 3}" for i in range(12)])]},
        ["labels of train split span 0..2", "expected 0..1"]),
    "labels beyond model.num_labels": (
        lambda d: {"train_files": [_csv(d / "t.csv", "sentence,label",
                                        [f"good {i},{i % 5}" for i in range(15)])],
                   "text_columns": ["sentence"], "_num_labels": 2},
        ["model.num_labels: 2", "span 0..4", "5 classes"]),
    "float labels with model.num_labels 3": (
        lambda d: {"train_files": [_csv(d / "t.csv", "sentence,label",
                                        [f"good {i},{i / 7:.3f}" for i in range(12)])],
                   "text_columns": ["sentence"], "_num_labels": 3},
        ["model.num_labels: 3", "float scores"]),
    "non-text values": (
        lambda d: {"train_files": [_csv(d / "t.csv", "sentence,label",
                                        [f"{i},{i % 2}" for i in range(12)])],
                   "text_columns": ["sentence"]},
        ["text column 'sentence'", "int64", "expected strings"]),
    "unknown GLUE task": (
        lambda d: {"glue_task": "sst3"},
        ["unknown GLUE task 'sst3'", "did you mean 'sst2'"]),
    "dataset path that does not exist": (
        lambda d: {"glue_task": None, "path": str(d / "no-such-folder"),
                   "text_columns": ["sentence"]},
        ["no-such-folder", "does not exist"]),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_is_a_clear_error_before_training(case, tmp_path, tiny_bert, tiny_glue, capsys):
    make, fragments = BAD_DATA[case]
    data = make(tmp_path)
    touch, num_labels = data.pop("_touch", None), data.pop("_num_labels", None)
    if touch:
        touch.write_text("")
    if "train_files" in data and "path" not in data:
        data = {"glue_task": None, "path": None, **data}
    out = tmp_path / "run"
    recipe = _recipe(tmp_path / "recipe.yaml", tiny_bert, tiny_glue, out, data=data,
                     model={"num_labels": num_labels} if num_labels else None)

    with pytest.raises((DataError, RecipeError)) as raised:
        train(recipe)
    for fragment in fragments:
        assert fragment in str(raised.value)
    _assert_nothing_trained(out)

    status, err = _cli_train(capsys, recipe)
    assert status == 2
    assert all(fragment in err for fragment in fragments) and "Traceback" not in err
    _assert_nothing_trained(out)


# ---------------------------------------------------------------------------------------------
# 5. bad environment
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def no_bitsandbytes(monkeypatch):
    """A machine without bitsandbytes: not findable, not importable."""
    real = importlib.util.find_spec

    def find_spec(name, package=None):
        return None if name == "bitsandbytes" else real(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)


@pytest.mark.parametrize("overrides, fragment", [
    (["optim.name=adamw_8bit"], "'adamw_8bit' needs bitsandbytes"),
    (["lora.enabled=true", "lora.load_in_4bit=true"], "QLoRA needs bitsandbytes"),
], ids=["8-bit optimizer", "QLoRA"])
def test_bitsandbytes_missing_is_a_recipe_error(overrides, fragment, no_bitsandbytes, tmp_path,
                                                tiny_bert, tiny_glue, capsys):
    out = tmp_path / "run"
    status, err = _cli_train(capsys, _recipe(tmp_path / "r.yaml", tiny_bert, tiny_glue, out),
                             *overrides)
    assert status == 2 and fragment in err and "pip install bitsandbytes" in err
    assert "Traceback" not in err and not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                    reason="without bitsandbytes the recipe check fires first (tested above)")
def test_qlora_without_cuda_is_a_recipe_error(tmp_path, tiny_bert, tiny_glue, capsys):
    out = tmp_path / "run"
    status, err = _cli_train(capsys, _recipe(tmp_path / "r.yaml", tiny_bert, tiny_glue, out),
                             "lora.enabled=true", "lora.load_in_4bit=true")
    assert status == 2 and "needs a CUDA GPU" in err and "lora.load_in_4bit=false" in err
    _assert_nothing_trained(out)


def test_hub_id_while_offline_says_so_and_suggests_a_local_path(tmp_path, tiny_bert, tiny_glue):
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE, "conftest sets HF_HUB_OFFLINE=1 before the Hub is imported"
    out = tmp_path / "run"
    start = time.monotonic()
    with pytest.raises(RecipeError) as raised:
        train(_recipe(tmp_path / "r.yaml", tiny_bert, tiny_glue, out),
              ["model.name_or_path=some-org/some-model"])
    assert time.monotonic() - start < 30, "offline: no network retries"
    message = str(raised.value)
    assert "model.name_or_path" in message and "'some-org/some-model'" in message
    assert "HF_HUB_OFFLINE=1 is set" in message and "local folder" in message
    _assert_nothing_trained(out)


def test_output_dir_that_cannot_be_created_is_a_clean_error(tmp_path, tiny_bert, tiny_glue,
                                                             capsys):
    """Works as root too, where chmod does not stop writes: the parent is a regular file."""
    (tmp_path / "a-file").write_text("not a folder")
    out = tmp_path / "a-file" / "run"
    status, err = _cli_train(capsys, _recipe(tmp_path / "r.yaml", tiny_bert, tiny_glue, out))
    assert status == 2 and "Traceback" not in err
    assert f"train.output_dir: cannot write to {out}" in err and "choose a writable folder" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod 0o500; the test above "
                                              "covers an uncreatable output_dir")
def test_read_only_output_parent_is_a_clean_error(tmp_path, tiny_bert, tiny_glue, capsys):
    parent = tmp_path / "read-only"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        out = parent / "run"
        status, err = _cli_train(capsys, _recipe(tmp_path / "r.yaml", tiny_bert, tiny_glue, out))
    finally:
        parent.chmod(0o700)
    assert status == 2 and f"cannot write to {out}" in err and "Traceback" not in err


def test_disk_full_on_save_is_a_clean_error_and_keeps_the_previous_checkpoint(
        tmp_path, tiny_bert, tiny_glue, monkeypatch, capsys):
    out = tmp_path / "run"
    recipe = _recipe(tmp_path / "r.yaml", tiny_bert, tiny_glue, out, eval_steps=None)
    real, calls, before = Accelerator.save_state, [], {}

    def save_state(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        if len(calls) < 2:
            return real(self, output_dir, **kwargs)
        before.update(_hashes(out / "checkpoint-4"))
        Path(output_dir).mkdir()
        (Path(output_dir) / "model.safetensors").write_bytes(b"\0" * 100)  # cut short
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    status, err = _cli_train(capsys, recipe)

    assert status == 2 and "Traceback" not in err
    assert f"cannot save checkpoint-8 in {out}" in err and "No space left on device" in err
    assert f"the previous checkpoint {out / 'checkpoint-4'} is intact" in err
    assert "train.resume_from_checkpoint=latest" in err
    assert not (out / "checkpoint-8.tmp").exists(), "the partial folder is removed"
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-4"]
    assert _hashes(out / "checkpoint-4") == before


# ---------------------------------------------------------------------------------------------
# 6. safe defaults
# ---------------------------------------------------------------------------------------------

def test_yaml_python_tags_are_refused_and_run_nothing(tmp_path):
    """A real `lrft train` process: the tag would run `touch`; safe_load refuses it."""
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f"model: !!python/object/apply:os.system ['touch {marker}']\n"
                    f"train:\n  output_dir: {tmp_path / 'run'}\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "lrft.cli", "train", str(evil)], check=False,
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "not valid YAML" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_trust_remote_code_is_false_unless_the_recipe_sets_it(tmp_path, tiny_bert, tiny_glue,
                                                              monkeypatch):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lrft.models import load_model, load_tokenizer
    from lrft.recipe import load_recipe

    seen = []
    for cls in (AutoTokenizer, AutoModelForSequenceClassification):
        real = cls.from_pretrained
        monkeypatch.setattr(cls, "from_pretrained",
                            lambda *a, _real=real, _cls=cls, **kw:
                            seen.append((_cls.__name__, kw.get("trust_remote_code", "unset")))
                            or _real(*a, **kw))
    recipe = _recipe(tmp_path / "r.yaml", tiny_bert, tiny_glue, tmp_path / "run", max_steps=2,
                     save_steps=None, eval_steps=None)
    train(recipe)
    assert {name for name, _ in seen} == {"AutoTokenizer", "AutoModelForSequenceClassification"}
    assert all(flag is False for _, flag in seen), seen

    seen.clear()
    trusted = load_recipe(recipe, ["model.trust_remote_code=true"])
    load_tokenizer(trusted.model)
    load_model(trusted.model, trusted.lora, num_labels=2)
    assert [flag for _, flag in seen] == [True, True]


def test_runs_write_weights_as_safetensors_and_no_other_pickles(reference):
    """Weights are safetensors; the only torch.save files are Accelerate's optimizer and RNG
    states, which resume reads with weights_only=True (asserted in the crash tests)."""
    checkpoints = list_checkpoints(reference)
    assert checkpoints
    for checkpoint in checkpoints:
        assert set(os.listdir(checkpoint)) == CHECKPOINT_FILES
    top = {p.name for p in reference.iterdir() if p.is_file()}
    assert "model.safetensors" in top
    assert not [n for n in top if n.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle"))], top


def test_lrft_never_unpickles_without_weights_only():
    """Every `torch.load(` in lrft passes weights_only=True; nothing uses pickle directly."""
    problems = []
    for path in sorted((REPO / "lrft").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                flag = {k.arg: k.value for k in node.keywords}.get("weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    problems.append(f"{path.name}:{node.lineno}: torch.load without "
                                    f"weights_only=True")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n.split(".")[0] in ("pickle", "dill", "cloudpickle") for n in names):
                    problems.append(f"{path.name}:{node.lineno}: imports a pickle module")
    assert not problems, problems


def test_latest_on_a_finished_run_without_checkpoints_does_not_start_over(tmp_path, tiny_bert,
                                                                          tiny_glue):
    """`latest` finds nothing to resume in a finished run: refused, not silently retrained.
    (Plain reuse of an output_dir is refused in tests/test_train_e2e.py.)"""
    out = tmp_path / "run"
    recipe = _recipe(tmp_path / "r.yaml", tiny_bert, tiny_glue, out, max_steps=2,
                     save_steps=None, eval_steps=None)
    train(recipe)
    before = _hashes(out)
    with pytest.raises(RecipeError, match="finished run with no checkpoint") as raised:
        train(recipe, ["train.resume_from_checkpoint=latest"])
    assert "train.overwrite_output_dir=true" in str(raised.value)
    assert _hashes(out) == before
