"""Merged backward plans (dX = dY(W + sBA)) must not keep W + sBA from the forward.

Under inductor the lowered op (``passes/lower.py``) becomes ATen calls in AOTAutograd's joint
graph; forward2 forms W + sBA there and backward4/5 form it again. If the two were one node
(the joint graph's CSE), the partitioner would save that o×i tensor for backward. Each test
compiles one LoRA layer with inductor, reads the partitioned forward graph (the last graph
handed to ``post_grad_custom_pre_pass`` that has no tangents) and lists what it saves.
"""

import pytest
import torch
from torch._inductor import config as inductor_config
from torch._inductor.custom_graph_pass import CustomGraphPass

import runlora_fx

I, O, R, N = 64, 96, 4, 256  # n > i·o/(i+o) and n > o: FLOPs alone would pick forward2/backward5 too


class SavedByForward(CustomGraphPass):
    """Records the non-input tensors each partitioned forward graph returns: user outputs and
    the activations it saves for backward."""

    def __init__(self):
        self.saved = []

    def __call__(self, graph):
        names = [n.name for n in graph.nodes if n.op == "placeholder"]
        if any(name.startswith("tangents") for name in names):
            return  # a backward graph
        (output,) = [n for n in graph.nodes if n.op == "output"]
        self.saved = [tuple(a.meta["val"].shape) for a in output.args[0]
                      if isinstance(a, torch.fx.Node) and a.op != "placeholder"]

    def uuid(self):
        return None


class LoraLayer(torch.nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.base = torch.nn.Linear(I, O, bias=True, dtype=dtype).requires_grad_(False)
        self.lora_A = torch.nn.Linear(I, R, bias=False, dtype=dtype)
        self.lora_B = torch.nn.Linear(R, O, bias=False, dtype=dtype)
        torch.nn.init.normal_(self.lora_B.weight, std=0.1)

    def forward(self, x):
        return self.base(x) + 2.0 * self.lora_B(self.lora_A(x))


class MergedByHand(LoraLayer):
    """The merged forward written out: autograd needs W + sBA for dX, so inductor saves it."""

    def forward(self, x):
        merged = self.base.weight + 2.0 * self.lora_B.weight @ self.lora_A.weight
        return torch.nn.functional.linear(x, merged, self.base.bias)


def compile_and_step(model, x, backend):
    grab = SavedByForward()
    with inductor_config.patch(post_grad_custom_pre_pass=grab, fx_graph_cache=False):
        y = torch.compile(model, backend=backend)(x)
        (y.float() ** 2).sum().backward()
    return y, grab.saved


@pytest.mark.parametrize("dtype, backward_plan, tol", [
    (torch.float32, "backward5", 1e-5),
    (torch.bfloat16, "backward4", 2e-2),
])
def test_merged_backward_saves_no_merged_weight(dtype, backward_plan, tol):
    torch.manual_seed(0)
    model = LoraLayer(dtype)
    x = torch.randn(N, I, dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = model(x_ref)
    (y_ref.float() ** 2).sum().backward()
    expected = [x_ref.grad, model.lora_A.weight.grad, model.lora_B.weight.grad]
    model.zero_grad()

    backend = runlora_fx.make_backend(forward_plan="forward2", backward_plan=backward_plan, allow_merged=True)
    y, saved = compile_and_step(model, x, backend)

    assert backend.reports[0].plan_counts() == {f"forward2/{backward_plan}": 1}
    assert saved, "no forward graph seen"
    assert (O, I) not in saved and (I, O) not in saved, saved
    torch.testing.assert_close(y, y_ref, atol=tol, rtol=tol)
    for got, want in zip([x.grad, model.lora_A.weight.grad, model.lora_B.weight.grad], expected):
        # bf16 sums in another order (backward4 forms T = Xᵀ·dY): tolerance on the gradient's scale
        torch.testing.assert_close(got, want, atol=tol * want.abs().max().item(), rtol=tol)


def test_the_probe_sees_a_saved_merged_weight():
    # Control: the same probe on the merged formula written by hand finds the o×i tensor.
    torch.manual_seed(0)
    x = torch.randn(N, I, requires_grad=True)
    _, saved = compile_and_step(MergedByHand(torch.float32), x, "inductor")
    assert (O, I) in saved or (I, O) in saved, saved
