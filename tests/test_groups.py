"""Tests for lrft.groups: which named parameter lands in which group, at which LR and decay.

Every model is built from a tiny config in code (no download). With lr=1e-3, layer_decay=0.5
and L=2 blocks the LLRD values are: embeddings 1e-3 * 0.5**3, block 0 1e-3 * 0.5**2,
block 1 1e-3 * 0.5, head and final norm 1e-3.
"""

import re
from types import SimpleNamespace

import pytest
import torch
import transformers as tf
from torch import nn

from lrft.groups import format_group_table, param_groups
from lrft.layers import layer_depths, num_layers

torch.set_num_threads(1)

LR, DECAY, WD = 1e-3, 0.5, 0.01
EMB_LR, L0_LR, L1_LR, HEAD_LR = LR * DECAY**3, LR * DECAY**2, LR * DECAY, LR
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
            vocab_size=100, max_position_embeddings=64)


def tiny_bert():
    return tf.BertForSequenceClassification(tf.BertConfig(**TINY))


def tiny_gpt2():
    config = tf.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, vocab_size=100,
                           bos_token_id=0, eos_token_id=0)
    return tf.GPT2LMHeadModel(config)


def tiny_llama():
    config = tf.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            num_key_value_heads=2, intermediate_size=64, vocab_size=100,
                            max_position_embeddings=64)
    return tf.LlamaForCausalLM(config)


def group_of(groups, name):
    """The one group holding the parameter called `name`."""
    found = [g for g in groups if name in g["param_names"]]
    assert len(found) == 1, f"{name} is in {len(found)} groups"
    return found[0]


def assert_partition(model, groups):
    """Every trainable parameter in exactly one group, names matching tensors, nothing else."""
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    listed = [n for g in groups for n in g["param_names"]]
    assert sorted(listed) == sorted(trainable)
    for g in groups:
        assert [id(p) for p in g["params"]] == [id(trainable[n]) for n in g["param_names"]]


def test_bert_llrd_exact_lrs_and_order():
    model = tiny_bert()
    groups = param_groups(model, LR, WD, layer_decay=DECAY)
    expected = {
        "bert.embeddings.word_embeddings.weight": EMB_LR,
        "bert.embeddings.LayerNorm.weight": EMB_LR,
        "bert.encoder.layer.0.attention.self.query.weight": L0_LR,
        "bert.encoder.layer.0.output.dense.bias": L0_LR,
        "bert.encoder.layer.1.intermediate.dense.weight": L1_LR,
        "bert.pooler.dense.weight": HEAD_LR,  # the pooler is on the head side
        "classifier.weight": HEAD_LR,
    }
    for name, lr in expected.items():
        assert group_of(groups, name)["lr"] == pytest.approx(lr, rel=1e-12), name
    assert [g["name"] for g in groups] == [
        "embeddings", "embeddings_no_decay", "layer.0", "layer.0_no_decay",
        "layer.1", "layer.1_no_decay", "head", "head_no_decay",
    ]
    assert group_of(groups, "classifier.weight")["name"] == "head"
    assert_partition(model, groups)


def test_bert_head_and_embedding_scales_combine_with_llrd():
    model = tiny_bert()
    groups = param_groups(model, LR, WD, layer_decay=DECAY, head_lr_scale=10.0,
                          embedding_lr_scale=0.1)
    assert group_of(groups, "classifier.bias")["lr"] == pytest.approx(HEAD_LR * 10)
    assert group_of(groups, "bert.pooler.dense.weight")["lr"] == pytest.approx(HEAD_LR * 10)
    assert group_of(groups, "bert.embeddings.word_embeddings.weight")["lr"] == pytest.approx(
        EMB_LR * 0.1)
    assert group_of(groups, "bert.encoder.layer.0.attention.self.key.weight")["lr"] == (
        pytest.approx(L0_LR))


def test_scales_without_llrd_give_head_embeddings_body():
    model = tiny_bert()
    groups = param_groups(model, LR, WD, head_lr_scale=10.0, embedding_lr_scale=0.1)
    assert {g["name"] for g in groups} == {
        "embeddings", "embeddings_no_decay", "body", "body_no_decay", "head", "head_no_decay"}
    assert group_of(groups, "classifier.weight")["lr"] == pytest.approx(1e-2)
    assert group_of(groups, "bert.embeddings.position_embeddings.weight")["lr"] == (
        pytest.approx(1e-4))
    assert group_of(groups, "bert.encoder.layer.1.output.dense.weight")["lr"] == LR
    assert [g["name"] for g in param_groups(model, LR, WD)] == ["body", "body_no_decay"]


def test_weight_decay_only_off_for_1d_params():
    model = tiny_bert()
    groups = param_groups(model, LR, WD, layer_decay=DECAY)
    for g in groups:
        for p in g["params"]:
            assert g["weight_decay"] == (0.0 if p.ndim < 2 else WD)
    # Embedding matrices stay decayed, as in the HF Trainer.
    assert group_of(groups, "bert.embeddings.word_embeddings.weight")["weight_decay"] == WD
    assert group_of(groups, "bert.embeddings.LayerNorm.bias")["weight_decay"] == 0.0
    flat = param_groups(model, LR, WD, no_decay_1d=False)
    assert [(g["name"], g["weight_decay"]) for g in flat] == [("body", WD)]


def test_frozen_params_left_out_and_unused_scale_rejected():
    model = tiny_bert()
    model.bert.embeddings.requires_grad_(False)
    groups = param_groups(model, LR, WD, layer_decay=DECAY)
    names = [n for g in groups for n in g["param_names"]]
    assert not any("embeddings" in n for n in names)
    assert groups[0]["name"] == "layer.0"
    assert_partition(model, groups)
    with pytest.raises(ValueError, match="embedding_lr_scale"):
        param_groups(model, LR, WD, embedding_lr_scale=0.1)


def test_gpt2_tied_lm_head_counted_once_as_embedding():
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    groups = param_groups(model, LR, WD, layer_decay=DECAY)
    assert_partition(model, groups)
    wte = group_of(groups, "transformer.wte.weight")
    assert wte["name"] == "embeddings" and wte["lr"] == pytest.approx(EMB_LR)
    assert sum(p is model.lm_head.weight for g in groups for p in g["params"]) == 1
    assert group_of(groups, "transformer.h.1.attn.c_attn.weight")["lr"] == pytest.approx(L1_LR)
    ln_f = group_of(groups, "transformer.ln_f.weight")
    assert (ln_f["name"], ln_f["lr"], ln_f["weight_decay"]) == ("final_norm_no_decay", LR, 0.0)
    # Tied, the output projection has no separate head to scale.
    with pytest.raises(ValueError, match="head_lr_scale"):
        param_groups(model, LR, WD, head_lr_scale=2.0)


def test_llama_llrd_final_norm_and_head():
    model = tiny_llama()
    groups = param_groups(model, LR, WD, layer_decay=DECAY, head_lr_scale=4.0)
    assert group_of(groups, "model.embed_tokens.weight")["lr"] == pytest.approx(EMB_LR)
    assert group_of(groups, "model.layers.0.self_attn.q_proj.weight")["lr"] == pytest.approx(L0_LR)
    assert group_of(groups, "model.layers.1.mlp.down_proj.weight")["lr"] == pytest.approx(L1_LR)
    rms = group_of(groups, "model.layers.1.input_layernorm.weight")
    assert (rms["name"], rms["weight_decay"]) == ("layer.1_no_decay", 0.0)
    # The final norm sits at depth L + 1 (factor 1) but is not scaled as head.
    norm = group_of(groups, "model.norm.weight")
    assert (norm["name"], norm["lr"], norm["weight_decay"]) == ("final_norm_no_decay", LR, 0.0)
    head = group_of(groups, "lm_head.weight")
    assert (head["name"], head["lr"], head["weight_decay"]) == ("head", LR * 4.0, WD)
    assert [g["name"] for g in groups][-2:] == ["final_norm_no_decay", "head"]
    assert_partition(model, groups)


def test_peft_lora_bert_gets_layer_lrs():
    import peft  # a hard dependency: a missing one must fail, not skip
    model = peft.get_peft_model(tiny_bert(), peft.LoraConfig(
        r=2, target_modules=["query", "value"], modules_to_save=["classifier"]))
    groups = param_groups(model, LR, WD, layer_decay=DECAY, head_lr_scale=10.0)
    prefix = "base_model.model."
    lora_a0 = prefix + "bert.encoder.layer.0.attention.self.query.lora_A.default.weight"
    assert group_of(groups, lora_a0)["lr"] == pytest.approx(L0_LR)
    lora_b1 = prefix + "bert.encoder.layer.1.attention.self.value.lora_B.default.weight"
    assert group_of(groups, lora_b1)["lr"] == pytest.approx(L1_LR)
    head = group_of(groups, prefix + "classifier.modules_to_save.default.weight")
    assert (head["name"], head["lr"]) == ("head", pytest.approx(HEAD_LR * 10))
    names = [n for g in groups for n in g["param_names"]]
    assert all(".lora_" in n or ".classifier.modules_to_save." in n for n in names)
    assert len(names) == 8 + 2
    assert_partition(model, groups)


def _lora_bert(**config):
    import peft  # a hard dependency: a missing one must fail, not skip
    return peft.get_peft_model(tiny_bert(), peft.LoraConfig(
        task_type="SEQ_CLS", r=2, target_modules=["query", "value", "word_embeddings"], **config))


def test_loraplus_b_matrix_of_layer_1_at_ratio_times_its_llrd_lr():
    # LoRA+ composes with LLRD: B of block 1 at lr x 0.5 (one step below the head) x 16; its A,
    # its DoRA magnitude (1-D, no decay) and the head keep their place's LR; B keeps its decay.
    model = _lora_bert(use_dora=True)
    groups = param_groups(model, LR, WD, layer_decay=DECAY, head_lr_scale=2.0,
                          embedding_lr_scale=0.5, loraplus_lr_ratio=16.0)
    layer1 = "base_model.model.bert.encoder.layer.1.attention.self.value."
    b1 = group_of(groups, layer1 + "lora_B.default.weight")
    assert (b1["name"], b1["lr"], b1["weight_decay"]) == ("layer.1_lora_B",
                                                          pytest.approx(L1_LR * 16), WD)
    a1 = group_of(groups, layer1 + "lora_A.default.weight")
    assert (a1["name"], a1["lr"], a1["weight_decay"]) == ("layer.1", pytest.approx(L1_LR), WD)
    magnitude = group_of(groups, layer1 + "lora_magnitude_vector.default.weight")
    assert (magnitude["name"], magnitude["lr"], magnitude["weight_decay"]) == (
        "layer.1_no_decay", pytest.approx(L1_LR), 0.0)
    b0 = group_of(groups, "base_model.model.bert.encoder.layer.0.attention.self.query."
                          "lora_B.default.weight")
    assert b0["lr"] == pytest.approx(L0_LR * 16)
    head = "base_model.model.classifier.modules_to_save.default."
    assert group_of(groups, head + "weight")["lr"] == pytest.approx(HEAD_LR * 2)
    bias = group_of(groups, head + "bias")  # peft's helper would boost it with the B matrices
    assert (bias["name"], bias["lr"], bias["weight_decay"]) == ("head_no_decay",
                                                                pytest.approx(HEAD_LR * 2), 0.0)
    # peft's embedding adapters: embeddings at depth 0, both at one LR, without the ratio
    embeddings = "base_model.model.bert.embeddings.word_embeddings."
    for name in ("lora_embedding_A.default", "lora_embedding_B.default"):
        group = group_of(groups, embeddings + name)
        assert (group["name"], group["lr"]) == ("embeddings", pytest.approx(EMB_LR * 0.5))
    table = format_group_table(groups)
    assert re.search(r"^layer\.1_lora_B\s+2\s+128\s+8\.00e-03\s+0\.01$", table, re.M), table
    assert_partition(model, groups)


def test_loraplus_without_llrd_keeps_the_head_and_1d_apart_and_unboosted():
    model = _lora_bert()
    groups = param_groups(model, LR, WD, loraplus_lr_ratio=16.0)
    assert [(g["name"], g["lr"]) for g in groups] == [
        ("embeddings", LR), ("body", LR), ("body_lora_B", LR * 16), ("head", LR),
        ("head_no_decay", LR)]
    assert {g["name"]: g["weight_decay"] for g in groups}["body_lora_B"] == WD
    assert_partition(model, groups)


def test_loraplus_on_a_llama_and_refused_without_lora():
    import peft  # a hard dependency: a missing one must fail, not skip
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(
        task_type="CAUSAL_LM", r=2, target_modules=["q_proj", "v_proj"], use_rslora=True))
    groups = param_groups(model, LR, 0.0, layer_decay=DECAY, loraplus_lr_ratio=4.0)
    b0 = group_of(groups, "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight")
    assert (b0["name"], b0["lr"]) == ("layer.0_lora_B", pytest.approx(L0_LR * 4))
    a0 = group_of(groups, "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight")
    assert (a0["name"], a0["lr"]) == ("layer.0", pytest.approx(L0_LR))
    with pytest.raises(ValueError, match="loraplus_lr_ratio is set but .* no trainable LoRA B"):
        param_groups(tiny_bert(), LR, WD, loraplus_lr_ratio=16.0)
    with pytest.raises(ValueError, match="loraplus_lr_ratio=0"):
        param_groups(model, LR, WD, loraplus_lr_ratio=0)


def test_hidden_matrices_apart_from_everything_else_and_tagged():
    model = tiny_bert()
    groups = param_groups(model, LR, 0.0, hidden_matrices=True)  # no decay: names must differ
    assert [(g["name"], g["hidden_matrix"]) for g in groups] == [
        ("embeddings", False), ("body", True), ("body_no_decay", False), ("head", False)]
    body = group_of(groups, "bert.encoder.layer.0.attention.self.query.weight")
    assert all(len(p.shape) == 2 for p in body["params"]) and body["hidden_matrix"]
    assert group_of(groups, "bert.pooler.dense.weight")["name"] == "head"
    assert_partition(model, groups)


class Unusual(nn.Module):
    """A model with a config but names no rule knows."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(num_hidden_layers=2)
        self.stem = nn.Linear(4, 4)
        self.stack = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])


def test_unmappable_model_raises_with_llrd_and_is_flat_without():
    model = Unusual()
    with pytest.raises(ValueError, match=r"Unusual.*'stem\.weight'"):
        param_groups(model, LR, WD, layer_decay=DECAY)
    with pytest.raises(ValueError, match="Unusual"):
        layer_depths(model)
    groups = param_groups(model, LR, WD)
    assert [(g["name"], g["lr"], len(g["params"])) for g in groups] == [
        ("body", LR, 3), ("body_no_decay", LR, 3)]
    assert_partition(model, groups)


def test_block_index_beyond_config_layer_count_raises():
    model = tiny_bert()
    model.config.num_hidden_layers = 1
    with pytest.raises(ValueError, match=r"BertForSequenceClassification.*layer\.1\."):
        param_groups(model, LR, WD, layer_decay=DECAY)


def test_bad_settings_rejected():
    with pytest.raises(ValueError, match="layer_decay=0"):
        param_groups(tiny_bert(), LR, WD, layer_decay=0)
    with pytest.raises(ValueError, match="lr=-1"):
        param_groups(tiny_bert(), -1, WD)
    with pytest.raises(ValueError, match="number of layers"):
        num_layers(nn.Linear(2, 2))


def test_groups_feed_a_torch_optimizer():
    model = tiny_bert()
    groups = param_groups(model, LR, WD, layer_decay=DECAY)
    optimizer = torch.optim.AdamW(groups)
    assert [g["lr"] for g in optimizer.param_groups] == [g["lr"] for g in groups]
    assert optimizer.param_groups[0]["name"] == "embeddings"


def test_format_group_table():
    model = tiny_bert()
    groups = param_groups(model, LR, WD, layer_decay=DECAY)
    table = format_group_table(groups)
    lines = table.splitlines()
    assert lines[0].split() == ["group", "#tensors", "#params", "lr", "weight_decay"]
    assert len(lines) == len(groups) + 2
    for line, g in zip(lines[1:], groups):
        assert line.split()[0] == g["name"]
    assert "1.25e-04" in lines[1] and "1.00e-03" in lines[-2]
    n_params = sum(p.numel() for p in model.parameters())
    n_tensors = len(list(model.parameters()))
    assert lines[-1].split() == ["total", str(n_tensors), f"{n_params:,}"]
    # Right-aligned: every number column ends at the same character on every line.
    ends = [[m.end() for m in re.finditer(r"\S+", line)] for line in lines]
    for column in (1, 2):
        assert len({e[column] for e in ends}) == 1
    assert len({e[3] for e in ends[:-1]}) == 1


def _albert(**extra):
    config = dict(TINY, embedding_size=16, **extra)
    return tf.AlbertForSequenceClassification(tf.AlbertConfig(**config))


# name -> (build the model, an embedding param, a head-side param at depth L + 1)
ARCHS = {
    "bert": (tiny_bert, "bert.embeddings.word_embeddings.weight", "bert.pooler.dense.weight"),
    "roberta": (lambda: tf.RobertaForSequenceClassification(tf.RobertaConfig(**TINY)),
                "roberta.embeddings.word_embeddings.weight", "classifier.out_proj.weight"),
    "deberta-v2": (lambda: tf.DebertaV2ForSequenceClassification(tf.DebertaV2Config(**TINY)),
                   "deberta.embeddings.word_embeddings.weight", "pooler.dense.weight"),
    "electra": (lambda: tf.ElectraForSequenceClassification(
                    tf.ElectraConfig(**TINY, embedding_size=16)),
                "electra.embeddings_project.weight", "classifier.dense.weight"),
    "distilbert": (lambda: tf.DistilBertForSequenceClassification(tf.DistilBertConfig(
                       dim=32, n_layers=2, n_heads=2, hidden_dim=37, vocab_size=100,
                       max_position_embeddings=64)),
                   "distilbert.embeddings.word_embeddings.weight", "pre_classifier.weight"),
    "albert": (_albert, "albert.encoder.embedding_hidden_mapping_in.weight", "albert.pooler.weight"),
    "gpt2": (tiny_gpt2, "transformer.wpe.weight", "transformer.ln_f.weight"),
    "gpt-neox": (lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**TINY)),
                 "gpt_neox.embed_in.weight", "lm_head.weight"),
    "opt": (lambda: tf.OPTForCausalLM(tf.OPTConfig(**TINY, ffn_dim=37, word_embed_proj_dim=16)),
            "model.decoder.project_in.weight", "model.decoder.project_out.weight"),
    "llama": (tiny_llama, "model.embed_tokens.weight", "lm_head.weight"),
    "mistral": (lambda: tf.MistralForCausalLM(tf.MistralConfig(**TINY, num_key_value_heads=2)),
                "model.embed_tokens.weight", "lm_head.weight"),
    "qwen2": (lambda: tf.Qwen2ForSequenceClassification(tf.Qwen2Config(
                  **TINY, num_key_value_heads=2, pad_token_id=0)),
              "model.embed_tokens.weight", "score.weight"),
    "gemma": (lambda: tf.GemmaForCausalLM(tf.GemmaConfig(**TINY, num_key_value_heads=2,
                                                         head_dim=16)),
              "model.embed_tokens.weight", "model.norm.weight"),
}
BLOCK = re.compile(r"(?:^|\.)(?:layer|layers|h)\.(\d+)\.")


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_architecture_maps_to_depths(arch):
    build, embedding, head = ARCHS[arch]
    model = build()
    n = num_layers(model)
    depths = layer_depths(model)
    assert set(depths) == {name for name, _ in model.named_parameters()}
    assert all(0 <= d <= n + 1 for d in depths.values())
    assert depths[embedding] == 0 and depths[head] == n + 1
    for name, depth in depths.items():
        match = BLOCK.search(name)
        if match:  # block i at depth i + 1: monotone in the block index
            assert depth == int(match.group(1)) + 1, name
    assert_partition(model, param_groups(model, LR, WD, layer_decay=DECAY))


def test_albert_counts_distinct_shared_blocks():
    assert num_layers(_albert()) == 1  # one shared block applied num_hidden_layers times
    model = _albert(num_hidden_layers=4, num_hidden_groups=2, inner_group_num=2)
    depths = layer_depths(model)
    assert num_layers(model) == 4
    assert depths["albert.encoder.albert_layer_groups.0.albert_layers.1.ffn.weight"] == 2
    assert depths["albert.encoder.albert_layer_groups.1.albert_layers.0.ffn.weight"] == 3
    assert depths["classifier.weight"] == 5


def test_deberta_v3_relative_embeddings_and_conv():
    config = tf.DebertaV2Config(**TINY, relative_attention=True, position_buckets=8,
                                norm_rel_ebd="layer_norm", conv_kernel_size=3,
                                position_biased_input=False)
    depths = layer_depths(tf.DebertaV2ForSequenceClassification(config))
    assert depths["deberta.encoder.rel_embeddings.weight"] == 0
    assert depths["deberta.encoder.LayerNorm.weight"] == 0
    assert depths["deberta.encoder.conv.conv.weight"] == 1  # applied to block 0's output
