"""How a run's settings are spelled, so the doctor's advice names the knobs the user turns.

The rules decide *what* to change as plain names (`learning_rate`, `warmup_ratio`, ...); a
:class:`Dialect` writes them as lrft recipe overrides (`optim.learning_rate=5e-06`) or as HF
`TrainingArguments` (`--learning_rate 5e-06`). A change a dialect has no knob for is left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata


@dataclass(frozen=True)
class Dialect:
    """One way of writing the settings the doctor advises changing.

    Attributes:
        name: "recipe" or "training_arguments".
        keys: the doctor's name of a setting -> this dialect's key (None: no such setting).
        assign: how one setting is written, from `{key}` and `{value}`.
        try_title, try_command: the heading and the command line that show what to run next,
            the command from `{recipe}` and `{settings}`.
        guard_hint: a sentence on the divergence guard, or "" where there is none.
    """

    name: str
    keys: dict[str, str | None]
    assign: str
    try_title: str
    try_command: str
    guard_hint: str

    def key(self, setting: str) -> str:
        """This dialect's key for a setting the doctor names."""
        return self.keys.get(setting) or setting

    def render(self, changes: dict[str, str]) -> list[str]:
        """The changes written in this dialect, in order; those it cannot express left out."""
        return [self.assign.format(key=self.keys[k], value=v)
                for k, v in changes.items() if self.keys.get(k)]

    def try_lines(self, changes: dict[str, str], recipe: str) -> list[str]:
        """The lines that show the user what to run next (none when nothing is to change)."""
        rendered = self.render(changes)
        if not rendered:
            return []
        command = self.try_command.format(recipe=recipe, settings=" ".join(rendered))
        return [self.try_title, f"  {command}"]


RECIPE = Dialect(
    name="recipe",
    keys={"learning_rate": "optim.learning_rate", "scale_lr": "optim.scale_lr",
          "weight_decay": "optim.weight_decay", "warmup_ratio": "schedule.warmup_ratio",
          "max_grad_norm": "train.max_grad_norm", "max_steps": "train.max_steps",
          "logging_steps": "train.logging_steps", "output_dir": "train.output_dir"},
    assign="{key}={value}",
    try_title="Try:",
    try_command="lrft train {recipe} {settings}",
    guard_hint=" Enabling the guard (guard.enabled=true) rolls spikes back.",
)


def _warmup_argument() -> str:
    """The TrainingArguments field for a warmup ratio: `warmup_ratio` before transformers 5;
    from 5.0 a float `warmup_steps` below 1 is the ratio and `warmup_ratio` is deprecated, then
    removed (huggingface/transformers#41326). Read from the installed version's metadata, so
    transformers is not imported."""
    try:
        major = int(metadata.version("transformers").split(".")[0])
    except (metadata.PackageNotFoundError, ValueError):
        major = 5
    return "warmup_ratio" if major < 5 else "warmup_steps"


TRAINING_ARGUMENTS = Dialect(
    name="training_arguments",
    keys={"learning_rate": "learning_rate", "scale_lr": None, "weight_decay": "weight_decay",
          "warmup_ratio": _warmup_argument(), "max_grad_norm": "max_grad_norm",
          "max_steps": "max_steps", "logging_steps": "logging_steps", "output_dir": "output_dir"},
    assign="--{key} {value}",
    try_title="Try (the TrainingArguments of your script):",
    try_command="{settings}",
    guard_hint="",  # a guard callback for the Trainer is issue 14's; say nothing until it exists
)
