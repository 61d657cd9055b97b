"""A Hugging Face Trainer's output folder read as a :class:`lrft.runlog.RunLog`.

The Trainer keeps its log in `trainer_state.json` (`log_history`): in the output folder when the
script called `trainer.save_state()`, and in every `checkpoint-N/` it saved. Each checkpoint's copy
holds the whole history up to its step (a resumed run loads it and appends), so the state with
the largest `global_step` is read, the output folder's own winning a tie. Nothing is written.

From `log_history`:
- an entry with `loss` is a train record: `loss`, `grad_norm`, `epoch`, and the LR: each
  `lr/<group>` key as a group (what lrft's per-group LR logging writes), else `learning_rate`
  (the Trainer logs its first group's LR only) as the group `lr`;
- an entry with `eval_*` keys is an evaluation: `eval_<metric>` in split `eval`, or with several
  eval datasets `eval_<name>_<metric>` in split `<name>`; its score is the eval loss (the Trainer's
  default `metric_for_best_model`), lower is better;
- the final summary (`train_loss`, `train_runtime`) and other entries are not curves.

The Trainer does not save the run's settings in readable form (`training_args.bin` is a pickle,
and is not opened), so the start record is inferred from the logged LR: `learning_rate` is its
peak (marked `learning_rate_from`, so advice says so), and the run had warmup when the LR rose to
that peak after the first record.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from lrft.errors import UserError
from lrft.runlog import MAX_SKIP_NOTES, RunLog, number

TRAINER_STATE = "trainer_state.json"  # what transformers.Trainer writes (TrainerState.save_to_json)
_CHECKPOINT = re.compile(r"checkpoint-(\d+)$")
_EVAL_EXTRAS = ("runtime", "samples_per_second", "steps_per_second", "model_preparation_time")


def trainer_states(folder: Path) -> list[Path]:
    """The trainer_state.json files of a Trainer output folder (itself and its checkpoints)."""
    found = [folder / TRAINER_STATE] + [c / TRAINER_STATE for c in folder.glob("checkpoint-*")
                                        if _CHECKPOINT.search(c.name)]
    return [p for p in found if p.is_file()]


def read_trainer_log(path: str | Path) -> RunLog:
    """Read a Trainer run: an output folder, a checkpoint folder, or a trainer_state.json.

    Args:
        path: where the Trainer wrote.

    Returns:
        The run as a :class:`RunLog` (`path` is the trainer_state.json read); entries of
        `log_history` that are not objects or have no numeric step are noted in `skipped`.

    Raises:
        FileNotFoundError: no trainer_state.json there.
        UserError: the file is not a Trainer state (not JSON, no `log_history` list).
    """
    path = Path(path)
    states = trainer_states(path) if path.is_dir() else [path] if path.is_file() else []
    if not states:
        raise FileNotFoundError(f"{path}: no {TRAINER_STATE} here or in its checkpoint-*/ folders")
    loaded = [(_load_state(p), p) for p in states]
    # the longest history; on a tie the output folder's own (listed first)
    state, chosen = max(loaded, key=lambda sp: (_global_step(sp[0]), -states.index(sp[1])))
    return _to_runlog(state, chosen)


def _global_step(state: dict) -> float:
    step = number(state.get("global_step"))
    return step if np.isfinite(step) else -1.0


def _load_state(path: Path) -> dict:
    try:
        state = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise UserError(f"{path}: not a Trainer state (expected the JSON that "
                        f"transformers.Trainer writes): {e}") from None
    if not isinstance(state, dict) or not isinstance(state.get("log_history"), list):
        raise UserError(f"{path}: not a Trainer state (expected a JSON object with a "
                        "'log_history' list)")
    return state


def _to_runlog(state: dict, path: Path) -> RunLog:
    log = RunLog(path)
    evals, base_lr = {}, {}  # step -> eval record, step -> the logged `learning_rate`
    for i, entry in enumerate(state["log_history"]):
        step = number(entry.get("step")) if isinstance(entry, dict) else float("nan")
        if not np.isfinite(step):
            log.skipped_count += 1
            if len(log.skipped) < MAX_SKIP_NOTES:
                log.skipped.append(f"{path}: log_history[{i}] is not a log entry with a step, "
                                   f"skipped: {str(entry)[:60]!r}")
            continue
        if "loss" in entry:
            log.train.add(int(step), _train_record(entry))
            base_lr[int(step)] = number(entry.get("learning_rate"))
        elif any(k.startswith("eval_") for k in entry):
            evals[int(step)] = _eval_record(entry, int(step))
    log.evals = [evals[s] for s in sorted(evals)]
    log.start = _start_record(base_lr, log, state)
    return log


def _train_record(entry: dict) -> dict:
    groups = {k[3:]: v for k, v in entry.items() if k.startswith("lr/")}
    if not groups and "learning_rate" in entry:
        groups = {"lr": entry["learning_rate"]}
    return {"loss": entry["loss"], "grad_norm": entry.get("grad_norm"),
            "epoch": entry.get("epoch"), "lr": groups}


def _eval_record(entry: dict, step: int) -> dict:
    """An eval entry in runlog's shape: metrics by split, the eval loss as the score."""
    named = {k[5:-5] for k in entry if k.startswith("eval_") and k.endswith("_loss")} - {""}
    splits: dict[str, dict] = {}
    for key, value in entry.items():
        if not key.startswith("eval_"):
            continue
        rest = key[5:]
        split = next((n for n in sorted(named, key=len, reverse=True)
                      if rest.startswith(n + "_")), "eval")
        metric = rest.removeprefix(split + "_") if split != "eval" else rest
        if metric not in _EVAL_EXTRAS:
            splits.setdefault(split, {})["eval_loss" if metric == "loss" else metric] = value
    losses = [number(m.get("eval_loss")) for m in splits.values()]
    score = float(np.mean(losses)) if losses and np.isfinite(losses).all() else None
    return {"kind": "eval", "step": step, "epoch": entry.get("epoch"), "splits": splits,
            "score": score, "score_name": "eval_loss", "higher_is_better": False}


def _start_record(base_lr: dict[int, float], log: RunLog, state: dict) -> dict:
    """What lrft's start record would say, as far as the logged LR tells it: the Trainer's
    `learning_rate` (its first group), else the first logged group."""
    steps = sorted(base_lr)
    lr = np.array([base_lr[s] for s in steps])
    if not np.isfinite(lr).any() and log.train.lr:
        steps, lr = log.train.step, np.asarray(next(iter(log.train.lr.values())), dtype=float)
    finite = lr[np.isfinite(lr)]
    if not finite.size:
        return {}
    i_peak = int(np.nanargmax(lr))
    rose = i_peak > 0 and finite[0] < lr[i_peak]  # the LR climbed to its peak: warmup
    return {"learning_rate": float(lr[i_peak]), "learning_rate_from": "the peak logged LR",
            "warmup_steps": int(steps[i_peak]) if rose else 0,
            "num_training_steps": state.get("max_steps")}
