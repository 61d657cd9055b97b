"""Optimizer registry: build any supported optimizer from plain param-group dicts.

Param groups arrive from `lrft.groups.param_groups` as plain dicts
(`{"params", "lr", "weight_decay", "name", "param_names"}`). Every optimizer here honours each
group's own `lr` and `weight_decay`, and the extra keys (`name`, `param_names`) survive into
`optimizer.param_groups` so schedules and logging can name the groups.

Names (`OPTIMIZER_NAMES`): adamw, adamw_8bit, paged_adamw_8bit, lion, lion_8bit, adam, sgd,
rmsprop, adagrad, adafactor, muon, schedule_free_adamw. Libraries, torch included, are imported
only inside the functions that need them, so `check_optimizer_args` (the recipe validator) stays
light and bitsandbytes' slow import is paid only by the 8-bit optimizers.

Two need more than groups in, optimizer out, and their registry entries say so:
- muon is torch's Muon on the hidden 2-D matrices and torch's AdamW on the rest, as one
  optimizer (lrft/muon.py); its groups come from `param_groups(..., hidden_matrices=True)`.
- schedule_free_adamw (the schedulefree package) trains at other weights than the ones to
  evaluate and save: `eval_weights(optimizer)` around evaluation and saving, `train_mode` after
  loading a checkpoint (lrft.train, lrft.hf do both); it needs a constant schedule.

Keyword arguments are checked, never dropped: an argument the chosen optimizer does not take
raises `ValueError` listing the ones it does. `check_optimizer_args` runs the same check without
building anything, for the recipe validator.
"""

from __future__ import annotations

import difflib
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from lrft.config import suggest

if TYPE_CHECKING:
    import torch
    from torch import nn

# lr and weight_decay are taken by every optimizer, per group; the rest are per optimizer.
_COMMON_ARGS = ("lr", "weight_decay")


def _torch_adamw(groups: list[dict], kwargs: dict, model: nn.Module | None) -> torch.optim.Optimizer:
    import torch

    # torch's fused AdamW (one kernel per step, not one per tensor) runs on CPU and CUDA alike;
    # the HF Trainer uses it by default. On CPU it is ~6x faster than torch's default
    # single-tensor path (bench/fixes.py). Params are usually still on the CPU here and moved to
    # the GPU by accelerate.prepare afterwards, so only dtype and device type are checked.
    # "meta": under FSDP2 with fsdp_cpu_ram_efficient_loading, ranks other than 0 build the
    # optimizer over meta parameters that sharding replaces; every rank must choose alike.
    return torch.optim.AdamW(groups, fused=fused_ok(groups), **kwargs)


def fused_ok(groups: list[dict]) -> bool | None:
    """True when torch's fused AdamW kernel can take every parameter of the groups, else None."""
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda", "meta")
                                 for p in params)
    return fused or None


def _torch(cls_name: str) -> Callable[..., torch.optim.Optimizer]:
    def build(groups: list[dict], kwargs: dict, model: nn.Module | None) -> torch.optim.Optimizer:
        import torch

        return getattr(torch.optim, cls_name)(groups, **kwargs)

    return build


def quiet_bitsandbytes() -> None:
    """Keep bitsandbytes' import-time notices off the terminal.

    bitsandbytes warns on import that it cannot load an optional CPU 4-bit kernel package
    (`kernels`); lrft never uses that kernel (4-bit QLoRA runs on CUDA), so the warning is noise.
    peft imports bitsandbytes when it is installed, so LoRA runs call this too. Errors still show.
    """
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def _import_bitsandbytes(name: str) -> Any:
    """Import bitsandbytes, or say how to install it.

    Raises:
        ImportError: bitsandbytes is not installed.
    """
    quiet_bitsandbytes()
    try:
        import bitsandbytes
    except ImportError as err:
        raise ImportError(
            f"optimizer {name!r} needs bitsandbytes: pip install bitsandbytes"
        ) from err
    return bitsandbytes


def _embeddings_in_32bit(bnb: Any, model: nn.Module) -> None:
    """Keep every nn.Embedding weight's optimizer state in 32 bits, as the HF Trainer does.

    8-bit state on embeddings hurts stability. The HF Trainer uses `register_module_override`,
    but bnb turns that into overrides keyed by (group, position) in its process-global manager,
    which then leak into every later bnb optimizer (a Linear at the same position gets 32-bit
    state too). `override_config` keys the override by `id(weight)` instead; bnb never forgets
    it, so it is dropped when the weight is freed, before a new tensor can reuse the id.
    """
    from torch import nn

    manager = bnb.optim.GlobalOptimManager.get_instance()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            manager.override_config(module.weight, "optim_bits", 32)
            weakref.finalize(module.weight, manager.pid2config.pop, id(module.weight), None)


def _bnb(cls_name: str, name: str) -> Callable[..., torch.optim.Optimizer]:
    def build(groups: list[dict], kwargs: dict, model: nn.Module | None) -> torch.optim.Optimizer:
        bnb = _import_bitsandbytes(name)
        if model is not None:
            _embeddings_in_32bit(bnb, model)
        return getattr(bnb.optim, cls_name)(groups, **kwargs)

    return build


def _lion(groups: list[dict], kwargs: dict, model: nn.Module | None) -> torch.optim.Optimizer:
    # lion-pytorch's foreach Lion: the same update as its per-tensor one (same state, same
    # per-group weight decay), in a few multi-tensor ops per group instead of ~5 ops per tensor:
    # 1.4x faster on CPU (bench/fixes.py), far fewer kernel launches on a GPU.
    from lion_pytorch.foreach import Lion

    # Without decoupled_weight_decay, lion-pytorch decays each group by p *= 1 - lr_g * wd_g,
    # which respects per-group LRs. Its decoupled mode divides wd by the constructor LR, not the
    # group's, so it is deliberately not offered.
    return Lion(groups, **kwargs)


def _adafactor(groups: list[dict], kwargs: dict, model: nn.Module | None) -> torch.optim.Optimizer:
    from transformers.optimization import Adafactor

    # Turn off Adafactor's own step-size rule so the group LR (and our schedule) is what applies.
    return Adafactor(groups, relative_step=False, scale_parameter=False, warmup_init=False, **kwargs)


# Muon's own keyword arguments; the rest (betas, eps) are AdamW's, for the groups Muon cannot take.
MUON_ARGS = ("momentum", "nesterov", "ns_steps", "adjust_lr_fn")


def _muon(groups: list[dict], kwargs: dict, model: nn.Module | None) -> torch.optim.Optimizer:
    from lrft import muon  # torch at import: loaded only when a recipe asks for Muon

    adamw_groups = [g for g in groups if not g.get("hidden_matrix", True)]
    return muon.build(
        groups, muon={k: kwargs[k] for k in ("lr", "weight_decay", *MUON_ARGS) if k in kwargs},
        adamw={**{k: v for k, v in kwargs.items() if k not in MUON_ARGS},
               "fused": fused_ok(adamw_groups)})


def _schedule_free_adamw(groups: list[dict], kwargs: dict,
                         model: nn.Module | None) -> torch.optim.Optimizer:
    from lrft import schedule_free

    return schedule_free.build(groups, kwargs, model)


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer: how to build it and what the rest of lrft needs to know about it.

    Attributes:
        name: the recipe's `optim.name`.
        build: (groups, kwargs, model) -> optimizer.
        args: keyword arguments it accepts besides lr and weight_decay. The recipe's
            adam_beta1/adam_beta2 are passed as `betas` to those that take betas, adam_epsilon as
            `eps` to those that take eps; `optim.args` may set the others.
        lr_rule: how its LR relates to AdamW's (`lrft.presets`): "adamw" (the same LR), "lion"
            (3-10x smaller), "sgd" (100-1000x larger), or None (no published rule).
        package: the pip package it needs beyond torch, checked by the recipe.
        eight_bit: keeps 8-bit optimizer state (bitsandbytes).
        fsdp2: steps FSDP2's sharded (DTensor) parameters. bitsandbytes' kernels have no
            DTensor rule and Adafactor mixes DTensors with plain tensors: both fail at the first
            step, so the launcher check (lrft.setup) refuses them under FSDP. Muon
            orthogonalises whole matrices, which a shard is not; schedule-free AdamW is not
            verified under FSDP2: both are refused there too.
        deepspeed: steps what DeepSpeed hands a client optimizer (flattened 1-D partitions of
            fp32 masters). Muon needs the 2-D shapes; schedule-free AdamW's evaluation weights
            would be swapped into the masters only, not the model DeepSpeed evaluates and saves.
        hidden_matrices: steps the hidden 2-D matrices with another algorithm than the rest
            (Muon): its groups come from `param_groups(..., hidden_matrices=True)`.
        schedule_free: averages its iterates instead of decaying the LR (schedule-free AdamW):
            it needs a constant schedule, and `train_mode` / `eval_weights` around evaluation
            and saving (lrft.train does both).
        choices: the values some arguments may take, checked with the arguments.
    """

    name: str
    build: Callable[[list[dict], dict, nn.Module | None], torch.optim.Optimizer]
    args: tuple[str, ...]
    lr_rule: str | None = "adamw"
    package: str | None = None
    eight_bit: bool = False
    fsdp2: bool = True
    deepspeed: bool = True
    hidden_matrices: bool = False
    schedule_free: bool = False
    choices: tuple[tuple[str, tuple[str, ...]], ...] = ()


_BNB_ADAM_ARGS = ("betas", "eps", "amsgrad", "min_8bit_size")
OPTIMIZERS: dict[str, OptimizerSpec] = {s.name: s for s in (
    OptimizerSpec("adamw", _torch_adamw, ("betas", "eps", "amsgrad")),
    OptimizerSpec("adamw_8bit", _bnb("AdamW8bit", "adamw_8bit"), _BNB_ADAM_ARGS,
                  package="bitsandbytes", eight_bit=True, fsdp2=False),
    OptimizerSpec("paged_adamw_8bit", _bnb("PagedAdamW8bit", "paged_adamw_8bit"), _BNB_ADAM_ARGS,
                  package="bitsandbytes", eight_bit=True, fsdp2=False),
    OptimizerSpec("lion", _lion, ("betas",), lr_rule="lion", package="lion_pytorch"),
    OptimizerSpec("lion_8bit", _bnb("Lion8bit", "lion_8bit"), ("betas", "min_8bit_size"),
                  lr_rule="lion", package="bitsandbytes", eight_bit=True, fsdp2=False),
    OptimizerSpec("adam", _torch("Adam"), ("betas", "eps", "amsgrad")),
    OptimizerSpec("sgd", _torch("SGD"), ("momentum", "dampening", "nesterov"), lr_rule="sgd"),
    OptimizerSpec("rmsprop", _torch("RMSprop"), ("alpha", "eps", "momentum", "centered")),
    OptimizerSpec("adagrad", _torch("Adagrad"), ("lr_decay", "eps", "initial_accumulator_value"),
                  lr_rule=None),
    OptimizerSpec("adafactor", _adafactor, ("beta1", "clip_threshold", "decay_rate"),
                  lr_rule=None, fsdp2=False),
    OptimizerSpec("muon", _muon, ("betas", "eps", *MUON_ARGS), lr_rule="muon", fsdp2=False,
                  deepspeed=False, hidden_matrices=True,
                  choices=(("adjust_lr_fn", ("match_rms_adamw", "original")),)),
    OptimizerSpec("schedule_free_adamw", _schedule_free_adamw,
                  ("betas", "eps", "r", "weight_lr_power"), lr_rule="schedule_free",
                  package="schedulefree", fsdp2=False, deepspeed=False, schedule_free=True),
)}
OPTIMIZER_NAMES: tuple[str, ...] = tuple(OPTIMIZERS)


def unknown_optimizer(name: str) -> str:
    return f"unknown optimizer {name!r}; {suggest(name, OPTIMIZER_NAMES, 'choose from')}"


def optimizer_args(name: str) -> tuple[str, ...]:
    """Keyword arguments an optimizer accepts (lr and weight_decay first), without building it.

    Args:
        name: One of `OPTIMIZER_NAMES`.

    Returns:
        The accepted keyword names.

    Raises:
        ValueError: `name` is not a known optimizer (with a did-you-mean).
    """
    if name not in OPTIMIZERS:
        raise ValueError(unknown_optimizer(name))
    return _COMMON_ARGS + OPTIMIZERS[name].args


def check_optimizer_args(name: str, args: dict) -> list[str]:
    """List every problem with an optimizer name and its keyword arguments, building nothing.

    Args:
        name: Optimizer name, e.g. from a recipe's `optim.name`.
        args: Keyword arguments, e.g. a recipe's `optim.args`.

    Returns:
        One message per problem (an unknown name, or each argument the optimizer does not
        take, with a did-you-mean); empty when all is well.
    """
    if name not in OPTIMIZERS:
        return [unknown_optimizer(name)]
    valid = optimizer_args(name)
    problems = []
    for key in args:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(
                f"optimizer {name!r} does not take {key!r}{hint}; it takes: {', '.join(valid)}"
            )
    for key, allowed in OPTIMIZERS[name].choices:
        if args.get(key) is not None and args[key] not in allowed:  # None: the library's
            problems.append(f"optimizer {name!r}: {key}={args[key]!r}; "
                            f"{suggest(str(args[key]), allowed, 'choose from')}")
    return problems


def _fill_groups(groups: list[dict], lr: float | None, weight_decay: float | None) -> list[dict]:
    """Copy the groups, giving each the default lr / weight decay it does not carry itself.

    Raises:
        ValueError: a group has no lr and no default lr was given.
    """
    filled = []
    for index, group in enumerate(groups):
        group = dict(group)  # never mutate the caller's dicts
        if "lr" not in group:
            if lr is None:
                label = group.get("name", f"#{index}")
                raise ValueError(f"param group {label} has no 'lr' and no default lr was given")
            group["lr"] = lr
        # Library defaults differ (torch AdamW 0.01, Adam 0, bnb 0.01): make it explicit.
        group.setdefault("weight_decay", 0.0 if weight_decay is None else weight_decay)
        filled.append(group)
    return filled


def build_optimizer(
    groups: list[dict],
    name: str,
    *,
    lr: float | None = None,
    weight_decay: float | None = None,
    betas: tuple[float, float] | None = None,
    eps: float | None = None,
    model: nn.Module | None = None,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """Build the named optimizer over plain param-group dicts.

    Args:
        groups: Param groups (`params`, and usually `lr`, `weight_decay`, `name`,
            `param_names`); extra keys are kept in `optimizer.param_groups`. Not mutated.
        name: One of `OPTIMIZER_NAMES`.
        lr: Default LR for groups that carry no `lr`.
        weight_decay: Default weight decay for groups that carry none (0.0 if None).
            Decoupled (AdamW-style) for adamw, the 8-bit ones, lion and adafactor; added to
            the gradient (L2) for adam, sgd, rmsprop and adagrad, as torch defines them.
        betas: For the Adam family and Lion; None keeps the library default.
        eps: For the Adam family, rmsprop and adagrad; None keeps the library default.
        model: Used only by the bitsandbytes optimizers, to keep every `nn.Embedding`
            weight's optimizer state in 32 bits as the HF Trainer does. Without it embedding
            state is 8-bit too.
        **kwargs: Optimizer-specific arguments, see `optimizer_args(name)`.

    Returns:
        The optimizer; `param_groups[i]` holds group i's lr, weight decay and extra keys.

    Raises:
        ValueError: unknown name, an argument the optimizer does not take, or a group with
            no lr and no default lr.
        ImportError: an 8-bit optimizer was asked for and bitsandbytes is not installed.
    """
    given = dict(kwargs)
    if betas is not None:
        given["betas"] = betas
    if eps is not None:
        given["eps"] = eps
    problems = check_optimizer_args(name, given)
    if problems:
        raise ValueError("; ".join(problems))
    groups = _fill_groups(groups, lr, weight_decay)
    # The constructor's lr and weight_decay are only defaults, unused since every group has its
    # own; pass real values because some constructors check them (Lion asserts lr > 0).
    given["lr"] = lr if lr is not None else max(g["lr"] for g in groups)
    given["weight_decay"] = weight_decay if weight_decay is not None else 0.0
    return OPTIMIZERS[name].build(groups, given, model)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the tensors in an optimizer's state.

    8-bit state counts at its real size, including quantization maps and absmax blocks; a
    tensor shared by several parameters (bnb's quantization maps) is counted once.

    Args:
        optimizer: Any optimizer, after at least one step (state is created lazily).

    Returns:
        Total bytes.
    """
    import torch

    tensors = {}
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                tensors[id(value)] = value.numel() * value.element_size()
    return sum(tensors.values())


# The recipe's own keys for what some constructors call lr, weight_decay, betas and eps: setting
# them in `optim.args` as well would be ambiguous (one value silently overwritten by the other).
RECIPE_KEYS = {"lr": "optim.learning_rate", "weight_decay": "optim.weight_decay",
               "betas": "optim.adam_beta1 and optim.adam_beta2", "eps": "optim.adam_epsilon"}


def reads_betas(name: str) -> bool:
    """Whether the recipe's adam_beta1/adam_beta2 reach this optimizer (as `betas`)."""
    return name in OPTIMIZERS and "betas" in OPTIMIZERS[name].args


def reads_eps(name: str) -> bool:
    """Whether the recipe's adam_epsilon reaches this optimizer (as `eps`)."""
    return name in OPTIMIZERS and "eps" in OPTIMIZERS[name].args


def recipe_kwargs(optim_config) -> dict[str, Any]:
    """The keyword arguments a recipe's `optim` section gives `build_optimizer` (besides lr
    and weight_decay): `optim.args`, betas and eps where the optimizer takes them."""
    o = optim_config
    kwargs = dict(o.args)
    if reads_betas(o.name):
        kwargs["betas"] = (o.adam_beta1, o.adam_beta2)
    if reads_eps(o.name):
        kwargs["eps"] = o.adam_epsilon
    return kwargs
