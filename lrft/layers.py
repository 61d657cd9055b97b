"""Where each parameter of a transformer sits: its role and depth, for layer-wise LR decay.

Depth convention (the building block of layer-wise LR decay, LLRD), with L transformer blocks:

- depth 0: embeddings, and what projects them into the hidden size before the first block
  (ELECTRA ``embeddings_project``, ALBERT ``embedding_hidden_mapping_in``, OPT ``project_in``,
  DeBERTa's shared ``rel_embeddings`` and its ``encoder.LayerNorm``).
- depth i + 1: transformer block i (``layer.i``, ``layers.i``, ``h.i``, ``blocks.i``).
- depth L + 1: the head, i.e. everything outside the backbone (``classifier``, ``score``,
  ``lm_head``, ``pre_classifier``, ``qa_outputs``, ``embed_out``, ...) and the pooler.
- depth L + 1: the final norm after the last block (Llama ``model.norm``, GPT-2 ``ln_f``,
  OPT/GPT-NeoX ``final_layer_norm``, OPT ``project_out``), as in BEiT and timm's
  ``param_groups_layer_decay``. It keeps its own role, so ``head_lr_scale`` does not touch it.

ALBERT shares its weights across layers: its L counts the distinct blocks
(``num_hidden_groups * inner_group_num``, 1 for the released checkpoints), not the number of
times they are applied. Tied weights (GPT-2's ``lm_head`` is ``wte``) appear once in
``named_parameters()``, under their first name, the embedding: one tensor has one LR.

Only 1-D parameters (biases, LayerNorm/RMSNorm weights) are exempt from weight decay, as in the
HF Trainer; embedding matrices are 2-D and are decayed. A parameter's shape is its full one even
when DeepSpeed ZeRO-3 has partitioned it at load (`zero3_init_flag`): the local tensor is then
empty and 1-D, and the real shape is in `ds_shape` (`param_shape`).
"""

from __future__ import annotations

import re
from typing import NamedTuple

from torch import nn

# Prefixes that wrappers add in front of the wrapped model's parameter names: PEFT's
# PeftModel/LoraModel and torch.compile's OptimizedModule.
_WRAPPER_PREFIXES = ("base_model.model.", "_orig_mod.")

_BLOCK_RE = re.compile(r"(?:^|\.)(?:layer|layers|h|blocks|block)\.(\d+)\.")
_ALBERT_RE = re.compile(r"(?:^|\.)albert_layer_groups\.(\d+)\.albert_layers\.(\d+)\.")
# DeBERTa-v2 applies its ConvLayer to the output of block 0, so it belongs to block 0.
_DEBERTA_CONV_RE = re.compile(r"(?:^|\.)encoder\.conv\.")
# DeBERTa-v2 normalises its shared relative-position embeddings with encoder.LayerNorm.
_DEBERTA_REL_NORM_RE = re.compile(r"(?:^|\.)encoder\.LayerNorm\.")
_EMBEDDING_RE = re.compile(
    r"(?:^|\.)(?:embeddings|embed_tokens|embed_positions|embed_in|wte|wpe|word_embeddings"
    r"|word_embeddings_layernorm|position_embeddings|token_type_embeddings|rel_embeddings"
    r"|embeddings_project|embedding_hidden_mapping_in|project_in)(?:\.|$)"
)
_FINAL_NORM_RE = re.compile(
    r"(?:^|\.)(?:norm|ln_f|final_layer_norm|final_layernorm|final_norm|norm_f|LayerNorm"
    r"|layernorm|layer_norm|project_out)\."
)
# Heads named by their top-level module. A model with a head is split by its backbone
# attribute anyway; these names also cover bare or custom models that have none.
_HEAD_RE = re.compile(
    r"^(?:classifier|score|lm_head|pre_classifier|qa_outputs|embed_out|cls"
    r"|discriminator_predictions|generator_predictions|generator_lm_head)(?:\.|$)"
)
# The pooler sits inside BERT-style backbones but only feeds the classifier, so it trains with
# the head at depth L + 1.
_POOLER_RE = re.compile(r"(?:^|\.)pooler(?:\.|$)")

# A transformer block as a module: the module named `layer.3`, `layers.3`, `h.3`, ...
_BLOCK_MODULE_RE = re.compile(r"(?:^|\.)(?:layer|layers|h|blocks|block)\.\d+$")

class Architecture(NamedTuple):
    """What name classification needs to know about a model besides the names."""

    cls_name: str
    backbone: str | None  # attribute holding the backbone, e.g. "bert"; None if bare
    n_layers: int | None
    albert_inner: int  # ALBERT inner_group_num; 1 elsewhere
    deberta: bool


def num_layers(model: nn.Module) -> int:
    """Number of distinct transformer blocks L of a (possibly PEFT-wrapped) model.

    Args:
        model: a Hugging Face model, a PEFT model around one, or any module with a ``config``.

    Returns:
        ``config.num_hidden_layers`` (or ``n_layer``, ``num_layers``, ``n_layers``); for ALBERT,
        the number of distinct shared blocks, ``num_hidden_groups * inner_group_num``.

    Raises:
        ValueError: if the model has no config or the config has no layer count.
    """
    config = getattr(unwrap(model), "config", None)
    if getattr(config, "model_type", None) == "albert":
        return int(config.num_hidden_groups) * int(config.inner_group_num)
    for attr in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(
        f"{type(model).__name__}: cannot find the number of layers "
        "(no config.num_hidden_layers, n_layer, num_layers or n_layers)"
    )


def param_shape(param: nn.Parameter) -> tuple[int, ...]:
    """The parameter's full shape, also when DeepSpeed ZeRO-3 partitioned it (`ds_shape`)."""
    return tuple(getattr(param, "ds_shape", param.shape))


def param_numel(param: nn.Parameter) -> int:
    """The parameter's full element count, also when ZeRO-3 partitioned it (`ds_numel`)."""
    return int(getattr(param, "ds_numel", param.numel()))


def block_classes(model: nn.Module) -> list[str]:
    """Class names of the model's transformer blocks (the modules named ``layer.i``,
    ``layers.i``, ``h.i``, ``blocks.i``), e.g. ``["BertLayer"]``: the unit FSDP wraps."""
    return sorted({type(module).__name__ for name, module in model.named_modules()
                   if _BLOCK_MODULE_RE.search(name)})


def layer_depths(model: nn.Module) -> dict[str, int]:
    """Depth of every parameter for layer-wise LR decay (see the module docstring).

    Args:
        model: a Hugging Face model or a PEFT model around one.

    Returns:
        ``{parameter name: depth}`` for every parameter, frozen ones included, with depths in
        ``[0, L + 1]``: 0 for embeddings, ``i + 1`` for block i, ``L + 1`` for head and final norm.

    Raises:
        ValueError: naming the model class and the parameter if a parameter cannot be placed,
            or if the model's layer count cannot be found.
    """
    arch = architecture(model, need_layers=True)
    return {
        name: depth(place(name, arch), arch) for name, _ in model.named_parameters()
    }


def unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a PEFT or torch.compile wrapper (or the model itself)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return getattr(model, "_orig_mod", model)


def architecture(model: nn.Module, need_layers: bool) -> Architecture:
    """Collect what `place` needs; the layer count only when LLRD needs it."""
    base = unwrap(model)
    prefix = getattr(base, "base_model_prefix", "")
    # A bare backbone (BertModel) has no attribute named after its own prefix: then only the
    # name rules find the head (the pooler).
    backbone = prefix if prefix and isinstance(getattr(base, prefix, None), nn.Module) else None
    config = getattr(base, "config", None)
    model_type = getattr(config, "model_type", "") or ""
    return Architecture(
        cls_name=type(base).__name__,
        backbone=backbone,
        n_layers=num_layers(model) if need_layers else None,
        albert_inner=int(getattr(config, "inner_group_num", 1)) if model_type == "albert" else 1,
        deberta=model_type.startswith("deberta"),
    )


def _strip_wrappers(name: str) -> str:
    """Parameter name as the unwrapped model would spell it."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix):], True
    return name


def place(name: str, arch: Architecture, strict: bool = True) -> tuple[str, int]:
    """Role of a parameter (embeddings, block, final_norm, head) and its block index.

    Rules run from the most to the least specific: a block's own LayerNorm must not be
    taken for a final norm, nor a head's LayerNorm for a block's.

    Raises:
        ValueError: if ``strict`` and no rule places the name, or a block index is >= L.
    """
    bare = _strip_wrappers(name)
    top = bare.split(".", 1)[0]
    if (arch.backbone and top != arch.backbone) or _HEAD_RE.match(bare) or _POOLER_RE.search(bare):
        return "head", 0
    index = _block_index(bare, arch)
    if index is not None:
        if strict and arch.n_layers is not None and index >= arch.n_layers:
            raise ValueError(
                f"{arch.cls_name}: parameter {name!r} is in block {index} but the config "
                f"has {arch.n_layers} layers"
            )
        return "block", index
    if _EMBEDDING_RE.search(bare) or (arch.deberta and _DEBERTA_REL_NORM_RE.search(bare)):
        return "embeddings", 0
    if _FINAL_NORM_RE.search(bare):
        return "final_norm", 0
    if strict:
        raise ValueError(
            f"{arch.cls_name}: cannot place parameter {name!r} at a depth for layer-wise LR "
            "decay (not an embedding, a numbered block, a final norm or a head); "
            "train without layer_decay or extend lrft.groups"
        )
    return "body", 0


def _block_index(bare: str, arch: Architecture) -> int | None:
    """Index of the transformer block holding the parameter, in execution order."""
    match = _ALBERT_RE.search(bare)
    if match:
        return int(match.group(1)) * arch.albert_inner + int(match.group(2))
    if arch.deberta and _DEBERTA_CONV_RE.search(bare):
        return 0
    match = _BLOCK_RE.search(bare)
    return int(match.group(1)) if match else None


def depth(where: tuple[str, int], arch: Architecture) -> int:
    """Depth in [0, L + 1] of a placed parameter (`where` = place(name, arch))."""
    role, index = where
    if role == "embeddings":
        return 0
    if role == "block":
        return index + 1
    return arch.n_layers + 1


