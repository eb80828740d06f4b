"""Train a small peft Llama for 20 steps on CPU with torch.compile(backend="runlora").

    python examples/compile_peft_llama.py

Builds a 2-layer Llama from a config (random weights, no downloads), adds peft LoRA on every
projection, and trains the same model twice from the same start: once compiled with plain
inductor, once with ``backend="runlora"`` (the pass, then inductor). Prints the loss of both,
steps per second after compilation, and the rewrite summary.
"""

import copy
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import runlora_fx

STEPS, BATCH, SEQ = 20, 4, 128


def build():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=1000, max_position_embeddings=SEQ)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj"])
    return get_peft_model(LlamaForCausalLM(config), lora)


def train(model, backend, batches):
    compiled = torch.compile(model, backend=backend)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses, start = [], None
    for step, ids in enumerate(batches):
        if step == 2:  # compile and warm-up done
            start = time.perf_counter()
        loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, (len(batches) - 2) / (time.perf_counter() - start)


def main():
    model = build()
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 1000, (BATCH, SEQ), generator=gen) for _ in range(STEPS)]
    reports = []
    backend = runlora_fx.make_backend(on_report=reports.append)
    ref_losses, ref_rate = train(copy.deepcopy(model), "inductor", batches)
    losses, rate = train(model, backend, batches)
    print(f"{'step':>4}  {'inductor loss':>13}  {'runlora loss':>12}")
    for step in range(0, STEPS, 4):
        print(f"{step:>4}  {ref_losses[step]:>13.4f}  {losses[step]:>12.4f}")
    print(f"{STEPS - 1:>4}  {ref_losses[-1]:>13.4f}  {losses[-1]:>12.4f}")
    print(f"\nsteps/s after compile: inductor {ref_rate:.2f}, runlora {rate:.2f} ({rate / ref_rate:.2f}x)")
    for report in reports:
        print(report.summary())


if __name__ == "__main__":
    main()
