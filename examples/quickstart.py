"""Quickstart: train a small peft Llama three ways; compare step time, saved activations and loss.

    .venv/bin/python examples/quickstart.py
    .venv/bin/python examples/quickstart.py --threads 1 --plot quickstart.png

A LlamaForCausalLM from a LlamaConfig with random weights (no downloads; hidden 256, 2 layers,
vocab 1024: the shape of ``benchmarks/bench_model.py --quick``) gets peft LoRA (r=16, alpha 32,
dropout 0) on q, k, v, o, gate, up and down. Each mode trains its own deep copy of that model:
peft eager; peft + inductor, ``torch.compile(model)``; and runlora,
``torch.compile(model, backend=runlora_fx.make_backend())``. The modes step round-robin (step k
of every mode, then step k+1) on one batch with AdamW, so load from other processes falls on all
alike and the losses agree step by step. Step time: the median of the timed steps, after the
warm-up steps (the first compiles). Saved activations: the bytes autograd keeps for backward in
one step, one count per storage, parameters excluded. Most of the run is inductor compiling (one to
two minutes cold on 2 CPU cores, half a minute once its cache is warm). ``--threads 1`` is what
``bench_model.py`` uses on a shared 2-core machine, where inductor's OpenMP kernels stall
whenever the other core is busy.
"""

import argparse
import copy
import statistics
import time
import warnings

import torch

import runlora_fx

try:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
except ImportError as exc:
    raise SystemExit(f"quickstart: needs peft and transformers ({exc}); pip install peft transformers") from None

# peft 0.21 reads transformers 5's deprecated `is_gradient_checkpointing`: nothing for a user to act on.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

BATCH, SEQ, RANK, WARMUP, TIMED = 2, 128, 16, 2, 10
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_model():
    """The tiny peft Llama, seed 0, in train mode."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=2048, use_cache=False)
    lora = LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, target_modules=TARGETS)
    return get_peft_model(LlamaForCausalLM(config), lora).train()


def make_step(model, batch):
    """(one training step returning its loss, the trainable parameters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)

    def step():
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()
    return step, params


def saved_bytes(step, params):
    """(bytes of the storages autograd saves for backward during ``step()``, its loss)."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    return sum(seen.values()), loss


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    parser.add_argument("--plot", metavar="PNG", help="also draw step times and the loss curves here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = build_model()
    ids = torch.randint(0, 1024, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids}
    backend = runlora_fx.make_backend()
    modes = {"peft eager": copy.deepcopy(model),
             "peft + inductor": torch.compile(copy.deepcopy(model)),
             "runlora": torch.compile(copy.deepcopy(model), backend=backend)}
    steps = {name: make_step(m, batch) for name, m in modes.items()}
    times, losses, saved = {name: [] for name in modes}, {name: [] for name in modes}, {}
    start = time.perf_counter()
    for k in range(WARMUP + TIMED + 1):
        for name, (step, params) in steps.items():
            if k == WARMUP + TIMED:  # one step more, counting what autograd saves
                saved[name], loss = saved_bytes(step, params)
            else:
                t0 = time.perf_counter()
                loss = step()
                if k >= WARMUP:
                    times[name].append(time.perf_counter() - t0)
            losses[name].append(loss)

    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    print(f"tiny peft Llama (hidden 256, 2 layers, B={BATCH}, S={SEQ}, r={RANK}, fp32), CPU, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}\n{WARMUP} warm-up + {TIMED} timed "
          f"steps per mode, round-robin, {time.perf_counter() - start:.0f} s with compilation\n")
    head = (f"{'mode':<17}{'step ms':>8}{'vs eager':>10}{'vs inductor':>13}{'saved MiB':>11}"
            f"{'loss 1st':>10}{'loss last':>11}")
    print(head + "\n" + "-" * len(head))
    for name in modes:
        print(f"{name:<17}{ms[name]:>8.1f}{ms['peft eager'] / ms[name]:>9.2f}x"
              f"{ms['peft + inductor'] / ms[name]:>12.2f}x{saved[name] / 2**20:>11.2f}"
              f"{losses[name][0]:>10.4f}{losses[name][-1]:>11.4f}")
    spread = max(abs(a - b) for a, b in zip(losses["runlora"], losses["peft eager"]))
    print(f"\n(vs = that mode's ms / this mode's ms; runlora's loss is within {spread:.1e} of peft eager's "
          f"at each of {len(losses['runlora'])} steps)")
    report = runlora_fx.RewriteReport(graph="quickstart")
    for graph_report in backend.reports:
        report.extend(graph_report)
    print(report.summary())
    print(runlora_fx.coverage(modes["runlora"]).summary())  # every LoRA layer of the model, and its fate

    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
        left.bar(list(ms), list(ms.values()), color=["tab:gray", "tab:blue", "tab:green"])
        left.set_ylabel("median step ms")
        for name in modes:
            right.plot(losses[name], label=name, linestyle="--" if name == "runlora" else "-")
        right.set(xlabel="step", ylabel="loss")
        right.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=100)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
