"""QLoRA correctness on a device: the runlora backend against eager on a peft + bitsandbytes Llama.

    python benchmarks/check_qlora.py --device cuda --dtype bfloat16
    python benchmarks/check_qlora.py                  # CPU, fp32

A 2-layer Llama (hidden 256) whose linear layers are bitsandbytes Linear4bit (NF4, double
quantization), peft LoRA r=16 on all of them: one step compiled with the runlora backend
(``--inner``, default inductor) and one eager, same weights and batch. Prints the relative
norm error of the loss and of every LoRA gradient, and the sites rewritten; exits 1 if a
site was not rewritten or an error exceeds the dtype's tolerance (fp32 1e-4, bf16 3e-2).
Then, if torchao is importable: torchao's NF4 dequantization against runlora's, bit for bit,
on the device.
"""

from __future__ import annotations

import argparse
import copy
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_model  # noqa: E402
import common  # noqa: E402

import runlora_fx  # noqa: E402

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-2}


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.double()
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()


def check_bnb(device: str, dtype: torch.dtype, inner: str) -> bool:
    spec = bench_model.ModelSpec("llama", 256, 688, 2, 4, vocab=1024)
    model = bench_model.build_base(spec, layers=None, seq=128, dtype=dtype, device=device)
    model = bench_model.quantize_base(model, "nf4", dtype, device)
    model = bench_model.add_lora(model, rank=16, fp32_adapters=False)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)  # peft starts B at zero: no signal in dA
    ref = copy.deepcopy(model)
    batch = bench_model.make_batch(spec, batch=2, seq=128, device=device)
    backend = runlora_fx.make_backend(inner=inner, rewrite_4bit=True)  # checks the rewrite on every device
    loss = torch.compile(model, backend=backend)(**batch).loss
    loss.backward()
    ref_loss = ref(**batch).loss
    ref_loss.backward()
    tol = TOLERANCE[dtype]
    errors = {"loss": relative_error(loss, ref_loss)}
    want = {k: p.grad for k, p in ref.named_parameters() if p.grad is not None}
    for k, p in model.named_parameters():
        if k in want:
            errors[k] = relative_error(p.grad, want[k])
    sites = sum(r.rewritten for r in backend.reports)
    expected = sum(isinstance(m, torch.nn.Linear) and "lora_A" in name for name, m in model.named_modules())
    worst = max(errors, key=errors.get)
    ok = sites == expected and errors[worst] < tol and len(errors) == 1 + 2 * expected
    print(f"{'ok  ' if ok else 'FAIL'} bnb nf4 {str(dtype).removeprefix('torch.')} on {device}: {sites}/{expected} "
          f"sites, loss rel err {errors['loss']:.1e}, worst grad {worst} {errors[worst]:.1e} (tol {tol:g}); "
          f"plans {[r.plan_counts() for r in backend.reports]}")
    return ok


def check_torchao_nf4(device: str) -> bool:
    try:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4
    except Exception as exc:  # noqa: BLE001 - optional
        print(f"skip torchao NF4 check: {type(exc).__name__}: {exc}")
        return True
    from runlora_fx.ops.quantized import dequantize_4bit

    ok = True
    for dtype in (torch.bfloat16, torch.float32):
        nf4 = to_nf4(torch.randn(1024, 512, dtype=dtype, device=device))
        qtensors = [nf4.quantized_data, nf4.quantized_scalers, nf4.quantization_factor, nf4.scaler_mean, nf4.nf4]
        ours = dequantize_4bit(qtensors, "torchao_nf4", [nf4.block_size, nf4.scaler_block_size], [1024, 512], dtype)
        same = torch.equal(ours, nf4.to(dtype))
        ok &= same
        print(f"{'ok  ' if same else 'FAIL'} torchao NF4 dequantization {str(dtype).removeprefix('torch.')} on "
              f"{device}: bitwise equal = {same}")
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=sorted(common.DTYPES), default="float32")
    parser.add_argument("--inner", choices=["inductor", "aot_eager"], default="inductor")
    args = parser.parse_args(argv)
    ok = check_bnb(args.device, common.DTYPES[args.dtype], args.inner)
    ok &= check_torchao_nf4(args.device)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
