"""Optimizer parameter groups: the depth of each parameter, LLRD, head/embedding scales, no-decay.

`param_groups` is one pure function from a model to a plain ``list[dict]`` that any
``torch.optim`` optimizer accepts. Choosing the optimizer is a separate step (``lrft.optim``),
and the schedule multiplies each group's base LR (``lrft.schedule``), so the ratios set here
survive warmup and decay.

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

On top of a parameter's place, two kinds are told apart when asked: LoRA B matrices (LoRA+,
``loraplus_lr_ratio``: peft's ``lora_B`` by module type, at the ratio x their place's LR) and
the hidden 2-D matrices that Muon steps (``hidden_matrices``: every 2-D parameter outside the
embeddings and the head, tagged ``hidden_matrix`` for ``lrft.optim``).
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

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

# Order of roles at equal depth, and of roles in the table when LLRD is off.
_ROLE_ORDER = {"embeddings": 0, "block": 1, "body": 1, "final_norm": 2, "head": 3}


class _Arch(NamedTuple):
    """What name classification needs to know about a model besides the names."""

    cls_name: str
    backbone: str | None  # attribute holding the backbone, e.g. "bert"; None if bare
    n_layers: int | None
    albert_inner: int  # ALBERT inner_group_num; 1 elsewhere
    deberta: bool


class _Rates(NamedTuple):
    """The LR settings of `param_groups`, passed on as one value."""

    lr: float
    layer_decay: float | None
    head_lr_scale: float | None
    embedding_lr_scale: float | None
    loraplus_lr_ratio: float | None = None


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
    config = getattr(_unwrap(model), "config", None)
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
    arch = _arch(model, need_layers=True)
    return {
        name: _depth(_place(name, arch), arch) for name, _ in model.named_parameters()
    }


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    layer_decay: float | None = None,
    head_lr_scale: float | None = None,
    embedding_lr_scale: float | None = None,
    no_decay_1d: bool = True,
    loraplus_lr_ratio: float | None = None,
    hidden_matrices: bool = False,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups with per-group base LR and weight decay.

    The LR of a parameter at depth d is ``lr * layer_decay ** (L + 1 - d)`` (factor 1 without
    ``layer_decay``), times ``head_lr_scale`` for head parameters and ``embedding_lr_scale`` for
    embeddings, times ``loraplus_lr_ratio`` for LoRA B matrices. Parameters that share LR,
    weight decay and role share a group. The role is the depth's name under LLRD
    (``embeddings``, ``layer.0`` .. ``layer.{L-1}``, ``final_norm``, ``head``); without LLRD it
    is ``embeddings`` or ``head`` where a scale, LoRA+ or ``hidden_matrices`` asks for them, else
    ``body``. Groups with weight decay 0 from the 1-D rule get a ``_no_decay`` suffix, LoRA B
    matrices a ``_lora_B`` one.

    LoRA+ (Hayou et al. 2024) trains each LoRA B matrix (the zero-initialised output side,
    ``lora_B`` of peft's LoRA layers, found by module type) at ``loraplus_lr_ratio`` x the LR
    its place gives it, so it composes with layer decay; A matrices, 1-D parameters (DoRA
    magnitudes, biases) and the head keep their place's LR, and weight decay follows the same
    rules as everywhere (peft's `create_loraplus_optimizer` zeroes it unless told, and boosts
    1-D parameters with the B matrices). peft's LoRA embedding adapters (``lora_embedding_A`` /
    ``_B``) are embeddings at depth 0: both train at the embeddings' LR, ``embedding_lr_scale``
    included, without the ratio, as peft keeps them at one LR of their own.

    Args:
        model: the model to train, possibly PEFT-wrapped; frozen parameters are left out.
        lr: base learning rate, the LR of the head (depth L + 1) before ``head_lr_scale``.
        weight_decay: weight decay of parameters with 2 or more dimensions.
        layer_decay: LLRD factor per depth step, in (0, 1]; None turns LLRD off.
        head_lr_scale: multiplier of the head's LR; None leaves the head at its LLRD LR.
        embedding_lr_scale: multiplier of the embeddings' LR on top of their LLRD LR.
        no_decay_1d: give 1-D parameters (biases, norm weights) weight decay 0.
        loraplus_lr_ratio: LoRA+: multiplier of the LoRA B matrices' LR; None turns it off.
        hidden_matrices: keep the hidden 2-D matrices (every 2-D parameter outside the
            embeddings and the head) in groups of their own, and tag every group
            ``hidden_matrix: True | False`` (what Muon steps and AdamW does not; lrft.optim).

    Returns:
        Groups ordered by depth, each ``{"params", "lr", "weight_decay", "name",
        "param_names"}`` (and ``hidden_matrix`` with ``hidden_matrices``); every trainable
        parameter is in exactly one group.

    Raises:
        ValueError: on a non-positive lr, decay, scale or ratio; if the model has no trainable
            parameter; if ``layer_decay`` is set and a parameter cannot be placed (naming the
            model class and parameter); if a scale is set but no trainable parameter has its
            role (the setting would silently do nothing, e.g. embeddings frozen under LoRA), or
            ``loraplus_lr_ratio`` is set and the model has no trainable LoRA B matrix.
    """
    _check_settings(lr, weight_decay, layer_decay, head_lr_scale, embedding_lr_scale,
                    loraplus_lr_ratio)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(f"{type(model).__name__} has no trainable parameter")
    arch = _arch(model, need_layers=layer_decay is not None)
    places = {name: _place(name, arch, strict=layer_decay is not None) for name, _ in named}
    _check_scales_used(places, arch, head_lr_scale, embedding_lr_scale)
    rates = _Rates(lr, layer_decay, head_lr_scale, embedding_lr_scale, loraplus_lr_ratio)
    lora_b = _lora_b_ids(model, named) if loraplus_lr_ratio is not None else set()
    groups = _build_groups(named, places, arch, rates, weight_decay, no_decay_1d, lora_b,
                           hidden_matrices)
    _assert_partition(named, groups)
    return groups


def format_group_table(groups: list[dict[str, Any]]) -> str:
    """Printable table of parameter groups, one row per group plus a total row.

    Args:
        groups: groups as returned by `param_groups` (``name`` optional, ``lr`` and
            ``weight_decay`` required), or an optimizer's ``param_groups``; when a group carries
            an ``algorithm`` (Muon with AdamW, lrft.muon) the table gets an ``optimizer`` column.

    Returns:
        Lines ``group  #tensors  #params  lr  weight_decay [optimizer]`` with right-aligned
        numbers and the LR in 3-significant-digit scientific notation, ending in a ``total`` row.
    """
    tagged = any("algorithm" in g for g in groups)
    rows = [
        (g.get("name", f"group{i}"), str(len(g["params"])),
         f"{sum(param_numel(p) for p in g['params']):,}", f"{g['lr']:.2e}",
         f"{g['weight_decay']:.3g}", *([g.get("algorithm", "")] if tagged else []))
        for i, g in enumerate(groups)
    ]
    total_tensors = sum(len(g["params"]) for g in groups)
    total_params = sum(param_numel(p) for g in groups for p in g["params"])
    rows.append(("total", str(total_tensors), f"{total_params:,}", "", "",
                 *([""] if tagged else [])))
    header = ("group", "#tensors", "#params", "lr", "weight_decay", *(["optimizer"] if tagged
                                                                      else []))
    widths = [max(len(row[c]) for row in [header, *rows]) for c in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [row[0].ljust(widths[0])] + [row[c].rjust(widths[c]) for c in range(1, 5)]
        cells += row[5:]  # the algorithm, left-aligned
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _build_groups(
    named: list[tuple[str, nn.Parameter]],
    places: dict[str, tuple[str, int]],
    arch: _Arch,
    rates: _Rates,
    weight_decay: float,
    no_decay_1d: bool,
    lora_b: set[int],
    hidden_matrices: bool,
) -> list[dict[str, Any]]:
    """Bucket parameters by (lr, weight decay, role label, LoRA B?, hidden matrix?), by depth."""
    groups: dict[tuple, dict[str, Any]] = {}
    order: dict[tuple, tuple] = {}
    keep_roles = hidden_matrices or rates.loraplus_lr_ratio is not None
    for name, param in named:
        role, index = _effective_place(places[name], rates, keep_roles)
        one_d = len(param_shape(param)) < 2
        decay = 0.0 if no_decay_1d and one_d else float(weight_decay)
        is_b = id(param) in lora_b
        group_lr = _group_lr(role, index, arch, rates) * (rates.loraplus_lr_ratio if is_b else 1)
        matrix = hidden_matrices and not one_d and role not in ("embeddings", "head")
        label = f"layer.{index}" if role == "block" else role
        key = (group_lr, decay, label, is_b, matrix)
        if key not in groups:
            groups[key] = {"params": [], "lr": group_lr, "weight_decay": decay,
                           "name": label + ("_lora_B" if is_b else "")
                           + _suffix(decay, weight_decay, one_d, hidden_matrices and not matrix
                                     and role not in ("embeddings", "head")),
                           "param_names": []}
            if hidden_matrices:
                groups[key]["hidden_matrix"] = matrix
            order[key] = (_ROLE_ORDER[role], index, is_b, decay != weight_decay, not matrix)
        groups[key]["params"].append(param)
        groups[key]["param_names"].append(name)
    return [groups[key] for key in sorted(groups, key=order.__getitem__)]


def _suffix(decay: float, weight_decay: float, one_d: bool, beside_matrices: bool) -> str:
    """``_no_decay`` marks decay switched off by the 1-D rule, not a zero weight_decay. Beside
    the hidden matrices of the same role (``hidden_matrices``) the other parameters are 1-D and
    always need a suffix of their own: ``_no_decay`` when their decay is 0, else ``_1d``."""
    if beside_matrices:
        return "_no_decay" if decay == 0 else "_1d"
    return "_no_decay" if decay != weight_decay else ""


def _lora_b_ids(model: nn.Module, named: list[tuple[str, nn.Parameter]]) -> set[int]:
    """ids of the trainable LoRA B matrices: the parameters of `lora_B` in peft's LoRA layers.

    Raises:
        ValueError: there is none (not a peft LoRA model), so a LoRA+ ratio would do nothing.
    """
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        LoraLayer = ()
    trainable = {id(p) for _, p in named}
    found = {id(p) for module in model.modules() if isinstance(module, LoraLayer)
             for p in module.lora_B.parameters() if id(p) in trainable}
    if not found:
        raise ValueError(f"loraplus_lr_ratio is set but {type(model).__name__} has no trainable "
                         f"LoRA B matrix (not a peft LoRA model?); enable LoRA or unset it")
    return found


def _unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a PEFT or torch.compile wrapper (or the model itself)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return getattr(model, "_orig_mod", model)


def _arch(model: nn.Module, need_layers: bool) -> _Arch:
    """Collect what `_place` needs; the layer count only when LLRD needs it."""
    base = _unwrap(model)
    prefix = getattr(base, "base_model_prefix", "")
    # A bare backbone (BertModel) has no attribute named after its own prefix: then only the
    # name rules find the head (the pooler).
    backbone = prefix if prefix and isinstance(getattr(base, prefix, None), nn.Module) else None
    config = getattr(base, "config", None)
    model_type = getattr(config, "model_type", "") or ""
    return _Arch(
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


def _place(name: str, arch: _Arch, strict: bool = True) -> tuple[str, int]:
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


def _block_index(bare: str, arch: _Arch) -> int | None:
    """Index of the transformer block holding the parameter, in execution order."""
    match = _ALBERT_RE.search(bare)
    if match:
        return int(match.group(1)) * arch.albert_inner + int(match.group(2))
    if arch.deberta and _DEBERTA_CONV_RE.search(bare):
        return 0
    match = _BLOCK_RE.search(bare)
    return int(match.group(1)) if match else None


def _depth(place: tuple[str, int], arch: _Arch) -> int:
    """Depth in [0, L + 1] of a placed parameter."""
    role, index = place
    if role == "embeddings":
        return 0
    if role == "block":
        return index + 1
    return arch.n_layers + 1


def _effective_place(place: tuple[str, int], rates: _Rates,
                     keep_roles: bool = False) -> tuple[str, int]:
    """Without LLRD, only the roles that a scale singles out keep groups of their own, and the
    head and embeddings when `keep_roles` (LoRA+, hidden matrices) sets them apart."""
    role, index = place
    if rates.layer_decay is not None:
        return place
    if keep_roles and role in ("head", "embeddings"):
        return place
    if role == "head" and rates.head_lr_scale is not None:
        return place
    if role == "embeddings" and rates.embedding_lr_scale is not None:
        return place
    return "body", 0


def _group_lr(role: str, index: int, arch: _Arch, rates: _Rates) -> float:
    """Base LR of a role: ``lr`` times the LLRD factor times the head or embedding scale."""
    factor = 1.0
    if rates.layer_decay is not None:
        factor = rates.layer_decay ** (arch.n_layers + 1 - _depth((role, index), arch))
    if role == "head" and rates.head_lr_scale is not None:
        factor *= rates.head_lr_scale
    if role == "embeddings" and rates.embedding_lr_scale is not None:
        factor *= rates.embedding_lr_scale
    return float(rates.lr * factor)


def _check_settings(
    lr: float,
    weight_decay: float,
    layer_decay: float | None,
    head_lr_scale: float | None,
    embedding_lr_scale: float | None,
    loraplus_lr_ratio: float | None = None,
) -> None:
    """Reject settings that cannot be a learning rate, decay, scale or ratio.

    Raises:
        ValueError: listing every bad setting at once.
    """
    problems = []
    for key, value in (("lr", lr), ("head_lr_scale", head_lr_scale),
                       ("embedding_lr_scale", embedding_lr_scale),
                       ("loraplus_lr_ratio", loraplus_lr_ratio)):
        if value is not None and not value > 0:
            problems.append(f"{key}={value!r} must be > 0")
    if layer_decay is not None and not 0 < layer_decay <= 1:
        problems.append(f"layer_decay={layer_decay!r} must be in (0, 1]")
    if not weight_decay >= 0:
        problems.append(f"weight_decay={weight_decay!r} must be >= 0")
    if problems:
        raise ValueError("; ".join(problems))


def _check_scales_used(
    places: dict[str, tuple[str, int]],
    arch: _Arch,
    head_lr_scale: float | None,
    embedding_lr_scale: float | None,
) -> None:
    """Refuse a scale that no trainable parameter would feel.

    Raises:
        ValueError: if a scale is set but no trainable parameter has its role.
    """
    roles = {role for role, _ in places.values()}
    for key, value, role in (("head_lr_scale", head_lr_scale, "head"),
                             ("embedding_lr_scale", embedding_lr_scale, "embeddings")):
        if value is not None and role not in roles:
            raise ValueError(
                f"{key}={value} is set but {arch.cls_name} has no trainable {role} parameter "
                "(frozen, e.g. under LoRA, or not recognised); unset it"
            )


def _assert_partition(named: list[tuple[str, nn.Parameter]], groups: list[dict]) -> None:
    """Check that every trainable parameter is in exactly one group.

    Raises:
        RuntimeError: naming the parameters that are missing or appear more than once.
    """
    counts: dict[int, int] = {}
    for group in groups:
        for param in group["params"]:
            counts[id(param)] = counts.get(id(param), 0) + 1
    missing = [n for n, p in named if counts.get(id(p), 0) == 0]
    repeated = [n for n, p in named if counts.get(id(p), 0) > 1]
    if missing or repeated or len(counts) != len(named):
        raise RuntimeError(
            f"parameter groups do not partition the trainable parameters: "
            f"missing {missing}, repeated {repeated}"
        )
    names = [g["name"] for g in groups]  # the logs key every group's LR by its name
    if len(set(names)) != len(names):
        raise RuntimeError(f"two parameter groups share a name: {names}")
