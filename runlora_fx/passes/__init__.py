"""The FX passes a graph travels, in order.

    nodes.py       what a node is, whatever the IR: target sets, ``LinearView``, ``meta_value``
    dialects.py    the dialect table: every spelling of a linear map (``LINEAR_DIALECTS``)
    quantized.py   the 4-bit spellings (bitsandbytes, torchao NF4) the table reads
    match.py       LoRA sites and their legality (``find_sites``; a ``Rejection`` says why not)
    subgraphs.py   the bodies of checkpoint / wrap / invoke_subgraph ops the pass enters (``region_bodies``)
    rewrite.py     each legal site into one ``runlora.*`` op with its chosen plans (``rewrite``)
    lower.py       each op into its plan's ATen chain, for inductor (``lower_runlora_ops``)
    upstream.py    upstream spots Dynamo cannot trace in LoRA models, fixed while compiling
"""

from .match import LoraSite, Rejection, find_sites, match_lora
from .rewrite import rewrite

__all__ = ["LoraSite", "Rejection", "find_sites", "match_lora", "rewrite"]
