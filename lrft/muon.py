"""Muon on the hidden matrices and AdamW on everything else, as ONE torch optimizer.

`torch.optim.Muon` (Jordan et al. 2024; in torch since 2.9) orthogonalises the momentum of a
2-D weight matrix with a Newton-Schulz iteration and takes nothing but 2-D parameters:
embeddings, the head and every 1-D parameter need AdamW beside it. Two optimizers would break
what lrft promises about its one optimizer: one schedule over every group (a LambdaLR takes one
optimizer), the guard's snapshot and rollback, the range test's one multiplier, checkpoints
and resume. `MuonWithAdamW` is one `torch.optim.Optimizer` whose `param_groups` are all the
groups in the order given, each tagged `algorithm: "muon" | "adamw"`; it steps torch's own Muon
and AdamW over those very group dicts and one shared `state`, so whatever reads or writes
`param_groups` or `state_dict()` (LambdaLR, the guard, the range test, Accelerate's
checkpoints) sees one optimizer, and the arithmetic is torch's, not a copy.

Which parameter goes where is decided by `lrft.groups.param_groups(..., hidden_matrices=True)`,
which tags every group `hidden_matrix`; `lrft.optim.build_optimizer(groups, "muon")` turns the
tags into algorithms and builds this class.
"""

from __future__ import annotations

import torch

ALGORITHMS = ("muon", "adamw")


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon for the groups tagged ``algorithm: "muon"``, AdamW for those tagged ``"adamw"``.

    Args:
        groups: param-group dicts, each with ``params``, ``lr``, ``weight_decay`` and
            ``algorithm``; Muon groups hold 2-D parameters only. The dicts become this
            optimizer's ``param_groups`` (extra keys such as ``name`` are kept).
        muon: keyword arguments of `torch.optim.Muon` (momentum, nesterov, ns_steps,
            adjust_lr_fn, ...), defaults for the Muon groups.
        adamw: keyword arguments of `torch.optim.AdamW` (betas, eps, fused, ...), defaults for
            the AdamW groups.

    Raises:
        ValueError: a group without a known ``algorithm``, or a Muon group holding a parameter
            that is not 2-D (torch's Muon says which).
    """

    def __init__(self, groups: list[dict], *, muon: dict | None = None,
                 adamw: dict | None = None):
        unknown = [g.get("name", i) for i, g in enumerate(groups)
                   if g.get("algorithm") not in ALGORITHMS]
        if unknown:
            raise ValueError(f"param groups {unknown} have no algorithm; tag each group "
                             f"algorithm: one of {', '.join(ALGORITHMS)}")
        # torch's constructors fill each group dict in place with their defaults (betas, eps,
        # momentum, ...); the parts then share these very dicts with this optimizer.
        self._parts: dict[str, torch.optim.Optimizer] = {}
        for algorithm, cls, kwargs in (("muon", torch.optim.Muon, muon),
                                       ("adamw", torch.optim.AdamW, adamw)):
            own = [g for g in groups if g["algorithm"] == algorithm]
            if own:
                self._parts[algorithm] = cls(own, **(kwargs or {}))
        super().__init__(groups, defaults={})
        self._link()

    def _link(self) -> None:
        """Point each part at this optimizer's group dicts and state (after a load, anew)."""
        for algorithm, part in self._parts.items():
            part.param_groups = [g for g in self.param_groups if g["algorithm"] == algorithm]
            part.state = self.state

    @torch.no_grad()
    def step(self, closure=None):
        """One Muon step over the Muon groups and one AdamW step over the AdamW groups."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for part in self._parts.values():
            part.step()
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """Load as any optimizer does (it replaces the group dicts), then re-link the parts."""
        super().load_state_dict(state_dict)
        self._link()


def build(groups: list[dict], muon: dict, adamw: dict) -> MuonWithAdamW:
    """`MuonWithAdamW` over groups tagged `hidden_matrix` (lrft.groups.param_groups(...,
    hidden_matrices=True)): Muon with `muon` keyword arguments on those, AdamW with `adamw` on
    the rest. `lrft.optim` splits a recipe's arguments between the two.

    Raises:
        ValueError: the groups carry no `hidden_matrix` tag.
    """
    if any("hidden_matrix" not in g for g in groups):
        raise ValueError("optimizer 'muon' needs to know which groups hold hidden 2-D matrices: "
                         "build them with lrft.groups.param_groups(model, ..., "
                         "hidden_matrices=True)")
    groups = [{**g, "algorithm": "muon" if g["hidden_matrix"] else "adamw"} for g in groups]
    # match_rms_adamw scales each matrix's update to AdamW's RMS, so AdamW's LR and weight decay
    # carry over (Liu et al. 2025; lrft.presets); torch's default ("original") wants ~0.02.
    muon = {"adjust_lr_fn": "match_rms_adamw", **muon}
    return MuonWithAdamW(groups, muon=muon, adamw=adamw)
