"""Architecture sweep: does the runlora pass rewrite every LoRA layer of each HF architecture, exactly?

    python benchmarks/zoo.py --sample                               # the CI sample (~5 min, 1 core)
    python benchmarks/zoo.py --only 'causal-lm/(llama|gpt2)$'       # a regex over "task/model_type"
    python benchmarks/zoo.py --only llama,bert,seq2seq/t5           # or a comma list (model types or entries)
    python benchmarks/zoo.py --jobs 2 --json results/zoo.json --md docs/zoo.md   # every architecture
    python benchmarks/zoo.py --one causal-lm/llama --json /tmp/llama.json        # one model, this process
    python benchmarks/zoo.py --merge a.json b.json --json docs/zoo.json --md docs/zoo.md  # sweeps run in parts

The entries are the model types of the installed transformers' causal-LM, masked-LM, seq2seq and
image-classification mappings, written "task/model_type". A model type in several mappings is
kept once, under the head that covers most of it (seq2seq, then masked-LM, then causal-LM: BART's
causal-LM head is its decoder alone, BERT's is its encoder with a causal mask); model types that
share one causal-LM class (gpt2 and gpt-sw3) are kept once, under the class's own name.
``--only`` may still name a dropped entry ("causal-lm/bert").

Each model runs in its own process (``--one``; ``--timeout`` seconds, one thread,
``HF_HUB_OFFLINE=1``; inductor's caches in a folder fresh for the sweep and shared by its
processes, or TORCHINDUCTOR_CACHE_DIR when set):

1. A tiny config: ``AutoConfig.for_model`` then every size-like attribute shrunk by name
   (``SIZE_RULES``; sub-configs too), dropout-like attributes 0, special token ids inside the
   vocabulary, a few ``OVERRIDES``. Random weights, fp32, seed 0.
2. peft LoRA (r=8, alpha=16, dropout 0, ``target_modules="all-linear"``), lora_B ~ N(0, 0.02)
   so the LoRA branch changes the result.
3. One training step (forward with labels, loss, backward) eagerly on a copy, with forward
   pre-hooks on every peft ``LoraLayer``: the layers the step reaches.
4. The same step through ``torch.compile(model, backend=runlora_fx.make_backend())``; loss and
   every LoRA grad compared with eager as max|a-b| / max(max|b|, 1e-6) <= 1e-4 (fp32).
5. When runlora crashes or is wrong, the same step through plain ``torch.compile(model)``; when
   the runlora stage kills the process (a signal) or times out, plain inductor in a second process.

Verdicts: full (every LoRA layer the step reaches is rewritten), partial (some), none, wrong
(loss or a grad beyond tolerance), crash (compiling or running under runlora raised), timeout,
and n/a with its reason (the tiny config, the model, peft or the eager step fails; or plain
inductor fails too). Report paths are relative to the Dynamo frame; a reached layer counts as
rewritten when a site's path is a '.'-boundary suffix of its module name.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import copy
import dataclasses
import inspect
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random weights only: never reach the hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402

SCRIPT = pathlib.Path(__file__).resolve()

# task -> (transformers mapping, Auto class). The order is the dedupe priority (see the docstring).
TASKS = {
    "seq2seq": ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "AutoModelForSeq2SeqLM"),
    "masked-lm": ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "AutoModelForMaskedLM"),
    "causal-lm": ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "AutoModelForCausalLM"),
    "image-classification": ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "AutoModelForImageClassification"),
}
TASK_ORDER = ["causal-lm", "masked-lm", "seq2seq", "image-classification"]  # the table's order

# The CI sample: decoders (llama, mistral, qwen2, gemma, phi3; gpt2's Conv1D; gpt_neox's fused
# qkv), an MoE, an encoder, an encoder-decoder and a ViT.
SAMPLE = [
    "causal-lm/llama", "causal-lm/mistral", "causal-lm/qwen2", "causal-lm/gemma", "causal-lm/phi3",
    "causal-lm/gpt2", "causal-lm/gpt_neox", "causal-lm/mixtral", "masked-lm/bert", "seq2seq/t5",
    "image-classification/vit",
]

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 64, 128, 2, 4, 2, 16
VOCAB, POSITIONS, EXPERTS, TOP_K, IMAGE, PATCH = 120, 256, 4, 2, 32, 8
BATCH, SEQ, DECODER_SEQ = 2, 12, 10  # n = 24 tokens: no size of the model equals another
RANK, ALPHA, B_STD = 8, 16, 0.02
RTOL = 1e-4  # fp32: max|a-b| / max(max|b|, 1e-6)
SEED = 0

KV_HEAD_KEYS = r"key_value_heads$|kv_heads$|^num_query_groups$"
# Attribute name -> tiny value, for int attributes; first match wins; a value is never raised.
SIZE_RULES = [(re.compile(p), v) for p, v in [
    (r"vocab_size$", VOCAB),
    (r"^num_kv_shared_layers$", 0),  # gemma3n: layers sharing KV must be fewer than the layers
    (r"^first_k_dense_replace$", 1),  # deepseek: keep an MoE layer among the two
    (r"(^|_)layers$|^n_layer$", LAYERS),
    (KV_HEAD_KEYS, KV_HEADS),  # see _shrink_value: multi-head attention stays multi-head
    (r"heads$|^n_head$", HEADS),
    (r"head_dim$|^d_kv$|^d_head$|^dim_head$|head_size$|^kv_channels$|^rotary_dim$", HEAD_DIM),
    (r"intermediate_size$|ffn_dim$|^d_ff$|^n_inner$|^dff$|^dim_ff$|ffn_hidden_size$|^mlp_dim$|^d_inner$"
     r"|^feed_forward_size$|^intermediate_size_mlp$", FFN),
    (r"^(hidden_size|d_model|n_embd|n_embed|dim|embed_dim|embedding_size|emb_dim|model_dim|hidden_dim"
     r"|word_embed_proj_dim|projection_dim|attention_hidden_size|lru_width|pooler_hidden_size|d_latents"
     r"|encoder_hidden_size|decoder_hidden_size|cross_attention_hidden_size)$", HIDDEN),
    (r"^max_.*position|^n_positions$|^n_ctx$|^max_seq_len$", POSITIONS),
    (r"^(num_(local_)?experts|n_routed_experts|moe_num_experts)$", EXPERTS),
    (r"experts_per_tok(en)?$|^(moe_)?top_?k$|^moe_k$", TOP_K),
    (r"^(n_group|topk_group|num_expert_group)$", 1),
    (r"shared_experts$", 1),
    (r"_lora_rank$", 32),
    (r"^image_size$", IMAGE),
    (r"^patch_size$", PATCH),
]]
# Sizes some configs leave None by default although their model reads them (hunyuan's head_dim,
# deepseek_v2's top-k, dots1's shared experts, esm's vocabulary): set to the tiny value.
FILL_WHEN_NONE = re.compile(r"^head_dim$|^(num_(local_)?experts|n_routed_experts)$|experts_per_tok(en)?$|shared_experts$"
                            r"|^vocab_size$")
DROPOUT = re.compile(r"dropout|drop_prob|drop_rate|drop_path|layerdrop|pdrop|jitter")
TOKEN_ID = re.compile(r"_token_id$|_token_index$|_token_ids$")
LAYER_COUNT = ("num_hidden_layers", "num_layers", "n_layer", "n_layers")

# model_type -> config attributes set after shrinking, for what the rules cannot know.
OVERRIDES: dict = {
    # 12 x (global, local) = 24 layers; the config checks it equals num_layers.
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},
    # The default leaves num_key_value_heads None, which NemotronAttention divides by.
    "nemotron": {"num_key_value_heads": HEADS},
    # Layers per pooling block (3 x 4 by default, 84 LoRA layers): one per block.
    "funnel": {"block_sizes": [1, 1, 1]},
}

VERDICTS = ["full", "partial", "none", "wrong", "crash", "timeout", "n/a"]

COLUMNS = [
    common.Column("task", "task"),
    common.Column("model_type", "model type"),
    common.Column("verdict", "verdict"),
    common.Column("coverage", "rewritten/reached"),
    common.Column("max_rel_err", "max rel err", "{:.1e}"),
    common.Column("seconds", "s", "{:.0f}"),
    common.Column("note", "note"),
]


# ----------------------------------------------------------------------------------------------
# Which architectures


def list_entries() -> list:
    """Every "task/model_type" of the four mappings, deduped (see the module docstring)."""
    from transformers.models.auto import modeling_auto

    entries, seen = [], set()
    for task, (mapping, _) in TASKS.items():
        names = getattr(modeling_auto, mapping)
        by_class = collections.defaultdict(list)
        for model_type, cls in names.items():
            by_class[cls if isinstance(cls, str) else tuple(cls)].append(model_type)
        for cls, model_types in by_class.items():
            keep = _own_model_type(cls, model_types)
            if keep not in seen:
                seen.add(keep)
                entries.append(f"{task}/{keep}")
    return sorted(entries, key=lambda e: (TASK_ORDER.index(e.split("/")[0]), e))


def _own_model_type(cls, model_types: Sequence[str]) -> str:
    """Of the model types sharing one head class, the one the class is named after, else the first."""
    name = re.sub(r"[-_]", "", cls if isinstance(cls, str) else cls[0]).lower()
    own = [t for t in model_types if name.startswith(re.sub(r"[-_]", "", t))]
    return max(own, key=len) if own else model_types[0]


def select(entries: Sequence[str], only: Optional[str]) -> list:
    """The entries ``--only`` names: a comma list of entries or model types, else a regex (search)."""
    if not only:
        return list(entries)
    parts = [p.strip() for p in only.split(",") if p.strip()]
    if all(re.fullmatch(r"[\w.-]+(/[\w.-]+)?", p) for p in parts):
        chosen = []
        for part in parts:
            hits = [e for e in entries if part in (e, e.split("/")[1])]
            if not hits and "/" in part and part.split("/")[0] in TASKS:
                hits = [part]  # an entry the dedupe dropped, asked for by name
            if not hits:
                raise SystemExit(f"zoo: --only {part!r} names no entry (e.g. causal-lm/llama)")
            chosen += [h for h in hits if h not in chosen]
        return chosen
    pattern = re.compile(only)
    return [e for e in entries if pattern.search(e)]


# ----------------------------------------------------------------------------------------------
# Tiny configs


def shrink(config: dict, vocab: Optional[int] = None) -> dict:
    """The changes that make a config dict (``PretrainedConfig.to_dict()``) tiny.

    Int attributes are shrunk by name (``SIZE_RULES``), dropout-like floats become 0.0, per-layer
    lists are cut to the new layer count, special token ids move inside the vocabulary, and
    sub-configs (dicts with a ``model_type``) are shrunk the same way and returned whole.

    Args:
        config: the full config dict.
        vocab: the enclosing config's tiny vocabulary, for token ids of a config without one.

    Returns:
        Only the changed top-level keys, with their new values.
    """
    changes = {}
    old_layers = next((config[k] for k in LAYER_COUNT if isinstance(config.get(k), int)), None)
    for key, value in config.items():
        new = _shrink_value(key, value, config)
        if new is not None and new != value:
            changes[key] = new
    new_layers = next((changes.get(k, config[k]) for k in LAYER_COUNT if isinstance(config.get(k), int)), None)
    if old_layers and new_layers and new_layers < old_layers:
        for key, value in config.items():
            if isinstance(value, list) and len(value) == old_layers and not TOKEN_ID.search(key):
                changes[key] = value[:new_layers]  # layer_types and the like: one entry per layer
    vocab = changes.get("vocab_size", config.get("vocab_size")) or vocab or VOCAB
    for key, value in config.items():
        if isinstance(value, dict) and "model_type" in value:
            changes[key] = {**value, **shrink(value, vocab)}
    changes.update(_ids_inside(config, vocab))
    if config.get("use_cache"):
        changes["use_cache"] = False
    return changes


def _shrink_value(key: str, value, config: dict):
    """The tiny value of one attribute, or None to leave it."""
    if isinstance(value, float) and DROPOUT.search(key):
        return 0.0
    if value is None and FILL_WHEN_NONE.search(key):
        return next(tiny for pattern, tiny in SIZE_RULES if pattern.search(key))
    if isinstance(value, bool) or not isinstance(value, int) or TOKEN_ID.search(key):
        return None
    for pattern, tiny in SIZE_RULES:
        if pattern.search(key):
            if pattern.pattern == KV_HEAD_KEYS and value == _heads(config):
                return min(value, HEADS)  # multi-head attention stays multi-head
            return min(value, tiny)
    return None


def _heads(config: dict) -> Optional[int]:
    return next((config[k] for k in ("num_attention_heads", "n_head", "num_heads") if k in config), None)


def _ids_inside(config: dict, vocab: int) -> dict:
    """Special token ids >= vocab moved to distinct ids at the top of the vocabulary."""
    free = iter(range(vocab - 1, -1, -1))
    moved: dict = {}

    def inside(i):
        if not isinstance(i, int) or isinstance(i, bool) or i < vocab:
            return i
        if i not in moved:
            moved[i] = next(free)
        return moved[i]

    changes = {}
    for key, value in sorted(config.items()):
        if TOKEN_ID.search(key) and value is not None:
            new = [inside(i) for i in value] if isinstance(value, list) else inside(value)
            if new != value:
                changes[key] = new
    return changes


def special_ids(config) -> set:
    """Every special token id of a config and its sub-configs (input ids avoid them)."""
    ids = set()
    for key, value in config.to_dict().items() if hasattr(config, "to_dict") else config.items():
        if isinstance(value, dict) and "model_type" in value:
            ids |= special_ids(value)
        elif TOKEN_ID.search(key):
            ids |= {i for i in (value if isinstance(value, list) else [value]) if isinstance(i, int)}
    return ids


def tiny_config(task: str, model_type: str):
    """``AutoConfig.for_model(model_type)`` rebuilt with ``shrink``'s changes and the overrides."""
    from transformers import AutoConfig

    default = AutoConfig.for_model(model_type)
    original = default.to_dict()
    changes = {**_init_kwargs(type(default), shrink(original), original), **OVERRIDES.get(model_type, {})}
    config = AutoConfig.for_model(model_type, **changes)
    if task == "seq2seq" and getattr(config, "decoder_start_token_id", None) is None:
        config.decoder_start_token_id = getattr(config, "pad_token_id", None) or 0  # labels shift right with it
    return config


def _init_kwargs(config_class, changes: dict, original: Optional[dict] = None) -> dict:
    """The changes a config class takes as arguments; sub-config dicts likewise, by their model_type.

    Attributes the class derives are left out, so the rebuilt config derives them again from
    the shrunk arguments: those it takes no argument for (DeepSeek's qk_head_dim), and the
    dataclass fields that default to None but hold a value in ``original`` (LongCat's
    qk_head_dim = qk_nope_head_dim + qk_rope_head_dim, Llama's head_dim).
    """
    from transformers import CONFIG_MAPPING

    original = original or {}
    keys = _init_keys(config_class)
    derived = _derived_fields(config_class, original)
    kwargs = {}
    for key, value in changes.items():
        if (keys is not None and key not in keys) or key in derived:
            continue
        if isinstance(value, dict) and value.get("model_type") in CONFIG_MAPPING:
            sub = original.get(key) if isinstance(original.get(key), dict) else {}
            value = {**_init_kwargs(CONFIG_MAPPING[value["model_type"]], value, sub), "model_type": value["model_type"]}
        kwargs[key] = value
    return kwargs


def _derived_fields(config_class, original: dict) -> set:
    """Int dataclass fields that default to None and hold a value in ``original``: sizes set in
    __post_init__ (sub-configs, also None by default, are built there too, and shrunk)."""
    if not dataclasses.is_dataclass(config_class):
        return set()
    return {f.name for f in dataclasses.fields(config_class) if f.init and f.default is None
            and isinstance(original.get(f.name), int) and not isinstance(original.get(f.name), bool)}


def _init_keys(config_class) -> Optional[set]:
    """The argument names of a config class, or None when it takes any (``**kwargs``, not a dataclass)."""
    if dataclasses.is_dataclass(config_class):
        return {f.name for f in dataclasses.fields(config_class) if f.init}
    params = inspect.signature(config_class.__init__).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}


# ----------------------------------------------------------------------------------------------
# Model, batch, step


def build_model(task: str, config):
    """The task's Auto model with random weights (seed 0), fp32, train mode."""
    import transformers

    torch.manual_seed(SEED)
    return getattr(transformers, TASKS[task][1]).from_config(config).float().train()


def add_lora(model):
    """peft LoRA on every linear layer (``"all-linear"``), lora_B ~ N(0, B_STD)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(SEED)
    lora = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear")
    model = get_peft_model(model, lora)
    for layer in lora_layers(model).values():
        for b in layer.lora_B.values():
            torch.nn.init.normal_(b.weight, std=B_STD)  # peft's zeros would hide the LoRA branch
    return model.train()


def lora_layers(model) -> dict:
    """name -> every peft LoraLayer module."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def make_batch(task: str, config) -> dict:
    """Random inputs and labels, drawn from torch's global generator (seed first)."""
    if task == "image-classification":
        vision = getattr(config, "vision_config", None) or config  # CLIP, SigLIP: the tower's config
        size = getattr(vision, "image_size", IMAGE)  # convolutional nets take any size
        size = size if isinstance(size, (list, tuple)) else (size,) * 2
        pixels = torch.randn(BATCH, getattr(vision, "num_channels", 3), *size[-2:])
        return {"pixel_values": pixels, "labels": torch.randint(0, config.num_labels, (BATCH,))}
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    allowed = torch.tensor(sorted(set(range(text.vocab_size)) - special_ids(config)))
    ids = allowed[torch.randint(0, len(allowed), (BATCH, SEQ))]
    if task == "seq2seq":
        return {"input_ids": ids, "labels": allowed[torch.randint(0, len(allowed), (BATCH, DECODER_SEQ))]}
    return {"input_ids": ids, "labels": ids.clone()}


def train_step(model, task: str, config) -> tuple:
    """One step from seed ``SEED``: (loss, {LoRA parameter name: grad or None})."""
    torch.manual_seed(SEED)
    batch = make_batch(task, config)
    loss = model(**batch).loss
    loss.backward()
    module = getattr(model, "_orig_mod", model)  # torch.compile's wrapper prefixes the names
    grads = {name: None if p.grad is None else p.grad.detach().clone()
             for name, p in module.named_parameters() if "lora_" in name and p.requires_grad}
    return loss.detach(), grads


def rel_error(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> float:
    """max|a - b| / max(max|b|, 1e-6); inf when one is missing, the shapes differ or a NaN appears."""
    if a is None or b is None:
        return 0.0 if a is None and b is None else float("inf")
    if a.shape != b.shape:
        return float("inf")
    if not a.numel():
        return 0.0
    err = (a - b).abs().max().item() / max(b.abs().max().item(), 1e-6)
    return err if err == err else float("inf")


def compare(got: tuple, want: tuple) -> tuple:
    """(max relative error, where) over the loss and every LoRA grad."""
    errors = {"loss": rel_error(got[0], want[0])}
    errors.update({name: rel_error(got[1].get(name), grad) for name, grad in want[1].items()})
    where = max(errors, key=errors.get)
    return errors[where], where


# ----------------------------------------------------------------------------------------------
# Coverage and verdict (pure)


def is_suffix(path: str, name: str) -> bool:
    """Whether ``path`` is ``name`` or ends it at a '.' boundary."""
    return name == path or name.endswith("." + path)


def match_sites(reached: Sequence[str], site_paths: Sequence[str]) -> dict:
    """Which reached LoRA layers a report's site paths cover.

    A Dynamo graph can serve several modules (one graph per decoder layer class reused for
    every layer), so a path that is a suffix of several names covers them all; such paths are
    listed as ambiguous. Each name keeps its longest matching path.

    Returns:
        {"rewritten": {name: path}, "missed": [names], "ambiguous": [paths], "unmatched": [paths]}
    """
    paths = sorted(set(site_paths), key=len, reverse=True)
    rewritten = {}
    for name in reached:
        path = next((p for p in paths if is_suffix(p, name)), None)
        if path is not None:
            rewritten[name] = path
    hits = collections.Counter(rewritten.values())
    return {
        "rewritten": rewritten,
        "missed": [n for n in reached if n not in rewritten],
        "ambiguous": sorted(p for p, k in hits.items() if k > 1),
        "unmatched": sorted(p for p in paths if not any(is_suffix(p, n) for n in reached)),
    }


def reasons_for(names: Sequence[str], rejected: Sequence[tuple]) -> dict:
    """name -> the reason of the rejection with the longest path that is a suffix of it."""
    out = {}
    for name in names:
        hits = [(len(p), why) for p, why in rejected if is_suffix(p, name)]
        if hits:
            out[name] = max(hits)[1]
    return out


def decide(result: dict) -> tuple:
    """(verdict, note) from a result's facts.

    Facts read: "na" (why the tiny model cannot run eagerly), "runlora_error", "max_rel_err",
    "where", "inductor_error" (plain inductor crashed or was wrong), "n_reached", "n_rewritten".
    """
    if result.get("na"):
        return "n/a", result["na"]
    error, err = result.get("runlora_error"), result.get("max_rel_err")
    if error or (err is not None and not err <= RTOL):
        if result.get("inductor_error"):
            return "n/a", f"inductor fails too: {result['inductor_error']}"
        if error:
            return "crash", error
        return "wrong", f"max rel err {err:.1e} at {result.get('where')}"
    not_linear = sum(k for kind, k in result.get("missed_kinds", {}).items() if kind in NOT_LINEAR)
    reached, rewritten = result.get("n_reached", 0) - not_linear, result.get("n_rewritten", 0)
    if not reached:
        return "n/a", "the step reaches no linear LoRA layer" + (f" ({_not_linear_note(result)})" if not_linear else "")
    if rewritten >= reached:
        return "full", "; ".join(filter(None, [_not_linear_note(result), _match_note(result)]))
    return ("partial" if rewritten else "none"), "; ".join(
        filter(None, [_missed_note(result), _not_linear_note(result), _match_note(result)]))


# LoRA layers the pass does not match by design (``runlora_fx.inspection.coverage``: "not linear"):
# peft's ParamWrapper (``target_parameters``; "all-linear" puts it on a fused MoE's 3-D experts and
# router) adds s·B·A to the weight inside the base layer's own op, so there is no x·Aᵀ·Bᵀ chain.
NOT_LINEAR = {"ParamWrapper": "peft LoRA on a parameter (fused MoE experts, router): s·B·A added to the weight"}


def _not_linear_note(result: dict) -> str:
    kinds = {kind: k for kind, k in result.get("missed_kinds", {}).items() if kind in NOT_LINEAR}
    return "; ".join(f"{k} not linear ({kind}: {NOT_LINEAR[kind]})" for kind, k in kinds.items())


def _match_note(result: dict) -> str:
    """What may make the count uncertain: site paths covering several layers, or none."""
    parts = []
    if result.get("ambiguous"):
        parts.append(f"{len(result['ambiguous'])} site paths each cover several layers (a graph reused)")
    if result.get("unmatched"):
        parts.append(f"{len(result['unmatched'])} site paths match no reached layer")
    return "; ".join(parts)


def _missed_note(result: dict) -> str:
    reasons = collections.Counter(result.get("missed_reasons", {}).values())
    not_linear = sum(k for kind, k in result.get("missed_kinds", {}).items() if kind in NOT_LINEAR)
    unexplained = len(result.get("missed", [])) - sum(reasons.values()) - not_linear
    parts = [f"{k}x {why}" for why, k in reasons.most_common(3)]
    if unexplained:
        kinds = ", ".join(f"{k}x {kind}" for kind, k in result.get("missed_kinds", {}).items())
        sample = ", ".join(_short(n) for n in result["missed"] if n not in result.get("missed_reasons", {}))
        parts.append(f"{unexplained} without a site or a rejection ({kinds}; {sample[:80]})")
    if result.get("graph_breaks"):
        parts.append(f"{result['graph_breaks']} graph breaks")
    return "; ".join(parts)


def _short(name: str) -> str:
    return re.sub(r"^base_model\.model\.", "", name)


def first_line(exc: BaseException, limit: int = 300) -> str:
    """'Type: first line of the message', at most ``limit`` characters."""
    lines = [s for s in str(exc).splitlines() if s.strip()]
    text = f"{type(exc).__name__}: {lines[0].strip() if lines else ''}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def origin(exc: BaseException) -> str:
    """Where an exception was raised (its root cause's innermost frame), as "package/file.py:line"."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "?"
    frame = frames[-1]
    path = re.sub(r"^.*/(site-packages|benchmarks)/", "", frame.filename)
    return f"{path}:{frame.lineno}"


# ----------------------------------------------------------------------------------------------
# One model (the child process)


def run_one(entry: str, json_path: Optional[str], inductor_only: bool = False) -> dict:
    """Builds, steps and compares one entry; writes the result after every stage.

    ``inductor_only``: the eager and plain-inductor steps alone (the sweep asks for it when the
    runlora stage killed the process: a crash of inductor's own code, or of the rewrite?)."""
    start = time.perf_counter()
    task, model_type = entry.split("/", 1)
    result = {"entry": entry, "task": task, "model_type": model_type, "stage": "start"}

    def save(stage: str) -> None:
        now = time.perf_counter() - start
        if result["stage"] != "start":
            result.setdefault("stage_seconds", {})[result["stage"]] = round(now - result["seconds"], 1)
        result["stage"], result["seconds"] = stage, now
        result["cpu_seconds"] = time.process_time()  # this process's CPU time, imports included
        if json_path:  # whole or not at all: the sweep reads it after a timeout's kill
            pathlib.Path(json_path + ".tmp").write_text(json.dumps(result, indent=1, default=str))
            os.replace(json_path + ".tmp", json_path)

    def fail(key: str, stage: str, exc: BaseException, prefix: str = "") -> None:
        result[key] = f"{prefix}{first_line(exc)} [{origin(exc)}]"
        result.setdefault("traceback", {})[stage] = traceback.format_exc().splitlines()[-25:]

    try:
        _run_stages(task, model_type, result, save, fail, inductor_only)
    finally:
        result["verdict"], result["note"] = decide(result)
        save("done")
    return result


def _run_stages(task: str, model_type: str, result: dict, save, fail, inductor_only: bool = False) -> None:
    import runlora_fx

    save("config")
    try:
        config = tiny_config(task, model_type)
    except Exception as e:  # noqa: BLE001 - any failure is the tiny config's
        return fail("na", "config", e, "tiny config: ")
    save("model")
    try:
        model = build_model(task, config)
    except Exception as e:  # noqa: BLE001
        return fail("na", "model", e, "model: ")
    try:
        pristine = add_lora(model)
    except Exception as e:  # noqa: BLE001
        return fail("na", "model", e, "peft: ")
    result["params"] = sum(p.numel() for p in pristine.parameters())
    result["n_lora_layers"] = len(lora_layers(pristine))

    save("eager")
    eager_model, reached = copy.deepcopy(pristine), []
    kinds = {}
    for name, layer in lora_layers(eager_model).items():
        layer.register_forward_pre_hook(lambda *_, name=name: reached.append(name))
        kinds[name] = type(layer).__name__
    try:
        want = train_step(eager_model, task, config)
    except Exception as e:  # noqa: BLE001
        return fail("na", "eager", e, "eager step: ")
    if not torch.isfinite(want[0]):
        result["na"] = f"eager step: the loss is {want[0].item()}"
        return None
    reached = list(dict.fromkeys(reached))
    result["n_reached"] = len(reached)

    if not inductor_only:
        save("runlora")
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        backend = runlora_fx.make_backend()
        try:
            got = train_step(torch.compile(copy.deepcopy(pristine), backend=backend), task, config)
            result["max_rel_err"], result["where"] = compare(got, want)
        except Exception as e:  # noqa: BLE001
            fail("runlora_error", "runlora", e)
        _record_coverage(result, reached, backend.reports)
        result["missed_kinds"] = dict(collections.Counter(kinds[n] for n in result["missed"]))

    if inductor_only or result.get("runlora_error") or not result.get("max_rel_err", 0.0) <= RTOL:
        save("inductor")
        torch._dynamo.reset()
        try:
            err, where = compare(train_step(torch.compile(copy.deepcopy(pristine)), task, config), want)
            result["inductor_max_rel_err"] = err
            if not err <= RTOL:
                result["inductor_error"] = f"wrong too (max rel err {err:.1e} at {where})"
        except Exception as e:  # noqa: BLE001
            fail("inductor_error", "inductor", e)


def _record_coverage(result: dict, reached: list, reports: list) -> None:
    """Sites, rejections and graph breaks against the reached layers. A graph the backend's safety
    net compiled without the rewrite (``report.fallback``) rewrote nothing: its sites count as
    rejected, for the fallback's reason."""
    fell_back = [r for r in reports if getattr(r, "fallback", None)]
    sites = [s.path for r in reports if not getattr(r, "fallback", None) for s in r.sites]
    rejected = [(j.path, j.reason) for r in reports for j in r.rejected]
    rejected += [(s.path, f"compiled without the rewrite: {r.fallback}") for r in fell_back for s in r.sites]
    match = match_sites(reached, sites)
    result.update({
        "graphs": len(reports),
        "graph_breaks": sum(torch._dynamo.utils.counters["graph_break"].values()),
        "break_reasons": list(torch._dynamo.utils.counters["graph_break"])[:5],
        "n_sites": len(sites),
        "n_rewritten": len(match["rewritten"]),
        "missed": match["missed"],
        "missed_reasons": reasons_for(match["missed"], rejected),
        "ambiguous": match["ambiguous"],
        "unmatched": match["unmatched"],
        "rejected": sorted({f"{p}: {why}" for p, why in rejected}),
        "fallbacks": sorted({r.fallback for r in fell_back}),
    })


# ----------------------------------------------------------------------------------------------
# The sweep (the parent process)


def child_env(cache_dir: str) -> dict:
    """One thread, no hub; inductor's caches in ``cache_dir`` unless TORCHINDUCTOR_CACHE_DIR is set."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               TORCHINDUCTOR_COMPILE_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", cache_dir)
    return env


def run_entry(entry: str, timeout: float, cache_dir: str) -> dict:
    """One entry in its own process. A process that dies or times out before any compile (the
    tiny model too big for memory: exit -9) is n/a. When the runlora stage kills the process (a
    signal, not an exception) or runs out of time, a second process runs plain inductor alone:
    if it dies, fails or runs out of time too, the entry is n/a (inductor's own code crashes, or
    compiles this model that slowly), else the crash or timeout is the rewrite's."""
    result = run_child(entry, timeout, cache_dir)
    if result["verdict"] in ("crash", "timeout") and result.get("stage", "start") in ("start", "config", "model", "eager"):
        result.update(verdict="n/a", note=f"before any compile: {result['note']}")  # -9: out of memory
    if result["verdict"] not in ("crash", "timeout") or result.get("stage") != "runlora":
        return result
    plain = run_child(entry, timeout, cache_dir, inductor_only=True)
    result["seconds"] += plain["seconds"]
    if plain.get("stage") != "done" or plain.get("inductor_error"):
        result.update(verdict="n/a", note=f"inductor fails too: {plain.get('inductor_error') or plain['note']}")
    else:
        result["note"] += " (plain inductor runs this step)"
    return result


def run_child(entry: str, timeout: float, cache_dir: str, inductor_only: bool = False) -> dict:
    """``--one entry`` in a new process (its own process group, killed whole on timeout)."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="zoo_") as tmp:
        out = os.path.join(tmp, "result.json")
        proc = subprocess.Popen([sys.executable, str(SCRIPT), "--one", entry, "--json", out]
                                + (["--inductor-only"] if inductor_only else []),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env=child_env(cache_dir), start_new_session=True)
        try:
            _, stderr = proc.communicate(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            _, stderr = proc.communicate()
            timed_out = True
        result = json.loads(pathlib.Path(out).read_text()) if os.path.exists(out) else {}
    task, model_type = entry.split("/", 1)
    result.update(entry=entry, task=task, model_type=model_type, seconds=time.perf_counter() - start)
    if timed_out and result.get("stage") != "done":
        result.update(verdict="timeout", note=f"after {timeout:.0f} s, in the {result.get('stage', 'start')} stage")
    elif result.get("stage") != "done":
        tail = [s for s in (stderr or "").splitlines() if s.strip()][-3:]
        result.update(verdict="crash", note=f"process exited {proc.returncode} in the "
                      f"{result.get('stage', 'start')} stage: {' / '.join(tail)[-300:]}")
    return result


def run_all(entries: Sequence[str], *, jobs: int, timeout: float, on_result) -> list:
    """Runs every entry, ``jobs`` processes at a time; calls ``on_result(results)`` after each.

    The processes share one inductor cache, fresh for the sweep: kernels compiled for one model
    serve the next (runlora_fx's passes key the caches on its source, so nothing is stale).
    """
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="zoo_inductor_") as cache_dir, \
            concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(run_entry, e, timeout, cache_dir): e for e in entries}
        for future in concurrent.futures.as_completed(futures):
            r = future.result()
            results[r["entry"]] = r
            print(f"# {r['entry']}: {r['verdict']} {_coverage(r)} {r['seconds']:.0f} s {r.get('note') or ''}"[:240],
                  file=sys.stderr, flush=True)
            on_result([results[e] for e in entries if e in results])
    return [results[e] for e in entries]


def _coverage(r: dict) -> str:
    """rewritten/reached linear LoRA layers, and the reached layers that are not linear."""
    if r.get("n_reached") is None or "n_rewritten" not in r:
        return ""
    not_linear = sum(k for kind, k in r.get("missed_kinds", {}).items() if kind in NOT_LINEAR)
    return f"{r['n_rewritten']}/{r['n_reached'] - not_linear}" + (f" (+{not_linear} not linear)" if not_linear else "")


def merge(paths: Sequence[str]) -> tuple:
    """Sweeps run in parts, as one: (results in the mappings' order, env, command, entries not run).

    A later file's row replaces an earlier one's for the same entry. The files must come from
    one stack (torch, transformers, peft); the newest file's environment is kept.
    """
    sweeps = [json.loads(pathlib.Path(p).read_text()) for p in paths]
    stack = {(s["env"]["torch"], s["env"]["transformers"], s["env"]["peft"]) for s in sweeps}
    if len(stack) > 1:
        raise SystemExit(f"--merge: the files come from different stacks (torch, transformers, peft): {sorted(stack)}")
    rows: dict = {}
    commands: list = []
    for sweep in sweeps:
        commands += sweep.get("commands", [sweep["command"]] if "command" in sweep else [])
        rows.update((r["entry"], r) for r in sweep["results"])
    order = list_entries()
    rank = {e: k for k, e in enumerate(order)}
    results = sorted(rows.values(), key=lambda r: (rank.get(r["entry"], len(order)), r["entry"]))
    env = max((s["env"] for s in sweeps), key=lambda e: e["date"])
    return results, env, " ; ".join(dict.fromkeys(commands)), [e for e in order if e not in rows]


def markdown(results: Sequence[dict], env: dict, command: str, not_run: Sequence[str] = ()) -> str:
    """The zoo page: versions, command, counts per verdict, the headline, one row per model."""
    counts = collections.Counter(r["verdict"] for r in results)
    works = [r for r in results if r["verdict"] in ("full", "partial", "none", "wrong", "crash", "timeout")]
    rows = [{**r, "coverage": _coverage(r), "note": _cell(r.get("note"))} for r in results]
    # n/a by where the eager side stopped: "tiny config", "model", "peft", "eager step", ...
    not_applicable = collections.Counter((r.get("note") or "").split(":")[0] for r in results if r["verdict"] == "n/a")
    lines = [
        "# Architecture zoo",
        "",
        f"{env['date']}; transformers {env['transformers']}, torch {env['torch']}, peft {env['peft']};"
        f" {env['cpu']}, 1 thread per model.",
        "",
        "; ".join(f"`{_short_command(c)}`" for c in command.split(" ; ")),
        "",
        "Tiny random-weight models (hidden 64, 2 layers), peft LoRA r=8 on all linear layers, one fp32"
        " training step eager vs `torch.compile(backend=runlora_fx.make_backend())`; see"
        " `benchmarks/zoo.py` for how the configs are shrunk and what each verdict means.",
        "",
        "Verdicts: " + ", ".join(f"{v} {counts[v]}" for v in VERDICTS if counts[v]) + f" (of {len(results)}).",
        "",
        *(["n/a, by where it stopped: " + ", ".join(f"{k} {n}" for k, n in not_applicable.most_common()) + ".", ""]
          if not_applicable else []),
        f"**Every LoRA layer the step reaches rewritten on {counts['full']} of {len(works)} architectures"
        " where eager and plain inductor work.**",
        "",
        common.markdown_table(rows, COLUMNS),
        "",
    ]
    if not_run:
        lines += ["## Not run", "",
                  f"{len(not_run)} of the {len(results) + len(not_run)} entries of the installed transformers'"
                  " mappings were not run: `python benchmarks/zoo.py --only ENTRY` runs any of them.", "",
                  ", ".join(f"`{e}`" for e in not_run), ""]
    return "\n".join(lines)


def _short_command(command: str) -> str:
    """A sweep's command with a long ``--only`` list cut to its count (the JSON keeps it whole)."""
    def cut(match):
        names = match.group(1).split(",")
        return match.group(0) if len(names) <= 8 else f"--only <{len(names)} entries, listed in zoo.json>"
    return re.sub(r"--only (\S+)", cut, command)


def _cell(text: Optional[str], limit: int = 200) -> str:
    text = " ".join((text or "").split()).replace("|", "\\|")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def write_results(results: Sequence[dict], env: dict, command: str, not_run: Sequence[str], *,
                  json_path: Optional[str], md_path: Optional[str]) -> None:
    """The sweep's JSON (what ``--merge`` reads) and its markdown page, where asked for."""
    if json_path:
        pathlib.Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(json_path).write_text(json.dumps(
            {"command": command, "env": env, "results": list(results), "not_run": list(not_run)}, indent=1, default=str))
    if md_path:
        pathlib.Path(md_path).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(md_path).write_text(markdown(results, env, command, not_run))


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", help="comma list of entries or model types, or a regex over task/model_type")
    parser.add_argument("--sample", action="store_true", help=f"the CI sample ({len(SAMPLE)} architectures)")
    parser.add_argument("--jobs", type=int, default=1, help="models run in parallel (default 1)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per model (default 120)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--md", help="write the markdown page here")
    parser.add_argument("--list", action="store_true", help="print the selected entries and exit")
    parser.add_argument("--one", metavar="TASK/MODEL_TYPE", help="run one entry in this process (as the sweep's child)")
    parser.add_argument("--inductor-only", action="store_true",
                        help="with --one: the eager and plain-inductor steps alone")
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="combine earlier sweeps' --json files (a later file's row wins) into --json / --md")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> list:
    """Runs the sweep (or ``--one``); returns the results."""
    args = parse_args(argv)
    if args.one:
        torch.set_num_threads(1)
        import torch._inductor.config as inductor_config
        inductor_config.fallback_random = True  # any RNG in the step draws as eager's does
        return [run_one(args.one, args.json, args.inductor_only)]
    if args.merge:
        results, env, command, not_run = merge(args.merge)
        command += " ; python " + " ".join(["benchmarks/zoo.py"] + list(sys.argv[1:] if argv is None else argv))
        write_results(results, env, command, not_run, json_path=args.json, md_path=args.md)
        return results
    entries = select(SAMPLE if args.sample else list_entries(), args.only)
    if args.list:
        print("\n".join(entries))
        return []
    env = common.environment("cpu")
    command = "python " + " ".join(["benchmarks/zoo.py"] + list(sys.argv[1:] if argv is None else argv))

    def write(results: list) -> None:
        write_results(results, env, command, (), json_path=args.json, md_path=args.md)

    results = run_all(entries, jobs=args.jobs, timeout=args.timeout, on_result=write)
    print(common.markdown_table([{**r, "coverage": _coverage(r), "note": _cell(r.get("note"), 120)}
                                 for r in results], COLUMNS))
    return results


if __name__ == "__main__":
    main()
