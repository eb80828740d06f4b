"""Numerics study: do merged plans (W + sBA in bf16) drift from fp32 more than eager bf16 does?

    python examples/numerics_study.py            # CPU, about 15 s; writes docs/numerics.png

A frozen random 2-layer MLP (width 256, GELU) gets LoRA (r=8, alpha=16, peft init: B=0) on
both linears and learns to match the same MLP whose weights carry a fixed random rank-4
perturbation. AdamW (lr 1e-3), 200 steps, 512 fresh tokens a step, the same init and data for
every run; adapters keep fp32 master weights, so the runs differ only in how the layer computes:

    fp32          eager, everything fp32 (the reference)
    bf16 eager    peft-style  F.linear(x, W) + s * F.linear(F.linear(x, A), B), all in bf16
    bf16 merged   runlora.lora_linear, forward2/backward5 forced (W + sBA formed in bf16)
    bf16 default  runlora.lora_linear with the plans the default bf16 policy picks

Prints final losses and each bf16 run's mean |loss - fp32 loss| over the last 50 steps, and how
much of sBA the merged weight loses to rounding; plots the three.
"""

import pathlib
import time

import torch
import torch.nn.functional as F

import runlora_fx

D, R, ALPHA, TOKENS, STEPS, LR = 256, 8, 16.0, 512, 200, 1e-3
S = ALPHA / R
OUT = pathlib.Path(__file__).resolve().parent.parent / "docs" / "numerics.png"

torch.set_num_threads(1)  # tiny GEMMs: one thread is as fast, never oversubscribed, reproducible
torch.manual_seed(0)
W = [torch.randn(D, D) / D**0.5 for _ in range(2)]
b = [torch.randn(D) * 0.1 for _ in range(2)]
# The target: the same MLP with a fixed rank-4 change of each weight (LoRA can represent it).
W_target = [w + 0.3 * torch.randn(D, 4) @ torch.randn(4, D) / D**0.5 for w in W]
A0 = [torch.empty(R, D).uniform_(-1 / D**0.5, 1 / D**0.5) for _ in range(2)]  # peft: kaiming-uniform A, B = 0


def batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(TOKENS, D, generator=g)
    with torch.no_grad():
        y = F.linear(F.gelu(F.linear(x, W_target[0], b[0])), W_target[1], b[1])
    return x, y


def eager_layer(x, w, bias, a, bb):
    return F.linear(x, w, bias) + S * F.linear(F.linear(x, a), bb)


def op_layer(plans):
    def layer(x, w, bias, a, bb):
        return torch.ops.runlora.lora_linear(x, w, bias, a, bb, S, None, None, *plans)
    return layer


def train(layer, dtype):
    A = [a.clone().requires_grad_() for a in A0]
    B = [torch.zeros(D, R, requires_grad=True) for _ in range(2)]
    opt = torch.optim.AdamW(A + B, lr=LR)
    Wd, bd = [w.to(dtype) for w in W], [v.to(dtype) for v in b]
    losses, lost = [], []
    for step in range(STEPS):
        x, y = batch(step)
        a, bb = [t.to(dtype) for t in A], [t.to(dtype) for t in B]
        h = F.gelu(layer(x.to(dtype), Wd[0], bd[0], a[0], bb[0]))
        out = layer(h, Wd[1], bd[1], a[1], bb[1])
        loss = F.mse_loss(out.float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        with torch.no_grad():  # share of sBA's nonzero entries lost when W + sBA is rounded to W's dtype
            delta = S * bb[0].float() @ a[0].float()
            merged = torch.addmm(Wd[0], bb[0], a[0], alpha=S)
            lost.append(((merged == Wd[0]) & (delta != 0)).sum().item() / max((delta != 0).sum().item(), 1))
    return torch.tensor(losses, dtype=torch.float64), torch.tensor(lost)


def plans_for(allow_merged):
    # Priced with every gradient needed (layer 2); layer 1 runs the same pair.
    choice = runlora_fx.choose_plan(TOKENS, D, D, R, allow_merged=allow_merged)
    return str(choice.forward), str(choice.backward)


def main():
    flops_pick, policy_pick = plans_for(True), plans_for(False)  # the bf16 default: no merged plans
    print(f"FLOPs alone pick {'/'.join(flops_pick)}; the default bf16 policy picks {'/'.join(policy_pick)}")
    runs = {"fp32": (eager_layer, torch.float32), "bf16 eager": (eager_layer, torch.bfloat16),
            f"bf16 merged ({'/'.join(flops_pick)})": (op_layer(flops_pick), torch.bfloat16),
            f"bf16 default ({'/'.join(policy_pick)})": (op_layer(policy_pick), torch.bfloat16)}
    curves, lost, start = {}, {}, time.perf_counter()
    for name, (layer, dtype) in runs.items():
        curves[name], lost[name] = train(layer, dtype)
    ref = curves["fp32"]
    print(f"\n{STEPS} steps, 4 runs in {time.perf_counter() - start:.0f} s\n")
    print(f"{'run':<34}{'loss step 0':>12}{'final loss':>12}{'mean |loss - fp32|, last 50':>30}")
    for name, c in curves.items():
        dist = (c[-50:] - ref[-50:]).abs().mean().item()
        print(f"{name:<34}{c[0].item():>12.4g}{c[-1].item():>12.4g}{dist:>30.3g}")
    share = lost[list(runs)[2]]
    print("\nshare of sBA entries rounded away when W + sBA is formed in bf16 (layer 1), by step: "
          + ", ".join(f"{k}: {share[k]:.0%}" for k in (1, 10, 50, 100, STEPS - 1)))
    plot(curves, share)


def smooth(t, k=10):
    return F.avg_pool1d(t[None, None], k, 1, padding=k // 2, count_include_pad=False)[0, 0, :len(t)]


def plot(curves, share):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(13, 3.6))
    styles = list(zip(["-", "--", ":", "-."], ["k", "C0", "C3", "C2"]))
    ref = curves["fp32"]
    for (name, c), (style, color) in zip(curves.items(), styles):
        ax1.plot(c.numpy(), style, color=color, label=name, lw=1.4)
        if name != "fp32":
            ax2.plot(smooth((c - ref).abs() / ref).numpy(), style, color=color, label=name, lw=1.4)
    ax3.plot((100 * share).numpy(), color="C3", lw=1.4)
    ax1.set(yscale="log", xlabel="step", ylabel="MSE loss", title="training loss")
    ax2.set(yscale="log", xlabel="step", ylabel="|loss - fp32 loss| / fp32 loss",
            title="distance to fp32 (10-step mean)")
    ax3.set(xlabel="step", ylabel="% of sBA entries", ylim=(0, 100), title="sBA rounded away in bf16 W + sBA")
    for ax in (ax1, ax2, ax3):
        ax.grid(alpha=0.3, which="both")
    ax1.legend(fontsize=7), ax2.legend(fontsize=7)
    fig.suptitle(f"LoRA r={R} on a frozen 2-layer MLP (width {D}), bf16 compute, AdamW lr {LR}", fontsize=9)
    fig.tight_layout()
    OUT.parent.mkdir(exist_ok=True)
    fig.savefig(OUT, dpi=90)
    print(f"\nwrote {OUT} ({OUT.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
