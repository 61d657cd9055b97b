"""Mixed precision: what `train.mixed_precision: auto` picks, and the attention kernel that suits it.

`auto` (the default) means: the launcher's precision when it asked for one (`accelerate launch
--mixed_precision bf16`, or a config file saying bf16/fp16), otherwise bf16 autocast where the
hardware computes bf16 natively, otherwise fp32. Native bf16 is an Ampere-or-newer GPU (A100, H100,
RTX 30xx+) or a CPU with AMX tiles (Intel Xeon Sapphire Rapids and newer) or AVX512-BF16
instructions (AMD EPYC Zen 4 and newer, Intel Cooper Lake), where a MiniLM training step runs
about 2x faster under bf16 autocast (bench/cpu_bf16.py, one row per CPU measured). fp16 is
never picked automatically: it needs loss scaling and overflows where bf16 does not. Weights, gradients and optimizer state stay fp32
under autocast; only the forward/backward matmuls run in bf16.

On CPU one kernel spoils the gain: torch's SDPA "flash" kernel is 2-6x slower in bf16 than in fp32
on short sequences (its backward, at MiniLM's 12 heads x 32 dims, 48-128 tokens), slower than
transformers' plain ("eager") attention, whose batched matmuls use the bf16 units. It wins again from
about 256 tokens. So a CPU bf16 run with short sequences loads the model with eager attention
unless the recipe names one (`model.attn_implementation`).
"""

from __future__ import annotations

import os

import torch

# Below this many tokens per sequence, eager attention beats SDPA's flash kernel on a CPU in bf16
# (torch 2.13, forward + backward, bench/fixes.py: MiniLM's heads at 48 tokens 24 vs 113 ms and at
# 128 tokens 103 vs 175 ms; at 256 tokens flash wins, 83 vs 63 ms for SmolLM2's heads).
CPU_BF16_EAGER_BELOW = 256


def native_bf16(device: torch.device) -> bool:
    """True when `device` computes bf16 matmuls in hardware: Ampere+ GPUs; CPUs with AMX tiles
    or AVX512-BF16 instructions (bench/cpu_bf16.py measures what each gains)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return _cpu_has("_is_amx_tile_supported") or _cpu_has("_is_avx512_bf16_supported")
    return False


def _cpu_bf16_units() -> str:
    return "AMX" if _cpu_has("_is_amx_tile_supported") else "AVX512-BF16"


def _cpu_has(check: str) -> bool:
    probe = getattr(torch.cpu, check, None)  # private torch probes: absent is "no"
    return bool(probe and probe())


def resolve_mixed_precision(asked: str | None, device: torch.device) -> tuple[str | None, str]:
    """The precision to give `accelerate.Accelerator`, and why.

    Args:
        asked: `train.mixed_precision`: "auto", "no", "fp16", "bf16", or None (the launcher's).
        device: the device the run trains on.

    Returns:
        (mixed_precision, reason): mixed_precision is None only when `asked` is None, which leaves
        the choice to Accelerate (its launcher's setting, else "no").
    """
    if asked != "auto":
        return asked, "the recipe's train.mixed_precision" if asked else "the launcher's setting"
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launcher != "no":
        return launcher, f"auto: the launcher asked for {launcher}"
    if native_bf16(device):
        what = "this GPU computes bf16 natively" if device.type == "cuda" else \
            f"this CPU computes bf16 natively ({_cpu_bf16_units()})"
        return "bf16", f"auto: {what}; train.mixed_precision: \"no\" for fp32"
    return "no", f"auto: no native bf16 on {device.type}"


def attention_for(asked: str | None, device: torch.device, mixed_precision: str | None,
                  max_tokens: int) -> tuple[str | None, str | None]:
    """The attention implementation to load the model with, and why (None, None: the default).

    Args:
        asked: `model.attn_implementation`; when set it is used as is.
        device: the training device.
        mixed_precision: the resolved precision (see `resolve_mixed_precision`).
        max_tokens: the longest sequence a batch can hold (`data.max_length`).
    """
    if asked or device.type != "cpu" or mixed_precision != "bf16":
        return asked, None
    if max_tokens >= CPU_BF16_EAGER_BELOW:
        return None, None
    return "eager", (f"attention: eager (CPU bf16, sequences under {CPU_BF16_EAGER_BELOW} tokens: "
                     f"faster than SDPA's flash kernel; model.attn_implementation overrides)")
