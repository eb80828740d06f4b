"""The torch.library contract: the ops a rewritten graph holds, with their fake and autograd rules.

    dense.py       runlora::lora_linear and runlora::lora_linear_backward (a dense base W)
    quantized.py   runlora::lora_linear_4bit (+ _backward) and runlora::dequantize_4bit
                   (bitsandbytes NF4/FP4, torchao NF4), and the 4-bit formats they read
    group.py       runlora::lora_linear_group (+ _backward): sibling sites sharing x in one op
    dora.py        runlora::dora_linear (DoRA, norm detached) and runlora::row_sq_norms (cached ‖W‖²)
    fused.py       runlora::mm_lowrank and runlora::lowrank_grads: the fused plan's Triton kernels
                   (registered only where Triton imports)

Importing this package registers every op, so ``torch.export.load`` can read saved programs.
The plan arguments are strings of ``plans/``; these ops run the records they name.
"""

from . import dense, dora, fused, group, quantized
from .dense import check_lora_args, lora_linear, lora_linear_backward

__all__ = ["check_lora_args", "dense", "dora", "fused", "group", "lora_linear", "lora_linear_backward", "quantized"]
