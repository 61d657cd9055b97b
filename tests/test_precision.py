"""`train.mixed_precision: auto` and the attention kernel it loads (lrft/precision.py).

The hardware checks are patched so that every branch runs on any CPU: bf16 autocast itself runs
on every CPU (emulated where there are no bf16 units), so the end-to-end runs are real.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import bert_recipe, write_recipe
from safetensors.torch import load_file

import lrft.precision
import lrft.train
from lrft.precision import (
    CPU_BF16_EAGER_BELOW,
    attention_for,
    native_bf16,
    resolve_mixed_precision,
)
from lrft.recipe import RecipeError, load_recipe

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def no_launcher(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)


@pytest.fixture
def hardware_bf16(monkeypatch):
    """Set whether the machine 'has' bf16 units: hardware_bf16(True)."""
    return lambda has: monkeypatch.setattr(lrft.precision, "native_bf16", lambda device: has)


# ---------------------------------------------------------------------------------------------
# What auto picks
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("asked", ["no", "fp16", "bf16"])
def test_an_explicit_precision_is_used_as_is(asked, hardware_bf16, monkeypatch):
    hardware_bf16(True)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    assert resolve_mixed_precision(asked, CPU) == (asked, "the recipe's train.mixed_precision")


def test_null_leaves_the_choice_to_the_launcher():
    assert resolve_mixed_precision(None, CPU) == (None, "the launcher's setting")


@pytest.mark.parametrize("has,device,expected", [(True, CPU, "bf16"), (True, CUDA, "bf16"),
                                                 (False, CPU, "no"), (False, CUDA, "no")])
def test_auto_is_bf16_only_where_the_hardware_has_it(has, device, expected, hardware_bf16,
                                                     no_launcher):
    hardware_bf16(has)
    precision, why = resolve_mixed_precision("auto", device)
    assert precision == expected and why.startswith("auto: ")


@pytest.mark.parametrize("launcher", ["fp16", "bf16"])
def test_auto_follows_a_launcher_that_asked_for_a_precision(launcher, hardware_bf16, monkeypatch):
    hardware_bf16(False)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher)
    assert resolve_mixed_precision("auto", CPU)[0] == launcher


def test_a_launcher_saying_no_does_not_stop_auto(hardware_bf16, monkeypatch):
    # `accelerate launch` exports "no" when nothing was asked, so "no" cannot mean "fp32 please"
    hardware_bf16(True)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert resolve_mixed_precision("auto", CPU)[0] == "bf16"


@pytest.mark.parametrize("amx, avx512_bf16", [(True, False), (False, True), (True, True),
                                               (False, False)])
def test_native_bf16_on_cpu_means_amx_or_avx512_bf16(amx, avx512_bf16, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert native_bf16(CPU) is (amx or avx512_bf16)
    if amx or avx512_bf16:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
        why = resolve_mixed_precision("auto", CPU)[1]
        assert ("AMX" if amx else "AVX512-BF16") in why


def test_native_bf16_on_gpu_excludes_emulation(monkeypatch):
    asked = {}

    def supported(including_emulation=True):
        asked["emulation"] = including_emulation
        return False  # e.g. a V100: bf16 only emulated

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    assert native_bf16(CUDA) is False and asked == {"emulation": False}
    assert native_bf16(torch.device("mps")) is False


# ---------------------------------------------------------------------------------------------
# Which attention
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("asked,device,precision,tokens,expected", [
    (None, CPU, "bf16", 128, "eager"),
    (None, CPU, "bf16", CPU_BF16_EAGER_BELOW - 1, "eager"),
    (None, CPU, "bf16", CPU_BF16_EAGER_BELOW, None),  # long sequences: SDPA's flash kernel wins
    (None, CPU, "no", 128, None),
    (None, CUDA, "bf16", 128, None),
    ("sdpa", CPU, "bf16", 128, "sdpa"),  # the recipe's choice stands
])
def test_attention_for(asked, device, precision, tokens, expected):
    attn, why = attention_for(asked, device, precision, tokens)
    assert attn == expected
    assert (why is not None) == (asked is None and expected == "eager")


# ---------------------------------------------------------------------------------------------
# The recipe key
# ---------------------------------------------------------------------------------------------

def test_auto_is_the_default_and_unquoted_no_means_no(tmp_path, tiny_bert, tiny_glue):
    recipe = bert_recipe(tiny_bert, tiny_glue, tmp_path / "run")
    assert load_recipe(write_recipe(tmp_path / "a.yaml", recipe)).train.mixed_precision == "auto"
    text = yaml.safe_dump(recipe).replace("train:\n", "train:\n  mixed_precision: no\n")
    assert yaml.safe_load(text)["train"]["mixed_precision"] is False  # YAML 1.1 reads no as false
    (tmp_path / "b.yaml").write_text(text)
    assert load_recipe(tmp_path / "b.yaml").train.mixed_precision == "no"
    assert load_recipe(tmp_path / "a.yaml", ["train.mixed_precision=no"]).train.mixed_precision \
        == "no"


def test_a_bad_precision_names_the_choices(tmp_path, tiny_bert, tiny_glue):
    path = write_recipe(tmp_path / "a.yaml", bert_recipe(tiny_bert, tiny_glue, tmp_path / "run"))
    with pytest.raises(RecipeError) as e:
        load_recipe(path, ["train.mixed_precision=bf32"])
    assert "train.mixed_precision" in str(e.value) and "'auto'" in str(e.value)
    with pytest.raises(RecipeError):
        load_recipe(path, ["train.mixed_precision=true"])  # `yes` is not a precision


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------

def _train(tmp: Path, tiny_bert, tiny_glue, monkeypatch, name: str, **train_keys):
    kept = {}
    save = lrft.train.save_final_model

    def keep_model(model, *args, **kwargs):
        kept["model"] = model
        return save(model, *args, **kwargs)

    monkeypatch.setattr(lrft.train, "save_final_model", keep_model)
    recipe = bert_recipe(tiny_bert, tiny_glue, tmp / name, max_steps=12, eval_steps=None,
                         **train_keys)
    lrft.train.train(write_recipe(tmp / f"{name}.yaml", recipe))
    lines = (tmp / name / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return records, kept["model"], tmp / name


def test_auto_trains_in_bf16_with_eager_attention_then_fp32_in_the_same_process(
        tmp_path, tiny_bert, tiny_glue, hardware_bf16, no_launcher, monkeypatch, capsys):
    hardware_bf16(True)
    records, model, out = _train(tmp_path, tiny_bert, tiny_glue, monkeypatch, "bf16")
    assert records[0]["kind"] == "start" and records[0]["mixed_precision"] == "bf16"
    assert model.config._attn_implementation == "eager"
    printed = capsys.readouterr().out
    assert "mixed precision bf16: auto: this CPU computes bf16 natively" in printed
    assert "attention: eager" in printed
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert sum(losses[-3:]) < sum(losses[:3])
    # autocast leaves the weights in fp32, and the saved model is the plain (unwrapped) one
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.float32}
    from transformers import AutoModelForSequenceClassification

    batch = {"input_ids": torch.tensor([[2, 5, 7, 9, 3], [2, 6, 3, 0, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])}
    with torch.no_grad():
        reloaded = AutoModelForSequenceClassification.from_pretrained(out).eval()(**batch).logits
        torch.testing.assert_close(model.eval()(**batch).logits, reloaded, rtol=0, atol=1e-6)

    # a second run in the same process may use another precision (Accelerate keeps one per
    # process; lrft releases it)
    records, model, _ = _train(tmp_path, tiny_bert, tiny_glue, monkeypatch, "fp32",
                               mixed_precision="no")
    assert records[0]["mixed_precision"] == "no"
    assert model.config._attn_implementation != "eager"
    _train(tmp_path, tiny_bert, tiny_glue, monkeypatch, "bf16-again")
    records, _, _ = _train(tmp_path, tiny_bert, tiny_glue, monkeypatch, "launcher",
                           mixed_precision=None)  # null: the launcher's, here none, so fp32
    assert records[0]["mixed_precision"] == "no"


def test_auto_without_bf16_hardware_trains_in_fp32(tmp_path, tiny_bert, tiny_glue,
                                                   hardware_bf16, no_launcher, monkeypatch):
    hardware_bf16(False)
    records, model, _ = _train(tmp_path, tiny_bert, tiny_glue, monkeypatch, "run")
    assert records[0]["mixed_precision"] == "no"
    assert model.config._attn_implementation == "sdpa"


def test_the_helpers_are_exported():
    import lrft

    assert lrft.resolve_mixed_precision is resolve_mixed_precision
    assert lrft.native_bf16 is native_bf16
