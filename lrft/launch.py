"""The one place that builds an `accelerate launch` command line for a training run.

Used by `lrft train --config_file/--num_processes` and by `lrft compare` for cells with a
launcher. The training entry point is launched as a module (`accelerate launch -m lrft.train`),
so it needs no `sys.path` trick; `accelerate launch lrft/train.py RECIPE` keeps working for
users who launch the script by path.
"""

from __future__ import annotations

import sys
from pathlib import Path


def accelerate_command(recipe: str, overrides: list[str], *, config_file: str | None = None,
                       num_processes: int | None = None, quiet: bool = False) -> list[str]:
    """The command that trains `recipe` under `accelerate launch`.

    Args:
        recipe: the recipe file.
        overrides: `section.key=value` overrides, passed on as they are.
        config_file: an Accelerate launcher config (accelerate_configs/*.yaml).
        num_processes: processes to start; None leaves it to the config file.
        quiet: `accelerate launch -q`: when training fails, the launcher exits 1 without its own
            traceback (the error lrft printed is the message).

    Returns:
        The argv list, starting with this interpreter.
    """
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *(["-q"] if quiet else [])]
    if config_file:
        cmd += ["--config_file", str(config_file)]
    if num_processes:
        cmd += ["--num_processes", str(num_processes)]
    return [*cmd, "-m", "lrft.train", str(recipe), *overrides]


def in_process_command(recipe: str, overrides: list[str]) -> list[str]:
    """The command that trains `recipe` in one plain process (no launcher)."""
    return [sys.executable, "-m", "lrft.train", str(recipe), *overrides]


def check_launcher(config_file: str | None, num_processes: int | None) -> list[str]:
    """Problems with launcher options, before anything is launched (empty when fine)."""
    problems = []
    if config_file is not None and not Path(config_file).is_file():
        problems.append(f"--config_file: {config_file} does not exist; e.g. "
                        f"accelerate_configs/cpu.yaml")
    if num_processes is not None and num_processes < 1:
        problems.append(f"--num_processes: {num_processes} must be >= 1")
    return problems
