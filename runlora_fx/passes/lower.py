"""Lower ``runlora.lora_linear`` / ``lora_linear_4bit`` nodes (and the group and DoRA ops, the
same way) into their chosen ATen chain for inductor.

Matches (the rewritten torch-level graph)::

    y = torch.ops.runlora.lora_linear.default(x, W, b, A, B, s, None, None, 'forward2', 'backward5')
    y = torch.ops.runlora.lora_linear_4bit.default(x, [packed, ...], 'bnb_nf4', [64], [o, i], b, A, B, s, ...)

Rewrite to::

    y = runlora_fx.passes.lower.lowered_lora_linear(x, W, b, A, B, s, None, None, 'forward2', 'backward5')
    y = runlora_fx.passes.lower.lowered_lora_linear_4bit(x, [packed, ...], 'bnb_nf4', [64], [o, i], b, A, B, s, ...)

Both are one autograd.Function whose forward and backward are the plan's mm/addmm calls
(``plans/catalogue.py``), so AOTAutograd traces them into the joint graph and inductor fuses the
scaling, casts and adds around them with no op boundary or per-call dispatch. A 4-bit
weight is dequantized inside it by ``runlora.dequantize_4bit`` (opaque, so AOTAutograd
cannot merge the forward and backward calls into one saved copy), in forward and in
backward only when dX is needed, and never saved. Inductor does not reassociate matmuls, so
the chosen chain survives. A piecewise plan is resolved at the traced n's size hint without
installing a guard: every plan is exact, so a dynamic graph stays one graph and only the
plan for other n may be the costlier one (the opaque op, by contrast, resolves the
piecewise plan on every call). Unlike the op, the chain may keep forward1's n×r X_l·Aᵀ for dB
(``choose/lora_product.py``; ``save_lora_product`` on the call), decided when it is traced.
``runlora.dora_linear`` and ``dora_linear_4bit`` lower to one autograd.Function the same way
(``_LoweredDoRA``), a 4-bit W dequantized once per forward for the base GEMM and the norm.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from .._compat import size_hint
from .. import ops  # noqa: F401  registers torch.ops.runlora.*
from ..ops.group import run_group_backward, run_group_forward, split_plans
from ..ops.quantized import nf4_parts
from ..choose.lora_product import keeps_lora_product
from ..plans import Needs, forward1_with_lora_product, resolve_plan, rows_as_output
from ..plans.catalogue import fused_forward_with_lora_product
from ..plans.dora import dora_backward_nd, dora_forward_nd
from .subgraphs import region_bodies

__all__ = ["dora_linear_nf4", "lowered_dora_linear", "lowered_dora_linear_4bit", "lowered_lora_linear", "lowered_lora_linear_4bit", "lowered_lora_linear_group", "lora_linear_nf4",
           "lower_runlora_ops"]


@dataclasses.dataclass(frozen=True)
class _WeightTensor:
    """W itself (``.to`` returns W when already in x's dtype); or torchao's NF4Tensor,
    dequantized by ``runlora.dequantize_4bit``; or another weight-only quantized subclass
    that dequantizes on ``.to(dtype)``."""

    def shape(self, weight):
        return tuple(weight.shape)

    def materialize(self, parts, dtype, phase):
        weight = parts[0]
        nf4 = nf4_parts(weight) if type(weight) is not torch.Tensor else None
        if nf4 is None:
            return weight.to(dtype)
        return torch.ops.runlora.dequantize_4bit(nf4[0], "torchao_nf4", nf4[1], list(weight.shape), dtype, phase)

    def sq_norms(self, parts, dtype):
        """‖W‖²_row in W's accumulation dtype, cached per frozen W at run time (``ops/dora.py``)."""
        weight = parts[0]
        nf4 = nf4_parts(weight) if type(weight) is not torch.Tensor else None
        if nf4 is None:
            return torch.ops.runlora.row_sq_norms(weight)  # W's own identity: the cache's key
        return torch.ops.runlora.row_sq_norms_4bit(nf4[0], "torchao_nf4", nf4[1], list(weight.shape), dtype)


@dataclasses.dataclass(frozen=True)
class _Packed4bit:
    """A packed 4-bit weight as ``runlora.lora_linear_4bit`` takes it (``ops/quantized.py``: ``QUANT_FORMATS``)."""

    quant_type: str
    quant_args: tuple
    out_in: tuple

    def shape(self, *_):
        return self.out_in

    def materialize(self, parts, dtype, phase):
        return torch.ops.runlora.dequantize_4bit(list(parts), self.quant_type, list(self.quant_args),
                                                 list(self.out_in), dtype, phase)

    def sq_norms(self, parts, dtype):
        return torch.ops.runlora.row_sq_norms_4bit(list(parts), self.quant_type, list(self.quant_args),
                                                   list(self.out_in), dtype)


def _keeps_product(ctx, x2, lora_A, adapter_dtype, forward_name, backward_plan, n_hint, policy) -> bool:
    """Whether this call keeps X_l·Aᵀ for dB (``choose/lora_product.py``), decided at trace time."""
    need_x, _, need_a, need_b, need_xl = ctx.needs_input_grad[:5]
    needs = Needs(x=bool(need_x or need_xl), lora_A=bool(need_a), lora_B=bool(need_b))
    return keeps_lora_product(forward_name, resolve_plan(backward_plan, n_hint, "backward").name, needs, n_hint,
                              size_hint(x2.shape[1]), size_hint(lora_A.shape[0]), dtype=x2.dtype, adapter_dtype=adapter_dtype,
                              policy=policy).keep


class _LoweredLoRA(torch.autograd.Function):
    """The plan's chain as an autograd.Function; ``weight`` (a ``_WeightTensor`` or ``_Packed4bit``)
    turns ``*parts`` into W: in forward, and in backward only when dX is needed. Saves x, A, B,
    x_lora and the weight's parts; and forward1's X_l·Aᵀ (n×r) where ``keeps_lora_product`` says
    so, which dB then reads instead of recomputing it."""

    @staticmethod
    def forward(ctx, x, bias, lora_A, lora_B, x_lora, scaling, adapter_dtype, forward_plan, backward_plan,
                save_lora_product, weight, *parts):
        o, i = weight.shape(*parts)
        x2 = x.reshape(-1, i)
        xl2 = None if x_lora is None else x_lora.reshape(-1, i)
        n_hint = size_hint(x2.shape[0])
        plan = resolve_plan(forward_plan, n_hint, "forward")
        w = weight.materialize(parts, x.dtype, "forward")
        product = None
        if _keeps_product(ctx, x2, lora_A, adapter_dtype, plan.name, backward_plan, n_hint, save_lora_product):
            # forward1's chain, or the fused plan's Triton GEMM (both form X_l·Aᵀ first)
            with_product = fused_forward_with_lora_product if plan.fused else forward1_with_lora_product
            y, product = with_product(x2, w, bias, lora_A, lora_B, scaling, xl2, adapter_dtype)
        else:
            y = plan.run(x2, w, bias, lora_A, lora_B, scaling, xl2, adapter_dtype)
        ctx.save_for_backward(x, lora_A, lora_B, x_lora, product, *parts)
        ctx.scaling, ctx.adapter_dtype, ctx.backward_plan, ctx.weight = scaling, adapter_dtype, backward_plan, weight
        return rows_as_output(y, x)

    @staticmethod
    def backward(ctx, grad_y):
        x, lora_A, lora_B, x_lora, product, *parts = ctx.saved_tensors
        need_x, _, need_a, need_b, need_xl = ctx.needs_input_grad[:5]
        o, i = ctx.weight.shape(*parts)
        g2 = grad_y.reshape(-1, o)
        plan = resolve_plan(ctx.backward_plan, size_hint(g2.shape[0]), "backward")
        needs = Needs(x=need_x or need_xl, lora_A=need_a, lora_B=need_b)
        weight = ctx.weight.materialize(parts, x.dtype, "backward") if needs.x else None
        gx, gxl, ga, gb = plan.run(g2, x.reshape(-1, i), weight, lora_A, lora_B, ctx.scaling,
                                   None if x_lora is None else x_lora.reshape(-1, i), ctx.adapter_dtype, needs,
                                   lora_product=product)
        grads = (
            None if gx is None or not need_x else gx.reshape(x.shape), None,
            ga if need_a else None, gb if need_b else None,
            None if gxl is None or not need_xl else gxl.reshape(x.shape),
        )
        return grads + (None,) * (len(ctx.needs_input_grad) - len(grads))


def lowered_lora_linear(x, weight, bias, lora_A, lora_B, scaling, x_lora=None, adapter_dtype=None,
                        forward_plan="forward1", backward_plan="backward1", *, save_lora_product=None):
    """Same contract as ``torch.ops.runlora.lora_linear``, as traceable ATen calls.

    ``save_lora_product``: keep forward1's X_l·Aᵀ for dB (None: ``choose.lora_product``'s rule)."""
    return _LoweredLoRA.apply(x, bias, lora_A, lora_B, x_lora, scaling, adapter_dtype, forward_plan, backward_plan,
                              save_lora_product, _WeightTensor(), weight)


def lowered_lora_linear_4bit(x, qtensors, quant_type, quant_args, shape, bias, lora_A, lora_B, scaling,
                             x_lora=None, adapter_dtype=None, forward_plan="forward1", backward_plan="backward1", *,
                             save_lora_product=None):
    """Same contract as ``torch.ops.runlora.lora_linear_4bit``, as traceable calls."""
    weight = _Packed4bit(quant_type, tuple(int(a) for a in quant_args), tuple(int(d) for d in shape))
    return _LoweredLoRA.apply(x, bias, lora_A, lora_B, x_lora, scaling, adapter_dtype, forward_plan, backward_plan,
                              save_lora_product, weight, *qtensors)


def lora_linear_nf4(x, weight, bias, lora_A, lora_B, scaling, x_lora=None, adapter_dtype=None,
                    forward_plan="forward1", backward_plan="backward1", *, save_lora_product=None):
    """The LoRA layer on a torchao ``NF4Tensor`` base (torchtune's QLoRA).

    NF4Tensor is a tensor subclass that dequantizes on ``.to(dtype)``; a torch.library op
    cannot take it, so this path is the lowered autograd.Function (above), which
    torch.compile traces subclass and all. Same contract as ``lora_linear_4bit``: dequantize
    in forward, again in backward only for dX; save the NF4 weight, never its dequantized copy.
    """
    return lowered_lora_linear(x, weight, bias, lora_A, lora_B, scaling, x_lora, adapter_dtype,
                               forward_plan, backward_plan, save_lora_product=save_lora_product)


def lower_runlora_ops(gm: fx.GraphModule, *, save_lora_product=None) -> int:
    """Replaces every runlora op node of ``gm`` and of its checkpointed/wrapped regions'
    bodies (``subgraphs.py``) by its lowered form; returns the count.

    ``save_lora_product`` (not None): passed to every LoRA call and group (True: keep forward1's
    X_l·Aᵀ wherever a dB reads it; False: always recompute it)."""
    lowered = {torch.ops.runlora.lora_linear.default: lowered_lora_linear,
               torch.ops.runlora.lora_linear_4bit.default: lowered_lora_linear_4bit,
               torch.ops.runlora.lora_linear_group.default: lowered_lora_linear_group,
               torch.ops.runlora.dora_linear.default: lowered_dora_linear,
               torch.ops.runlora.dora_linear_4bit.default: lowered_dora_linear_4bit}
    count = 0
    for module in (gm, *region_bodies(gm)):
        here, changed = 0, False
        for node in module.graph.nodes:
            if node.op != "call_function":
                continue
            if node.target in lowered:
                node.target = lowered[node.target]
                here += 1
            if save_lora_product is not None and node.target in _TAKES_SAVE_LORA_PRODUCT:
                node.kwargs = {**node.kwargs, "save_lora_product": bool(save_lora_product)}
                changed = True
        if here or changed:
            module.recompile()
        count += here
    return count


# --- sibling groups (runlora.lora_linear_group; ops/group.py) --------------------------------
class _LoweredGroup(torch.autograd.Function):
    """``runlora.lora_linear_group`` as its ATen chain (``ops.group.run_group_forward`` /
    ``run_group_backward``): the concatenated x-reading GEMMs stay one mm each in the joint graph.

    Tensors arrive flat: the k weights, the biases that are not None, the k A's, the k B's.
    A member's X_l·A_jᵀ (its columns of the forward's XA_cat) is kept for its dB where
    ``keeps_lora_product`` says so for the member alone; the others' are recomputed together.
    """

    @staticmethod
    def forward(ctx, x, x_lora, adapter_dtype, scalings, forward_plans, backward_plans, has_bias, save_lora_product,
                *tensors):
        k = len(has_bias)
        weights, rest = list(tensors[:k]), list(tensors[k:])
        biases = [rest.pop(0) if present else None for present in has_bias]
        lora_As, lora_Bs = rest[:k], rest[k:]
        i = x.shape[-1]
        x2 = x.reshape(-1, i)
        xl2 = None if x_lora is None else x_lora.reshape(-1, i)
        n_hint = size_hint(x2.shape[0])
        fplans = [resolve_plan(p, n_hint, "forward").name for p in split_plans(forward_plans, k, "forward")]
        bplans = [resolve_plan(p, n_hint, "backward").name for p in split_plans(backward_plans, k, "backward")]
        outs, products = run_group_forward(x2, weights, biases, lora_As, lora_Bs, list(scalings), xl2, adapter_dtype,
                                           fplans)
        need = ctx.needs_input_grad
        offset = 8 + k + sum(has_bias)
        needs_x = bool(need[0] or need[1])
        kept = [j for j in products
                if keeps_lora_product(fplans[j], bplans[j], Needs(x=needs_x, lora_A=bool(need[offset + j]),
                                                                  lora_B=bool(need[offset + k + j])),
                                      n_hint, i, lora_As[j].shape[0], dtype=x2.dtype, adapter_dtype=adapter_dtype,
                                      policy=save_lora_product).keep]
        ctx.save_for_backward(x, x_lora, *weights, *lora_As, *lora_Bs, *[products[j] for j in kept])
        ctx.k, ctx.n_bias, ctx.scalings, ctx.adapter_dtype = k, sum(has_bias), list(scalings), adapter_dtype
        ctx.backward_plans, ctx.kept = backward_plans, kept
        return tuple(rows_as_output(y, x) for y in outs)

    @staticmethod
    def backward(ctx, *grads):
        k = ctx.k
        x, x_lora, *rest = ctx.saved_tensors
        weights, lora_As, lora_Bs = rest[:k], rest[k:2 * k], rest[2 * k:3 * k]
        products = dict(zip(ctx.kept, rest[3 * k:]))
        need = ctx.needs_input_grad
        need_x, need_xl = need[0], need[1]
        offset = 8 + k + ctx.n_bias
        need_a, need_b = list(need[offset:offset + k]), list(need[offset + k:offset + 2 * k])
        i = x.shape[-1]
        g2 = [None if g is None else g.reshape(-1, w.shape[0]) for g, w in zip(grads, weights)]
        n_hint = size_hint(x.reshape(-1, i).shape[0])
        bplans = [resolve_plan(p, n_hint, "backward").name for p in split_plans(ctx.backward_plans, k, "backward")]
        gx, gxl, ga, gb = run_group_backward(
            g2, x.reshape(-1, i), weights, lora_As, lora_Bs, ctx.scalings,
            None if x_lora is None else x_lora.reshape(-1, i), ctx.adapter_dtype, bplans, need_x or need_xl,
            need_a, need_b, lora_products=products)
        return ((None if gx is None or not need_x else gx.reshape(x.shape),
                 None if gxl is None or not need_xl else gxl.reshape(x.shape))
                + (None,) * (6 + k + ctx.n_bias) + tuple(ga) + tuple(gb))


def lowered_lora_linear_group(x, weights, biases, lora_As, lora_Bs, scalings, x_lora=None, adapter_dtype=None,
                              forward_plans="forward1", backward_plans="backward1", *, save_lora_product=None):
    """Same contract as ``torch.ops.runlora.lora_linear_group``, as traceable ATen calls."""
    has_bias = tuple(b is not None for b in biases)
    return list(_LoweredGroup.apply(x, x_lora, adapter_dtype, tuple(scalings), forward_plans, backward_plans,
                                    has_bias, save_lora_product, *weights, *[b for b in biases if b is not None],
                                    *lora_As, *lora_Bs))


_TAKES_SAVE_LORA_PRODUCT = (lowered_lora_linear, lowered_lora_linear_4bit, lora_linear_nf4, lowered_lora_linear_group)


# --- DoRA (runlora.dora_linear; ops/dora.py, plans/dora.py) ------------------------------------
class _LoweredDoRA(torch.autograd.Function):
    """``runlora.dora_linear`` / ``dora_linear_4bit`` as its ATen chain (``plans.dora.dora_forward``
    / ``dora_backward``); ``weight`` (a ``_WeightTensor`` or ``_Packed4bit``) turns ``*parts`` into W:
    in forward, and in backward only when dX is needed.

    Saves x, x_lora, A, B, m, v (the unscaled LoRA-layer output, for dm), c (the norms) and the
    weight's parts, never a dequantized W; ‖W‖²_row for ``norm_lowrank`` comes from the opaque
    ``runlora.row_sq_norms`` (``_4bit``), cached per frozen W at run time, so the compiled step
    never re-reads W for it.
    """

    @staticmethod
    def forward(ctx, x, bias, lora_A, lora_B, magnitude, x_lora, scaling, form, norm, forward_plan, backward_plan,
                adapter_dtype, weight, *parts):
        o, i = weight.shape(*parts)
        fplan = resolve_plan(forward_plan, size_hint(x.numel() // i), "forward").name
        w = weight.materialize(parts, x.dtype, "forward")
        y, v, c = dora_forward_nd(x, w, bias, lora_A, lora_B, magnitude, scaling, x_lora, form, norm, fplan,
                                  lambda _: weight.sq_norms(parts, x.dtype), adapter_dtype)
        ctx.save_for_backward(x, lora_A, lora_B, magnitude, x_lora, v, c, *parts)
        ctx.scaling, ctx.form, ctx.backward_plan, ctx.weight = scaling, form, backward_plan, weight
        ctx.adapter_dtype = adapter_dtype
        ctx.mark_non_differentiable(v, c)
        return y, v, c

    @staticmethod
    def backward(ctx, grad_y, _grad_v, _grad_c):
        x, lora_A, lora_B, magnitude, x_lora, v, c, *parts = ctx.saved_tensors
        need_x, _, need_a, need_b, need_m, need_xl = ctx.needs_input_grad[:6]
        o, _ = ctx.weight.shape(*parts)
        bplan = resolve_plan(ctx.backward_plan, size_hint(grad_y.numel() // o), "backward").name
        needs = Needs(x=bool(need_x or need_xl), lora_A=bool(need_a), lora_B=bool(need_b))
        weight = ctx.weight.materialize(parts, x.dtype, "backward") if needs.x else None
        gx, gxl, ga, gb, gm = dora_backward_nd(grad_y, x, weight, lora_A, lora_B, magnitude, ctx.scaling, x_lora, v, c,
                                               ctx.form, bplan, needs, bool(need_m), ctx.adapter_dtype)
        grads = (gx if need_x else None, None, ga if need_a else None, gb if need_b else None,
                 gm if need_m else None, gxl if need_xl else None)
        return grads + (None,) * (len(ctx.needs_input_grad) - len(grads))


def lowered_dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scaling, x_lora=None, form="peft",
                        norm_plan="norm_lowrank", forward_plan="forward1", backward_plan="backward1",
                        adapter_dtype=None):
    """Same contract as ``torch.ops.runlora.dora_linear`` (returns (Y, v, c)), as traceable ATen calls."""
    return _LoweredDoRA.apply(x, bias, lora_A, lora_B, magnitude, x_lora, scaling, form, norm_plan, forward_plan,
                              backward_plan, adapter_dtype, _WeightTensor(), weight)


def lowered_dora_linear_4bit(x, qtensors, quant_type, quant_args, shape, bias, lora_A, lora_B, magnitude, scaling,
                             x_lora=None, form="peft", norm_plan="norm_lowrank", forward_plan="forward1",
                             backward_plan="backward1", adapter_dtype=None):
    """Same contract as ``torch.ops.runlora.dora_linear_4bit``, as traceable calls."""
    weight = _Packed4bit(quant_type, tuple(int(a) for a in quant_args), tuple(int(d) for d in shape))
    return _LoweredDoRA.apply(x, bias, lora_A, lora_B, magnitude, x_lora, scaling, form, norm_plan, forward_plan,
                              backward_plan, adapter_dtype, weight, *qtensors)


def dora_linear_nf4(x, weight, bias, lora_A, lora_B, magnitude, scaling, x_lora=None, form="peft",
                    norm_plan="norm_lowrank", forward_plan="forward1", backward_plan="backward1", adapter_dtype=None):
    """The DoRA layer on a torchao ``NF4Tensor`` base (torchtune's QDoRA), as ``lora_linear_nf4``
    is the LoRA one: a torch.library op cannot take the subclass, so this is the lowered
    autograd.Function, traced subclass and all. Returns (Y, v, c)."""
    return lowered_dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scaling, x_lora, form, norm_plan,
                               forward_plan, backward_plan, adapter_dtype)
