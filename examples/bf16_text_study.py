"""bf16/fp16 text study: do merged plans (W + sBA in low precision) drift from fp32 more than
the low-precision paths that never merge?

    python examples/bf16_text_study.py     # CPU, 11-20 min; writes docs/bf16_text_study.{png,json}
    python examples/bf16_text_study.py --lrs 1e-4 3e-4 1e-3 --dtypes bf16 fp16 --out precision_rule
                                           # the precision rule's grid; writes docs/precision_rule.{png,json}

A byte-level Llama (vocab 256, hidden 128, 2 layers, random init, frozen) gets peft LoRA (r=8,
alpha=16, all 7 projections) and learns the Python standard library's own source: the sorted
top-level ``*.py`` files of ``os.path.dirname(os.__file__)``, concatenated; the last 5% is
held out. AdamW, batch 8 x 128 bytes, 300 steps, 3 seeds (the seed sets the weights and the
batches, shared by every mode). Modes, per low-precision dtype D (bf16, fp16):

    fp32          eager, everything fp32 (the reference, one per lr and seed)
    D eager       the same weights cast to D, base and adapters (and AdamW state) D
    D merged      D, torch.compile(backend=runlora, inner aot_eager), allow_merged=True,
                  forward2/backward5 forced on every site (the report is checked)
    D default     D, the runlora backend with its default settings (inner aot_eager)

fp16 runs scale the loss by 1024 and AdamW's eps by the same factor, never unscaling: Adam's
update is invariant to the gradient's scale, so this is fp32's optimizer exactly, without the
gradient underflow (and eps = 1e-8 rounding to 0: 0/0 on dA at step 1, where B = 0) of plain fp16.

Per run: the train loss curve, the held-out loss, mean |loss - fp32 loss| over the last 50
steps ("distance"), and, every 25 steps (--probe-every) on all 14 sites of an eager copy of the weights, the
share of the LoRA term each path rounds away: eager in y = round(round(xW) + round(lora))
(||(y - round(xW)) - lora|| / ||lora||), merged in W + sBA (||(round(W + sBA) - W) - sBA|| / ||sBA||).

The rule (fixed before the grid ran, written into the JSON): merged plans become the bf16/fp16
default iff on every run (lr x seed x dtype) their distance is at most the largest distance of
that run's paths that never merge (D eager, D default).
"""

import argparse
import copy
import json
import os
import pathlib
import time

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import Linear as LoraLinear
from transformers import LlamaConfig, LlamaForCausalLM

import runlora_fx

BATCH, SEQ, LAST = 8, 128, 50
DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
LOSS_SCALE = {"bf16": 1.0, "fp16": 1024.0}  # fp16: static scale, eps scaled alike (see the docstring)
RULE = ("merged plans become the bf16/fp16 default iff on every run (lr x seed x dtype) the merged path's "
        "distance from fp32 (mean |loss - fp32 loss| over the last 50 steps) is at most the largest distance "
        "of that run's paths that never merge (eager and the unmerged runlora default); otherwise the policy "
        "stays and the worst ratio merged / max(eager, default) is reported with its run")


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


@torch.no_grad()
def rounding_lost(probe, ids):
    """Per site, the share of the LoRA term eager rounds away in y and merged rounds away in W + sBA."""
    inputs, hooks = {}, []
    for name, mod in probe.named_modules():
        if isinstance(mod, LoraLinear):
            hooks.append(mod.register_forward_pre_hook(lambda m, args, name=name: inputs.__setitem__(name, args[0])))
    probe(input_ids=ids)
    for h in hooks:
        h.remove()
    eager, merged = [], []
    for name, x in inputs.items():
        mod = probe.get_submodule(name)
        W, A, B = mod.base_layer.weight, mod.lora_A["default"].weight, mod.lora_B["default"].weight
        s, x = mod.scaling["default"], x.reshape(-1, x.shape[-1])
        xw = x @ W.T
        y = xw + (x @ A.T) @ B.T * s                                   # eager: round(round(xW) + round(lora))
        exact = (x.double() @ A.double().T) @ B.double().T * s
        eager.append(((y.double() - xw.double() - exact).norm() / exact.norm()).item())
        sba = s * B.double() @ A.double()
        merged_w = (W.double() + sba).to(W.dtype).double()             # merged: round(W + sBA)
        merged.append(((merged_w - W.double() - sba).norm() / sba.norm()).item())
    return eager, merged


def run(base, mode, train, held, lr, probe_every=25):
    dname = mode.split()[0]
    dtype = torch.float32 if dname == "fp32" else DTYPES[dname]
    scale = LOSS_SCALE.get(dname, 1.0)
    model = copy.deepcopy(base).to(dtype)
    probe = copy.deepcopy(model) if dname != "fp32" else None  # never compiled: hooks cannot cause recompiles
    backend = None
    if mode.endswith("merged"):
        backend = runlora_fx.make_backend(inner="aot_eager", allow_merged=True, forward_plan="forward2",
                                          backward_plan="backward5")
    elif mode.endswith("default"):
        backend = runlora_fx.make_backend(inner="aot_eager")
    torch._dynamo.reset()  # else the recompile limit (8 per frame) silently falls back to eager
    step_fn = torch.compile(model, backend=backend) if backend else model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, eps=1e-8 * scale)
    losses, lost, start = [], {"step": [], "eager": [], "merged": []}, time.perf_counter()
    for step, ids in enumerate(train, 1):
        loss = step_fn(input_ids=ids, labels=ids).loss
        (loss * scale if scale != 1.0 else loss).backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if probe is not None and (step == 1 or step % probe_every == 0):
            probe.load_state_dict(model.state_dict())
            eager, merged = rounding_lost(probe, ids)
            lost["step"].append(step)
            lost["eager"].append(eager)
            lost["merged"].append(merged)
    with torch.no_grad():
        held_loss = sum(step_fn(input_ids=ids, labels=ids).loss.item() for ids in held) / len(held)
    plans = {}
    for report in (backend.reports if backend else []):
        for key, count in report.plan_counts().items():
            plans[key] = plans.get(key, 0) + count
    return {"train_loss": losses, "heldout_loss": held_loss, "plans": plans, "rounding_lost": lost,
            "seconds": time.perf_counter() - start}


def judge(per, dtypes):
    """Distances, ratios and the rule's verdict per dtype for one (lr, seed)."""
    ref = torch.tensor(per["fp32"]["train_loss"], dtype=torch.float64)
    for r in per.values():
        r["distance"] = (torch.tensor(r["train_loss"], dtype=torch.float64) - ref)[-LAST:].abs().mean().item()
    verdict = {}
    for d in dtypes:
        eager, default, merged = (per[f"{d} {m}"]["distance"] for m in ("eager", "default", "merged"))
        for m in ("eager", "default", "merged"):
            per[f"{d} {m}"]["ratio_to_eager"] = per[f"{d} {m}"]["distance"] / eager if eager else None
        bar = max(eager, default)
        verdict[d] = {"merged": merged, "bar": bar, "ratio": merged / bar if bar else float("inf"),
                      "pass": merged <= bar}
    return verdict


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3])
    parser.add_argument("--dtypes", nargs="+", default=["bf16"], choices=sorted(DTYPES))
    parser.add_argument("--out", default="bf16_text_study", help="docs/<out>.json and docs/<out>.png")
    parser.add_argument("--probe-every", type=int, default=25, help="steps between rounding probes")
    parser.add_argument("--threads", type=int, default=1)  # tiny GEMMs; never oversubscribed
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    modes = ["fp32"] + [f"{d} {m}" for d in args.dtypes for m in ("eager", "merged", "default")]
    train_data, held_data = corpus()
    held = batches(held_data, 8, 12345)
    flags = " ".join(f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                     for k, v in vars(args).items())
    meta = {"command": f"python examples/bf16_text_study.py {flags}",
            "rule": RULE, "steps": args.steps, "batch": BATCH, "seq": SEQ, "lrs": args.lrs, "seeds": args.seeds,
            "dtypes": args.dtypes, "last": LAST, "probe_every": args.probe_every, "loss_scale": LOSS_SCALE,
            "torch": torch.__version__, "threads": args.threads}
    results, verdicts, out = {}, {}, DOCS / f"{args.out}.json"
    DOCS.mkdir(exist_ok=True)
    # seeds outer: a grid cut short still has every lr and dtype
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for lr in args.lrs:
            key = f"{lr:g}/{seed}"
            base, train = build(seed), batches(train_data, args.steps, 1000 + seed)
            per = results[key] = {mode: run(base, mode, train, held, lr, args.probe_every) for mode in modes}
            for d in args.dtypes:
                assert set(per[f"{d} merged"]["plans"]) == {"forward2/backward5"}, per[f"{d} merged"]["plans"]
                assert per[f"{d} default"]["plans"], "the default backend rewrote nothing"
            verdicts[key] = judge(per, args.dtypes)
            print(f"lr {lr:g} seed {seed} ({time.strftime('%H:%M:%S')}): " + ", ".join(
                f"{d} merged/max(eager, default) {v['ratio']:.2f}" for d, v in verdicts[key].items()) + "; " +
                ", ".join(f"{m} {r['seconds']:.0f} s" for m, r in per.items()), flush=True)
            summary = summarize(verdicts)
            out.write_text(json.dumps({"meta": meta, "verdict": summary, "per_run": verdicts, "runs": results},
                                      indent=1))
    report(results, verdicts, args, summarize(verdicts))
    (plot_rule if (len(args.lrs) > 1 or args.dtypes != ["bf16"]) else plot)(results, DOCS / f"{args.out}.png")


def summarize(verdicts):
    flat = [(key, d, v) for key, per in verdicts.items() for d, v in per.items()]
    key, d, worst = max(flat, key=lambda t: t[2]["ratio"])
    return {"merged_default": all(v["pass"] for _, _, v in flat), "runs": len(flat),
            "passed": sum(v["pass"] for _, _, v in flat), "worst_ratio": worst["ratio"],
            "worst_run": f"{d} lr/seed {key}"}


def report(results, verdicts, args, summary):
    print(f"\n{args.steps} steps, batch {BATCH}x{SEQ} bytes; distance = mean |loss - fp32 loss|, last {LAST} steps; "
          f"lost = share of the LoRA term rounded away (mean over sites and probes after step 1)\n")
    print(f"{'lr/seed':>9}  {'mode':<13}{'last 50':>9}{'held-out':>10}{'distance':>10}{'/ eager':>8}"
          f"{'lost eager':>11}{'lost merged':>12}  plans")
    for key, per in results.items():
        for mode, r in per.items():
            last = sum(r["train_loss"][-LAST:]) / len(r["train_loss"][-LAST:])
            ratio = "" if mode == "fp32" else f"{r['ratio_to_eager']:.2f}"
            lost = r["rounding_lost"]
            mean = lambda rows: sum(sum(x) / len(x) for x in rows[1:]) / max(len(rows) - 1, 1)  # noqa: E731
            le, lm = (f"{mean(lost[k]):.3f}" if lost["step"] else "" for k in ("eager", "merged"))
            plans = ", ".join(f"{k}: {v}" for k, v in sorted(r["plans"].items())) or "-"
            print(f"{key:>9}  {mode:<13}{last:>9.4f}{r['heldout_loss']:>10.4f}{r['distance']:>10.2e}{ratio:>8}"
                  f"{le:>11}{lm:>12}  {plans}")
    print("\nrule: " + RULE)
    for key, per in verdicts.items():
        for d, v in per.items():
            print(f"  {key:>9} {d}: merged {v['merged']:.2e} vs max(eager, default) {v['bar']:.2e} = "
                  f"{v['ratio']:.2f}x {'pass' if v['pass'] else 'FAIL'}")
    print(f"verdict: merged default {summary['merged_default']} ({summary['passed']}/{summary['runs']} runs pass; "
          f"worst {summary['worst_ratio']:.2f}x on {summary['worst_run']})")

def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def smooth(values, k=10):
        t = torch.tensor(values, dtype=torch.float64)
        return torch.nn.functional.avg_pool1d(t[None, None], k, 1, padding=k // 2, count_include_pad=False)[0, 0, :len(t)]

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    styles = dict(zip(next(iter(results.values())), [("-", "k"), ("--", "C0"), (":", "C3"), ("-.", "C2")]))
    for seed, per in results.items():
        ref = per["fp32"]["train_loss"]
        for mode, r in per.items():
            style, color = styles[mode]
            label = mode if seed == next(iter(results)) else None
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
    fig.savefig(path, dpi=90)
    print(f"wrote {path} and {path.with_suffix('.json')}")


def plot_rule(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(results)
    dtypes = sorted({m.split()[0] for per in results.values() for m in per} - {"fp32"})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, d in zip(axes[:2], dtypes):
        for j, (m, mk, c) in enumerate((("eager", "o", "C0"), ("default", "s", "C2"), ("merged", "x", "C3"))):
            ax.plot([k + (j - 1) * 0.15 for k in range(len(keys))], [results[k][f"{d} {m}"]["distance"] for k in keys],
                    mk, color=c, label=f"{d} {m}")
        ax.set_xticks(range(len(keys)), keys, rotation=60, fontsize=7)
        ax.set(yscale="log", xlabel="lr/seed", ylabel="mean |loss - fp32 loss|, last 50 steps",
               title=f"{d}: distance to fp32")
    ax = axes[2]
    for d, style in zip(dtypes, ("-", "--")):
        for m, c in (("eager", "C0"), ("merged", "C3")):
            for k in keys:
                lost = results[k][f"{d} eager"]["rounding_lost"]
                ax.plot(lost["step"], [sum(x) / len(x) for x in lost[m]], style, color=c, lw=0.7, alpha=0.6,
                        label=f"{d} {m}" if k == keys[0] else None)
    ax.set(yscale="log", xlabel="step", ylabel="share of the LoRA term rounded away",
           title="eager: in y; merged: in W + sBA")
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle("precision rule: byte-level Llama (hidden 128, 2 layers, frozen random base), LoRA r=8, Python stdlib "
                 "source; lost share probed on each eager run's weights", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    print(f"wrote {path} and {path.with_suffix('.json')}")


if __name__ == "__main__":
    main()
