"""optim.name: muon: torch's Muon on the hidden matrices, torch's AdamW on the rest, ONE optimizer.

- Which named parameter goes to Muon and which to AdamW, on tiny BERT and Llama, at which LR
  under layer decay; one `torch.optim.Optimizer` with one param-group list; the group table.
- Its steps are exactly torch's Muon and AdamW stepped side by side; a state_dict round trip
  continues exactly; a schedule reaches both parts, also after a load.
- The guard's rollback and the range test restore it exactly and keep the group ratios.
- Recipe: arguments reach the right part, a bad adjust_lr_fn is named; FSDP and DeepSpeed are
  refused; a tiny Llama learns.
Resume bit-identical: tests/test_train_e2e.py; 1 vs 2 processes under `accelerate launch -m
lrft.train`: tests/test_launch.py.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from conftest import write_recipe
from test_groups import tiny_bert, tiny_llama

from lrft.errors import RecipeError
from lrft.groups import format_group_table, param_groups
from lrft.optim import build_optimizer
from lrft.recipe import GuardConfig, load_recipe

torch.set_num_threads(1)
LR, WD, DECAY = 1e-3, 0.01, 0.9


def _muon(model, **kwargs):
    groups = param_groups(model, LR, WD, layer_decay=DECAY, hidden_matrices=True)
    return build_optimizer(groups, "muon", **kwargs)


def _algorithms(optimizer) -> dict[str, str]:
    return {n: g["algorithm"] for g in optimizer.param_groups for n in g["param_names"]}


def _batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1, 100, (4, 10), generator=g),
            "labels": torch.randint(0, 2, (4,), generator=g)}


def _steps(model, optimizer, n: int, seed: int = 0, scheduler=None) -> None:
    for i in range(n):
        model(**_batch(seed + i)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if scheduler is not None:
            scheduler.step()


def _bert(seed: int = 0):
    """The tiny BERT without dropout (eval mode; gradients flow), so runs compare exactly."""
    torch.manual_seed(seed)
    return tiny_bert().eval()


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ---------------------------------------------------------------------------------------------
# Which parameter goes where, at which LR
# ---------------------------------------------------------------------------------------------

def test_bert_hidden_matrices_go_to_muon_everything_else_to_adamw():
    torch.manual_seed(0)
    model = tiny_bert()
    optimizer = _muon(model)
    assert type(optimizer).__name__ == "MuonWithAdamW"
    assert isinstance(optimizer, torch.optim.Optimizer)
    algorithm = _algorithms(optimizer)
    assert set(algorithm) == {n for n, _ in model.named_parameters()}  # one optimizer, all
    muon = {n for n, a in algorithm.items() if a == "muon"}
    # the 2-D weights inside the blocks, and nothing else
    assert muon == {n for n, p in model.named_parameters()
                    if p.ndim == 2 and ".encoder.layer." in n}
    assert "bert.encoder.layer.1.attention.self.query.weight" in muon
    assert "bert.encoder.layer.0.intermediate.dense.weight" in muon
    for name in ("bert.embeddings.word_embeddings.weight", "bert.embeddings.position_embeddings.weight",
                 "bert.pooler.dense.weight", "classifier.weight", "classifier.bias",
                 "bert.encoder.layer.0.attention.self.query.bias",
                 "bert.encoder.layer.1.output.LayerNorm.weight"):
        assert algorithm[name] == "adamw", name
    by_name = {g["name"]: g for g in optimizer.param_groups}
    # layer decay holds for both algorithms: block 1 is one step below the head (L = 2)
    assert by_name["layer.1"]["algorithm"] == "muon"
    assert by_name["layer.1"]["lr"] == pytest.approx(LR * DECAY)
    assert by_name["layer.1_no_decay"]["algorithm"] == "adamw"
    assert by_name["layer.1_no_decay"]["lr"] == pytest.approx(LR * DECAY)
    assert by_name["embeddings"]["lr"] == pytest.approx(LR * DECAY ** 3)
    assert by_name["layer.1"]["weight_decay"] == WD and by_name["layer.1"]["adjust_lr_fn"] == \
        "match_rms_adamw"
    lines = format_group_table(optimizer.param_groups).splitlines()
    assert lines[0].split() == ["group", "#tensors", "#params", "lr", "weight_decay", "optimizer"]
    assert lines[3].split()[0] == "layer.0" and lines[3].split()[-1] == "muon"
    assert lines[4].split()[0] == "layer.0_no_decay" and lines[4].split()[-1] == "adamw"


def test_llama_embeddings_lm_head_and_norms_go_to_adamw():
    model = tiny_llama()
    algorithm = _algorithms(_muon(model))
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight",
                 "model.layers.1.self_attn.o_proj.weight"):
        assert algorithm[name] == "muon", name
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                 "model.layers.0.input_layernorm.weight"):
        assert algorithm[name] == "adamw", name


def test_without_the_hidden_matrix_tags_muon_says_how_to_build_its_groups():
    model = tiny_bert()
    with pytest.raises(ValueError, match=r"hidden_matrices=True"):
        build_optimizer(param_groups(model, LR, WD), "muon")


def test_lora_adapters_are_hidden_matrices_and_the_head_stays_adamw():
    import peft  # a hard dependency: a missing one must fail, not skip
    model = peft.get_peft_model(tiny_bert(), peft.LoraConfig(
        task_type="SEQ_CLS", r=2, target_modules=["query", "value"]))
    algorithm = _algorithms(build_optimizer(param_groups(model, LR, WD, hidden_matrices=True,
                                                         loraplus_lr_ratio=4.0), "muon"))
    prefix = "base_model.model.bert.encoder.layer.0.attention.self.query."
    assert algorithm[prefix + "lora_A.default.weight"] == "muon"
    assert algorithm[prefix + "lora_B.default.weight"] == "muon"
    assert algorithm["base_model.model.classifier.modules_to_save.default.weight"] == "adamw"


# ---------------------------------------------------------------------------------------------
# One optimizer: torch's arithmetic, state, schedule
# ---------------------------------------------------------------------------------------------

def test_steps_are_torchs_muon_and_adamw_side_by_side():
    model = _bert()
    twin = copy.deepcopy(model)
    ours = _muon(model, betas=(0.9, 0.98), eps=1e-7, momentum=0.9)
    groups = param_groups(twin, LR, WD, layer_decay=DECAY, hidden_matrices=True)
    muon = torch.optim.Muon([g for g in groups if g["hidden_matrix"]], momentum=0.9,
                            adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW([g for g in groups if not g["hidden_matrix"]], betas=(0.9, 0.98),
                              eps=1e-7, fused=True)
    for i in range(3):
        model(**_batch(i)).loss.backward()
        twin(**_batch(i)).loss.backward()
        ours.step()
        muon.step()
        adamw.step()
        for m, o in ((model, ours), (twin, muon), (twin, adamw)):
            o.zero_grad()
    theirs = _weights(twin)
    assert [n for n, p in _weights(model).items() if not torch.equal(p, theirs[n])] == []


def test_state_dict_round_trip_continues_exactly():
    model = _bert()
    optimizer = _muon(model)
    _steps(model, optimizer, 2)
    saved_model, saved_state = _weights(model), copy.deepcopy(optimizer.state_dict())
    _steps(model, optimizer, 2, seed=10)

    other = _bert(seed=1)  # other initial weights, replaced by the saved ones
    other.load_state_dict(saved_model, strict=False)
    fresh = _muon(other)
    fresh.load_state_dict(saved_state)
    assert [g["algorithm"] for g in fresh.param_groups] == \
        [g["algorithm"] for g in optimizer.param_groups]
    query = "bert.encoder.layer.0.attention.self.query.weight"
    assert "momentum_buffer" in fresh.state[dict(other.named_parameters())[query]]
    _steps(other, fresh, 2, seed=10)
    done = _weights(model)
    assert [n for n, p in _weights(other).items() if not torch.equal(p, done[n])] == []


def test_a_schedule_reaches_both_parts_also_after_a_load():
    torch.manual_seed(0)
    model = tiny_bert()
    optimizer = _muon(model)
    _steps(model, optimizer, 1)
    optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # new group dicts
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.0)
    before = _weights(model)
    _steps(model, optimizer, 2, scheduler=scheduler)  # LR 0: neither Muon nor AdamW moves
    after = _weights(model)
    assert [n for n in before if not torch.equal(before[n], after[n])] == []
    assert all(g["initial_lr"] > 0 and g["lr"] == 0 for g in optimizer.param_groups)


# ---------------------------------------------------------------------------------------------
# The guard and the range test
# ---------------------------------------------------------------------------------------------

def test_guard_rollback_restores_muon_and_adamw_state_and_keeps_ratios():
    from lrft.guard import DivergenceGuard

    torch.manual_seed(0)
    model = tiny_bert()
    optimizer = _muon(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    _steps(model, optimizer, 2)
    guard = DivergenceGuard(GuardConfig(enabled=True), model, optimizer, scheduler,
                            SimpleNamespace(lr_scale=1.0, rollbacks=0))  # snapshot now
    good, good_state = _weights(model), copy.deepcopy(optimizer.state_dict()["state"])
    ratios = [g["lr"] / optimizer.param_groups[0]["lr"] for g in optimizer.param_groups]
    _steps(model, optimizer, 2, seed=5)
    guard.rollback()
    assert [n for n, p in _weights(model).items() if not torch.equal(p, good[n])] == []
    state = optimizer.state_dict()["state"]
    assert all(torch.equal(state[i][k], good_state[i][k]) for i in good_state
               for k in good_state[i])
    assert [g["lr"] / optimizer.param_groups[0]["lr"] for g in optimizer.param_groups] == \
        pytest.approx(ratios)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * LR * DECAY ** 3)
    _steps(model, optimizer, 1)  # both parts step on the restored state


def test_range_test_keeps_the_ratios_and_restores_exactly():
    from lrft.finder import lr_range_test

    torch.manual_seed(0)
    model = tiny_bert()
    optimizer = _muon(model)
    _steps(model, optimizer, 1)
    before, state = _weights(model), copy.deepcopy(optimizer.state_dict())
    bases = [g["lr"] for g in optimizer.param_groups]
    seen = []
    optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: seen.append([g["lr"] for g in opt.param_groups]))
    result = lr_range_test(model, optimizer, [_batch(i) for i in range(3)], num_steps=6)
    assert len(seen) == len(result.losses) >= 2
    for lrs in seen:  # one multiplier for every group, Muon's and AdamW's alike
        assert [lr / base for lr, base in zip(lrs, bases)] == pytest.approx([lrs[0] / bases[0]]
                                                                             * len(bases))
    assert [n for n, p in _weights(model).items() if not torch.equal(p, before[n])] == []
    restored = optimizer.state_dict()
    assert [g["lr"] for g in optimizer.param_groups] == bases
    assert all(torch.equal(restored["state"][i][k], state["state"][i][k])
               for i in state["state"] for k in state["state"][i])
    _steps(model, optimizer, 1)


# ---------------------------------------------------------------------------------------------
# The recipe and the launchers
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def muon_recipe(tmp_path, tiny_bert, tiny_glue):
    from conftest import bert_recipe

    recipe = bert_recipe(tiny_bert, tiny_glue, tmp_path / "run", max_steps=2, eval_steps=None)
    recipe["optim"]["name"] = "muon"
    return write_recipe(tmp_path / "muon.yaml", recipe)


def test_recipe_arguments_reach_their_part_and_a_bad_value_is_named(muon_recipe):
    from lrft.optim import recipe_kwargs

    recipe = load_recipe(muon_recipe, ["optim.adam_beta2=0.98", "optim.args={momentum: 0.9}"])
    model = tiny_bert()
    optimizer = build_optimizer(param_groups(model, LR, WD, hidden_matrices=True), "muon",
                                **recipe_kwargs(recipe.optim))
    for g in optimizer.param_groups:
        if g["algorithm"] == "muon":
            assert g["momentum"] == 0.9 and "betas" not in g
        else:
            assert g["betas"] == (0.9, 0.98) and "momentum" not in g
    with pytest.raises(RecipeError) as err:
        load_recipe(muon_recipe, ["optim.args={adjust_lr_fn: orginal}"])
    assert "optim.args: optimizer 'muon': adjust_lr_fn='orginal'; did you mean 'original'?" \
        in err.value.problems


def test_fsdp_and_deepspeed_are_refused_with_the_alternative(muon_recipe):
    from lrft.launch import launcher_problems

    recipe = load_recipe(muon_recipe)
    for kind, says in (("FSDP", "orthogonalises whole matrices"), ("DEEPSPEED", "2-D shape")):
        launcher = SimpleNamespace(distributed_type=kind, gradient_accumulation_steps=1,
                                   state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(
                                       deepspeed_config={})))
        [problem] = launcher_problems(recipe, launcher)
        assert problem.startswith("optim.name: muon") and says in problem
        assert "optim.name=adamw" in problem


def test_a_tiny_llama_learns_with_muon(tmp_path, tiny_llama, causal_files):
    from lrft.train import train

    recipe = {"model": {"name_or_path": str(tiny_llama), "task": "causal_lm"},
              "data": {"format": "messages", "train_files": [str(causal_files["messages-train"])],
                       "eval_files": [str(causal_files["messages-eval"])], "max_length": 32},
              "optim": {"name": "muon", "learning_rate": 3e-3, "layer_decay": 0.9},
              "schedule": {"lr_scheduler_type": "cosine", "warmup_steps": 2},
              "train": {"output_dir": str(tmp_path / "run"), "per_device_train_batch_size": 8,
                        "max_steps": 16, "logging_steps": 1, "eval_at_start": True, "seed": 0,
                        "num_threads": 1},
              "log": {"report_to": ["none"]}}
    results = train(write_recipe(tmp_path / "r.yaml", recipe))
    import json

    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    start = records[0]
    assert start["algorithms"]["layer.0"] == "muon" and start["algorithms"]["head"] == "adamw"
    evals = [r["splits"]["validation"]["eval_loss"] for r in records if r["kind"] == "eval"]
    assert evals[-1] < evals[0] - 0.5, evals
    assert results["status"] == "completed"
