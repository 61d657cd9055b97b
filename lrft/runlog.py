"""The run log `metrics.jsonl`: its schema, the writer, and the one reader.

One JSON object per line, in the order they happened. Every record has a `kind`:

- `start`: once per run (and again after a resume that changed the recipe, as `resume`):
  `num_training_steps`, `steps_per_epoch`, `warmup_steps`, `groups` (base LR by group),
  `learning_rate`, `optimizer`, `lr_scheduler_type`, `effective_batch_size`, `num_processes`,
  `trainable_params`, `mixed_precision`, `lr_note`, `time`.
- `train`: every `logging_steps` optimizer steps: `step`, `epoch`, `loss` (mean since the
  last record), `lr` (current LR by group), `grad_norm`, `samples_per_s`, `tokens_per_s`, `time`.
- `eval`: `step`, `epoch`, `splits` (metrics by eval split, e.g. {"validation": {"accuracy":
  0.91, "eval_loss": 0.24}}), `score` (the one number best checkpoints are picked on),
  `score_name`, `higher_is_better`.
- `guard`: a divergence-guard event: `step`, `event`, `detail`, `lr_scale`.
- `resume`: a run resumed from a checkpoint: `step`, `checkpoint`, `changes` (key -> [old, new]).
- `end`: `step`, `status` (completed or diverged), `time`.

Losses are NaN-safe: a non-finite loss is written as NaN (JSON `NaN`), read back as NaN.

`read_log` is the only reader (`lrft diagnose`, `lrft compare`, the tests): it streams the file,
skips lines that are not records (a line torn by a crash, stray text) with a note, keeps the last
record of a step that was logged twice (a resumed run), and reads logs of earlier lrft versions,
whose eval records held prefixed keys (`validation_matched_accuracy`) in a flat `metrics`.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
KINDS = ("start", "train", "eval", "guard", "resume", "end")
MAX_SKIP_NOTES = 5  # a file of garbage gets a few notes and a count, not a note per line
_OLD_SPLITS = ("validation_matched", "validation_mismatched")  # earlier logs' MNLI prefixes


class MetricsLog:
    """Appends records to metrics.jsonl on the main process (other processes write nothing)."""

    def __init__(self, path: Path, enabled: bool):
        self.path = Path(path)
        self.enabled = enabled

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record, default=float) + "\n")

    def truncate(self, step: int) -> None:
        """Keep only records up to optimizer step `step` (all of them when `step` is 0).

        A resumed run logs again the steps after its checkpoint that the interrupted run had
        logged; dropping those (and a line torn by the kill) leaves one clean curve. Records
        without a step (`start`) stay with the steps they precede.
        """
        if not self.enabled or not self.path.exists():
            return
        kept = []
        with self.path.open() as f:
            for line in f:
                record = _parse_line(line)
                if step and record is not None and _step_of(record, 0) <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, self.path)


@dataclass
class LogWindow:
    """What the next `train` record averages: losses, samples and tokens since the last one.

    Losses and token counts stay device tensors between records (no host sync per step); the
    loss sum and count are saved in checkpoints, so a resumed run writes the same averages.
    """

    loss: Any = 0.0  # sum of the finite step losses (a tensor while training)
    count: Any = 0  # finite step losses summed
    samples: int = 0
    tokens: Any = 0
    t0: float = field(default_factory=time.perf_counter)

    def add_loss(self, loss) -> None:
        """Add one optimizer step's loss (a device tensor); a non-finite loss is not averaged."""
        import torch

        finite = torch.isfinite(loss)
        self.loss = self.loss + torch.where(finite, loss, 0.0)
        self.count = self.count + finite.long()

    def count_batch(self, batch: dict) -> None:
        """Count one micro-batch's rows and (non-pad) tokens."""
        self.samples += batch["input_ids"].shape[0]
        mask = batch.get("attention_mask")
        self.tokens = self.tokens + (mask.sum() if mask is not None else batch["input_ids"].numel())

    def mean_loss(self) -> float:
        count = int(self.count)
        return float(self.loss) / count if count else float("nan")

    def reset(self) -> None:
        self.loss, self.count, self.samples, self.tokens = 0.0, 0, 0, 0
        self.t0 = time.perf_counter()

    def state_dict(self) -> dict:
        return {"loss_sum": float(self.loss), "loss_count": int(self.count)}

    def load_state_dict(self, state: dict) -> None:
        self.loss, self.count = state.get("loss_sum", 0.0), state.get("loss_count", 0)


# ---------------------------------------------------------------------------------------------
# Records the training loop writes
# ---------------------------------------------------------------------------------------------

def start_record(run, schedule) -> dict:
    """The `start` record of a run (`run`: lrft.setup.Run, `schedule`: lrft.setup.Schedule)."""
    acc, t = run.accelerator, run.recipe.train
    return {"kind": "start", "time": time.time(), "num_training_steps": schedule.total,
            "steps_per_epoch": schedule.per_epoch, "warmup_steps": schedule.warmup_steps,
            "groups": group_lrs(run.optimizer, "initial_lr"), "learning_rate": run.lr,
            "optimizer": run.recipe.optim.name,
            "lr_scheduler_type": run.recipe.schedule.lr_scheduler_type,
            "effective_batch_size": acc.num_processes * t.per_device_train_batch_size
            * t.gradient_accumulation_steps,
            "num_processes": acc.num_processes, "trainable_params": run.trainable_params,
            "mixed_precision": acc.mixed_precision, "lr_note": run.lr_note,
            **_optional_start_keys(run)}


def _optional_start_keys(run) -> dict:
    """Start-record keys only some runs have: the LoRA scaling (and LoRA+ ratio) peft applied,
    and the algorithm of each group when one optimizer runs two (Muon with AdamW)."""
    keys = {}
    if run.lora:
        keys["lora"] = {k: v for k, v in run.lora.items() if k != "line"}
    algorithms = {g.get("name", str(i)): g["algorithm"]
                  for i, g in enumerate(run.optimizer.param_groups) if "algorithm" in g}
    if algorithms:
        keys["algorithms"] = algorithms
    return keys


def group_lrs(optimizer, key: str = "lr") -> dict[str, float]:
    """The LR of every parameter group by group name: current (`lr`) or base (`initial_lr`)."""
    return {g.get("name", str(i)): g.get(key, g["lr"]) for i, g in enumerate(optimizer.param_groups)}


def resume_record(run, schedule, step: int, checkpoint: str, changes: dict[str, list]) -> dict:
    """The `resume` record: the recipe changes a resumed run applied (the resume flags left
    out), with the run's length and base LRs after them."""
    return {"kind": "resume", "step": step, "checkpoint": checkpoint,
            "changes": {k: v for k, v in changes.items()
                        if k not in ("train.resume_from_checkpoint", "train.overwrite_output_dir")},
            "num_training_steps": schedule.total, "learning_rate": run.lr,
            "groups": group_lrs(run.optimizer, "initial_lr"), "time": time.time()}


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------

@dataclass
class TrainCurve:
    """The train records as columns (one entry per logged step, ascending): a long run's log
    reads into a few lists of floats, not a million dicts. Missing numbers are NaN."""

    step: list[int] = field(default_factory=list)
    epoch: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    samples_per_s: list[float] = field(default_factory=list)
    tokens_per_s: list[float] = field(default_factory=list)
    lr: dict[str, list[float]] = field(default_factory=dict)  # group -> LR at each step

    _NUMBERS = ("epoch", "loss", "grad_norm", "samples_per_s", "tokens_per_s")

    def __len__(self) -> int:
        return len(self.step)

    def add(self, step: int, record: dict) -> None:
        """Append one train record; a step at or before the last one (a resumed run that logs
        again what its interrupted run had logged) first drops the entries it replaces."""
        if self.step and step <= self.step[-1]:
            keep = next((i for i, s in enumerate(self.step) if s >= step), len(self.step))
            for column in (self.step, *(getattr(self, n) for n in self._NUMBERS),
                           *self.lr.values()):
                del column[keep:]
        n = len(self.step)
        self.step.append(step)
        for name in self._NUMBERS:
            getattr(self, name).append(number(record.get(name)))
        lrs = record.get("lr") if isinstance(record.get("lr"), dict) else {}
        for group, values in self.lr.items():
            values.append(number(lrs.get(group)))
        for group in lrs:  # new groups, in the record's order
            if str(group) not in self.lr:
                self.lr[str(group)] = [math.nan] * n + [number(lrs[group])]


@dataclass
class RunLog:
    """A run log as read back. `train` holds columns, `evals` one record per step, by step."""

    path: Path
    start: dict = field(default_factory=dict)
    train: TrainCurve = field(default_factory=TrainCurve)
    evals: list[dict] = field(default_factory=list)
    guards: list[dict] = field(default_factory=list)
    resumes: list[dict] = field(default_factory=list)
    end: dict | None = None
    skipped: list[str] = field(default_factory=list)  # notes on the first lines that were not records
    skipped_count: int = 0  # all lines that were not records

    @property
    def records(self) -> int:
        return bool(self.start) + len(self.train) + len(self.evals) + len(self.guards) + \
            len(self.resumes) + (self.end is not None)


def number(value: Any) -> float:
    """A logged value as a float; NaN for a missing, non-numeric or boolean value."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    try:
        return float(value)
    except OverflowError:  # a JSON integer beyond float range
        return math.inf if value > 0 else -math.inf


def _parse_line(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and record.get("kind") in KINDS else None


def _step_of(record: dict, default: int | None = None) -> int | None:
    step = record.get("step", default)
    if isinstance(step, bool) or not isinstance(step, (int, float)):
        return default
    try:
        return int(step) if math.isfinite(step) else default
    except OverflowError:  # a JSON integer beyond float range
        return default


def _eval_record(record: dict) -> dict:
    """An eval record in this version's shape, also from earlier versions' flat `metrics`."""
    if isinstance(record.get("splits"), dict):
        return record
    flat = record.get("metrics") if isinstance(record.get("metrics"), dict) else {}
    splits: dict[str, dict] = {}
    for key, value in flat.items():
        split = next((s for s in _OLD_SPLITS if key.startswith(s + "_")), "validation")
        splits.setdefault(split, {})[key.removeprefix(split + "_")] = value
    main = record.get("main_metric")
    score = flat.get(main) if isinstance(main, str) else None
    return {**record, "splits": splits, "score": score,
            "score_name": main, "higher_is_better": record.get("higher_is_better", True)}


def resolve_log_path(run_dir: str | Path) -> Path:
    """The metrics file of a run folder (or the file itself).

    Raises:
        FileNotFoundError: no such folder or file, or the folder holds no metrics.jsonl.
    """
    path = Path(run_dir)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no {METRICS_FILE} here (is this a run folder?)")
    return path


def read_log(run_dir: str | Path) -> RunLog:
    """Read a run log, streaming: see the module docstring.

    Args:
        run_dir: a run folder, or its metrics.jsonl.

    Returns:
        The :class:`RunLog`; lines that were not records are noted in `skipped`.

    Raises:
        FileNotFoundError: see :func:`resolve_log_path`.
    """
    path = resolve_log_path(run_dir)
    log = RunLog(path)
    evals: dict[int, dict] = {}
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, 1):
            line = raw.decode("utf-8", errors="replace").strip()
            if not line:
                continue
            record = _parse_line(line)
            step = _step_of(record) if record is not None else None
            kind = record.get("kind") if record is not None else None
            if record is None or (kind in ("train", "eval") and step is None):
                log.skipped_count += 1
                if len(log.skipped) < MAX_SKIP_NOTES:
                    log.skipped.append(f"{path}:{line_no}: not a record, skipped: {line[:60]!r}")
                continue
            if kind == "start":
                log.start = log.start or record
            elif kind == "train":
                log.train.add(step, record)
            elif kind == "eval":
                evals[step] = _eval_record(record)
            elif kind == "guard":
                log.guards.append(record)
            elif kind == "resume":
                log.resumes.append(record)
            else:
                log.end = record
    log.evals = [evals[s] for s in sorted(evals)]
    return log
