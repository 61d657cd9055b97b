"""Shared fixtures: tiny models, tokenizers and GLUE-shaped data, all built offline in tmp folders.

Nothing here downloads. The tiny BERT and Llama are random-initialised from configs and saved
with `save_pretrained`, so the training code loads them exactly like a hub checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_GLUE = SHARED / "glue"

POSITIVE = "good great fun fine nice".split()
NEGATIVE = "bad awful dull poor boring".split()
NEUTRAL = "the a movie film plot acting is was very story".split()
WORDS = POSITIVE + NEGATIVE + NEUTRAL


def sentences(n: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """`n` easily learnt sentences: label 1 iff the sentiment words are positive; 4-15 words."""
    import random

    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        label = i % 2
        words = [rng.choice(NEUTRAL) for _ in range(rng.randint(1, 12))]
        for _ in range(3):
            words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label else NEGATIVE))
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


def write_glue_folder(root: Path, n_train: int = 96, n_eval: int = 32) -> Path:
    """A folder laid out like ../shared/glue (sst2 and rte), loadable by `load_dataset(root, task)`."""
    import datasets

    root.mkdir(parents=True, exist_ok=True)
    sst2 = datasets.Features({"sentence": datasets.Value("string"),
                              "label": datasets.ClassLabel(names=["negative", "positive"]),
                              "idx": datasets.Value("int32")})
    rte = datasets.Features({"sentence1": datasets.Value("string"),
                             "sentence2": datasets.Value("string"),
                             "label": datasets.ClassLabel(names=["entailment", "not_entailment"]),
                             "idx": datasets.Value("int32")})
    for split, n, seed in (("train", n_train, 0), ("validation", n_eval, 1)):
        texts, labels = sentences(n, seed)
        (root / "sst2").mkdir(exist_ok=True)
        datasets.Dataset.from_dict({"sentence": texts, "label": labels, "idx": list(range(n))},
                                   features=sst2).to_parquet(str(root / "sst2" / f"{split}.parquet"))
        other, _ = sentences(n, seed + 10)
        (root / "rte").mkdir(exist_ok=True)
        datasets.Dataset.from_dict({"sentence1": texts, "sentence2": other, "label": labels,
                                    "idx": list(range(n))},
                                   features=rte).to_parquet(str(root / "rte" / f"{split}.parquet"))
    lines = ["---", "configs:"]
    for task in ("sst2", "rte"):
        lines += [f"- config_name: {task}", "  data_files:"]
        for split in ("train", "validation"):
            lines += [f"  - split: {split}", f"    path: {task}/{split}.parquet"]
    (root / "README.md").write_text("\n".join([*lines, "---", ""]))
    return root


def write_tiny_bert(folder: Path) -> Path:
    """A 2-layer, hidden-32 BERT encoder and a word-level BERT tokenizer, saved like a checkpoint."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(specials + WORDS)})
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(specials + WORDS), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=37, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_tiny_llama(folder: Path) -> Path:
    """A 2-layer, hidden-32 Llama and a word-level tokenizer with a chat template."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<eos>", "<|user|>", "<|assistant|>"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + WORDS)},
                                         unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                  unk_token="<unk>")
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} "
                         "{% if m['role'] == 'assistant' %}<eos> {% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|> {% endif %}")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(specials + WORDS), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=128, pad_token_id=0, eos_token_id=2,
                         bos_token_id=2, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_causal_data(folder: Path, n_train: int = 64, n_eval: int = 16) -> dict[str, Path]:
    """jsonl files: plain `text`, `prompt`/`response` pairs and chat `messages`."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n, seed in (("train", n_train, 0), ("eval", n_eval, 1)):
        texts, labels = sentences(n, seed)
        rows = {
            "text": [{"text": t} for t in texts],
            "prompt_response": [{"prompt": t, "response": "good" if y else "bad"}
                                for t, y in zip(texts, labels)],
            "messages": [{"messages": [{"role": "user", "content": t},
                                       {"role": "assistant", "content": "good" if y else "bad"}]}
                         for t, y in zip(texts, labels)],
        }
        for fmt, items in rows.items():
            path = folder / f"{fmt}-{split}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in items))
            out[f"{fmt}-{split}"] = path
    return out


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def bert_recipe(model_dir: Path, glue_dir: Path, output_dir: Path, **train) -> dict:
    """A complete small classification recipe on the tiny BERT and tiny GLUE folder."""
    return {
        "model": {"name_or_path": str(model_dir)},
        "data": {"glue_task": "sst2", "path": str(glue_dir), "max_length": 32},
        "optim": {"name": "adamw", "learning_rate": 3e-3},
        "schedule": {"lr_scheduler_type": "constant_with_warmup", "warmup_steps": 2},
        "train": {"output_dir": str(output_dir), "per_device_train_batch_size": 8,
                  "per_device_eval_batch_size": 16, "max_steps": 48, "logging_steps": 1,
                  "eval_steps": 24, "seed": 0, "num_threads": 1, **train},
        "log": {"report_to": ["none"]},
    }


@pytest.fixture(scope="session")
def tiny_glue(tmp_path_factory) -> Path:
    return write_glue_folder(tmp_path_factory.mktemp("glue"))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def causal_files(tmp_path_factory) -> dict[str, Path]:
    return write_causal_data(tmp_path_factory.mktemp("causal-data"))


@pytest.fixture(autouse=True, scope="session")
def _datasets_cache(tmp_path_factory):
    """Keep the datasets cache of the test run out of ~/.cache."""
    import datasets

    cache = tmp_path_factory.mktemp("hf-datasets-cache")
    old = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = str(cache)
    yield
    datasets.config.HF_DATASETS_CACHE = old
