"""DDP and real FSDP2 on two CPU processes (gloo), against one process, through lrft's entry point.

Accelerate never runs FSDP on a CPU: with ACCELERATE_USE_CPU=1 and an FSDP config it quietly runs
DDP (accelerate/state.py considers FSDP only for GPU-like distributed types), so a plain CPU
"FSDP" launch tests DDP. FSDP2 itself runs on gloo. This file is therefore also the launched
script: `accelerate launch --config_file accelerate_configs/fsdp_8xa100.yaml --num_processes 2
tests/test_distributed.py --fsdp RECIPE key=value ...` builds the Accelerator as lrft does
(`lrft.setup.make_accelerator`, from the launcher's environment), then switches its state to FSDP
with the FSDP2 plugin that environment describes, before anything loads or is prepared: what
`AcceleratorState` does itself on a GPU. Accelerate's own `fully_shard`, ram-efficient loading,
DCP checkpoints and state-dict gathering then run for real. lrft knows nothing of this file.

Proven here, with the same global batch (1 x 8 rows against 2 x 4) and the shipped
`fsdp_8xa100.yaml` (FSDP2, TRANSFORMER_BASED_WRAP with no class named, sharded state dicts,
ram-efficient loading) on a tiny BERT with layer decay, a head LR scale and no-decay groups:

- the param groups survive sharding: every group holds exactly the model's sharded (DTensor)
  parameters of its names, with its LR and weight decay;
- every group's LR at every step equals the 1-process and the DDP run's, and the losses agree to
  1e-3 (in practice to float rounding), through a guard rollback (a NaN loss injected at step 8:
  the snapshot is restored from each process's shards and the LR halved on every process);
- a sharded checkpoint resumes and continues identically;
- the final model loads with plain `from_pretrained` and predicts what the 1-process model does;
- LoRA trains under FSDP2 as on one process, and only its trainable tensors are gathered to save.

What only a GPU shows (bf16 sharded compute, NCCL, memory) is in bench/gpu_check.py.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from conftest import REPO, bert_recipe, write_recipe
from test_launch import _free_port, _records, _run, _script, bert_no_dropout  # noqa: F401

HARNESS = Path(__file__).resolve()
FSDP_CONFIG = REPO / "accelerate_configs" / "fsdp_8xa100.yaml"
NAN_STEP = 8  # the guard rolls back here, in every run
STEPS, SAVE_AT = 24, 12


# ---------------------------------------------------------------------------------------------
# The harness: run as the launched script (never by pytest)
# ---------------------------------------------------------------------------------------------

def _switch_to_fsdp(make_accelerator):
    """Wrap lrft's make_accelerator: the same Accelerator, its state switched to FSDP (v2)."""
    def make(recipe):
        from accelerate.state import PartialState
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        accelerator, why = make_accelerator(recipe)
        plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* environment
        if accelerator.mixed_precision != "no":
            plugin.set_mixed_precision(accelerator.mixed_precision)
        accelerator.state.fsdp_plugin = plugin
        accelerator.state.distributed_type = DistributedType.FSDP
        # Every later AcceleratorState() copies the process state's type: set it there too,
        # as AcceleratorState does in its own FSDP branch.
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        assert accelerator.is_fsdp2
        return accelerator, why
    return make


def _nan_loss_at(step: int):
    """A forward hook making the loss NaN at the `step`-th training forward (1 micro-batch per
    optimizer step here), on every process: a divergence the guard must roll back."""
    calls = [0]

    def hook(module, args, output):
        if module.training:
            calls[0] += 1
            if calls[0] == step:
                output["loss"] = output["loss"] * float("nan")
        return output
    return hook


def _record_groups(run, folder: Path) -> None:
    """Each process writes what its optimizer's groups hold after `prepare`."""
    from torch.distributed.tensor import DTensor

    named = dict(run.accelerator.unwrap_model(run.model).named_parameters())
    groups = [{"name": g["name"], "lr": g["lr"], "weight_decay": g["weight_decay"],
               "params": [[n, list(p.shape), isinstance(p, DTensor), p is named.get(n)]
                          for n, p in zip(g["param_names"], g["params"])]}
              for g in run.optimizer.param_groups]
    rank = run.accelerator.process_index
    (folder / f"groups-rank{rank}.json").write_text(json.dumps(groups))


def harness(argv: list[str]) -> int:
    """`tests/test_distributed.py [--fsdp] [--nan-at N] [--record DIR] RECIPE [key=value ...]`."""
    import argparse

    import lrft.train

    parser = argparse.ArgumentParser()
    parser.add_argument("--fsdp", action="store_true")
    parser.add_argument("--nan-at", type=int)
    parser.add_argument("--record", type=Path)
    args, rest = parser.parse_known_args(argv)
    if args.fsdp:
        lrft.train.make_accelerator = _switch_to_fsdp(lrft.train.make_accelerator)
    build_run, save_final_model = lrft.train.build_run, lrft.train.save_final_model

    def build(recipe, accelerator):
        run = build_run(recipe, accelerator)
        if args.nan_at:
            run.model.register_forward_hook(_nan_loss_at(args.nan_at))
        if args.record:
            _record_groups(run, args.record)
        return run

    def save(model, tokenizer, out, recipe, state_dict=None):
        if args.record:
            (args.record / "final-keys.json").write_text(json.dumps(sorted(state_dict or {})))
        return save_final_model(model, tokenizer, out, recipe, state_dict)

    lrft.train.build_run, lrft.train.save_final_model = build, save
    return lrft.train.main(rest)


# ---------------------------------------------------------------------------------------------
# Runs (module fixtures: each launches once)
# ---------------------------------------------------------------------------------------------

def _recipe(tmp: Path, model: Path, glue: Path, *, lora: bool = False) -> Path:
    """24 steps of batch 8, cosine after 4 warmup steps (the LR differs at every step), layer
    decay with a head scale and no-decay groups, a guard that rolls back, a checkpoint at 12."""
    recipe = bert_recipe(model, glue, tmp / "run", max_steps=STEPS, eval_steps=None,
                         save_steps=SAVE_AT, mixed_precision="no")
    recipe["data"]["group_by_length"] = False  # see test_launch: the 2 x 4 rows are the 8 rows
    recipe["schedule"] = {"lr_scheduler_type": "cosine", "warmup_steps": 4}
    if lora:
        recipe["optim"].update(learning_rate=1e-2, weight_decay=0.0)
        recipe["lora"] = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0,
                          "target_modules": ["query", "value"]}
    else:
        recipe["optim"].update(layer_decay=0.8, head_lr_scale=2.0, weight_decay=0.01)
        recipe["guard"] = {"enabled": True, "action": "rollback", "snapshot_steps": 5}
    return write_recipe(tmp / "recipe.yaml", recipe)


def _launch(tmp: Path, recipe: Path, out: Path, *, processes: int, fsdp: bool = False,
            nan: bool = True, extra: tuple = ()) -> Path:
    """Train `recipe` into `out` on 1 process, 2 DDP processes or 2 FSDP2 processes."""
    record = out.with_name(out.name + "-record")
    record.mkdir(parents=True, exist_ok=True)
    options = [*(["--fsdp"] if fsdp else []), *(["--nan-at", str(NAN_STEP)] if nan else []),
               "--record", record]
    args = [HARNESS, *options, recipe, f"train.output_dir={out}",
            f"train.per_device_train_batch_size={8 // processes}", *extra]
    if processes == 1:
        _run([sys.executable, *args], tmp)
        return out
    launch = [*_script("accelerate", "accelerate.commands.accelerate_cli"), "launch"]
    launch += ["--config_file", FSDP_CONFIG] if fsdp else ["--multi_gpu"]
    _run([*launch, "--num_processes", "2", "--main_process_port", str(_free_port()), *args],
         tmp, ACCELERATE_USE_CPU="1")
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, bert_no_dropout, tiny_glue) -> dict[str, Path]:
    """The same recipe on 1 process, 2 DDP processes, 2 FSDP2 processes, and the FSDP2 run
    resumed from its step-12 checkpoint."""
    tmp = tmp_path_factory.mktemp("distributed")
    recipe = _recipe(tmp, bert_no_dropout, tiny_glue)
    out = {"one": _launch(tmp, recipe, tmp / "one", processes=1),
           "ddp": _launch(tmp, recipe, tmp / "ddp", processes=2),
           "fsdp": _launch(tmp, recipe, tmp / "fsdp", processes=2, fsdp=True)}
    resumed = tmp / "fsdp-resumed"  # the FSDP2 run as a kill right after step 12 leaves it
    resumed.mkdir()
    shutil.copytree(out["fsdp"] / f"checkpoint-{SAVE_AT}", resumed / f"checkpoint-{SAVE_AT}")
    for name in ("recipe.yaml", "metrics.jsonl"):
        shutil.copy(out["fsdp"] / name, resumed / name)
    out["resumed"] = _launch(tmp, recipe, resumed, processes=2, fsdp=True, nan=False,
                             extra=("train.resume_from_checkpoint=latest",))
    return out


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory, bert_no_dropout, tiny_glue) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("distributed-lora")
    recipe = _recipe(tmp, bert_no_dropout, tiny_glue, lora=True)
    return {"one": _launch(tmp, recipe, tmp / "one", processes=1, nan=False),
            "fsdp": _launch(tmp, recipe, tmp / "fsdp", processes=2, fsdp=True, nan=False)}


def _groups(out: Path, rank: int = 0) -> list[dict]:
    return json.loads((out.with_name(out.name + "-record") / f"groups-rank{rank}.json").read_text())


def _final_keys(out: Path) -> list[str]:
    return json.loads((out.with_name(out.name + "-record") / "final-keys.json").read_text())


def _assert_same_run(a: Path, b: Path, steps=None, loss_tol: float = 1e-3) -> None:
    """Same LR for every group at every step (exactly), losses within `loss_tol`, same guard
    events, same final eval loss."""
    train_a, train_b = _records(a, "train"), _records(b, "train")
    if steps is not None:
        train_a = [r for r in train_a if r["step"] in steps]
        train_b = [r for r in train_b if r["step"] in steps]
    assert [r["step"] for r in train_a] == [r["step"] for r in train_b]
    for x, y in zip(train_a, train_b):
        assert y["lr"] == x["lr"], x["step"]
        assert y["loss"] == pytest.approx(x["loss"], abs=loss_tol, nan_ok=True), x["step"]
    events = [[(e["step"], e["event"]) for e in _records(run, "guard")] for run in (a, b)]
    assert events[0] == events[1]
    final = [json.loads((run / "results.json").read_text())["final"]["validation"]
             for run in (a, b)]
    assert final[1]["eval_loss"] == pytest.approx(final[0]["eval_loss"], abs=loss_tol)


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_fsdp2_keeps_every_param_group_through_sharding(runs):
    one = _groups(runs["one"])
    assert {g["name"] for g in one} >= {"embeddings", "embeddings_no_decay", "layer.0",
                                        "layer.1_no_decay", "head", "head_no_decay"}
    for rank in (0, 1):
        sharded = _groups(runs["fsdp"], rank)
        assert [(g["name"], g["lr"], g["weight_decay"]) for g in sharded] == \
               [(g["name"], g["lr"], g["weight_decay"]) for g in one]
        for g, g1 in zip(sharded, one):
            assert [p[0] for p in g["params"]] == [p[0] for p in g1["params"]], g["name"]
            # each group holds the model's own parameters, now sharded DTensors of full shape
            assert all(is_dtensor and is_models for _, _, is_dtensor, is_models in g["params"])
            assert [p[1] for p in g["params"]] == [p[1] for p in g1["params"]]
            if g["name"].endswith("_no_decay"):
                assert g["weight_decay"] == 0 and all(len(p[1]) == 1 for p in g["params"])
            else:
                assert g["weight_decay"] == 0.01 and all(len(p[1]) == 2 for p in g["params"])


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_every_group_lr_and_loss_match_one_process_and_ddp(runs):
    start = [_records(runs[k], "start")[0] for k in ("one", "ddp", "fsdp")]
    assert [s["num_processes"] for s in start] == [1, 2, 2]
    assert start[0]["groups"] == start[1]["groups"] == start[2]["groups"]
    assert len(set(start[0]["groups"].values())) >= 4  # layer decay and head scale: distinct LRs
    assert [r["step"] for r in _records(runs["fsdp"], "train")] == list(range(1, STEPS + 1))
    _assert_same_run(runs["one"], runs["ddp"])
    _assert_same_run(runs["one"], runs["fsdp"])
    # the guard rolled back at the injected NaN on every process, and the LR halved
    assert [(e["step"], e["event"]) for e in _records(runs["fsdp"], "guard")] == \
           [(NAN_STEP, "nan_loss"), (NAN_STEP, "rollback")]
    results = json.loads((runs["fsdp"] / "results.json").read_text())
    assert results["status"] == "completed" and results["lr_scale"] == 0.5


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_fsdp2_sharded_checkpoint_resumes_identically(runs):
    import torch
    from safetensors.torch import load_file

    checkpoint = runs["fsdp"] / f"checkpoint-{SAVE_AT}"
    assert (checkpoint / "pytorch_model_fsdp_0").is_dir()  # sharded (DCP), one file per rank
    assert len(list((checkpoint / "pytorch_model_fsdp_0").glob("*.distcp"))) == 2
    resumed = runs["resumed"]
    assert [r["step"] for r in _records(resumed, "train")] == list(range(1, STEPS + 1))
    _assert_same_run(runs["fsdp"], resumed, steps=range(SAVE_AT + 1, STEPS + 1), loss_tol=1e-6)
    a = load_file(runs["fsdp"] / "model.safetensors")
    b = load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_fsdp2_final_model_loads_with_plain_from_pretrained(runs, tiny_glue):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    models = {k: AutoModelForSequenceClassification.from_pretrained(
        runs[k], output_loading_info=True) for k in ("one", "fsdp")}
    for model, info in models.values():
        assert not info["missing_keys"] and not info["unexpected_keys"]
    assert next(models["fsdp"][0].parameters()).dtype == torch.float32
    tok = AutoTokenizer.from_pretrained(runs["fsdp"])
    batch = tok(["good great fun", "bad awful dull"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = [models[k][0].eval()(**batch).logits for k in ("one", "fsdp")]
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=1e-4)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_lora_under_fsdp2_trains_as_on_one_process_and_gathers_only_the_adapter(lora_runs):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from safetensors.torch import load_file

    _assert_same_run(lora_runs["one"], lora_runs["fsdp"])
    adapter = load_file(lora_runs["fsdp"] / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert len(lora_b) == 4 and all(float(b.abs().max()) > 0 for b in lora_b)  # B starts at 0
    # The save gathered the adapters and the head, never the frozen base.
    keys = _final_keys(lora_runs["fsdp"])
    assert keys and all("lora_" in k or "modules_to_save" in k for k in keys), keys
    assert len(_final_keys(lora_runs["one"])) > len(keys)  # one process: the whole state dict
    base = json.loads((lora_runs["one"] / "adapter_config.json").read_text())
    logits = []
    for k in ("one", "fsdp"):
        model = AutoModelForSequenceClassification.from_pretrained(
            base["base_model_name_or_path"], num_labels=2)
        model = PeftModel.from_pretrained(model, lora_runs[k]).eval()
        with torch.no_grad():
            logits.append(model(input_ids=torch.tensor([[2, 5, 6, 7, 3]])).logits)
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=1e-4)


if __name__ == "__main__":
    sys.exit(harness(sys.argv[1:]))
