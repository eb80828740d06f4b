"""benchmarks/zoo.py: its pure parts (config shrinking, site matching, verdicts), then the sweep itself.

The sweep tests run the script as CI would, one process per model: two architectures in the
default run (about a minute on 2 cores), and the whole CI sample under the ``slow`` mark.
"""

import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

ZOO = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "zoo.py"


@pytest.fixture(scope="module")
def zoo():
    """benchmarks/zoo.py imported as a module (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location("_bench_zoo", ZOO)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def llama_dict():
    return {"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
            "max_position_embeddings": 4096, "attention_dropout": 0.1, "rms_norm_eps": 1e-6, "use_cache": True,
            "bos_token_id": 1, "eos_token_id": [2, 32001], "pad_token_id": None, "tie_word_embeddings": False}


# ---------------------------------------------------------------------------------------------- shrink

def test_shrink_makes_a_llama_tiny(zoo):
    changes = zoo.shrink(llama_dict())

    assert changes == {"vocab_size": 120, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                       "max_position_embeddings": 256, "attention_dropout": 0.0, "use_cache": False,
                       "eos_token_id": [2, 119]}


def test_shrink_keeps_multi_head_attention_multi_head(zoo):
    config = {**llama_dict(), "num_key_value_heads": 32}

    assert zoo.shrink(config)["num_key_value_heads"] == 4


def test_shrink_never_grows_and_leaves_flags_alone(zoo):
    config = {"n_layer": 1, "n_head": 2, "n_embd": 32, "add_cross_attention": True, "scale_attn_weights": True}

    assert zoo.shrink(config) == {}


@pytest.mark.parametrize("model_type, sub", [("t5gemma", "encoder"), ("qwen2_audio", "text_config")])
def test_tiny_config_shrinks_sub_configs(zoo, model_type, sub):
    config = getattr(zoo.tiny_config("seq2seq", model_type), sub)
    assert (config.hidden_size, config.num_hidden_layers) == (zoo.HIDDEN, zoo.LAYERS)


def test_tiny_config_derives_a_size_the_class_defaults_to_none(zoo):
    config = zoo.tiny_config("causal-lm", "longcat_flash")  # qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
    assert config.qk_head_dim == config.qk_nope_head_dim + config.qk_rope_head_dim


def test_shrink_fills_sizes_a_config_leaves_none_but_its_model_reads(zoo):
    config = {**llama_dict(), "head_dim": None, "num_experts_per_tok": None, "n_routed_experts": None,
              "sliding_window": None}
    changes = zoo.shrink(config)
    assert (changes["head_dim"], changes["num_experts_per_tok"], changes["n_routed_experts"]) == (
        zoo.HEAD_DIM, zoo.TOP_K, zoo.EXPERTS)
    assert "sliding_window" not in changes


def test_shrink_cuts_per_layer_lists_and_recurses_into_sub_configs(zoo):
    text = {"model_type": "gemma3_text", "vocab_size": 262208, "hidden_size": 2560, "num_hidden_layers": 3,
            "layer_types": ["sliding_attention", "sliding_attention", "full_attention"], "hidden_dropout": 0.1}
    config = {"model_type": "gemma3", "text_config": text, "image_token_index": 262144, "boi_token_index": 255999}

    changes = zoo.shrink(config)

    assert changes["text_config"]["layer_types"] == ["sliding_attention", "sliding_attention"]
    assert changes["text_config"]["hidden_size"] == 64 and changes["text_config"]["hidden_dropout"] == 0.0
    assert changes["text_config"]["model_type"] == "gemma3_text"  # returned whole
    assert {changes["image_token_index"], changes["boi_token_index"]} == {119, 118}  # inside the text vocab


def test_tiny_config_lets_the_config_derive_what_it_derives(zoo):
    config = zoo.tiny_config("causal-lm", "deepseek_v3")

    assert (config.qk_nope_head_dim, config.qk_rope_head_dim) == (16, 16)
    assert config.qk_head_dim == 32  # derived in __post_init__, not copied from the big config
    assert config.num_experts_per_tok <= config.n_routed_experts


# ---------------------------------------------------------------------------------------------- entries

def test_entries_are_deduped_by_model_type_and_by_head_class(zoo):
    entries = zoo.list_entries()
    model_types = [e.split("/")[1] for e in entries]

    assert len(model_types) == len(set(model_types))
    assert {"causal-lm/llama", "causal-lm/gpt2", "masked-lm/bert", "seq2seq/t5", "image-classification/vit"} <= set(entries)
    assert "causal-lm/gpt-sw3" not in entries  # GPT2LMHeadModel is gpt2's
    assert set(zoo.SAMPLE) <= set(entries)


def test_select_takes_names_regexes_and_dropped_entries(zoo):
    entries = ["causal-lm/llama", "causal-lm/gpt2", "masked-lm/bert"]

    assert zoo.select(entries, "gpt2,masked-lm/bert") == ["causal-lm/gpt2", "masked-lm/bert"]
    assert zoo.select(entries, "^causal-lm/(llama|gpt2)$") == ["causal-lm/llama", "causal-lm/gpt2"]
    assert zoo.select(entries, "causal-lm/bert") == ["causal-lm/bert"]
    with pytest.raises(SystemExit):
        zoo.select(entries, "no_such_model")


# ---------------------------------------------------------------------------------------------- matching

REACHED = ["base_model.model.model.layers.0.self_attn.q_proj", "base_model.model.model.layers.1.self_attn.q_proj",
           "base_model.model.model.layers.0.mlp.down_proj", "base_model.model.lm_head_proj"]


def test_a_site_path_matches_at_a_dot_boundary_only(zoo):
    assert zoo.is_suffix("layers.0.self_attn.q_proj", REACHED[0])
    assert zoo.is_suffix(REACHED[0], REACHED[0])
    assert not zoo.is_suffix("head_proj", REACHED[3])
    assert not zoo.is_suffix("0.self_attn.q_proj", REACHED[1])


def test_match_sites_counts_what_is_covered_and_flags_ambiguous_paths(zoo):
    match = zoo.match_sites(REACHED, ["self_attn.q_proj", "layers.0.mlp.down_proj", "vision.fc1"])

    assert set(match["rewritten"]) == set(REACHED[:3])
    assert match["missed"] == [REACHED[3]]
    assert match["ambiguous"] == ["self_attn.q_proj"]  # one graph served both layers
    assert match["unmatched"] == ["vision.fc1"]


def test_match_sites_prefers_the_longest_path(zoo):
    match = zoo.match_sites(REACHED[:2], ["q_proj", "layers.1.self_attn.q_proj"])

    assert match["rewritten"][REACHED[1]] == "layers.1.self_attn.q_proj"
    assert match["rewritten"][REACHED[0]] == "q_proj"


def test_reasons_for_picks_the_longest_rejection(zoo):
    rejected = [("q_proj", "generic"), ("layers.1.self_attn.q_proj", "specific")]

    assert zoo.reasons_for(REACHED[:2], rejected) == {REACHED[0]: "generic", REACHED[1]: "specific"}


# ---------------------------------------------------------------------------------------------- verdicts

@pytest.mark.parametrize("facts, verdict", [
    ({"n_reached": 14, "n_rewritten": 14, "max_rel_err": 1e-6}, "full"),
    ({"n_reached": 14, "n_rewritten": 8, "max_rel_err": 1e-6}, "partial"),
    ({"n_reached": 14, "n_rewritten": 0, "max_rel_err": 0.0}, "none"),
    ({"n_reached": 14, "n_rewritten": 14, "max_rel_err": 2e-4, "where": "loss"}, "wrong"),
    ({"n_reached": 14, "n_rewritten": 14, "max_rel_err": float("nan"), "where": "loss"}, "wrong"),
    ({"n_reached": 14, "n_rewritten": 0, "runlora_error": "RuntimeError: boom"}, "crash"),
    ({"n_reached": 14, "runlora_error": "RuntimeError: boom", "inductor_error": "RuntimeError: boom"}, "n/a"),
    ({"n_reached": 14, "n_rewritten": 14, "max_rel_err": 1.0, "inductor_error": "wrong too"}, "n/a"),
    ({"na": "eager step: ValueError: x"}, "n/a"),
    ({"n_reached": 0, "n_rewritten": 0, "max_rel_err": 0.0}, "n/a"),
])
def test_decide(zoo, facts, verdict):
    assert zoo.decide(facts)[0] == verdict


def test_decide_explains_an_inductor_failure_and_a_partial(zoo):
    facts = {"runlora_error": "RuntimeError: boom", "inductor_error": "TypeError: bang"}
    assert zoo.decide(facts) == ("n/a", "inductor fails too: TypeError: bang")

    partial = {"n_reached": 3, "n_rewritten": 1, "max_rel_err": 0.0, "missed": ["a.gate", "a.up"],
               "missed_reasons": {"a.gate": "W requires grad"}, "missed_kinds": {"ParamWrapper": 1, "Linear": 1}}
    verdict, note = zoo.decide(partial)
    assert verdict == "partial" and "1x W requires grad" in note
    assert "1 not linear (ParamWrapper" in note  # peft's LoRA on a parameter: counted apart, with why


def test_decide_counts_lora_on_parameters_apart_from_linear_layers(zoo):
    """A fused MoE's experts under peft's ParamWrapper have no x·Aᵀ·Bᵀ chain: every linear layer
    rewritten is "full", the ParamWrappers named in the note."""
    facts = {"n_reached": 14, "n_rewritten": 8, "max_rel_err": 0.0, "missed": [f"e{k}" for k in range(6)],
             "missed_reasons": {}, "missed_kinds": {"ParamWrapper": 6}}
    verdict, note = zoo.decide(facts)
    assert verdict == "full" and note.startswith("6 not linear (ParamWrapper")
    assert zoo._coverage(facts) == "8/8 (+6 not linear)"


def test_decide_flags_site_paths_that_cover_several_layers(zoo):
    facts = {"n_reached": 2, "n_rewritten": 2, "max_rel_err": 0.0, "ambiguous": ["self_attn.q_proj"]}

    assert zoo.decide(facts) == ("full", "1 site paths each cover several layers (a graph reused)")


def test_rel_error_is_relative_to_the_reference_max(zoo):
    import torch

    want = torch.tensor([1.0, -4.0])
    assert zoo.rel_error(torch.tensor([1.0, -4.002]), want) == pytest.approx(5e-4, rel=1e-3)
    assert zoo.rel_error(None, None) == 0.0
    assert zoo.rel_error(None, want) == float("inf")
    assert zoo.rel_error(torch.tensor([float("nan"), 0.0]), want) == float("inf")


def sweep_file(path, rows, *, date, transformers="5.25.0", command="python benchmarks/zoo.py"):
    env = {"date": date, "torch": "2.13.0", "transformers": transformers, "peft": "0.21.2", "cpu": "x"}
    path.write_text(json.dumps({"command": command, "env": env, "results": rows}))
    return str(path)


@pytest.mark.parametrize("plain, verdict", [
    ({"stage": "inductor", "verdict": "crash", "note": "process exited -6 in the inductor stage"}, "n/a"),
    ({"stage": "done", "verdict": "none", "inductor_error": "wrong too (max rel err 1e-2 at loss)"}, "n/a"),
    ({"stage": "done", "verdict": "none"}, "crash"),
    ({"stage": "inductor", "verdict": "timeout", "note": "after 10 s, in the inductor stage"}, "n/a"),
])
def test_a_process_killed_or_timed_out_in_the_runlora_stage_is_retried_with_plain_inductor(zoo, monkeypatch, plain, verdict):
    killed = {"stage": "runlora", "verdict": "crash", "note": "process exited -11 in the runlora stage", "seconds": 9}
    calls = []

    def fake_child(entry, timeout, cache_dir, inductor_only=False):
        calls.append(inductor_only)
        return dict(plain, seconds=1) if inductor_only else dict(killed)

    monkeypatch.setattr(zoo, "run_child", fake_child)
    result = zoo.run_entry("causal-lm/x", 10, "/tmp")

    assert calls == [False, True] and result["verdict"] == verdict and result["seconds"] == 10
    assert ("inductor fails too" in result["note"]) == (verdict == "n/a"), result["note"]


def test_a_runlora_timeout_is_its_own_when_plain_inductor_finishes(zoo, monkeypatch):
    timed_out = {"stage": "runlora", "verdict": "timeout", "note": "after 10 s, in the runlora stage", "seconds": 10}
    monkeypatch.setattr(zoo, "run_child", lambda entry, timeout, cache_dir, inductor_only=False:
                        {"stage": "done", "verdict": "none", "seconds": 1} if inductor_only else dict(timed_out))
    result = zoo.run_entry("causal-lm/x", 10, "/tmp")
    assert result["verdict"] == "timeout" and "plain inductor runs this step" in result["note"]


@pytest.mark.parametrize("stage", ["model", "eager"])
def test_a_process_killed_before_any_compile_is_not_applicable(zoo, monkeypatch, stage):
    monkeypatch.setattr(zoo, "run_child", lambda *a, **k: {"stage": stage, "verdict": "crash", "seconds": 1,
                                                           "note": f"process exited -9 in the {stage} stage"})
    result = zoo.run_entry("causal-lm/x", 10, "/tmp")
    assert result["verdict"] == "n/a" and result["note"].startswith("before any compile: process exited -9")


def test_an_exception_in_the_runlora_stage_is_not_retried(zoo, monkeypatch):
    calls = []
    monkeypatch.setattr(zoo, "run_child", lambda *a, **k: calls.append(k) or
                        {"stage": "done", "verdict": "crash", "note": "RuntimeError", "seconds": 1})
    assert zoo.run_entry("causal-lm/x", 10, "/tmp")["verdict"] == "crash" and len(calls) == 1


def test_merge_keeps_the_later_row_orders_by_mapping_and_lists_what_was_not_run(zoo, tmp_path):
    row = lambda entry, verdict: {"entry": entry, "verdict": verdict}  # noqa: E731
    first = sweep_file(tmp_path / "a.json", [row("masked-lm/bert", "full"), row("causal-lm/openai-gpt", "partial")],
                       date="2026-12-01", command="sweep a")
    second = sweep_file(tmp_path / "b.json", [row("causal-lm/openai-gpt", "full"), row("causal-lm/gpt2", "full")],
                        date="2026-12-02", command="sweep b")

    results, env, command, not_run = zoo.merge([first, second])

    assert [(r["entry"], r["verdict"]) for r in results] == [
        ("causal-lm/gpt2", "full"), ("causal-lm/openai-gpt", "full"), ("masked-lm/bert", "full")]
    assert env["date"] == "2026-12-02" and command == "sweep a ; sweep b"
    assert len(not_run) == len(zoo.list_entries()) - 3 and "causal-lm/llama" in not_run
    page = zoo.markdown(results, env, command, not_run)
    assert "full 3 (of 3)" in page and f"{len(not_run)} of the {len(not_run) + 3} entries" in page


def test_page_cuts_long_entry_lists_to_their_count(zoo):
    long = "python benchmarks/zoo.py --only " + ",".join(f"causal-lm/m{k}" for k in range(9)) + " --jobs 2"
    assert zoo._short_command(long) == "python benchmarks/zoo.py --only <9 entries, listed in zoo.json> --jobs 2"
    assert zoo._short_command("python benchmarks/zoo.py --only llama,bert") == "python benchmarks/zoo.py --only llama,bert"


def test_merge_refuses_sweeps_of_different_stacks(zoo, tmp_path):
    old = sweep_file(tmp_path / "a.json", [], date="2026-11-01", transformers="5.17.0")
    new = sweep_file(tmp_path / "b.json", [], date="2026-12-01")
    with pytest.raises(SystemExit, match="different stacks"):
        zoo.merge([old, new])


# ---------------------------------------------------------------------------------------------- the sweep

def run_zoo(tmp_path, *args, timeout):
    out = tmp_path / "zoo.json"
    subprocess.run([sys.executable, str(ZOO), "--json", str(out), "--md", str(tmp_path / "zoo.md"), *args],
                   check=True, timeout=timeout, capture_output=True)
    return json.loads(out.read_text())["results"]


def assert_exact_and_built(results):
    for r in results:
        assert r["verdict"] in ("full", "partial", "none"), (r["entry"], r["verdict"], r.get("note"))
        assert r["max_rel_err"] <= 1e-4


def test_zoo_runs_two_architectures_of_the_sample(tmp_path):
    results = run_zoo(tmp_path, "--sample", "--only", "llama,bert", timeout=240)

    assert [r["entry"] for r in results] == ["causal-lm/llama", "masked-lm/bert"]
    assert_exact_and_built(results)
    assert [(r["verdict"], r["n_rewritten"], r["n_reached"]) for r in results] == [("full", 14, 14), ("full", 13, 13)]
    assert "rewritten on 2 of 2 architectures" in (tmp_path / "zoo.md").read_text()


@pytest.mark.slow
def test_zoo_ci_sample(tmp_path):
    results = run_zoo(tmp_path, "--sample", "--jobs", "2", timeout=900)

    assert len(results) == 11
    assert_exact_and_built(results)
    for r in results:
        assert r["verdict"] == "full", (r["entry"], r["note"])
        if r["entry"] == "causal-lm/mixtral":  # peft puts the router and experts in ParamWrappers (W + BA)
            assert set(r["missed_kinds"]) == {"ParamWrapper"} and "not linear" in r["note"], r["note"]
