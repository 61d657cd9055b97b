"""Model loading: fp32 master weights for half-precision checkpoints, LoRA wrapping."""

from __future__ import annotations

import pytest
import torch

from lrft.models import load_model
from lrft.recipe import LoraConfig, ModelConfig


def _causal(tiny_llama, dtype="bfloat16", **lora):
    cfg = ModelConfig(name_or_path=str(tiny_llama), task="causal_lm", dtype=dtype)
    return load_model(cfg, LoraConfig(enabled=bool(lora), **lora))


def _fraction_of_matrix_entries_changed(model, steps: int, lr: float) -> float:
    """Train `steps` AdamW steps at a constant `lr` under bf16 autocast; share of 2-D weight
    entries that moved at all."""
    torch.manual_seed(0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()
              if p.requires_grad and p.ndim == 2}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    ids = torch.randint(5, 20, (4, 12))
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    changed = sum(int((p.detach() != before[n]).sum()) for n, p in model.named_parameters()
                  if n in before)
    return changed / sum(t.numel() for t in before.values())


def test_a_bf16_checkpoint_trains_fp32_master_weights(tiny_llama):
    model = _causal(tiny_llama, "bfloat16")
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    # At a full-fine-tuning LR every weight moves; pure bf16 weights rounded ~93% of updates away.
    assert _fraction_of_matrix_entries_changed(model, steps=10, lr=5e-6) > 0.99


def test_lora_keeps_the_frozen_base_in_the_load_dtype(tiny_llama):
    model = _causal(tiny_llama, "bfloat16", r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert trainable == {torch.float32}
    assert frozen == {torch.bfloat16}  # the memory saving of a half-precision base is kept


def test_an_fp32_checkpoint_is_left_as_it_is(tiny_llama):
    model = _causal(tiny_llama, "float32")
    assert {p.dtype for p in model.parameters()} == {torch.float32}


# ---------------------------------------------------------------------------------------------
# A checkpoint's classification head of another size; what the model can take
# ---------------------------------------------------------------------------------------------

def _three_label_checkpoint(tiny_bert, folder):
    """The tiny BERT saved with a 3-label classification head (an 'MNLI model')."""
    import shutil

    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3).save_pretrained(
        folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                 "special_tokens_map.json"):
        if (tiny_bert / name).exists():
            shutil.copy(tiny_bert / name, folder / name)
    return folder


def test_a_head_of_another_size_is_reinitialised_with_one_line(tiny_bert, tmp_path):
    three = _three_label_checkpoint(tiny_bert, tmp_path / "mnli-like")
    notes = []
    model = load_model(ModelConfig(name_or_path=str(three)), LoraConfig(), num_labels=2,
                       notes=notes)
    assert model.classifier.weight.shape == (2, 32)
    (note,) = notes
    assert "classifier.weight [3, 32] -> [2, 32]" in note and "re-initialised" in note


def test_a_head_mismatch_can_be_refused_from_the_recipe(tiny_bert, tmp_path):
    from lrft.errors import RecipeError

    three = _three_label_checkpoint(tiny_bert, tmp_path / "mnli-like")
    cfg = ModelConfig(name_or_path=str(three), ignore_mismatched_sizes=False)
    with pytest.raises(RecipeError, match="model.ignore_mismatched_sizes: false"):
        load_model(cfg, LoraConfig(), num_labels=2)


def test_a_new_head_is_one_line_not_a_load_report(tiny_bert, capsys):
    notes = []
    load_model(ModelConfig(name_or_path=str(tiny_bert)), LoraConfig(), num_labels=2, notes=notes)
    assert notes == ["model: new classification head (classifier.bias, classifier.weight) for "
                     "2 label(s)"]
    captured = capsys.readouterr()
    assert "LOAD REPORT" not in captured.out + captured.err


def test_max_length_above_the_position_limit_is_cut_with_a_note(tiny_bert, tiny_glue, tmp_path,
                                                                 capsys):
    from conftest import bert_recipe, write_recipe

    from lrft.train import train

    recipe = bert_recipe(tiny_bert, tiny_glue, tmp_path / "run", max_steps=2, eval_steps=None)
    recipe["data"]["max_length"] = 1024  # the tiny BERT has 64 positions
    results = train(write_recipe(tmp_path / "r.yaml", recipe))
    assert results["status"] == "completed"
    assert "data.max_length: 1024 is above the model's position limit; sequences are cut at 64" \
        in capsys.readouterr().out


def test_an_encoder_is_not_a_causal_lm(tiny_bert):
    from lrft.models import check_model_fits

    (problem,), limit = check_model_fits(ModelConfig(name_or_path=str(tiny_bert), task="causal_lm"))
    assert problem.startswith("model.task: causal_lm, but") and "bert encoder" in problem
    assert limit == 64


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_runs_say_nothing_about_bitsandbytes_kernels(tiny_bert, tiny_glue, tmp_path, lora):
    """bitsandbytes (imported by peft) warns about an optional CPU kernel on import (on CPUs with
    AVX512-BF16): not shown, with LoRA or without (a full run once imported peft to read LoRA's
    scale and printed the warning)."""
    import subprocess
    import sys

    from conftest import bert_recipe, write_recipe

    recipe = bert_recipe(tiny_bert, tiny_glue, tmp_path / "run", max_steps=2, eval_steps=None)
    if lora:
        recipe["lora"] = {"enabled": True, "r": 4, "alpha": 8, "target_modules": ["query", "value"]}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    done = subprocess.run([sys.executable, "-m", "lrft.cli", "train", str(path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "bitsandbytes" not in done.stderr and "gemm_4bit" not in done.stderr
    # transformers' own loading and saving bars: the run's bar is the one to watch
    assert "Loading weights" not in done.stderr and "Writing model shards" not in done.stderr


@pytest.mark.parametrize("rslora, scaling, rule", [(False, 2.0, "alpha/r"),
                                                   (True, 4.0, "alpha/sqrt(r)")])
def test_rslora_and_dora_reach_peft_and_the_scaling_is_read_back(tiny_llama, rslora, scaling,
                                                                  rule):
    from lrft.models import lora_line, lora_scaling

    model = _causal(tiny_llama, dtype="float32", r=4, alpha=8, use_rslora=rslora, use_dora=True,
                    target_modules=["q_proj", "v_proj"])
    config = model.peft_config["default"]
    assert (config.use_rslora, config.use_dora) == (rslora, True)
    assert any("lora_magnitude_vector" in n for n, _ in model.named_parameters())
    info = lora_scaling(model)
    assert info == {"r": 4, "alpha": 8, "use_rslora": rslora, "use_dora": True,
                    "scaling": scaling, "scaling_rule": rule}
    line = lora_line(info, 16.0)
    assert line.startswith(f"lora: r=4, alpha=8: every adapter update is scaled by {rule} = "
                           f"{scaling:g} (")
    assert "DoRA" in line and "LoRA+: B matrices at 16x their group's LR" in line
    assert lora_scaling(_causal(tiny_llama, dtype="float32")) is None


def test_a_lora_run_says_its_scaling_and_loraplus_lrs_at_the_start(tiny_bert, tiny_glue,
                                                                     tmp_path, capsys):
    import json

    from conftest import bert_recipe, write_recipe

    from lrft.train import train

    recipe = bert_recipe(tiny_bert, tiny_glue, tmp_path / "run", max_steps=2, eval_steps=None)
    recipe["optim"].update(layer_decay=0.9, weight_decay=0.01)
    recipe["lora"] = {"enabled": True, "r": 4, "alpha": 8, "target_modules": ["query", "value"],
                      "use_rslora": True, "use_dora": True, "loraplus_lr_ratio": 16}
    train(write_recipe(tmp_path / "r.yaml", recipe))
    out = capsys.readouterr().out
    assert "layer.1_lora_B" in out and "lora: r=4, alpha=8: every adapter update is scaled by " \
        "alpha/sqrt(r) = 4 (alpha/r would be 2;" in out
    start = json.loads((tmp_path / "run" / "metrics.jsonl").open().readline())
    assert start["lora"] == {"r": 4, "alpha": 8, "use_rslora": True, "use_dora": True,
                             "scaling": 4.0, "scaling_rule": "alpha/sqrt(r)",
                             "loraplus_lr_ratio": 16.0}
    lr = recipe["optim"]["learning_rate"]
    assert start["groups"]["layer.1_lora_B"] == pytest.approx(lr * 0.9 * 16)
    assert start["groups"]["layer.1"] == pytest.approx(lr * 0.9)
    assert start["groups"]["head"] == pytest.approx(lr)
