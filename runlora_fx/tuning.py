"""``tune(model, *inputs)``: measure every LoRA site's plan pairs ahead of a ``criterion="time"`` compile."""

from __future__ import annotations

from typing import Optional

import torch

from .choose.measure import Autotuner
from .options import RewriteOptions
from .passes.rewrite import rewrite

__all__ = ["tune"]


def tune(model: torch.nn.Module, *example_args, allow_merged: Optional[bool] = None, dynamic: Optional[bool] = None,
         time_budget_s: Optional[float] = None, tuner: Optional[Autotuner] = None, **example_kwargs) -> dict:
    """Measures every LoRA site of ``model`` ahead of time; a later ``criterion="time"`` compile hits the cache.

    Captures the model's graphs with Dynamo and a dry run of the pass (as ``explain`` does:
    the model runs once on the example inputs, nothing is compiled or changed), and times each
    distinct key's applicable plan pairs on the inputs' device.

    Args:
        model: the model, as you will compile it.
        *example_args, **example_kwargs: inputs of the shapes you will train with.
        allow_merged: as for the pass; the same setting as the later compile.
        dynamic: passed to ``torch.compile`` for the capture.
        time_budget_s: stop measuring after this many seconds.
        tuner: an ``Autotuner`` to use (its cache directory, timer, budget).

    Returns:
        key string -> {"times_s": {pair: seconds}, "best": pair, "source": "cache"|"measured"},
        or {"times_s": None, "skipped": reason} for keys left to the roofline.
    """
    tuner = tuner or Autotuner(time_budget_s=time_budget_s)
    options = RewriteOptions(criterion="time", allow_merged=allow_merged, tuner=tuner)
    count = [0]

    def capture(gm, example_inputs):
        rewrite(gm, options, graph_name=f"tune_{count[0]}", dry_run=True)
        count[0] += 1
        return gm.forward

    torch.compile(model, backend=capture, dynamic=dynamic)(*example_args, **example_kwargs)
    return dict(tuner.results)
