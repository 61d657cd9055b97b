"""The `lrft` command line: train, check, compare, find-lr, diagnose, lr-guide.

Every subcommand imports its heavy dependencies (torch, transformers, peft) inside its handler,
so `lrft --help` and `lrft lr-guide` start in well under a second. Bad input ends with a short
message naming the key and the fix and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

TRAIN_SCRIPT = Path(__file__).with_name("train.py")

EPILOG = """examples:
  lrft check recipes/bert/standard.yaml optim.learning_rate=3e-5
  lrft train recipes/quickstart.yaml
  lrft train recipes/bert/lora.yaml --num_processes 2 --config_file accelerate_configs/cpu.yaml
  lrft find-lr recipes/bert/standard.yaml --apply
  lrft diagnose runs/bert-standard
  lrft compare recipes/glue/compare-cpu.yaml
  lrft lr-guide
"""


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. optim.learning_rate=3e-5 train.max_steps=100")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lrft", description="Fine-tuning recipes built around the learning rate.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="fine-tune a model from a recipe")
    _add_recipe_args(p)
    p.add_argument("--config_file", help="accelerate launcher config: runs through "
                                         "`accelerate launch` (e.g. accelerate_configs/cpu.yaml)")
    p.add_argument("--num_processes", type=int, help="processes for `accelerate launch`")

    p = sub.add_parser("check", help="validate a recipe and print it resolved")
    _add_recipe_args(p)

    p = sub.add_parser("compare", help="compare optimizers x tasks x seeds on GLUE")
    p.add_argument("recipe", nargs="?", help="comparison recipe (recipes/glue/compare-*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--report", metavar="DIR",
                   help="rebuild tables and plots from the finished cells in DIR; no training")

    p = sub.add_parser("find-lr", help="LR range test that keeps the recipe's group ratios")
    _add_recipe_args(p)
    p.add_argument("--num_steps", type=int, default=100)
    p.add_argument("--start_mult", type=float, default=None,
                   help="first multiplier of every group's base LR")
    p.add_argument("--end_mult", type=float, default=None)
    p.add_argument("--apply", action="store_true",
                   help="write the suggested LR into a new recipe file next to the original")

    p = sub.add_parser("diagnose", help="read a run's metrics.jsonl and say what the LR did")
    p.add_argument("run_dir")

    sub.add_parser("lr-guide", help="print the learning-rate table with its reasons")
    return parser


def _version() -> str:
    from lrft import __version__

    return f"lrft {__version__}"


def _launch(args: argparse.Namespace) -> int:
    """Run training through `accelerate launch` with the user's launcher settings."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if args.config_file:
        cmd += ["--config_file", args.config_file]
    if args.num_processes:
        cmd += ["--num_processes", str(args.num_processes)]
    cmd += [str(TRAIN_SCRIPT), args.recipe, *args.overrides]
    return subprocess.call(cmd)


def cmd_train(args: argparse.Namespace) -> int:
    if args.config_file or args.num_processes:
        return _launch(args)
    from lrft.train import train

    train(args.recipe, args.overrides)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from lrft.recipe import dump_recipe, load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    print(f"# {args.recipe}: valid")
    print(dump_recipe(recipe), end="")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from lrft import compare

    if args.report:
        compare.report(args.report)
        return 0
    if not args.recipe:
        raise SystemExit("lrft compare: give a comparison recipe, or --report DIR")
    summary = compare.run_comparison(args.recipe, args.overrides)
    return 1 if summary.get("failed") else 0  # a failed cell stops the comparison


def cmd_find_lr(args: argparse.Namespace) -> int:
    from lrft.finder import find_lr_for_recipe

    find_lr_for_recipe(args.recipe, args.overrides, num_steps=args.num_steps,
                       start_mult=args.start_mult, end_mult=args.end_mult, apply=args.apply)
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    from lrft.doctor import diagnose_run

    return diagnose_run(args.run_dir)


def cmd_lr_guide(args: argparse.Namespace) -> int:
    from lrft.presets import format_lr_table

    print(format_lr_table())
    return 0


COMMANDS = {"train": cmd_train, "check": cmd_check, "compare": cmd_compare,
            "find-lr": cmd_find_lr, "diagnose": cmd_diagnose, "lr-guide": cmd_lr_guide}


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that are the user's to fix: shown as a message, not a traceback."""
    from lrft.recipe import RecipeError

    errors: list[type[BaseException]] = [RecipeError, FileNotFoundError]
    if "lrft.data" in sys.modules:
        errors.append(sys.modules["lrft.data"].DataError)
    if "lrft.train" in sys.modules:  # disk full or folder gone while saving a checkpoint
        errors.append(sys.modules["lrft.train"].CheckpointError)
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - user errors get a message, the rest re-raise
        if isinstance(e, _user_errors()):
            print(f"lrft {args.command}: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
