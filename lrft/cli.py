"""The `lrft` command line: train, check, compare, find-lr, diagnose, lr-guide.

Argument parsing and thin command bodies only. Every subcommand imports its heavy dependencies
(torch, transformers, peft) inside its body, so `lrft --help` and `lrft lr-guide` start in well
under a second. `key=value` overrides may stand anywhere on the line. Bad input ends with a
short message naming the key and the fix and exit status 2, never a traceback
(`lrft.errors.run_command`).
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import subprocess
import sys

EPILOG = """examples:
  lrft check recipes/bert/standard.yaml optim.learning_rate=3e-5
  lrft train recipes/quickstart.yaml
  lrft train recipes/bert/lora.yaml --config_file accelerate_configs/multi_gpu_8xa100.yaml
  lrft find-lr recipes/bert/standard.yaml --apply
  lrft diagnose runs/bert-standard
  lrft compare recipes/glue/compare-cpu.yaml
  lrft compare recipes/glue/compare-optimizers.yaml --executor slurm --partition gpu --time 4:00:00
  lrft lr-guide
"""


EXECUTORS = ("local", "slurm", "ray")


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

    p = sub.add_parser("check", help="validate a recipe and print it resolved (a comparison "
                                     "spec: validate it and every cell, list its grid)")
    _add_recipe_args(p)

    p = sub.add_parser("compare", help="compare optimizers x tasks x seeds x LRs (GLUE or custom "
                                       "tasks), each optimizer at its own best LR")
    p.add_argument("recipe", nargs="?", help="comparison recipe (recipes/glue/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--report", metavar="DIR",
                   help="rebuild tables and plots from the finished cells in DIR; no training")
    p.add_argument("--shard", metavar="I/N",
                   help="run only every N-th cell from the I-th (1-based), e.g. a SLURM array "
                        "task; workers on one folder never run a cell twice")
    p.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="local (default): the cells one after another here; slurm: one job "
                        "array, a task per unfinished cell, through submitit (pip install -e "
                        "'.[slurm]'); ray: a Ray task per cell on the cluster ray.init finds "
                        "(RAY_ADDRESS) or a local one (pip install -e '.[ray]')")
    g = p.add_argument_group("what each cell asks for under --executor slurm | ray (else the "
                             "spec's cluster: section)")
    g.add_argument("--partition", help="SLURM partition (cluster.partition)")
    g.add_argument("--account", help="SLURM account (cluster.account)")
    g.add_argument("--time", metavar="MIN|H:MM:SS",
                   help="SLURM time limit of one cell, e.g. 240 or 4:00:00 (cluster.time_min); "
                        "a cell that reaches it is requeued and resumes from its checkpoint")
    g.add_argument("--gpus", type=int, metavar="N",
                   help="GPUs per training process (cluster.gpus_per_process); 0: CPU-only")
    g.add_argument("--cpus", type=int, metavar="N",
                   help="CPU cores per training process (cluster.cpus_per_process)")

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


def positionals_first(argv: list[str], value_options: set[str]) -> list[str]:
    """The command, then its positionals (recipe and `key=value` overrides, in their order), then
    the options with their values: argparse reads the overrides wherever the user put them
    (`lrft find-lr R --num_steps 20 train.output_dir=X`). A `--` leaves the line as it is."""
    if len(argv) < 2 or "--" in argv:
        return argv
    positionals, options, tokens = [], [], argv[1:]
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token.startswith("-") and len(token) > 1:
            options.append(token)
            if token in value_options and i + 1 < len(tokens):
                options.append(tokens[i + 1])
                i += 1
        else:
            positionals.append(token)
        i += 1
    return argv[:1] + positionals + options


def value_options(parser: argparse.ArgumentParser) -> set[str]:
    """Option strings of every subcommand that take a value (`--num_steps 20`)."""
    found = set()
    for action in parser._actions:  # argparse keeps subcommands only here
        for sub in getattr(action, "choices", None) or {}:
            if isinstance(action.choices, dict):
                for option in action.choices[sub]._actions:
                    if option.option_strings and option.nargs != 0:
                        found.update(option.option_strings)
    return found


# ---------------------------------------------------------------------------------------------
# Command bodies
# ---------------------------------------------------------------------------------------------

def cmd_train(args: argparse.Namespace) -> int:
    if args.config_file or args.num_processes is not None:
        from lrft.errors import USER_ERROR_EXIT, UserError
        from lrft.launch import accelerate_command, check_launcher
        from lrft.recipe import load_recipe

        problems = check_launcher(args.config_file, args.num_processes)
        if problems:
            raise UserError("; ".join(problems))
        load_recipe(args.recipe, args.overrides)  # a bad recipe is reported here, not per process
        code = subprocess.call(accelerate_command(args.recipe, args.overrides, quiet=True,
                                                  config_file=args.config_file,
                                                  num_processes=args.num_processes))
        return USER_ERROR_EXIT if code == USER_ERROR_EXIT else code
    from lrft.train import train

    train(args.recipe, args.overrides)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from lrft.compare.load import is_comparison
    from lrft.recipe import dump_recipe, load_recipe

    if is_comparison(args.recipe):
        return _check_comparison(args.recipe, args.overrides)
    recipe = load_recipe(args.recipe, args.overrides)
    print(f"# {args.recipe}: valid")
    print(dump_recipe(recipe), end="")
    return 0


def _check_comparison(path: str, overrides: list[str]) -> int:
    """`lrft check` of a comparison spec: validate it and every cell's recipe, list the grid."""
    from lrft.compare import plan

    p = plan(path, overrides)
    c = p.comparison
    print(f"# {path}: valid comparison: {len(p.cells)} cells ({len(p.rows)} optimizer-LR rows x "
          f"{len(c.tasks)} tasks x {len(c.seeds)} seeds) into {c.output_dir}")
    print(f"tasks: {', '.join(c.tasks)}; seeds: {', '.join(map(str, c.seeds))}; "
          f"LRs picked on {c.selection.split}")
    for row in p.rows:
        print(f"  {row}")
    print("run: " + shlex.join(["lrft", "compare", path, *overrides]))
    return 0


def _cluster_overrides(args: argparse.Namespace) -> list[str]:
    """The --partition/--account/--time/--gpus/--cpus flags as `cluster.*` overrides."""
    from lrft.compare.grid import yaml_value
    from lrft.compare.spec import slurm_minutes
    from lrft.errors import UserError

    slurm, both = ("slurm",), ("slurm", "ray")
    flags = [("--partition", "partition", args.partition, slurm),
             ("--account", "account", args.account, slurm),
             ("--time", "time_min", args.time, slurm),
             ("--gpus", "gpus_per_process", args.gpus, both),
             ("--cpus", "cpus_per_process", args.cpus, both)]
    overrides = []
    for flag, key, value, executors in flags:
        if value is None:
            continue
        if args.executor not in executors:
            raise UserError(f"{flag} applies to --executor {' | '.join(executors)}")
        if key == "time_min":
            try:
                value = slurm_minutes(value)
            except ValueError:
                raise UserError(f"--time {value!r}: expected minutes or SLURM's [D-]HH:MM:SS, "
                                f"e.g. 240 or 4:00:00") from None
        overrides.append(f"cluster.{key}={yaml_value(value)}")
    return overrides


def cmd_compare(args: argparse.Namespace) -> int:
    from lrft import compare
    from lrft.errors import UserError

    if args.report:
        compare.report(args.report)
        return 0
    if not args.recipe:
        raise UserError("give a comparison recipe, or --report DIR")
    overrides = [*args.overrides, *_cluster_overrides(args)]
    if args.executor == "slurm":  # submits and returns: --report collects
        from lrft.compare.slurm import submit_slurm

        submit_slurm(args.recipe, overrides, shard=args.shard)
        return 0
    if args.executor == "ray":
        from lrft.compare.ray_exec import run_on_ray

        return 1 if run_on_ray(args.recipe, overrides, shard=args.shard)["failed"] else 0
    summary = compare.run_comparison(args.recipe, overrides, shard=args.shard)
    return 1 if summary.get("failed") else 0  # a failed cell stops the comparison


def cmd_find_lr(args: argparse.Namespace) -> int:
    from lrft.errors import UserError

    problems = []
    if args.num_steps < 2:
        problems.append(f"--num_steps: {args.num_steps} must be >= 2 (100 is the usual sweep)")
    for name in ("start_mult", "end_mult"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            problems.append(f"--{name}: {value} must be a number > 0")
    if not problems and args.start_mult and args.end_mult and args.end_mult <= args.start_mult:
        problems.append(f"--end_mult ({args.end_mult}) must be above --start_mult "
                        f"({args.start_mult})")
    if problems:
        raise UserError("; ".join(problems))
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


def main(argv: list[str] | None = None) -> int:
    from lrft.errors import run_command

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(positionals_first(argv, value_options(parser)))
    if args.command is None:
        parser.print_help()
        return 0
    return run_command(args.command, lambda: COMMANDS[args.command](args))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
