"""Property tests: hostile recipes and overrides never crash the loader, `lrft check` or training.

Each example starts from a valid shipped recipe (resolved through its `base:`, as a plain dict),
mutates it (wrong types, unknown keys and sections, missing or misshapen sections, huge / NaN /
inf numbers, keys moved to the wrong level, unsafe YAML tags) or replaces the file with arbitrary
bytes, and adds arbitrary `key=value` overrides. The property: `load_recipe` returns a Recipe or
raises `RecipeError` whose every problem names a key path, a file or an override; nothing else
escapes, and no YAML tag runs code. And whatever `lrft check` accepts, built from the settings
users combine, trains on a tiny model or stops with a user error: never a traceback.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import dataclasses
import io
import re
import shutil
import tempfile
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import lrft.cli
from lrft.recipe import SECTIONS, Recipe, RecipeError, dump_recipe, load_recipe

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(
    p for p in ROOT.glob("recipes/**/*.yaml")
    if p.name != "base.yaml" and "glue" not in p.relative_to(ROOT / "recipes").parts[:1]
)
WORKDIR = Path(tempfile.mkdtemp(prefix="lrft-hostile-"))  # module-wide: @given reuses it
atexit.register(shutil.rmtree, WORKDIR, True)
RECIPE = WORKDIR / "recipe.yaml"
MARKER = WORKDIR / "pwned"
PAYLOADS = (  # each would create MARKER under yaml.unsafe_load; safe_load must refuse them
    f'!!python/object/apply:os.system ["touch {MARKER}"]',
    f"!!python/object/apply:builtins.open [{MARKER}, w]",
    f'!!python/object/new:os.system ["touch {MARKER}"]',
    "!!python/name:os.system",
    "!!python/module:os",
)
SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _merged(path: Path) -> dict:
    """The shipped recipe with its base folded in, as plain YAML data (no `base:` key)."""
    data = yaml.safe_load(path.read_text())
    base = data.pop("base", None)
    if base is None:
        return data
    parent = _merged(path.parent / base)
    for key, value in data.items():
        parent[key] = {**parent.get(key, {}), **value} if isinstance(value, dict) else value
    return parent


VALID = [_merged(p) for p in SHIPPED]
FIELDS = [(s, f.name) for s in SECTIONS
          for f in dataclasses.fields(typing.get_type_hints(Recipe)[s])]
PLACE = re.compile(rf"^(?:(?:{'|'.join(SECTIONS)})(?:[.:]| and )|base: |override |/)")


def names_a_place(problem: str) -> bool:
    """Every problem starts with a key path, `base:`, an override or an (absolute) file path;
    an unknown top-level key starts with that key, whatever it is."""
    return bool(PLACE.match(problem)) or "unknown section" in problem


# ----------------------------------------------------------------------------------------------
# Strategies
# ----------------------------------------------------------------------------------------------

numbers = st.one_of(
    st.integers(), st.floats(),  # floats include nan, inf, -inf
    st.sampled_from([10**400, -10**400, 2**63, -1, 0, 1e308, -1e-320]),
)
scalars = st.one_of(
    st.none(), st.booleans(), numbers, st.text(max_size=20),
    st.sampled_from(["5e-5", "nan", "-inf", "1e400", "", "auto", "adamw", "sgd", "lion_8bit",
                     "cosine", "step", "causal_lm", "bf16", "true", "null"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.one_of(st.text(max_size=8), st.integers()), inner, max_size=3),
    max_leaves=6,
)
key_names = st.one_of(st.text(max_size=12), st.sampled_from([f for _, f in FIELDS]), st.integers())
base_values = st.one_of(
    values,
    st.sampled_from(["", ".", "/", "recipe.yaml", "nowhere.yaml", "/dev/null", "a\x00b", "a" * 300,
                     str(ROOT / "recipes/bert/base.yaml"), str(ROOT / "recipes")]),
)

mutation = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(FIELDS), values),  # wrong type at a known key
    st.tuples(st.just("set"), st.tuples(st.sampled_from(SECTIONS), key_names), values),  # unknown key
    st.tuples(st.just("section"), st.one_of(st.sampled_from(SECTIONS), key_names), values),
    st.tuples(st.just("drop"), st.sampled_from(SECTIONS), st.none()),
    st.tuples(st.just("hoist"), st.sampled_from(FIELDS), st.none()),  # a key at the top level
    st.tuples(st.just("base"), st.none(), base_values),
    st.tuples(st.just("tag"), st.sampled_from(FIELDS + [("base", None)]), st.sampled_from(PAYLOADS)),
)

override_keys = st.one_of(
    st.sampled_from([f"{s}.{k}" for s, k in FIELDS]),
    st.sampled_from(["optim", "optim.", ".learning_rate", "optm.learning_rate", "base",
                     "optim.args.lr", "a.b.c", " optim.learning_rate ", "=", ""]),
    st.text(max_size=15),
)
override_values = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["3e-5", "[a, b", "{a: 1}", "{lr: 1, foo: 2}", "null", "~", ".nan", "1e400",
                     "[" * 2000, "&a [*a]", "&a {x: *a}", "true", "!!binary aGk=", *PAYLOADS]),
)
# argv may carry lone surrogates (undecodable bytes under surrogateescape): allow them
any_text = st.text(alphabet=st.characters(blacklist_categories=()), max_size=30)
overrides = st.lists(
    st.one_of(any_text, st.builds(lambda k, v: f"{k}={v}", override_keys, override_values)),
    max_size=4,
)


def mutate(doc: dict, mutations) -> str:
    """Apply the mutations to a copy of `doc`; return YAML text (tags spliced in afterwards)."""
    doc = copy.deepcopy(doc)
    tags = {}
    for kind, where, value in mutations:
        if kind == "set":
            section, key = where
            if not isinstance(doc.get(section), dict):
                doc[section] = {}
            doc[section][key] = value
        elif kind == "section":
            doc[where] = value
        elif kind == "drop":
            doc.pop(where, None)
        elif kind == "hoist":
            section, key = where
            moved = doc.get(section, {}).pop(key, 1) if isinstance(doc.get(section), dict) else 1
            doc[key] = moved
        elif kind == "base":
            doc["base"] = value
        elif kind == "tag":
            placeholder = f"PAYLOAD_{len(tags)}"
            tags[placeholder] = value
            section, key = where
            if section == "base":
                doc["base"] = placeholder
            else:
                if not isinstance(doc.get(section), dict):
                    doc[section] = {}
                doc[section][key] = placeholder
    text = yaml.safe_dump(doc, allow_unicode=True, sort_keys=False)
    for placeholder, payload in tags.items():
        text = text.replace(placeholder, payload)
    return text


def write(content: str | bytes) -> Path:
    RECIPE.write_bytes(content.encode("utf-8", "surrogatepass") if isinstance(content, str)
                       else content)
    return RECIPE


def check_load(path: Path, items: list[str]) -> Recipe | None:
    """The property itself: a Recipe, or a RecipeError whose problems each name a place."""
    try:
        recipe = load_recipe(path, items)
    except RecipeError as e:
        assert e.problems, "a RecipeError without problems"
        bad = [p for p in e.problems if not names_a_place(p)]
        assert not bad, f"problems that name no key, file or override: {bad}"
        return None
    finally:
        assert not MARKER.exists(), "a YAML tag executed code"
    assert isinstance(recipe, Recipe)
    # Whatever loads can be printed, and what is printed loads back to the same recipe.
    text = dump_recipe(recipe)
    again = load_recipe(write(text))
    assert dump_recipe(again) == text
    return recipe


# ----------------------------------------------------------------------------------------------
# The properties
# ----------------------------------------------------------------------------------------------

def test_the_payloads_are_live():
    """Guard against a vacuous test: the unsafe loader does run the first two payloads."""
    for payload in PAYLOADS[:2]:
        assert not MARKER.exists()
        yaml.unsafe_load(f"x: {payload}\n")
        assert MARKER.exists(), payload
        MARKER.unlink()


def test_the_unmutated_recipes_load():
    for doc in VALID:
        assert check_load(write(mutate(doc, [])), []) is not None


@SETTINGS
@given(doc=st.sampled_from(VALID), mutations=st.lists(mutation, min_size=1, max_size=4),
       items=overrides)
@example(doc=VALID[0], mutations=[("set", ("optim", "learning_rate"), 10**400)], items=[])
@example(doc=VALID[0], mutations=[("section", "optim", 5)], items=["optim.learning_rate=3e-5"])
@example(doc=VALID[0], mutations=[("base", None, "a\x00b")], items=[])
@example(doc=VALID[0], mutations=[("base", None, "recipe.yaml")], items=[])
@example(doc=VALID[0], mutations=[("drop", "model", None)], items=["data.where=&a {x: *a}"])
def test_mutated_recipes_load_or_raise_recipe_error(doc, mutations, items):
    check_load(write(mutate(doc, mutations)), items)


@SETTINGS
@given(content=st.one_of(st.binary(max_size=200), any_text, st.sampled_from([
    "", " \n", "---\n", "~\n", "[]\n", "- a\n", "42\n", "model\n", "model: [\n", "\t:\n",
    "base: recipe.yaml\n", "model: " + "[" * 5000 + "]" * 5000 + "\n",
    "model:\n  name_or_path: !!binary aGk=\n", "\ufeffmodel: {}\n", "\xff\xfe",
    *[f"model: {p}\n" for p in PAYLOADS], *[f"{p}\n" for p in PAYLOADS],
])), items=overrides)
@example(content=b"\xff\xfe\x00m", items=[])
def test_arbitrary_files_load_or_raise_recipe_error(content, items):
    check_load(write(content), items)


@pytest.mark.parametrize("text, key", [
    # A self-referencing anchor and an alias bomb (9**9 leaves) in the free-form mappings: they
    # must be refused at load time, not hang or overflow when the recipe is printed.
    ("data:\n  where: &a {x: *a}\n", "data.where"),
    ("optim:\n  args: &a {x: [*a]}\n", "optim.args"),
    ("data:\n  where:\n" + "".join(
        f"    l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9) if i else 'lol'}]\n" for i in range(10)),
     "data.where"),
    ("data:\n  text_columns: &a [*a, *a]\n", "data.text_columns"),
    ("data:\n  where: " + "{a: " * 40 + "1" + "}" * 40 + "\n", "data.where"),
])
def test_anchor_cycles_and_alias_bombs_are_refused(text: str, key: str):
    path = write(f"base: {ROOT / 'recipes/bert/standard.yaml'}\n" + text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert any(p.startswith(f"{key}:") for p in info.value.problems), info.value.problems
    assert len(str(info.value)) < 2000


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(doc=st.sampled_from(VALID), mutations=st.lists(mutation, max_size=3), items=overrides)
@example(doc=VALID[0], mutations=[], items=[])
@example(doc=VALID[0], mutations=[], items=["--learning_rate=1"])
def test_cli_check_returns_0_or_2_and_never_raises(doc, mutations, items):
    path = write(mutate(doc, mutations))
    argv = ["check", str(path), *items]
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = lrft.cli.main(argv)
    except SystemExit as e:  # argparse's own exit: an override that looks like an option
        assert e.code in (0, 2) and any(i.startswith("-") for i in items), (e.code, items)
        return
    parser = lrft.cli.build_parser()  # the overrides as the CLI reads them (`--` handling too)
    items = parser.parse_args(lrft.cli.positionals_first(argv, lrft.cli.value_options(parser))
                              ).overrides
    assert not MARKER.exists()
    assert "Traceback" not in err.getvalue()
    if code == 0:
        assert out.getvalue() == f"# {path}: valid\n" + dump_recipe(load_recipe(path, items))
        assert tuple(yaml.safe_load(out.getvalue())) == SECTIONS
        assert err.getvalue() == ""
        return
    assert code == 2, code
    with pytest.raises(RecipeError) as info:
        load_recipe(path, items)
    assert err.getvalue() == f"lrft check: {info.value}\n"
    assert all(names_a_place(p) for p in info.value.problems)
    assert out.getvalue() == ""


# ----------------------------------------------------------------------------------------------
# Whatever `lrft check` accepts trains, or stops with a user error: never a traceback
# ----------------------------------------------------------------------------------------------

# Valid-looking settings of the keys a user combines; each combination is checked, then trained.
TRAINABLE = {
    "optim.name": st.sampled_from(["adamw", "adam", "sgd", "lion", "rmsprop", "adagrad",
                                   "adafactor", "adamw_8bit"]),
    "optim.learning_rate": st.sampled_from(["1e-5", "3e-3", "0.5"]),
    "optim.weight_decay": st.sampled_from(["0", "0.1"]),
    "optim.layer_decay": st.sampled_from(["0.8", "1.0"]),
    "optim.head_lr_scale": st.sampled_from(["2.0", "10"]),
    "optim.embedding_lr_scale": st.sampled_from(["0.5"]),
    "optim.scale_lr": st.sampled_from(["sqrt", "linear"]),
    "optim.reference_batch_size": st.sampled_from(["16", "64"]),
    "schedule.lr_scheduler_type": st.sampled_from(
        ["cosine", "linear", "constant", "polynomial", "cosine_with_restarts", "inverse_sqrt",
         "warmup_stable_decay", "step", "exponential", "reduce_lr_on_plateau"]),
    "schedule.warmup_steps": st.sampled_from(["0", "1", "3", "null"]),
    "schedule.min_lr_ratio": st.sampled_from(["0.1"]),
    "schedule.step_size": st.sampled_from(["1", "2"]),
    "schedule.gamma": st.sampled_from(["0.5"]),
    "train.max_steps": st.sampled_from(["1", "3"]),
    "train.gradient_accumulation_steps": st.sampled_from(["1", "2"]),
    "train.max_grad_norm": st.sampled_from(["null", "0.1"]),
    "train.eval_steps": st.sampled_from(["1", "2", "null"]),
    "train.save_steps": st.sampled_from(["1", "null"]),
    "train.mixed_precision": st.sampled_from(["no", "auto", "bf16"]),
    "train.eval_at_start": st.sampled_from(["true"]),
    "data.max_length": st.sampled_from(["8", "1024"]),
    "data.max_train_samples": st.sampled_from(["1", "9"]),
    "data.holdout_fraction": st.sampled_from(["0.25"]),
    "lora.enabled": st.sampled_from(["true"]),
    "lora.r": st.sampled_from(["2"]),
    "lora.target_modules": st.sampled_from(["[query, value]", "[dense]", "auto"]),
    "guard.enabled": st.sampled_from(["true"]),
    "guard.action": st.sampled_from(["skip", "rollback"]),
    "model.num_labels": st.sampled_from(["1", "3"]),
}
settings_combo = st.dictionaries(st.sampled_from(sorted(TRAINABLE)), st.just(None),
                                 max_size=5).flatmap(
    lambda keys: st.fixed_dictionaries({k: TRAINABLE[k] for k in keys}))


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(combo=settings_combo)
@example(combo={"schedule.lr_scheduler_type": "reduce_lr_on_plateau", "train.eval_steps": "1",
                "schedule.warmup_steps": "null"})
@example(combo={"lora.enabled": "true", "guard.enabled": "true", "train.save_steps": "1"})
@example(combo={"data.holdout_fraction": "0.25", "model.num_labels": "1"})
@pytest.mark.slow
def test_what_check_accepts_trains_or_stops_with_a_user_error(tiny_bert, tiny_glue, combo):
    """The invariant of issues 16 and 18: a clear error or a correct run, never a traceback."""
    from conftest import bert_recipe

    from lrft.errors import UserError
    from lrft.train import train

    out = Path(tempfile.mkdtemp(dir=WORKDIR))
    base = bert_recipe(tiny_bert, tiny_glue, out, max_steps=3, eval_steps=None)
    base["schedule"] = {"lr_scheduler_type": "cosine"}
    path = WORKDIR / "trainable.yaml"
    path.write_text(yaml.safe_dump(base))
    items = [f"{k}={v}" for k, v in combo.items()]
    try:
        recipe = load_recipe(path, items)
    except RecipeError:
        return  # refused at check: that is a clear error
    try:
        results = train(recipe)
    except UserError as e:
        assert str(e).strip() and "Traceback" not in str(e)
        return
    assert results["status"] in ("completed", "diverged")
    assert results["step"] == recipe.train.max_steps or results["status"] == "diverged"
    assert (out / "results.json").is_file()
