"""Recipes: plain YAML mirrored by typed dataclasses.

A recipe is loaded in four steps, each of which may add problems to one list:

    read YAML (safe loader) -> inherit `base:` -> apply `key=value` overrides -> validate

The I/O is lrft/config.py's, the rules are lrft/validate.py's; this module holds the sections.

Every problem is collected and raised together as one :class:`RecipeError`, each naming the
key path, the bad value and the fix, so a user fixes a recipe in one go instead of one
traceback at a time. Key names follow Hugging Face ``TrainingArguments`` wherever one exists.

This module imports neither torch nor transformers: ``lrft check`` and the CLI's start stay fast.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lrft import optim, schedule
from lrft.config import (ConversionError, build_dataclass, parse_override, resolve_bases,
                         resolve_path, suggest)
from lrft.errors import RecipeError
from lrft.validate import SECTIONS, validate

__all__ = ["Recipe", "RecipeError", "load_recipe", "dump_recipe", "resolve_path", "SECTIONS"]

# What the recipe accepts comes from the registries: one entry per optimizer (lrft.optim) and per
# schedule (lrft.schedule), each saying which keys it reads (tests/test_registries.py).
OPTIMIZERS: tuple[str, ...] = optim.OPTIMIZER_NAMES
SCHEDULERS: tuple[str, ...] = schedule.SCHEDULER_NAMES
EIGHT_BIT_OPTIMIZERS = tuple(n for n, spec in optim.OPTIMIZERS.items() if spec.eight_bit)


# --------------------------------------------------------------------------------------------
# The schema. Defaults are the "standard" regime for a BERT-style classifier.
# --------------------------------------------------------------------------------------------

@dataclass
class ModelConfig:
    name_or_path: str = ""  # hub id, local folder, or pkg:<python package>[/sub/path]
    task: Literal["sequence_classification", "causal_lm"] = "sequence_classification"
    num_labels: int | None = None  # derived from the data when unset
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    attn_implementation: str | None = None  # e.g. sdpa, eager, flash_attention_2
    gguf_file: str | None = None  # a GGUF file inside name_or_path (weights are dequantised)
    tokenizer: str | None = None  # defaults to name_or_path
    trust_remote_code: bool = False  # runs code from the model repo: only when you trust it
    # A checkpoint whose classification head has another label count (an MNLI model on RTE):
    # re-initialise the head, as run_glue.py's flag does; false refuses instead.
    ignore_mismatched_sizes: bool = True
    gradient_checkpointing: bool = False


@dataclass
class DataConfig:
    glue_task: str | None = None  # cola sst2 mrpc stsb qqp mnli qnli rte wnli
    path: str | None = None  # hub dataset id or local folder; GLUE default nyu-mll/glue
    name: str | None = None  # dataset config name for non-GLUE sets
    train_files: list[str] | None = None  # local csv/json/jsonl/parquet/txt files
    eval_files: list[str] | None = None
    train_split: str = "train"
    eval_split: str | None = None  # GLUE: validation (mnli: matched + mismatched)
    eval_fraction: float | None = None  # hold out this share of train when there is no eval split
    # Hold out this share of train as a `holdout` split, evaluated beside the dev split but never
    # part of the run's score: `lrft compare` can pick each optimizer's LR on it (honest selection).
    holdout_fraction: float | None = None
    # Seeds the eval/holdout hold-outs and eval subsets; None: train.seed. A fixed value keeps
    # the dev and holdout rows the same across the seeds of a comparison.
    split_seed: int | None = None
    where: dict[str, Any] | None = None  # keep rows whose column equals the value
    text_columns: list[str] | None = None  # classification: 1 or 2 text columns
    label_column: str = "label"
    format: Literal["text", "prompt_response", "messages"] = "text"  # causal LM data
    text_column: str = "text"
    prompt_column: str = "prompt"
    response_column: str = "response"
    messages_column: str = "messages"
    max_length: int = 128
    packing: bool = False
    group_by_length: bool = True
    max_train_samples: int | None = None
    max_eval_samples: int | None = None


@dataclass
class OptimConfig:
    name: str = "adamw"
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    layer_decay: float | None = None  # LLRD: lr x layer_decay ** (L + 1 - depth)
    head_lr_scale: float | None = None  # task head at this multiple of the base LR
    embedding_lr_scale: float | None = None
    scale_lr: Literal["none", "linear", "sqrt"] = "none"
    reference_batch_size: int | None = None  # the effective batch the LR was tuned for
    args: dict[str, Any] = field(default_factory=dict)  # other constructor arguments, checked


@dataclass
class ScheduleConfig:
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float | None = None
    warmup_steps: int | None = None
    warmup_start_factor: float = 0.0
    warmup_type: Literal["linear", "constant"] = "linear"
    min_lr_ratio: float = 0.0
    num_cycles: int = 1  # cosine_with_restarts
    power: float = 1.0  # polynomial
    decay_ratio: float = 0.1  # warmup_stable_decay: share of steps in the final decay
    step_size: int | None = None  # step
    gamma: float = 0.1  # step, exponential, reduce_lr_on_plateau
    patience: int = 2  # reduce_lr_on_plateau, in evaluations


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    overwrite_output_dir: bool = False
    num_train_epochs: float = 3.0
    max_steps: int = -1  # optimizer steps; -1 = use num_train_epochs
    per_device_train_batch_size: int = 32
    per_device_eval_batch_size: int = 64
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = 1.0
    seed: int = 42
    # auto: the launcher's choice if it made one, else bf16 where the hardware has it natively (Ampere+
    # GPU, AMX CPU), else fp32 (lrft/precision.py); null: the launcher's setting, else fp32
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] | None = "auto"
    eval_steps: int | None = None  # None: evaluate at the end only
    eval_at_start: bool = False  # also evaluate before the first step (a "before" baseline)
    save_steps: int | None = None  # None: no intermediate checkpoints
    save_total_limit: int | None = 2
    logging_steps: int = 10
    resume_from_checkpoint: str | None = None  # latest | PATH
    num_threads: int | None = None  # torch CPU threads; None leaves torch's default


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str | list[str] = "auto"  # auto: peft's defaults for the architecture
    bias: Literal["none", "all", "lora_only"] = "none"
    load_in_4bit: bool = False  # QLoRA: 4-bit NF4 base model through bitsandbytes (CUDA only)
    use_rslora: bool = False  # rsLoRA: scale adapters by alpha/sqrt(r), not alpha/r (peft)
    use_dora: bool = False  # DoRA: a trained magnitude per output beside the low-rank direction
    loraplus_lr_ratio: float | None = None  # LoRA+: B matrices at this x their group's LR (16)


@dataclass
class LogConfig:
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    project: str = "lrft"
    run_name: str | None = None


@dataclass
class GuardConfig:
    enabled: bool = False
    action: Literal["skip", "rollback"] = "rollback"
    loss_spike_factor: float = 3.0  # loss > factor x running mean of the window
    grad_spike_factor: float = 10.0  # grad norm > factor x running mean of the window
    window: int = 20
    snapshot_steps: int = 50  # keep a CPU copy of the last good state this often
    lr_backoff: float = 0.5  # multiply every group's LR by this on each rollback
    max_rollbacks: int = 3


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    log: LogConfig = field(default_factory=LogConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    # Dotted keys the recipe (with its bases and overrides) set explicitly: the rest are defaults.
    explicit: frozenset[str] = field(default_factory=frozenset, repr=False, compare=False)
    source: str | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as plain data (what `lrft check` prints and runs save)."""
        return {s.name: dataclasses.asdict(getattr(self, s.name)) for s in _sections(Recipe)}




def _sections(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.name in SECTIONS]


# --------------------------------------------------------------------------------------------
# Loading: YAML -> bases -> overrides -> typed sections -> validation (lrft.config does the I/O)
# --------------------------------------------------------------------------------------------

def from_dict(data: dict, problems: list[str] | None = None, source: str | None = None) -> Recipe:
    """Build a Recipe from a plain mapping (already merged); validate; raise on problems."""
    problems = [] if problems is None else problems
    sections = {}
    explicit = set()
    for key in data:
        if key not in SECTIONS:
            problems.append(f"{key}: unknown section; {suggest(str(key), SECTIONS)}")
    for f in _sections(Recipe):
        raw = data.get(f.name)
        sections[f.name] = build_dataclass(_section_type(f.name), raw, f.name, problems)
        if isinstance(raw, dict):
            explicit.update(f"{f.name}.{k}" for k in raw)
    recipe = Recipe(**sections, explicit=frozenset(explicit), source=source)
    problems.extend(validate(recipe))  # lrft/validate.py: every range and cross-field rule
    if problems:
        raise RecipeError(problems, source)
    return recipe


def _section_type(name: str):
    return typing.get_type_hints(Recipe)[name]


def apply_overrides(data: dict, overrides: list[str], problems: list[str]) -> dict:
    """Apply dotted `section.key=value` overrides; values are read as YAML scalars/lists."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for item in overrides:
        try:
            parts, value = parse_override(item)
        except ConversionError as e:
            problems.append(str(e))
            continue
        if len(parts) != 2:
            problems.append(f"override {item!r}: the key must be section.key, "
                            f"e.g. optim.learning_rate")
            continue
        section, name = parts
        if section not in SECTIONS:
            problems.append(f"override {'.'.join(parts)}: unknown section '{section}'; "
                            f"{suggest(section, SECTIONS)}")
            continue
        current = data.get(section)
        if current is not None and not isinstance(current, dict):
            continue  # from_dict reports the malformed section; don't replace it silently
        data[section] = {**(current or {}), name: value}
    return data


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load a recipe: YAML -> `base:` inheritance -> overrides -> validation.

    Args:
        path: the recipe file.
        overrides: dotted `section.key=value` strings, applied after inheritance.

    Returns:
        The validated :class:`Recipe`.

    Raises:
        RecipeError: listing every problem found, each with key, value and fix.
    """
    problems: list[str] = []
    data = resolve_bases(Path(path), problems, SECTIONS)
    if data is None:
        raise RecipeError(problems, str(path))
    data = apply_overrides(data, list(overrides or []), problems)
    return from_dict(data, problems, source=str(path))


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML text."""
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False, default_flow_style=False)
