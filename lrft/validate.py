"""The recipe's rules: every range and cross-field check, in one place, asking the registries.

`validate(recipe)` returns every problem of a typed recipe as a message naming the key, the bad
value and the fix; `lrft.recipe.load_recipe` raises them together as one RecipeError. What an
optimizer or a schedule reads comes from its registry entry (`lrft.optim.OPTIMIZERS`,
`lrft.schedule.SCHEDULES`), never from a list kept here. Imports no torch.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math

from lrft import optim, schedule
from lrft.config import suggest

SECTIONS = ("model", "data", "optim", "schedule", "train", "lora", "log", "guard")



def _changed(r) -> frozenset[str]:
    """The explicit keys whose value differs from the default. A key set to its default changes
    nothing, so the "not read by ..." rules below skip it, and a dumped recipe (which spells out
    every default) loads back."""
    out = set()
    for section in SECTIONS:
        obj = getattr(r, section)
        default = type(obj)()
        out.update(f"{section}.{f.name}" for f in dataclasses.fields(obj)
                   if f"{section}.{f.name}" in r.explicit
                   and getattr(obj, f.name) != getattr(default, f.name))
    return frozenset(out)


def _finite(x: float | None) -> bool:
    return x is None or math.isfinite(x)


def validate(r) -> list[str]:
    """Every range and cross-field problem of a typed recipe, as messages (empty when valid)."""
    p: list[str] = []
    for section in SECTIONS:
        for f in dataclasses.fields(getattr(r, section)):
            value = getattr(getattr(r, section), f.name)
            if isinstance(value, float) and not math.isfinite(value):
                p.append(f"{section}.{f.name}: {value} is not a finite number")
    p += _validate_model(r) + _validate_data(r) + _validate_optim(r)
    p += _validate_schedule(r) + _validate_train(r) + _validate_lora(r) + _validate_guard(r)
    p += _validate_log(r)
    return p


# Attention kernels transformers can load a model with (`attn_implementation`); a name with a
# slash is a kernel from the Hub's `kernels` library (e.g. kernels-community/flash-attn).
ATTENTION = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3",
             "flash_attention_4", "paged|eager", "paged|sdpa", "paged|flash_attention_2")
# Trackers Accelerate logs to (accelerate.utils.LoggerType) and the package each one needs.
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow",
            "comet_ml": "comet_ml", "aim": "aim", "clearml": "clearml", "dvclive": "dvclive",
            "swanlab": "swanlab", "trackio": "trackio"}


def _validate_model(r) -> list[str]:
    p, m = [], r.model
    if not m.name_or_path:
        p.append("model.name_or_path: missing; set a hub id (bert-base-uncased) or a local folder")
    if m.num_labels is not None and m.num_labels < 1:
        p.append(f"model.num_labels: {m.num_labels} must be >= 1 (1 = regression)")
    attn = m.attn_implementation
    if attn is not None and attn not in ATTENTION and "/" not in attn:
        p.append(f"model.attn_implementation: unknown kernel {attn!r}; "
                 f"{suggest(attn, ATTENTION, 'choose from')} (or null for the model's default)")
    return p


def _validate_log(r) -> list[str]:
    p, names = [], r.log.report_to
    for name in names:
        if name == "none":
            if len(names) > 1:
                p.append(f"log.report_to: {names} mixes none with trackers; use [none] alone")
        elif name not in TRACKERS:
            p.append(f"log.report_to: unknown tracker {name!r}; "
                     f"{suggest(name, [*TRACKERS, 'none'], 'choose from')}")
        elif importlib.util.find_spec(TRACKERS[name]) is None:
            p.append(f"log.report_to: {name} is not installed (the run would go untracked); "
                     f"pip install {TRACKERS[name].replace('_', '-')}, or remove it")
    return p


def _validate_data(r) -> list[str]:
    p, d = [], r.data
    causal = r.model.task == "causal_lm"
    if causal and d.glue_task:
        p.append(f"data.glue_task: {d.glue_task!r} is a classification task but model.task is "
                 f"causal_lm; remove data.glue_task or set model.task: sequence_classification")
    if not causal and not (d.glue_task or d.path or d.train_files):
        p.append("data: no data; set data.glue_task (e.g. sst2), data.path or data.train_files")
    if not causal and not d.glue_task and (d.path or d.train_files) and not d.text_columns:
        p.append("data.text_columns: missing; name the 1 or 2 text columns, e.g. [sentence]")
    if d.text_columns is not None and not 1 <= len(d.text_columns) <= 2:
        p.append(f"data.text_columns: {d.text_columns} must name 1 or 2 columns")
    if d.max_length < 8:
        p.append(f"data.max_length: {d.max_length} is too short; use at least 8 (typical: 128-512)")
    for key in ("eval_fraction", "holdout_fraction"):
        value = getattr(d, key)
        if value is not None and not 0 < value < 1:
            p.append(f"data.{key}: {value} must be in (0, 1), e.g. 0.1")
    if d.holdout_fraction is not None and causal:
        p.append("data.holdout_fraction: a held-out selection split is for classification; "
                 "remove it")
    for key in ("max_train_samples", "max_eval_samples"):
        value = getattr(d, key)
        if value is not None and value < 1:
            p.append(f"data.{key}: {value} must be >= 1 or null (all rows)")
    if d.packing and not causal:
        p.append("data.packing: packing applies to causal LM data; remove it or set "
                 "model.task: causal_lm")
    return p


def _validate_optim(r) -> list[str]:
    p, o = [], r.optim
    spec = optim.OPTIMIZERS.get(o.name)
    if spec is None:
        p.append(f"optim.name: {optim.unknown_optimizer(o.name)}")
    if not o.learning_rate > 0:
        p.append(f"optim.learning_rate: {o.learning_rate} must be > 0 "
                 f"(typical: 5e-6 full, 5e-5 standard, 1e-4 LoRA; see `lrft lr-guide`)")
    elif o.learning_rate > 1 and math.isfinite(o.learning_rate):
        p.append(f"optim.learning_rate: {o.learning_rate:g} is far above any fine-tuning LR; "
                 f"typical: 5e-6 full, 5e-5 standard, 1e-4 LoRA (see `lrft lr-guide`)")
    if o.weight_decay < 0:
        p.append(f"optim.weight_decay: {o.weight_decay} must be >= 0 (typical: 0.01)")
    for key in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(o, key) < 1:
            p.append(f"optim.{key}: {getattr(o, key)} must be in [0, 1)")
    if not o.adam_epsilon > 0:
        p.append(f"optim.adam_epsilon: {o.adam_epsilon} must be > 0 (typical: 1e-8)")
    if o.layer_decay is not None and not 0 < o.layer_decay <= 1:
        p.append(f"optim.layer_decay: {o.layer_decay} must be in (0, 1] (typical: 0.75-0.95)")
    for key in ("head_lr_scale", "embedding_lr_scale"):
        value = getattr(o, key)
        if value is not None and not value > 0:
            p.append(f"optim.{key}: {value} must be > 0 (e.g. 2.0 for a head at twice the LR)")
    if o.scale_lr != "none" and o.reference_batch_size is None:
        p.append(f"optim.reference_batch_size: needed with optim.scale_lr: {o.scale_lr}; set the "
                 f"effective batch the learning rate was tuned for, e.g. 32")
    if o.reference_batch_size is not None and o.reference_batch_size < 1:
        p.append(f"optim.reference_batch_size: {o.reference_batch_size} must be >= 1")
    return p + (_optimizer_keys(r, spec) if spec is not None else [])


def _optimizer_keys(r, spec) -> list[str]:
    """The keys the chosen optimizer reads, by its registry entry."""
    p, o, changed = [], r.optim, _changed(r)
    if not optim.reads_betas(o.name):
        p += [f"optim.{k}: optimizer {o.name!r} has no betas; remove the key"
              for k in ("adam_beta1", "adam_beta2") if f"optim.{k}" in changed]
    if not optim.reads_eps(o.name) and "optim.adam_epsilon" in changed:
        p.append(f"optim.adam_epsilon: optimizer {o.name!r} takes no epsilon; remove the key")
    if spec.package and importlib.util.find_spec(spec.package) is None:
        p.append(f"optim.name: {o.name!r} needs {spec.package}, which is not installed; "
                 f"pip install {spec.package.replace('_', '-')}, or use optim.name=adamw")
    for key in o.args:
        if key in optim.RECIPE_KEYS:
            p.append(f"optim.args.{key}: set {optim.RECIPE_KEYS[key]} instead (one value, "
                     f"one place)")
    p += [f"optim.args: {msg}" for msg in optim.check_optimizer_args(
        o.name, {k: v for k, v in o.args.items() if k not in optim.RECIPE_KEYS})]
    return p


def schedule_problem(optimizer: str, schedule_name: str) -> str | None:
    """Why an optimizer cannot follow a schedule, or None: a schedule-free optimizer with a
    schedule that decays the LR (the recipe and lrft.hf's keyword arguments both ask here)."""
    spec, sched = optim.OPTIMIZERS.get(optimizer), schedule.SCHEDULES.get(schedule_name)
    if spec is None or sched is None or not spec.schedule_free or sched.constant:
        return None
    constant = [n for n, s in schedule.SCHEDULES.items() if s.constant]
    return (f"{schedule_name} decays the LR, but {optimizer} averages its weights in place of a "
            f"decay: its theory and its LR range assume the LR stays constant after warmup, and "
            f"a decay on top anneals twice (Defazio et al. 2024, The Road Less Scheduled); use "
            f"{' or '.join(constant)} (a warmup is fine)")


def _validate_schedule(r) -> list[str]:
    s, t = r.schedule, r.train
    p = [f"schedule.{' and schedule.'.join(keys)}: {message}" for keys, message in
         schedule.check_options(s.lr_scheduler_type, schedule.recipe_options(s))]
    spec = schedule.SCHEDULES.get(s.lr_scheduler_type)
    if spec is None:
        return p
    if s.warmup_steps is not None and t.max_steps > 0 and s.warmup_steps > t.max_steps:
        p.append(f"schedule.warmup_steps: {s.warmup_steps} is more than train.max_steps "
                 f"({t.max_steps}); lower it or use warmup_ratio")
    if spec.decay is None and t.eval_steps is None:
        p.append(f"train.eval_steps: {s.lr_scheduler_type} steps on evaluations; set eval_steps")
    clash = schedule_problem(r.optim.name, s.lr_scheduler_type)
    if clash:
        p.append(f"schedule.lr_scheduler_type: {clash}")
    changed = _changed(r)
    for key in schedule.DEFAULTS:
        if f"schedule.{key}" in changed and key not in spec.keys:
            readers = [n for n, other in schedule.SCHEDULES.items() if key in other.keys]
            p.append(f"schedule.{key}: not read by lr_scheduler_type {s.lr_scheduler_type!r} "
                     f"(only by {', '.join(readers)}); remove it")
    return p


def _validate_train(r) -> list[str]:
    p, t = [], r.train
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size",
                "gradient_accumulation_steps", "logging_steps"):
        if getattr(t, key) < 1:
            p.append(f"train.{key}: {getattr(t, key)} must be >= 1")
    if t.max_steps == 0 or t.max_steps < -1:
        p.append(f"train.max_steps: {t.max_steps} must be > 0, or -1 to use num_train_epochs")
    if t.max_steps == -1 and not t.num_train_epochs > 0:
        p.append(f"train.num_train_epochs: {t.num_train_epochs} must be > 0 "
                 f"(or set train.max_steps)")
    if t.max_grad_norm is not None and not t.max_grad_norm > 0:
        p.append(f"train.max_grad_norm: {t.max_grad_norm} must be > 0, or null for no clipping")
    for key in ("eval_steps", "save_steps", "save_total_limit", "num_threads"):
        value = getattr(t, key)
        if value is not None and value < 1:
            p.append(f"train.{key}: {value} must be >= 1 or null")
    if not t.output_dir:
        p.append("train.output_dir: missing; e.g. runs/sst2-standard")
    if not 0 <= t.seed < 2**32:
        p.append(f"train.seed: {t.seed} must be in [0, 2**32) (numpy's seed range), e.g. 42")
    return p


def _stray_keys(r, section: str) -> list[str]:
    """Keys of a switched-off section (`lora`, `guard`) that were set: they would do nothing."""
    stray = sorted(k for k in _changed(r) if k.startswith(f"{section}.")
                   and k != f"{section}.enabled")
    if not stray:
        return []
    return [f"{section}: {', '.join(stray)} set but {section}.enabled is false; set "
            f"{section}.enabled: true or remove them"]


def _validate_lora(r) -> list[str]:
    p, lo = [], r.lora
    if not lo.enabled:
        return _stray_keys(r, "lora")
    if lo.r < 1:
        p.append(f"lora.r: {lo.r} must be >= 1 (typical: 8-64)")
    if lo.alpha < 1:
        p.append(f"lora.alpha: {lo.alpha} must be >= 1 (typical: 2 x r)")
    if not 0 <= lo.dropout < 1:
        p.append(f"lora.dropout: {lo.dropout} must be in [0, 1)")
    if isinstance(lo.target_modules, str) and lo.target_modules != "auto":
        p.append(f"lora.target_modules: {lo.target_modules!r}: use auto or a list such as "
                 f"[query, value]")
    if lo.loraplus_lr_ratio is not None and not lo.loraplus_lr_ratio > 0:
        p.append(f"lora.loraplus_lr_ratio: {lo.loraplus_lr_ratio} must be > 0 (LoRA+ trains the "
                 f"B matrices at this multiple of the A matrices' LR; 16 in its paper)")
    if lo.load_in_4bit and importlib.util.find_spec("bitsandbytes") is None:
        p.append("lora.load_in_4bit: QLoRA needs bitsandbytes; pip install bitsandbytes")
    return p


def _validate_guard(r) -> list[str]:
    p, g = [], r.guard
    if not g.enabled:
        return _stray_keys(r, "guard")
    for key in ("loss_spike_factor", "grad_spike_factor"):
        if not getattr(g, key) > 1:
            p.append(f"guard.{key}: {getattr(g, key)} must be > 1 (e.g. 3)")
    for key in ("window", "snapshot_steps"):
        if getattr(g, key) < 1:
            p.append(f"guard.{key}: {getattr(g, key)} must be >= 1")
    if not 0 < g.lr_backoff < 1:
        p.append(f"guard.lr_backoff: {g.lr_backoff} must be in (0, 1) (e.g. 0.5)")
    if g.max_rollbacks < 0:
        p.append(f"guard.max_rollbacks: {g.max_rollbacks} must be >= 0")
    return p
