"""Batches: a seeded, length-grouped order and dynamic padding, for training and evaluation.

    make_dataloader(dataset, tokenizer, batch_size, ...) -> DataLoader   dicts of padded tensors

Each batch is padded to its own longest row (classification labels are scalars; causal labels are
padded with IGNORE_INDEX). With `group_by_length`, training batches hold rows of similar length
(`LengthGroupedSampler`) and evaluation runs longest first. `padding_fraction` measures the waste.
"""

from __future__ import annotations

import datasets
import pyarrow.compute as pc
import torch
from accelerate.data_loader import SeedableRandomSampler
from torch.utils.data import DataLoader, Sampler
from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding
from transformers.trainer_pt_utils import get_length_grouped_indices

from lrft.data.causal import IGNORE_INDEX
from lrft.errors import DataError

# Columns a model's forward() takes; everything else is dropped before batching.
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "labels")


class LengthGroupedSampler(Sampler[int]):
    """Random order in which each run of `batch_size` indices holds rows of similar length.

    Per epoch, with a generator seeded by `seed + epoch`: shuffle, cut into mega-batches of up to
    50 batches, sort each by length (transformers' `get_length_grouped_indices`), chunk into
    batches, and shuffle the batch order. The batch holding the longest row stays first, so an
    out-of-memory error shows at step 0, and a short last batch stays last, so DataLoader's
    re-chunking into `batch_size` finds the same batches.

    The order depends only on (seed, epoch): every process of a multi-process run, and a run
    resumed with Accelerate's `skip_first_batches`, sees the same batches. Accelerate's prepared
    loader calls `set_epoch` each epoch; without it the epoch advances after each full pass.
    (No `generator` attribute on purpose: Accelerate would re-seed such a generator itself.)
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int = 0):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next pass yields."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        if not self.lengths:
            return
        rng = torch.Generator().manual_seed(self.seed + self.epoch)
        order = get_length_grouped_indices(self.lengths, self.batch_size, generator=rng)
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        last = len(batches) if len(batches[-1]) == self.batch_size else len(batches) - 1
        middle = batches[1:last]
        shuffled = [middle[i] for i in torch.randperm(len(middle), generator=rng).tolist()]
        for batch in batches[:1] + shuffled + batches[max(last, 1):]:
            yield from batch
        self.epoch += 1


def _lengths(dataset: datasets.Dataset) -> list[int]:
    return pc.list_value_length(dataset.with_format("arrow")["input_ids"]).to_pylist()


def _sampler(dataset, batch_size: int, shuffle: bool, seed: int, group_by_length: bool):
    if shuffle and group_by_length:
        return LengthGroupedSampler(_lengths(dataset), batch_size, seed)
    if shuffle:
        return SeedableRandomSampler(dataset, data_seed=seed)
    if group_by_length:
        # Evaluation: longest first, no randomness; predictions stay paired with their labels.
        lengths = _lengths(dataset)
        return sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True)
    return None


def make_dataloader(
    dataset: datasets.Dataset,
    tokenizer,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    group_by_length: bool,
    task: str = "classification",
) -> DataLoader:
    """A plain DataLoader (so `accelerator.prepare` can shard it) with dynamic padding.

    Args:
        dataset: tokenised; columns other than `MODEL_INPUTS` are dropped.
        tokenizer: pads the batches; needs a pad token.
        batch_size: rows per batch (per process).
        shuffle: a new seeded order each epoch (training); False keeps a fixed order (evaluation).
        seed: seeds the order, with the epoch.
        group_by_length: batch rows of similar length to waste less padding.
        task: "classification" (scalar labels) or "causal" (label sequences padded with -100).

    Returns:
        A `torch.utils.data.DataLoader` yielding dicts of tensors, padded to each batch's own
        longest row.

    Raises:
        DataError: unknown task, untokenised dataset or a tokenizer without a pad token.
    """
    if task not in ("classification", "causal"):
        raise DataError(f"unknown task {task!r}; expected 'classification' or 'causal'")
    if "input_ids" not in dataset.column_names:
        raise DataError(f"dataset is not tokenised: no input_ids; columns are: {', '.join(dataset.column_names)}")
    if tokenizer.pad_token is None:
        raise DataError("tokenizer has no pad token; set tokenizer.pad_token (e.g. to its eos token)")
    dataset = dataset.select_columns([c for c in MODEL_INPUTS if c in dataset.column_names])
    if task == "causal":
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX,
                                          pad_to_multiple_of=None)
    else:
        collator = DataCollatorWithPadding(tokenizer, padding=True, pad_to_multiple_of=None)
    sampler = _sampler(dataset, batch_size, shuffle, seed, group_by_length)
    # The loader's own generator: each `iter(loader)` draws a worker base seed from it instead of
    # from torch's global RNG, so starting an epoch, an evaluation or a resumed (skipped) pass
    # never shifts the dropout RNG, and a resumed run continues bit-identically.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collator,
                      generator=torch.Generator().manual_seed(seed))


def padding_fraction(dataloader) -> float:
    """Share of pad positions (attention_mask == 0) among all token positions of one pass.

    Args:
        dataloader: yields batches with an `attention_mask`.

    Returns:
        pad tokens / total tokens, 0.0 for an empty loader.
    """
    pad = total = 0
    for batch in dataloader:
        mask = batch["attention_mask"]
        pad += int((mask == 0).sum())
        total += mask.numel()
    return pad / total if total else 0.0
