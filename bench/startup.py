"""Start-up time: `lrft --help`, `python -m lrft.cli --help`, `python -c "import lrft"`.

Hyperfine-like: every command runs --runs times, round-robin (so load changes hit all of them
alike), after one warm-up each; the table shows median, min and IQR in seconds. `python -c pass`
is the floor (the interpreter alone). `lrft` is the installed console script (behind a pyenv
shim on these machines, which costs its own few tens of milliseconds).

Run:  python bench/startup.py [--runs 15]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time

from _common import REPO, iqr, loadavg, median, table, write_result

TARGET = 1.0  # seconds, for `lrft --help`


def commands() -> dict[str, list[str]]:
    cmds = {"python -c pass": [sys.executable, "-c", "pass"],
            'python -c "import lrft"': [sys.executable, "-c", "import lrft"],
            "python -m lrft.cli --help": [sys.executable, "-m", "lrft.cli", "--help"]}
    exe = shutil.which("lrft")
    if exe:
        cmds["lrft --help"] = [exe, "--help"]
    cmds["python -c \"import lrft.train\""] = [sys.executable, "-c", "import lrft.train"]
    return cmds


def once(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=15)
    a = p.parse_args()
    cmds = commands()
    times: dict[str, list[float]] = {k: [] for k in cmds}
    for cmd in cmds.values():
        once(cmd)  # warm-up: page cache, .pyc
    loads = []
    for _ in range(a.runs):
        loads.append(loadavg()[0])
        for name, cmd in cmds.items():
            times[name].append(once(cmd))
    rows = [{"command": k, "median_s": median(v), "min_s": min(v), "iqr_s": "%.3f..%.3f" % tuple(iqr(v))}
            for k, v in times.items()]
    print(table(rows))
    helps = times.get("lrft --help") or times["python -m lrft.cli --help"]
    ok = median(helps) < TARGET
    print(f"\ntarget: lrft --help < {TARGET} s: {'pass' if ok else 'FAIL'}; load {min(loads)}..{max(loads)}")
    write_result("startup", {"runs": a.runs, "times_s": times, "summary": rows,
                             "loadavg_1min_during": loads,
                             "target": {"lrft --help median_s <": TARGET,
                                        "measured": median(helps), "pass": ok}})


if __name__ == "__main__":
    main()
