"""Model loading: fp32 master weights for half-precision checkpoints, LoRA wrapping."""

from __future__ import annotations

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
