"""Causal-LM data: texts, prompt/response pairs or chat conversations, tokenised with loss masks.

    load_causal_data(cfg, tokenizer, seed) -> CausalData   input_ids / attention_mask / labels

`data.format` picks the encoder: `text` (loss on every token), `prompt_response` (no loss on the
prompt) or `messages` (chat-templated; loss on the last assistant message only). Labels equal
input_ids except IGNORE_INDEX (-100) where there is no loss. Rows are then truncated to
`max_length`, or with `packing` concatenated and cut into blocks of exactly `max_length` tokens;
rows left with no label token are dropped. Rows come from `splits.load_splits` like
classification's.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import datasets
import pyarrow.compute as pc

from lrft.data.splits import check_text_columns, load_splits, named_splits
from lrft.errors import DataError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label id that torch's cross-entropy skips
CAUSAL_FORMATS = ("text", "prompt_response", "messages")


@dataclass
class CausalData:
    """Tokenised causal-LM splits: input_ids, attention_mask, labels (-100 where no loss)."""

    train: datasets.Dataset
    evals: dict[str, datasets.Dataset]


def load_causal_data(cfg, tokenizer, seed: int) -> CausalData:
    """Load, check and tokenise causal-LM data (`text`, `prompt_response` or `messages` format).

    Labels equal input_ids except IGNORE_INDEX (-100) on prompt tokens (`prompt_response`) or on
    everything before the last assistant message (`messages`; see `_encode_messages`). With
    `packing`, rows are concatenated into blocks of exactly `max_length` tokens; otherwise each row
    is truncated to `max_length`.

    Args:
        cfg: the recipe's `DataConfig`.
        tokenizer: a Hugging Face tokenizer with an eos token (and a chat template for `messages`).
        seed: seeds the `eval_fraction` hold-out and the `max_*_samples` subsets.

    Returns:
        `CausalData` with input_ids, attention_mask and labels.

    Raises:
        DataError: any problem with the source, splits, columns, values or tokenizer, or a split
            whose texts (responses) are all empty.
    """
    if cfg.glue_task:
        raise DataError(
            f"glue_task ({cfg.glue_task!r}) is for classification; causal-LM data needs path or train_files"
        )
    if cfg.holdout_fraction is not None:
        raise DataError(f"data.holdout_fraction ({cfg.holdout_fraction}) is for classification; "
                        f"causal-LM data has no selection split: remove it")
    columns = _causal_columns(cfg)
    _eos_id(tokenizer)
    if cfg.format == "messages" and not tokenizer.chat_template:
        raise DataError("data.format 'messages' needs a tokenizer with a chat_template; this one has none")
    train, evals = load_splits(cfg, seed, None, columns)
    splits, _ = named_splits(cfg.train_split, train, evals)
    if cfg.format == "messages":
        _check_messages(splits, cfg.messages_column)
    else:
        check_text_columns(splits, [c for cols in columns.values() for c in cols])
        if cfg.format == "text":
            _check_not_all_empty(splits, cfg.text_column, "texts", "data.text_column")
        else:
            _check_not_all_empty(splits, cfg.response_column, "responses", "data.response_column")
    return CausalData(
        train=_tokenize(train, cfg.train_split, tokenizer, cfg),
        evals={k: _tokenize(ds, k, tokenizer, cfg) for k, ds in evals.items()},
    )


# --------------------------------------------------------------------------- checks


def _causal_columns(cfg) -> dict[str, list[str]]:
    if cfg.format not in CAUSAL_FORMATS:
        raise DataError(f"unknown data.format {cfg.format!r}; expected one of: {', '.join(CAUSAL_FORMATS)}")
    return {
        "text": {"text": [cfg.text_column]},
        "prompt_response": {"prompt": [cfg.prompt_column], "response": [cfg.response_column]},
        "messages": {"messages": [cfg.messages_column]},
    }[cfg.format]


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise DataError("causal-LM data needs a tokenizer with an eos token; this one has none")
    return tokenizer.eos_token_id


def _check_messages(splits: dict[str, datasets.Dataset], column: str) -> None:
    for name, ds in splits.items():
        feature = ds.features[column]
        if not isinstance(feature, (datasets.List, datasets.LargeList, list)):
            raise DataError(f"messages column {column!r} of {name} split holds {feature}; expected lists of "
                            f"{{role, content}} messages")


def _check_not_all_empty(splits: dict[str, datasets.Dataset], column: str, what: str, key: str) -> None:
    # An all-empty split would train (or evaluate) on special tokens alone: nothing to learn.
    for name, ds in splits.items():
        lengths = pc.utf8_length(pc.utf8_trim_whitespace(ds.with_format("arrow")[column]))
        if not pc.any(pc.greater(lengths, 0)).as_py():
            raise DataError(f"all {len(ds)} {what} in column {column!r} of {name} split are empty; "
                            f"expected text to learn from: name the column that holds it ({key}) "
                            f"or fill it")


# --------------------------------------------------------------------------- encoders


def _with_eos(ids: list[int], eos: int) -> list[int]:
    return ids if ids and ids[-1] == eos else ids + [eos]


def _encode_text(batch, tokenizer, cfg):
    eos = _eos_id(tokenizer)
    ids = [_with_eos(x, eos) for x in tokenizer(batch[cfg.text_column])["input_ids"]]
    return {"input_ids": ids, "labels": [list(x) for x in ids]}


def _encode_prompt_response(batch, tokenizer, cfg):
    # Tokenised apart and joined, so the mask covers exactly the prompt's tokens. Put any separator
    # (space, newline) at the end of the prompt.
    eos = _eos_id(tokenizer)
    prompts = tokenizer(batch[cfg.prompt_column])["input_ids"]
    responses = tokenizer(batch[cfg.response_column], add_special_tokens=False)["input_ids"]
    ids, labels = [], []
    for prompt, response in zip(prompts, responses):
        response = _with_eos(response, eos)
        ids.append(prompt + response)
        labels.append([IGNORE_INDEX] * len(prompt) + response)
    return {"input_ids": ids, "labels": labels}


def _split_last_assistant(conversation: list[dict]) -> tuple[list[dict], list[dict]]:
    """(context before the last assistant message, conversation up to and including it)."""
    roles = [m.get("role") for m in conversation]
    if "assistant" not in roles:
        raise DataError(f"conversation has no assistant message to learn from; roles: {roles}")
    last = len(roles) - 1 - roles[::-1].index("assistant")
    if last == 0:
        raise DataError("conversation starts with the assistant message; nothing to condition on")
    return conversation[:last], conversation[: last + 1]


def _encode_messages(batch, tokenizer, cfg):
    """Template conversations; loss only on the last assistant message.

    The prompt is the conversation before that message templated with add_generation_prompt=True;
    every token before its end gets label -100. Limitations: in a multi-turn conversation earlier
    assistant turns are context only (no loss; split the conversation into one row per turn to
    train on them), messages after the last assistant turn are dropped, and the template must
    render that prompt as an exact prefix of the whole conversation (a DataError says when it
    does not). Whether the learned turn ends in eos is up to the template.
    """
    contexts, conversations = zip(*(_split_last_assistant(c) for c in batch[cfg.messages_column]))
    full = tokenizer.apply_chat_template(list(conversations), tokenize=True, return_dict=True)["input_ids"]
    prompts = tokenizer.apply_chat_template(
        list(contexts), tokenize=True, add_generation_prompt=True, return_dict=True
    )["input_ids"]
    labels = []
    for ids, prompt in zip(full, prompts):
        if ids[: len(prompt)] != prompt:
            raise DataError(
                "the chat template does not render the conversation before the last assistant message "
                "(with add_generation_prompt=True) as a prefix of the whole conversation; "
                "the assistant tokens cannot be located"
            )
        labels.append([IGNORE_INDEX] * len(prompt) + ids[len(prompt):])
    return {"input_ids": full, "labels": labels}


_ENCODERS = {"text": _encode_text, "prompt_response": _encode_prompt_response, "messages": _encode_messages}


# --------------------------------------------------------------------------- lengths


def _truncate(batch, max_length: int):
    ids = [x[:max_length] for x in batch["input_ids"]]
    return {"input_ids": ids, "labels": [x[:max_length] for x in batch["labels"]],
            "attention_mask": [[1] * len(x) for x in ids]}


def _pack(batch, max_length: int):
    # Concatenate (each row already ends in eos) and cut into full blocks; the tail of every
    # 1000-row map batch is dropped, as in transformers' run_clm. Attention crosses documents.
    ids = list(itertools.chain.from_iterable(batch["input_ids"]))
    labels = list(itertools.chain.from_iterable(batch["labels"]))
    stop = len(ids) // max_length * max_length
    blocks = range(0, stop, max_length)
    return {"input_ids": [ids[i:i + max_length] for i in blocks],
            "labels": [labels[i:i + max_length] for i in blocks],
            "attention_mask": [[1] * max_length for _ in blocks]}


def _drop_unsupervised(ds: datasets.Dataset, name: str) -> datasets.Dataset:
    # Rows whose response was cut away by truncation teach nothing (and give a NaN loss alone).
    kept = ds.filter(lambda b: [any(t != IGNORE_INDEX for t in x) for x in b["labels"]], batched=True)
    if len(kept) < len(ds):
        logger.warning("%s: dropped %d of %d rows with no label token left after truncation/packing",
                       name, len(ds) - len(kept), len(ds))
    if len(kept) == 0:
        raise DataError(f"{name} split has no token to learn from after truncation/packing (max_length too small?)")
    return kept


def _tokenize(ds: datasets.Dataset, name: str, tokenizer, cfg) -> datasets.Dataset:
    encode = _ENCODERS[cfg.format]
    ds = ds.map(encode, batched=True, remove_columns=ds.column_names,
                fn_kwargs={"tokenizer": tokenizer, "cfg": cfg}, desc=f"tokenize {cfg.format}")
    if cfg.packing:
        ds = ds.map(_pack, batched=True, remove_columns=ds.column_names,
                    fn_kwargs={"max_length": cfg.max_length}, desc="pack")
        if len(ds) == 0:
            raise DataError(f"{name} split has fewer tokens than one packed block of max_length={cfg.max_length}")
    else:
        ds = ds.map(_truncate, batched=True, fn_kwargs={"max_length": cfg.max_length}, desc="truncate")
    return _drop_unsupervised(ds, name)
