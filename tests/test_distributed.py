"""Two CPU processes (gloo on 127.0.0.1): DDP with buckets small enough that DDPOptimizer
splits the graph inside LoRA sites, and FSDP2 (fully_shard per decoder layer + root). Every
rank reports its rewritten sites; gradients equal a single-process reference.

Each 2-process test starts this file twice as a script (``python test_distributed.py MODE RANK
PORT OUT``). The one-process tests drive DDPOptimizer directly, as Dynamo does for a DDP module.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest
import torch

WORLD = 2
HERE = pathlib.Path(__file__).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(mode: str, tmp_path) -> list:
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = [subprocess.Popen([sys.executable, __file__, mode, str(rank), str(port), str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(WORLD)]
    outs = []
    for proc in procs:
        try:
            outs.append(proc.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
    for proc, out in zip(procs, outs):
        assert proc.returncode == 0, out[-4000:]
    return [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(WORLD)]


def test_ddp_small_buckets_keep_every_site(tmp_path):
    results = _launch("ddp", tmp_path)
    for rank, res in enumerate(results):
        assert res["buckets"] >= 2, res  # DDPOptimizer did split the graph
        # a backend hidden behind a plain callable gets the pieces only: sites are cut, and it warns
        assert res["hidden_sites"] < 14 and res["cut_warning"], res
        assert res["sites"] == 14, res
        assert res["max_rel_err"] < 1e-4, res
        assert res["loss_err"] < 1e-5, res


def test_fsdp2_every_site_rewritten_and_grads_match(tmp_path):
    results = _launch("fsdp2", tmp_path)
    for res in results:
        assert res["sites"] == 14, res
        assert res["max_rel_err"] < 1e-4, res
        assert res["loss_err"] < 1e-5, res


def _through_ddp_optimizer(backend, bucket_mb=1):
    """What Dynamo does for a DDP module, in one process: DDPOptimizer splits each graph at
    bucket edges and calls ``backend`` (through the runlora hook, if any) on the pieces."""
    from torch._dynamo.backends.distributed import DDPOptimizer

    def compile_fn(gm, example_inputs):
        return DDPOptimizer(int(bucket_mb * 2**20), backend).compile_fn(gm, example_inputs)

    return compile_fn


def _lora_stack():
    from test_pass import TorchtuneLoRALinear

    torch.manual_seed(0)  # 10 sites of 256 -> 256, r=64: 1.3 MB of adapters, two 1 MB buckets
    return torch.nn.Sequential(*[TorchtuneLoRALinear(256, 256, 64) for _ in range(10)])


@pytest.mark.parametrize("hidden", [False, True], ids=["backend", "hidden-backend"])
def test_ddp_optimizer_split_keeps_sites_whole_in_one_process(hidden):
    import warnings

    import runlora_fx

    model = _lora_stack()
    backend = runlora_fx.make_backend(inner="eager")
    compiled = torch.compile(model, backend=_through_ddp_optimizer(
        (lambda gm, ex: backend(gm, ex)) if hidden else backend))
    x = torch.randn(4, 256, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = compiled(x)
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    cut = [w for w in caught if "DDPOptimizer split" in str(w.message)]
    if hidden:  # the pieces only: one site cut between its A and B, named in the warning
        assert len(backend.reports) >= 2 and sum(r.rewritten for r in backend.reports) < 10 and cut
    else:
        assert len(backend.reports) == 1 and backend.reports[0].rewritten == 10 and not cut


def test_ddp_optimizer_split_with_the_registered_runlora_backend(monkeypatch):
    """backend="runlora" (a fresh make_backend per graph): the pieces share the backend that
    rewrote the whole graph, and inductor compiles them."""
    import runlora_fx

    made = []
    real = runlora_fx.backend.make_backend
    monkeypatch.setattr(runlora_fx.backend, "make_backend", lambda **kw: made.append(real(**kw)) or made[-1])
    model = _lora_stack()
    compiled = torch.compile(model, backend=_through_ddp_optimizer(runlora_fx.runlora_backend))
    x = torch.randn(4, 256, requires_grad=True)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
    assert [[r.rewritten for r in b.reports] for b in made] == [[10]]  # one backend, every site


# --- the worker ---------------------------------------------------------------------------
def _model():
    """A 2-layer peft Llama whose adapters (r=128 on all 7 projections, about 2.4 MB) fill
    at least two DDP buckets of 1 MB (DDPOptimizer's first bucket is at least 1 MB)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from test_pass import TARGETS

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=101, use_cache=False)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=128, target_modules=TARGETS))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model


def _inputs(rank):
    torch.manual_seed(1000 + rank)
    return torch.randint(0, 101, (2, 12))


def _loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def _reference():
    """Each rank's loss and the average of the ranks' LoRA grads, in one process, eager."""
    model = _model()
    losses, grads = [], {}
    for rank in range(WORLD):
        model.zero_grad()
        loss = _loss(model, _inputs(rank))
        loss.backward()
        losses.append(loss.item())
        for name, p in model.named_parameters():
            if p.requires_grad:
                grads[name] = grads.get(name, 0) + p.grad / WORLD
    return losses, grads


def _compare(named_grads: dict, ref: dict) -> float:
    worst = 0.0
    assert set(named_grads) == set(ref), sorted(set(named_grads) ^ set(ref))[:4]
    for name, g in named_grads.items():
        err = ((g - ref[name]).norm() / ref[name].norm().clamp_min(1e-12)).item()
        worst = max(worst, err)
    return worst


def _ddp(rank, ref_losses, ref_grads):
    import warnings

    import runlora_fx
    from torch.nn.parallel import DistributedDataParallel as DDP

    cap = 1  # MB: the smallest DDPOptimizer takes (its first bucket is 1 MB)

    # 1. the backend behind a plain callable: DDPOptimizer hands it the pieces only
    hidden = runlora_fx.make_backend(inner="aot_eager")
    model = DDP(_model(), bucket_cap_mb=cap)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _loss(torch.compile(model, backend=lambda gm, ex: hidden(gm, ex)), _inputs(rank)).backward()
    cut_warning = any("DDPOptimizer split" in str(w.message) for w in caught)
    torch._dynamo.reset()

    # 2. the backend itself: the whole graph is rewritten before the split
    backend = runlora_fx.make_backend(inner="aot_eager")
    model = DDP(_model(), bucket_cap_mb=cap)
    loss = _loss(torch.compile(model, backend=backend), _inputs(rank))
    loss.backward()
    grads = {k.removeprefix("module."): p.grad for k, p in model.named_parameters() if p.requires_grad}
    return dict(sites=sum(r.rewritten for r in backend.reports), hidden_sites=sum(r.rewritten for r in hidden.reports),
                cut_warning=cut_warning, buckets=len(hidden.reports), graphs=len(backend.reports),
                max_rel_err=_compare(grads, ref_grads), loss_err=abs(loss.item() - ref_losses[rank]))


def _fsdp2(rank, ref_losses, ref_grads):
    import runlora_fx
    from torch.distributed.fsdp import fully_shard

    model = _model()
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    backend = runlora_fx.make_backend(inner="aot_eager")
    loss = _loss(torch.compile(model, backend=backend), _inputs(rank))
    loss.backward()
    grads = {k: p.grad.full_tensor() for k, p in model.named_parameters() if p.requires_grad}
    return dict(sites=sum(r.rewritten for r in backend.reports), max_rel_err=_compare(grads, ref_grads),
                loss_err=abs(loss.item() - ref_losses[rank]))


def _worker(mode: str, rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    ref_losses, ref_grads = _reference()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        result = (_ddp if mode == "ddp" else _fsdp2)(rank, ref_losses, ref_grads)
    finally:
        dist.destroy_process_group()
    pathlib.Path(out, f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    _worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
