"""The launcher: the one `accelerate launch` command builder, and what a launcher can run.

Used by `lrft train --config_file/--num_processes` and by `lrft compare` for cells with a
launcher. `launcher_problems` says what the distributed type the launcher chose (DDP, FSDP2,
DeepSpeed) cannot run, before anything loads; `fill_deepspeed_config` gives DeepSpeed the
recipe's clipping. The recipe, not the launcher, decides the accumulation count and clipping. The training entry point is launched as a module (`accelerate launch -m lrft.train`),
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


# ---------------------------------------------------------------------------------------------
# The launcher: what its distributed type can run, and what the recipe decides
# ---------------------------------------------------------------------------------------------

_DDP = "launch with DDP instead (accelerate_configs/multi_gpu_8xa100.yaml)"


def launcher_problems(recipe, accelerator) -> list[str]:
    """What the recipe asks that the launcher cannot run, each naming the setting and the way out.

    Args:
        recipe: the run's recipe.
        accelerator: the Accelerator as the launcher configured it (reads `distributed_type`,
            `gradient_accumulation_steps` and, under DeepSpeed, the DeepSpeed config).

    Returns:
        One message per problem; empty when the launcher can run the recipe.
    """
    from lrft.optim import OPTIMIZERS

    t, kind = recipe.train, accelerator.distributed_type
    ds_config = _deepspeed_config(accelerator)
    problems = []
    if accelerator.gradient_accumulation_steps != t.gradient_accumulation_steps:
        problems.append(
            f"train.gradient_accumulation_steps: {t.gradient_accumulation_steps} in the recipe, "
            f"but the launcher accumulates {accelerator.gradient_accumulation_steps} (the "
            f"environment's ACCELERATE_GRADIENT_ACCUMULATION_STEPS, set by `accelerate launch "
            f"--gradient_accumulation_steps` or a config file, or the DeepSpeed config); the "
            f"schedule and the logged loss follow the recipe, so remove the launcher's setting")
    if ds_config is not None:
        for key, recipe_key, value in (
                ("gradient_accumulation_steps", "train.gradient_accumulation_steps",
                 t.gradient_accumulation_steps),
                ("gradient_clipping", "train.max_grad_norm", t.max_grad_norm or 0.0)):
            theirs = ds_config.get(key, "auto")
            if theirs != "auto" and float(theirs) != float(value):
                problems.append(f"{recipe_key}: {value} in the recipe, but the DeepSpeed config "
                                f"sets {key}: {theirs}; set it to \"auto\" there (lrft fills in "
                                f"the recipe's value)")
    spec = OPTIMIZERS.get(recipe.optim.name)
    if kind == "FSDP" and spec is not None and not spec.fsdp2:
        why = ("orthogonalises whole matrices, which FSDP's row shards are not"
               if spec.hidden_matrices else
               "is not verified on FSDP's sharded (DTensor) parameters" if spec.schedule_free else
               "cannot step FSDP's sharded (DTensor) parameters and would fail at the first step")
        problems.append(f"optim.name: {spec.name} {why}; use optim.name=adamw (or lion), or "
                        f"{_DDP}")
    if kind == "DEEPSPEED" and spec is not None and spec.eight_bit:
        problems.append(f"optim.name: {spec.name} under DeepSpeed gets flattened partitions, so "
                        f"the embeddings would lose their 32-bit optimizer state; use "
                        f"optim.name=adamw, or {_DDP}")
    elif kind == "DEEPSPEED" and spec is not None and not spec.deepspeed:
        why = ("Muon needs each matrix's 2-D shape" if spec.hidden_matrices else
               "its averaged weights would reach DeepSpeed's fp32 masters only, not the model "
               "DeepSpeed evaluates and saves")
        problems.append(f"optim.name: {spec.name} under DeepSpeed gets flattened 1-D partitions "
                        f"({why}); use optim.name=adamw, or {_DDP}")
    if kind == "DEEPSPEED" and recipe.guard.enabled:
        problems.append("guard.enabled: the divergence guard cannot act under DeepSpeed (the "
                        "optimizer steps inside backward, before the guard's verdict, and a "
                        "rollback's state cannot be loaded into DeepSpeed's partitions); set "
                        "guard.enabled=false, or launch with DDP or FSDP2 "
                        "(accelerate_configs/multi_gpu_8xa100.yaml, fsdp_8xa100.yaml)")
    zero3 = ds_config is not None and ds_config.get("zero_optimization", {}).get("stage") == 3
    if recipe.lora.enabled and recipe.lora.load_in_4bit and (kind == "FSDP" or zero3):
        problems.append(f"lora.load_in_4bit: QLoRA under {'FSDP' if kind == 'FSDP' else 'ZeRO-3'} "
                        f"needs its 4-bit base stored for sharding (bnb_4bit_quant_storage), "
                        f"which lrft does not set up; train QLoRA on one GPU, or {_DDP}")
    return problems


def _deepspeed_config(accelerator) -> dict | None:
    """The DeepSpeed config dict the launcher gave Accelerate, or None without DeepSpeed."""
    if accelerator.distributed_type != "DEEPSPEED":
        return None
    return accelerator.state.deepspeed_plugin.deepspeed_config


def fill_deepspeed_config(recipe, accelerator) -> None:
    """DeepSpeed clips inside its own step by `gradient_clipping`; Accelerate fills an "auto" there
    with 1.0 whatever the recipe says, so lrft fills in `train.max_grad_norm` first (0: none)."""
    ds_config = _deepspeed_config(accelerator)
    if ds_config is not None and ds_config.get("gradient_clipping", "auto") == "auto":
        ds_config["gradient_clipping"] = recipe.train.max_grad_norm or 0.0
