"""Optimizer parameter groups: LLRD, head/embedding scales, no-decay, LoRA+ and Muon's matrices.

`param_groups` is one pure function from a model to a plain ``list[dict]`` that any
``torch.optim`` optimizer accepts. Choosing the optimizer is a separate step (``lrft.optim``),
and the schedule multiplies each group's base LR (``lrft.schedule``), so the ratios set here
survive warmup and decay.

Each parameter's role and depth (embeddings at 0, block i at i + 1, the head and the final norm
at L + 1) come from `lrft.layers`, which knows the architectures. Only 1-D parameters (biases,
LayerNorm/RMSNorm weights) are exempt from weight decay, as in the HF Trainer; embedding matrices
are 2-D and are decayed (a ZeRO-3-partitioned parameter's full shape: `lrft.layers.param_shape`).

On top of a parameter's place, two kinds are told apart when asked: LoRA B matrices (LoRA+,
``loraplus_lr_ratio``: peft's ``lora_B`` by module type, at the ratio x their place's LR) and
the hidden 2-D matrices that Muon steps (``hidden_matrices``: every 2-D parameter outside the
embeddings and the head, tagged ``hidden_matrix`` for ``lrft.optim``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from torch import nn

from lrft.layers import Architecture, architecture, depth, param_numel, param_shape, place

# Order of roles at equal depth, and of roles in the table when LLRD is off.
_ROLE_ORDER = {"embeddings": 0, "block": 1, "body": 1, "final_norm": 2, "head": 3}


class _Rates(NamedTuple):
    """The LR settings of `param_groups`, passed on as one value."""

    lr: float
    layer_decay: float | None
    head_lr_scale: float | None
    embedding_lr_scale: float | None
    loraplus_lr_ratio: float | None = None


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
    arch = architecture(model, need_layers=layer_decay is not None)
    places = {name: place(name, arch, strict=layer_decay is not None) for name, _ in named}
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
    arch: Architecture,
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
        role, index = _effectiveplace(places[name], rates, keep_roles)
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


def _effectiveplace(place: tuple[str, int], rates: _Rates,
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


def _group_lr(role: str, index: int, arch: Architecture, rates: _Rates) -> float:
    """Base LR of a role: ``lr`` times the LLRD factor times the head or embedding scale."""
    factor = 1.0
    if rates.layer_decay is not None:
        factor = rates.layer_decay ** (arch.n_layers + 1 - depth((role, index), arch))
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
    arch: Architecture,
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
