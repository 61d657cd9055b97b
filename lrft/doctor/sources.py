"""Where a run's log comes from: lrft's `metrics.jsonl`, or a HF Trainer's `trainer_state.json`.

:func:`load_run` takes what the user typed after `lrft diagnose` (a run folder, a Trainer output
or checkpoint folder, or the log file itself) and returns its :class:`lrft.runlog.RunLog`, read by
`lrft.runlog.read_log` or :func:`lrft.doctor.trainer.read_trainer_log`. A path that holds no
run, or a file with no record in it, is the user's to fix: FileNotFoundError or UserError,
naming the path and what was expected, never a traceback.
"""

from __future__ import annotations

from pathlib import Path

from lrft.doctor.trainer import TRAINER_STATE, read_trainer_log, trainer_states
from lrft.errors import UserError
from lrft.runlog import KINDS, METRICS_FILE, RunLog, read_log

EXPECTED = (f"an lrft run folder (with {METRICS_FILE}), a HF Trainer output folder "
            f"(with {TRAINER_STATE}, also in checkpoint-*/), or one of those files")


def load_run(path: str | Path) -> RunLog:
    """Read the run at `path`, whichever wrote it.

    Args:
        path: an lrft run folder or its metrics.jsonl; a Trainer output folder, checkpoint
            folder or trainer_state.json.

    Returns:
        The run log; lines that were not records are noted in its `skipped`.

    Raises:
        FileNotFoundError: nothing at `path`, or a folder with no run log in it.
        UserError: the file cannot be read, or holds no record.
    """
    path = Path(path)
    try:
        if _is_trainer_run(path):
            log = read_trainer_log(path)
        elif path.is_dir() and not (path / METRICS_FILE).exists():
            raise FileNotFoundError(f"{path}: no run log here; expected {EXPECTED}")
        else:
            log = read_log(path)
    except (FileNotFoundError, UserError):
        raise
    except OSError as e:  # permissions, a folder named metrics.jsonl's parent, ...
        raise UserError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not log.records:
        raise UserError(_no_records(log))
    return log


def _is_trainer_run(path: Path) -> bool:
    if path.is_file():
        return path.name == TRAINER_STATE
    return path.is_dir() and not (path / METRICS_FILE).exists() and bool(trainer_states(path))


def _no_records(log: RunLog) -> str:
    if log.path.name == TRAINER_STATE:
        return f"{log.path}: its log_history holds no training or eval entry yet"
    if not log.skipped_count:
        return f"{log.path}: empty, no record yet (has the run started?)"
    return (f"{log.path}: none of its {log.skipped_count} line(s) is a run record; expected "
            f"lrft's {METRICS_FILE}, one JSON object per line with a 'kind' of "
            f"{', '.join(KINDS)}")


def input_notes(log: RunLog) -> list[str]:
    """One line per input line that was skipped (the first few), and a count of the rest."""
    notes = list(log.skipped)
    if log.skipped_count > len(log.skipped):
        notes.append(f"{log.path}: {log.skipped_count - len(log.skipped)} more line(s) skipped "
                     f"({log.skipped_count} in all)")
    return notes
