"""bf16 text study: do merged plans (W + sBA formed in bf16) drift from fp32 more than bf16 eager?

    python examples/bf16_text_study.py     # CPU, 11-20 min; writes docs/bf16_text_study.{png,json}

A byte-level Llama (vocab 256, hidden 128, 2 layers, random init, frozen) gets peft LoRA (r=8,
alpha=16, all 7 projections) and learns the Python standard library's own source: the sorted
top-level ``*.py`` files of ``os.path.dirname(os.__file__)``, concatenated; the last 5% is
held out. AdamW lr 1e-3, batch 8 x 128 bytes, 300 steps, 3 seeds (the seed sets the weights and
the batches, shared by every mode). Modes:

    fp32          eager, everything fp32 (the reference)
    bf16 eager    the same weights cast to bf16, base and adapters (and AdamW state) bf16
    bf16 merged   bf16, torch.compile(backend=runlora, inner aot_eager), allow_merged=True,
                  forward2/backward5 forced on every site (the report is checked)
    bf16 default  bf16, the runlora backend with its default settings (inner aot_eager)

Per mode and seed: the train loss curve, the held-out loss, mean |loss - fp32 loss| over the
last 50 steps ("distance"), and distance / bf16 eager's distance.
"""

import argparse
import copy
import json
import os
import pathlib
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import runlora_fx

BATCH, SEQ, LR, LAST = 8, 128, 1e-3, 50
DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
MODES = ("fp32", "bf16 eager", "bf16 merged", "bf16 default")


def corpus():
    files = sorted(pathlib.Path(os.path.dirname(os.__file__)).glob("*.py"))
    data = torch.frombuffer(bytearray(b"".join(f.read_bytes() for f in files)), dtype=torch.uint8).long()
    cut = int(0.95 * len(data))
    return data[:cut], data[cut:]


def batches(data, count, seed):
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - SEQ, (count, BATCH), generator=g)
    return [torch.stack([data[s:s + SEQ] for s in row.tolist()]) for row in starts]


def build(seed):
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=SEQ)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    return get_peft_model(LlamaForCausalLM(config), lora)


def run(base, mode, train, held):
    model = copy.deepcopy(base).to(torch.float32 if mode == "fp32" else torch.bfloat16)
    backend = None
    if mode == "bf16 merged":
        backend = runlora_fx.make_backend(inner="aot_eager", allow_merged=True, forward_plan="forward2",
                                          backward_plan="backward5")
    elif mode == "bf16 default":
        backend = runlora_fx.make_backend(inner="aot_eager")
    torch._dynamo.reset()  # else the recompile limit (8 per frame) silently falls back to eager
    step_fn = torch.compile(model, backend=backend) if backend else model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    losses, start = [], time.perf_counter()
    for ids in train:
        loss = step_fn(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    with torch.no_grad():
        held_loss = sum(step_fn(input_ids=ids, labels=ids).loss.item() for ids in held) / len(held)
    plans = {}
    for report in (backend.reports if backend else []):
        for key, count in report.plan_counts().items():
            plans[key] = plans.get(key, 0) + count
    return {"train_loss": losses, "heldout_loss": held_loss, "plans": plans, "seconds": time.perf_counter() - start}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)  # tiny GEMMs; never oversubscribed
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train_data, held_data = corpus()
    held = batches(held_data, 8, 12345)
    results = {}
    for seed in range(args.seeds):
        base, train = build(seed), batches(train_data, args.steps, 1000 + seed)
        results[seed] = {mode: run(base, mode, train, held) for mode in MODES}
        merged = results[seed]["bf16 merged"]["plans"]
        assert set(merged) == {"forward2/backward5"}, f"merged plans did not run: {merged}"
        assert results[seed]["bf16 default"]["plans"], "the default backend rewrote nothing"
        ref = torch.tensor(results[seed]["fp32"]["train_loss"], dtype=torch.float64)
        for mode, r in results[seed].items():
            r["distance"] = (torch.tensor(r["train_loss"], dtype=torch.float64) - ref)[-LAST:].abs().mean().item()
        eager = results[seed]["bf16 eager"]["distance"]
        for r in results[seed].values():
            r["ratio_to_eager"] = r["distance"] / eager if eager else None
        print(f"seed {seed} done: " + ", ".join(f"{m} {r['seconds']:.0f} s" for m, r in results[seed].items()))
    print(f"\n{args.steps} steps, batch {BATCH}x{SEQ} bytes, lr {LR}; distance = mean |loss - fp32 loss|, "
          f"last {LAST} steps\n")
    print(f"{'seed':>4}  {'mode':<13}{'last 50':>11}{'held-out':>10}{'distance':>10}{'/ eager':>9}  plans")
    for seed, per in results.items():
        for mode, r in per.items():
            last = sum(r["train_loss"][-LAST:]) / len(r["train_loss"][-LAST:])
            ratio = "" if mode == "fp32" else f"{r['ratio_to_eager']:.2f}"
            plans = ", ".join(f"{k}: {v}" for k, v in sorted(r["plans"].items())) or "-"
            print(f"{seed:>4}  {mode:<13}{last:>11.4f}{r['heldout_loss']:>10.4f}{r['distance']:>10.2e}{ratio:>9}  {plans}")
    within = all(per["bf16 merged"]["distance"] <= per["bf16 eager"]["distance"] for per in results.values())
    print(f"\nmerged plans within bf16 eager's distance from fp32 on every seed: {within}")
    DOCS.mkdir(exist_ok=True)
    meta = {"command": "python examples/bf16_text_study.py", "steps": args.steps, "batch": BATCH, "seq": SEQ,
            "lr": LR, "last": LAST, "torch": torch.__version__, "merged_within_eager_all_seeds": within}
    (DOCS / "bf16_text_study.json").write_text(json.dumps({"meta": meta, "runs": results}, indent=1))
    plot(results)


def plot(results):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def smooth(values, k=10):
        t = torch.tensor(values, dtype=torch.float64)
        return torch.nn.functional.avg_pool1d(t[None, None], k, 1, padding=k // 2, count_include_pad=False)[0, 0, :len(t)]

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    styles = dict(zip(MODES, [("-", "k"), ("--", "C0"), (":", "C3"), ("-.", "C2")]))
    for seed, per in results.items():
        ref = per["fp32"]["train_loss"]
        for mode, r in per.items():
            style, color = styles[mode]
            label = mode if seed == 0 else None
            ax1.plot(smooth(r["train_loss"]).numpy(), style, color=color, lw=1.1, label=label)
            if mode != "fp32":
                gap = [abs(a - b) for a, b in zip(r["train_loss"], ref)]
                ax2.plot(smooth(gap).numpy(), style, color=color, lw=1.1, label=label)
    ax1.set(xlabel="step", ylabel="train loss (nats/byte, 10-step mean)", title="training loss, 3 seeds")
    ax2.set(yscale="log", xlabel="step", ylabel="|loss - fp32 loss| (10-step mean)", title="distance to fp32")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle("byte-level Llama (hidden 128, 2 layers, frozen random base), LoRA r=8 on all projections, "
                 "Python stdlib source", fontsize=9)
    fig.tight_layout()
    fig.savefig(DOCS / "bf16_text_study.png", dpi=90)
    print(f"wrote {DOCS / 'bf16_text_study.png'} and {DOCS / 'bf16_text_study.json'}")


if __name__ == "__main__":
    main()
