"""CPU snapshots of what training changes: trainable parameters, buffers, optimizer state.

Shared by the divergence guard (roll back to the last good state) and the LR range test
(restore the model and optimizer after the sweep). Frozen weights (a LoRA base, a 4-bit QLoRA
base) never move, so they are neither copied nor restored: a snapshot of a LoRA run is small.
A schedule-free optimizer marks in its state dict whether the parameters hold its training or
its averaged weights (`train_mode`), so a snapshot restores the weights and that mark together.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

_LR_KEYS = ("lr", "initial_lr")


def cpu_copy(obj):
    """A deep copy with every tensor copied to the CPU (never aliasing a live CPU tensor)."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(cpu_copy(v) for v in obj)
    return copy.deepcopy(obj)


def _changeable(model) -> dict[str, torch.Tensor]:
    """What training can change: trainable parameters and buffers, by qualified name."""
    state = {f"param:{n}": p for n, p in model.named_parameters() if p.requires_grad}
    state.update({f"buffer:{n}": b for n, b in model.named_buffers()})
    return state


@dataclass
class Snapshot:
    """A CPU copy of a model's changeable tensors and an optimizer's state and group LRs."""

    tensors: dict[str, torch.Tensor]
    optimizer: dict
    group_lrs: list[dict]
    training: bool

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def take(model, optimizer) -> Snapshot:
    """Copy the model's trainable parameters and buffers and the optimizer's state to the CPU."""
    return Snapshot(
        tensors=cpu_copy(_changeable(model)),
        optimizer=cpu_copy(optimizer.state_dict()),
        group_lrs=[{k: g[k] for k in _LR_KEYS if k in g} for g in optimizer.param_groups],
        training=model.training,
    )


@torch.no_grad()
def restore(model, optimizer, snapshot: Snapshot, *, lrs: bool) -> None:
    """Put the snapshot back into the model and optimizer.

    Args:
        model: the model the snapshot was taken from.
        optimizer: likewise; state the model gained since (new moments) is dropped.
        snapshot: from :func:`take`.
        lrs: also restore each group's `lr` and `initial_lr` (the range test, which changed
            them); False keeps the groups' current LRs (the guard, which then lowers them).
    """
    live = _changeable(model)
    for name, saved in snapshot.tensors.items():
        live[name].copy_(saved.to(live[name].device))
    current = [{k: g[k] for k in _LR_KEYS if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(copy.deepcopy(snapshot.optimizer))
    for group, saved in zip(optimizer.param_groups, snapshot.group_lrs if lrs else current):
        group.update(saved)
    model.train(snapshot.training)
