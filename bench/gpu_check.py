"""Check on a CUDA GPU what the CPU tests of issue 17 cannot show, in a few minutes.

    python bench/gpu_check.py        # after `pip install -e ".[dev]"` on a machine with a GPU

The CPU tests (tests/test_distributed.py, tests/test_distributed_faults.py) run FSDP2 on gloo,
fp16 through a CPU GradScaler, and QLoRA's 4-bit layers through bitsandbytes' CPU path. What only
a GPU has is checked here, each on a tiny model through lrft's real entry point:

1. fp16 guard: Accelerate's own CUDA GradScaler with torch's fused AdamW. A NaN loss at step 3
   is skipped / rolled back and the run goes on (finding 2); inf gradients at steps 2-3 are the
   scaler's overflows: no guard event, and the schedule holds still on them (finding 10).
2. bf16 master weights: a Llama checkpoint loaded in bf16, 10 AdamW steps at a constant 5e-6
   under bf16 autocast move > 99 % of its 2-D weights (6.7 % with bf16 weights; finding 1).
3. FSDP2 BERT: `accelerate launch --config_file accelerate_configs/fsdp_8xa100.yaml` on 1-2
   GPUs (NCCL, bf16 sharded compute) trains and saves a model `from_pretrained` loads (3, 14).
4. 8-bit under FSDP2: the same launch with optim.name=adamw_8bit stops before loading with the
   message naming optim.name (finding 4).
5. QLoRA classifier: a 4-bit BERT base with LoRA trains, its new head in full precision (7, 10).

Prints PASS / FAIL per check with its evidence and writes bench/results/gpu_check.json. Without
CUDA every check is skipped with the reason and the script exits 0; it exits 1 if a check fails.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from _common import REPO, write_result

sys.path.insert(0, str(REPO / "tests"))

from conftest import (bert_recipe, write_causal_data, write_glue_folder,  # noqa: E402
                      write_recipe, write_tiny_bert, write_tiny_llama)


def _records(out: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == kind]


def _train(recipe: dict, folder: Path, *overrides: str) -> dict:
    import lrft.train

    return lrft.train.train(write_recipe(folder / "recipe.yaml", recipe), list(overrides))


def check_fp16_guard(tmp: Path, bert: Path, glue: Path) -> str:
    import pytest
    from test_distributed_faults import _at_steps

    evidence = []
    for action in ("skip", "rollback"):
        folder = tmp / f"fp16-{action}"
        recipe = bert_recipe(bert, glue, folder / "run", max_steps=6, eval_steps=None,
                             mixed_precision="fp16")
        recipe["guard"] = {"enabled": True, "action": action, "snapshot_steps": 1}
        with pytest.MonkeyPatch.context() as mp:
            _at_steps(mp, {3}, nan_loss=True)
            folder.mkdir()
            results = _train(recipe, folder)
        events = [(e["step"], e["event"]) for e in _records(folder / "run", "guard")]
        assert results["status"] == "completed", results["status"]
        assert events == [(3, "nan_loss"), (3, action)], events
        evidence.append(f"NaN at step 3, {action}: completed")
    lrs = {}
    for name, steps in (("clean", set()), ("overflow", {2, 3})):
        folder = tmp / f"fp16-{name}"
        recipe = bert_recipe(bert, glue, folder / "run", max_steps=8, eval_steps=None,
                             mixed_precision="fp16")
        recipe["schedule"] = {"lr_scheduler_type": "linear", "warmup_steps": 3}
        recipe["guard"] = {"enabled": True}
        with pytest.MonkeyPatch.context() as mp:
            _at_steps(mp, steps, inf_grad=True)
            folder.mkdir()
            results = _train(recipe, folder)
        assert results["rollbacks"] == 0 and not _records(folder / "run", "guard")
        lrs[name] = [r["lr"]["body"] for r in _records(folder / "run", "train")]
    assert lrs["overflow"][:3] == [lrs["clean"][0]] * 3, lrs
    assert lrs["overflow"][3:] == lrs["clean"][1:-2], lrs
    return "; ".join(evidence) + "; overflows at 2-3: no guard event, schedule held still"


def check_bf16_masters(tmp: Path, llama: Path, causal: dict) -> str:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    before = {k: v.float() for k, v in AutoModelForCausalLM.from_pretrained(
        llama, dtype=torch.bfloat16).state_dict().items()}
    recipe = {"model": {"name_or_path": str(llama), "task": "causal_lm", "dtype": "bfloat16"},
              "data": {"format": "messages", "train_files": [str(causal["messages-train"])],
                       "eval_files": [str(causal["messages-eval"])], "max_length": 64},
              "optim": {"name": "adamw", "learning_rate": 5e-6, "weight_decay": 0.0},
              "schedule": {"lr_scheduler_type": "constant"},
              "train": {"output_dir": str(tmp / "bf16" / "run"), "max_steps": 10,
                        "per_device_train_batch_size": 8, "max_grad_norm": None,
                        "mixed_precision": "bf16", "logging_steps": 1},
              "log": {"report_to": ["none"]}}
    (tmp / "bf16").mkdir()
    _train(recipe, tmp / "bf16")
    after = load_file(tmp / "bf16" / "run" / "model.safetensors")
    matrices = [k for k, v in before.items() if v.ndim == 2 and k in after]
    moved = sum(int((after[k].float() != before[k]).sum()) for k in matrices)
    share = moved / sum(before[k].numel() for k in matrices)
    assert {after[k].dtype for k in matrices} == {torch.float32}
    assert share > 0.99, f"only {share:.1%} of 2-D weights moved"
    return f"{share:.1%} of 2-D weight entries moved in 10 steps at 5e-6 (fp32 masters)"


def _fsdp_launch(tmp: Path, bert: Path, glue: Path, name: str, *overrides: str):
    import torch

    processes = min(2, torch.cuda.device_count())
    out = tmp / name / "run"
    recipe = write_recipe(tmp / f"{name}.yaml", bert_recipe(
        bert, glue, out, max_steps=6, eval_steps=None, per_device_train_batch_size=4))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "accelerate_configs" / "fsdp_8xa100.yaml"), "--num_processes",
           str(processes), str(REPO / "lrft" / "train.py"), str(recipe), *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    return proc, out, processes


def check_fsdp2_bert(tmp: Path, bert: Path, glue: Path) -> str:
    from transformers import AutoModelForSequenceClassification

    proc, out, n = _fsdp_launch(tmp, bert, glue, "fsdp", "optim.layer_decay=0.8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "completed" and results["step"] == 6
    start = _records(out, "start")[0]
    _, info = AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return (f"{n} GPU(s), mixed precision {start['mixed_precision']}, {len(start['groups'])} "
            f"param groups; final model loads with from_pretrained")


def check_fsdp2_refuses_8bit(tmp: Path, bert: Path, glue: Path) -> str:
    proc, _, n = _fsdp_launch(tmp, bert, glue, "fsdp-8bit", "optim.name=adamw_8bit")
    assert proc.returncode != 0 and "optim.name: adamw_8bit" in proc.stderr, proc.stderr[-3000:]
    line = next(x for x in proc.stderr.splitlines() if "optim.name: adamw_8bit" in x)
    return f"refused on {n} GPU(s): {line.strip()[:120]}"


def check_qlora_classifier(tmp: Path, bert: Path, glue: Path) -> str:
    recipe = bert_recipe(bert, glue, tmp / "qlora" / "run", max_steps=6, eval_steps=None)
    recipe["lora"] = {"enabled": True, "load_in_4bit": True, "r": 4, "alpha": 8,
                      "target_modules": ["query", "value"]}
    (tmp / "qlora").mkdir()
    results = _train(recipe, tmp / "qlora")
    out = tmp / "qlora" / "run"
    assert results["status"] == "completed" and (out / "adapter_model.safetensors").exists()
    losses = [r["loss"] for r in _records(out, "train")]
    assert all(loss == loss for loss in losses), losses  # no NaN
    return f"completed 6 steps, final eval loss {results['final']['validation']['eval_loss']:.4f}"


CHECKS = {"fp16 guard": check_fp16_guard, "bf16 masters": check_bf16_masters,
          "FSDP2 BERT": check_fsdp2_bert, "8-bit under FSDP2": check_fsdp2_refuses_8bit,
          "QLoRA classifier": check_qlora_classifier}


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        reason = "no CUDA GPU visible (torch.cuda.is_available() is False)"
        print(f"gpu_check: every check skipped: {reason}")
        for name in CHECKS:
            print(f"  SKIP  {name}")
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="lrft-gpu-check-") as tmp_dir:
        tmp = Path(tmp_dir)
        bert = write_tiny_bert(tmp / "bert")
        llama = write_tiny_llama(tmp / "llama")
        glue = write_glue_folder(tmp / "glue")
        causal = write_causal_data(tmp / "causal")
        inputs = {"fp16 guard": (bert, glue), "bf16 masters": (llama, causal),
                  "FSDP2 BERT": (bert, glue), "8-bit under FSDP2": (bert, glue),
                  "QLoRA classifier": (bert, glue)}
        for name, check in CHECKS.items():
            t0 = time.perf_counter()
            try:
                status, evidence = "PASS", check(tmp, *inputs[name])
            except Exception as e:  # noqa: BLE001 - every check reports, the script goes on
                status, evidence = "FAIL", f"{type(e).__name__}: {e}"
                traceback.print_exc()
            rows.append({"check": name, "status": status, "seconds": time.perf_counter() - t0,
                         "evidence": evidence})
            print(f"  {status}  {name} ({rows[-1]['seconds']:.0f} s): {evidence}", flush=True)
    write_result("gpu_check", {"gpu": torch.cuda.get_device_name(0), "checks": rows})
    return 1 if any(r["status"] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
