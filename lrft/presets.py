"""The practitioners' learning-rate table, as data, and the batch-size scaling rule.

The values are the starting points the fine-tuning literature and model cards converge on
(BERT paper's 2e-5..5e-5 grid, the LoRA and QLoRA papers' 1e-4..2e-4, instruction-tuning
recipes' ~5e-6 for full updates of large models). The Lion paper (Chen et al., 2023, "Symbolic
Discovery of Optimization Algorithms") recommends a 3-10x smaller LR and 3-10x larger decoupled
weight decay than AdamW, because Lion's sign update has a larger norm than Adam's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class LRPreset:
    """A recommended learning rate with its range and the reason for it."""

    scenario: str
    optimizer: str
    learning_rate: float
    low: float
    high: float
    weight_decay: float
    reason: str


# How a LoRA LR moves with the adapter's scaling (peft: alpha/r, rsLoRA: alpha/sqrt(r)). Under
# Adam every adapter weight moves by about the LR per step whatever its gradient's size, so the
# change of the adapter's product grows with LR x scale.
LORA_SCALING = (
    "The value assumes peft's adapter scale alpha/r = 2 (lrft's r=16, alpha=32), and the adapter's "
    "step grows with LR x scale: rsLoRA (lora.use_rslora) scales by alpha/sqrt(r), sqrt(r) times "
    "alpha/r at the same r and alpha (4x at r=16), so divide the LR by about sqrt(r) (or alpha by "
    "it) when switching it on. Across ranks: with alpha fixed, alpha/r shrinks as r grows and "
    "larger ranks learn slower; under rsLoRA's alpha/sqrt(r) an LR tuned at one rank carries over "
    "to another (Kalajdzievski 2023); the usual alpha = 2r keeps alpha/r at 2. LoRA+ "
    "(lora.loraplus_lr_ratio, 16 in Hayou et al. 2024) raises only the B matrices: this LR stays "
    "the A matrices' one")

# AdamW values; other optimizers are derived from these below.
_ADAMW = {
    "full": LRPreset(
        "full", "adamw", 5e-6, 1e-6, 1e-5, 0.01,
        "full fine-tuning of every weight of a large pretrained model: the smallest LR keeps "
        "the update small relative to the weights and avoids catastrophic forgetting"),
    "standard": LRPreset(
        "standard", "adamw", 5e-5, 2e-5, 1e-4, 0.01,
        "the BERT-style default for task fine-tuning with a new head (BERT paper grid 2e-5..5e-5)"),
    "conservative": LRPreset(
        "conservative", "adamw", 4e-5, 1e-5, 5e-5, 0.01,
        "small data sets (a few thousand rows) or noisy labels: the lower end overfits less "
        "and varies less between seeds"),
    "lora": LRPreset(
        "lora", "adamw", 1e-4, 5e-5, 3e-4, 0.0,
        "LoRA trains few, freshly initialised low-rank weights from zero (B=0): they tolerate and "
        "need a larger LR (LoRA/QLoRA papers use 1e-4..2e-4). " + LORA_SCALING),
    "scratch": LRPreset(
        "scratch", "adamw", 1e-3, 3e-4, 3e-3, 0.1,
        "training from random initialisation (small models): nothing to forget, larger steps"),
}
SCENARIOS = tuple(_ADAMW)

# How other optimizers' LRs relate to AdamW's (`OptimizerSpec.lr_rule` in lrft.optim): a range of
# ratios, of which the geometric middle is the recommendation and the range widens low/high.
# Lion: 3-10x smaller LR and 3-10x larger weight decay (Lion paper, section 5), because its sign
# update has a larger norm than Adam's. SGD with momentum 0.9: no normalisation by the gradient's
# scale, so its LR is 100-1000x AdamW's on transformer fine-tuning (lrft's own measurement on
# MiniLM: docs/lr-study; Kumar et al. 2022 fine-tune with SGD at 1e-3..3e-2).
LR_RULES: dict[str, dict] = {
    "adamw": {"lr": (1.0, 1.0), "wd": 1.0,
              "note": ""},
    "lion": {"lr": (1 / 10.0, 1 / 3.0), "wd": math.sqrt(3.0 * 10.0),
             "note": "Lion: 3-10x smaller LR and 3-10x larger weight decay than AdamW (sign "
                     "updates have a larger norm)"},
    "sgd": {"lr": (100.0, 1000.0), "wd": 1.0,
            "note": "SGD with momentum: 100-1000x AdamW's LR (no per-weight normalisation)"},
    "muon": {"lr": (1.0, 1.0), "wd": 1.0,
             "note": "Muon with adjust_lr_fn match_rms_adamw (lrft's default) scales each "
                     "matrix's orthogonalised update to AdamW's RMS, 0.2 sqrt(max(rows, cols)), "
                     "so AdamW's LR and weight decay carry over (Liu et al. 2025, Muon is "
                     "Scalable for LLM Training); torch's own default, original, needs an LR of its "
                     "own (0.02 in Keller Jordan's runs)"},
    "schedule_free": {"lr": (1.0, 10.0), "wd": 1.0,
                      "note": "schedule-free AdamW: 1-10x AdamW's LR, its authors' starting "
                              "range (Defazio et al. 2024), held constant after warmup"},
}
# Kept for readers of earlier versions: Lion's published ranges.
LION_LR_DIVISOR = (3.0, 10.0)
LION_WD_MULTIPLIER = (3.0, 10.0)


def _rule(optimizer: str) -> dict:
    from lrft.optim import OPTIMIZERS  # torch-free at import

    spec = OPTIMIZERS.get(optimizer)
    if spec is None or spec.lr_rule is None:
        known = [n for n, s in OPTIMIZERS.items() if s.lr_rule]
        raise ValueError(f"no LR rule for optimizer {optimizer!r}; rules exist for "
                         f"{', '.join(known)}")
    return LR_RULES[spec.lr_rule]


def equivalent_lr(adamw_lr: float, optimizer: str) -> float:
    """The LR of `optimizer` that matches AdamW at `adamw_lr`, by its rule (2 significant digits).

    Raises:
        ValueError: the optimizer has no LR rule (see `LR_RULES`).
    """
    low, high = _rule(optimizer)["lr"]
    return float(f"{adamw_lr * math.sqrt(low * high):.2g}")


def lr_preset(scenario: str, optimizer: str = "adamw") -> LRPreset:
    """The recommended LR (and range, weight decay, reason) for a scenario and optimizer.

    Args:
        scenario: one of full, standard, conservative, lora, scratch.
        optimizer: any optimizer with an LR rule (`lrft.optim.OPTIMIZERS[...].lr_rule`): the
            AdamW family and rmsprop share AdamW's values; lion and lion_8bit get Lion's rule,
            sgd SGD's.

    Returns:
        An :class:`LRPreset`.

    Raises:
        ValueError: unknown scenario or an optimizer with no LR rule.
    """
    if scenario not in _ADAMW:
        raise ValueError(f"unknown scenario {scenario!r}; choose from {', '.join(SCENARIOS)}")
    base, rule = _ADAMW[scenario], _rule(optimizer)
    if rule is LR_RULES["adamw"]:
        return replace(base, optimizer=optimizer)
    low, high = rule["lr"]
    wd = base.weight_decay * rule["wd"]  # no decay stays no decay (LoRA adapters)
    return replace(
        base, optimizer=optimizer, learning_rate=equivalent_lr(base.learning_rate, optimizer),
        low=base.low * low, high=base.high * high, weight_decay=float(f"{wd:.2g}"),
        reason=f"{base.reason}; {rule['note']}")


def scaled_lr(lr: float, batch_size: int, reference_batch_size: int, rule: str) -> float:
    """Scale a learning rate tuned at `reference_batch_size` to `batch_size`.

    linear: lr x B / B_ref (Goyal et al. 2017, for SGD); sqrt: lr x sqrt(B / B_ref) (the
    usual rule for adaptive optimizers, Malladi et al. 2022 "On the SDEs and scaling rules for
    adaptive gradient algorithms"); none: unchanged.
    """
    ratio = batch_size / reference_batch_size
    if rule == "none":
        return lr
    if rule == "linear":
        return lr * ratio
    if rule == "sqrt":
        return lr * math.sqrt(ratio)
    raise ValueError(f"unknown LR scaling rule {rule!r}; choose from none, linear, sqrt")


# The optimizers `lrft lr-guide` shows, and the line under the table for each whose LR is not
# simply AdamW's.
GUIDE_OPTIMIZERS = ("adamw", "lion", "muon", "schedule_free_adamw")
_FOOTNOTES = {
    "lion": "3-10x smaller LR and 3-10x larger weight decay than AdamW (Chen et al. 2023). "
            "Measured on short fine-tunes (docs/lr-study, MiniLM, 50-100 steps): Lion's best LR "
            "was only ~2x below AdamW's, and 5.5x below cost 7-16 points: tune it.",
    "muon": "Muon on the hidden matrices, AdamW on the rest: AdamW's LR and weight decay carry "
            "over (adjust_lr_fn match_rms_adamw, Liu et al. 2025). Measured on short fine-tunes "
            "(docs/lr-study): Muon's best LR was 3-10x AdamW's: tune it upwards.",
    "schedule_free_adamw": "1-10x AdamW's LR, constant after warmup: it averages its weights "
                           "instead of decaying the LR (Defazio et al. 2024).",
}


def format_lr_table(optimizers: tuple[str, ...] = GUIDE_OPTIMIZERS) -> str:
    """The LR table with reasons, for `lrft lr-guide`."""
    width = max(len("optimizer"), *map(len, optimizers)) + 2
    rows = [f"{'scenario':<13}{'optimizer':<{width}}{'lr':>9}{'range':>22}{'wd':>7}"]
    for scenario in SCENARIOS:
        for opt in optimizers:
            p = lr_preset(scenario, opt)
            rng = f"{p.low:.0e} .. {p.high:.0e}"
            # .1e: Lion LRs carry two significant digits (9.1e-06), which .0e would round off.
            rows.append(f"{scenario:<13}{opt:<{width}}{p.learning_rate:>9.1e}{rng:>22}"
                        f"{p.weight_decay:>7.2g}")
    rows.append("")
    rows += [f"{s}: {_ADAMW[s].reason}." for s in SCENARIOS]
    rows += [f"{opt}: {_FOOTNOTES[opt]}" for opt in optimizers if opt in _FOOTNOTES]
    return "\n".join(rows)
