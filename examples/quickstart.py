"""Quickstart: run runlora.lora_linear with every plan on a small LoRA layer and show the choice.

    python examples/quickstart.py

Builds one LoRA layer (CPU, fp32), prints each plan's FLOPs (from the sympy cost model),
its measured error against the eager reference, and the plan the selector chooses, then
compiles a two-layer LoRA model with ``backend="runlora"`` and prints the rewrite summary.
"""

import torch
import torch.nn as nn

import runlora_fx
from runlora_fx import BACKWARD_PLANS, FORWARD_PLANS, choose_plan


class LoRALinear(nn.Module):
    """A hand-written LoRA layer: frozen base plus s * B(A(x))."""

    def __init__(self, i, o, r, alpha=16):
        super().__init__()
        self.base = nn.Linear(i, o)
        self.base.requires_grad_(False)
        self.lora_A = nn.Linear(i, r, bias=False)
        self.lora_B = nn.Linear(r, o, bias=False)
        nn.init.normal_(self.lora_B.weight, std=0.02)
        self.scaling = alpha / r

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scaling


def main():
    torch.manual_seed(0)
    n, i, o, r = 2048, 512, 1376, 16
    layer = LoRALinear(i, o, r)
    x = torch.randn(4, n // 4, i, requires_grad=True)
    dy = torch.randn(4, n // 4, o)

    y_ref = layer(x)
    ref_grads = torch.autograd.grad(y_ref, (x, layer.lora_A.weight, layer.lora_B.weight), dy)
    choice = choose_plan(n, i, o, r)
    print(f"one LoRA layer: n={n} tokens, {i}->{o}, rank {r}; chosen: {choice.forward} / {choice.backward}\n")
    print(f"{'forward':<10}{'backward':<11}{'GFLOPs fwd+bwd':>15}{'max |err| y':>14}{'max |err| grads':>17}")
    for f_name, f_plan in FORWARD_PLANS.items():
        for b_name, b_plan in BACKWARD_PLANS.items():
            if b_plan.dominated:
                continue
            y = torch.ops.runlora.lora_linear(
                x, layer.base.weight, layer.base.bias, layer.lora_A.weight, layer.lora_B.weight,
                layer.scaling, None, None, f_name, b_name)
            grads = torch.autograd.grad(y, (x, layer.lora_A.weight, layer.lora_B.weight), dy)
            flops = f_plan.flops(n, i, o, r) + b_plan.flops(n, i, o, r)
            err_y = (y - y_ref).abs().max().item()
            err_g = max((g - h).abs().max().item() for g, h in zip(grads, ref_grads))
            mark = "  <- chosen" if (f_name, b_name) == (str(choice.forward), str(choice.backward)) else ""
            print(f"{f_name:<10}{b_name:<11}{float(flops) / 1e9:>15.3f}{err_y:>14.2e}{err_g:>17.2e}{mark}")

    model = nn.Sequential(LoRALinear(i, o, r), nn.GELU(), LoRALinear(o, i, r))
    backend = runlora_fx.make_backend(inner="aot_eager")
    compiled = torch.compile(model, backend=backend)
    loss = compiled(x).pow(2).mean()
    loss.backward()
    ref_loss = model(x).pow(2).mean()
    print(f"\ncompiled two-layer model: loss {loss.item():.6f} (eager {ref_loss.item():.6f})")
    print(backend.reports[0].summary())


if __name__ == "__main__":
    main()
