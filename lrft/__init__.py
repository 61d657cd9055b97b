"""lrft: fine-tuning recipes built around the learning rate.

The public helpers, for people with their own training loop::

    from lrft import load_recipe, param_groups, build_optimizer, build_scheduler, lr_preset

Imports are lazy (PEP 562) so that ``import lrft`` and ``lrft --help`` do not pull in torch,
transformers or peft.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "load_recipe": "lrft.recipe",
    "Recipe": "lrft.recipe",
    "RecipeError": "lrft.errors",
    "UserError": "lrft.errors",
    "param_groups": "lrft.groups",
    "format_group_table": "lrft.groups",
    "build_optimizer": "lrft.optim",
    "optimizer_state_bytes": "lrft.optim",
    "eval_weights": "lrft.schedule_free",
    "train_mode": "lrft.schedule_free",
    "build_scheduler": "lrft.schedule",
    "lr_multiplier": "lrft.schedule",
    "lr_preset": "lrft.presets",
    "equivalent_lr": "lrft.presets",
    "scaled_lr": "lrft.presets",
    "lr_range_test": "lrft.finder",
    "diagnose": "lrft.doctor",
    "read_log": "lrft.runlog",
    "DivergenceGuard": "lrft.guard",
    "train": "lrft.train",
    "resolve_mixed_precision": "lrft.precision",
    "native_bf16": "lrft.precision",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lrft' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
