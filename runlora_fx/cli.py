"""The ``runlora-fx`` command line: explain a model or a saved program; plot plan regions.

    runlora-fx explain model.pt2 --write model.runlora.pt2     # rewrite a torch.export program
    runlora-fx explain mypkg.models:make_model --json          # dry run on a model from a factory
    runlora-fx regions --in 4096 --out 11008 -o regions.png    # where each plan wins, by FLOPs
    runlora-fx calibrate --device cuda --json h200.json        # measure the roofline's device constants
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

__all__ = ["build_parser", "main"]

_PROG = "runlora-fx"

_EPILOG = """\
examples, one per command:
  runlora-fx explain model.pt2 --write fast.pt2       report the LoRA sites of a torch.export.save file
                                                      and save the rewritten program
  runlora-fx explain mypkg.models:make_model --json   dry run on the model a factory returns
  runlora-fx regions --in 4096 --out 11008 -o regions.png
                                                      which plan pair wins for a 4096->11008 layer
  runlora-fx calibrate --device cuda --json gpu.json  measure matmul rate, bandwidth and per-kernel cost;
                                                      use with criterion="roofline", device_model="gpu.json"

Run 'runlora-fx COMMAND --help' for a command's options and more examples.
"""

_EXPLAIN_DESCRIPTION = """\
Report every LoRA site runlora_fx finds: its sizes, each plan's FLOPs, the plan chosen and
what it saves; and the sites left alone, with the reason.

TARGET is either
  FILE.pt2          a program saved with torch.export.save(torch.export.export(model, args), FILE);
                    it is rewritten with runlora_fx.rewrite_exported_program, and --write saves
                    the result (load it later with runlora_fx.load, or import runlora_fx first);
  MODULE:FACTORY    a function, importable from the current directory or PYTHONPATH, that takes no
                    arguments and returns (model, args) or (model, args, kwargs), with args a tuple
                    of example inputs; the model runs once through runlora_fx.explain (a dry run
                    under torch.compile: nothing is compiled or changed).
"""

_EXPLAIN_EPILOG = """\
examples:
  runlora-fx explain model.pt2
  runlora-fx explain model.pt2 --write model.runlora.pt2 --json > report.json
  runlora-fx explain mypkg.models:make_model

  # mypkg/models.py
  def make_model():
      model = build_my_lora_model()
      return model, (torch.randint(0, 32000, (2, 128)),)
"""

_REGIONS_DESCRIPTION = """\
Plot which (forward, backward) plan pair runlora_fx chooses by FLOPs for one layer shape, over a
grid of token counts n (batch x sequence) and LoRA ranks r, like Figure 2 of RunLoRA
(arXiv 2312.03415); a second panel shows the FLOPs the winner saves against forward1/backward1.
Drawn over it: n = in*out/(in+out), where forward2 starts to win; n = out, where backward5 beats
backward1; and r(in+out) = in*out, the rank above which LoRA saves no parameters.
Each cell is one runlora_fx.choose_plan call (tens of ms): large grids take a while.
"""

_REGIONS_EPILOG = """\
examples:
  runlora-fx regions --in 4096 --out 11008 -o regions.png
  runlora-fx regions --in 4096 --out 11008 --ranks 1..4096 -o regions.png
  runlora-fx regions --in 4096 --out 4096 --tokens 512,2048,8192 --ranks 8,16,64 --json

GRID is a comma list (64,256,1024) or a doubling range (64..131072 = 64, 128, ..., 131072).
"""


_CALIBRATE_DESCRIPTION = """\
Measure the constants criterion="roofline" uses (matmul rate per dtype, copy bandwidth,
per-kernel cost) on this machine's device; print them, or write them as JSON for
device_model="FILE.json".
"""

_CALIBRATE_EPILOG = """\
examples:
  runlora-fx calibrate                                       this machine's GPU if it has one, else the CPU
  runlora-fx calibrate --device cuda:1 --dtypes bfloat16 --json gpu1.json

Then: runlora_fx.make_backend(criterion="roofline", device_model="gpu1.json").
"""


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps each command's help on the line of its name.

    argparse sizes the help column from the options' names without the extra indent it gives
    subcommands, so a name as long as ``calibrate`` would push its help to the next line.
    """

    def __init__(self, prog):
        super().__init__(prog)
        self._action_max_length = max(self._action_max_length, len("    calibrate"))


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``runlora-fx`` and its subcommands."""
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="RunLoRA's cheapest LoRA chains as a torch.fx / torch.export pass: "
                    "explain what it rewrites, plot where each plan wins.",
        epilog=_EPILOG, formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, title="commands")

    explain = commands.add_parser(
        "explain", help="report (or apply) the rewrite of a .pt2 file or a model factory",
        description=_EXPLAIN_DESCRIPTION, epilog=_EXPLAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    explain.add_argument("target", metavar="TARGET", help="FILE.pt2 or MODULE:FACTORY (see above)")
    explain.add_argument("--write", metavar="OUT.pt2",
                         help="save the rewritten program here (FILE.pt2 targets only)")
    explain.add_argument("--json", action="store_true",
                         help="print the report as JSON (schema in runlora_fx/inspection/report.py)")
    explain.add_argument("--allow-merged", action="store_const", const=True, default=None,
                         help="use merged plans (W + sBA) in bf16/fp16 too; by default only for fp32/fp64 weights")
    explain.add_argument("-v", "--verbose", action="store_true", help="log what the pass does (INFO)")
    explain.set_defaults(run=_run_explain)

    regions = commands.add_parser(
        "regions", help="plot which plan pair wins by FLOPs over tokens x rank",
        description=_REGIONS_DESCRIPTION, epilog=_REGIONS_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    regions.add_argument("--in", dest="in_features", type=_positive_int, required=True, metavar="N",
                         help="the layer's in features (i)")
    regions.add_argument("--out", dest="out_features", type=_positive_int, required=True, metavar="N",
                         help="the layer's out features (o)")
    regions.add_argument("--tokens", type=_grid, metavar="GRID", default=None,
                         help="token counts n (default 64..131072)")
    regions.add_argument("--ranks", type=_grid, metavar="GRID", default=None, help="LoRA ranks r (default 1..512)")
    merged = regions.add_mutually_exclusive_group()
    merged.add_argument("--allow-merged", dest="allow_merged", action="store_true", default=True,
                        help="let the selector use merged plans (forward2, backward4/5); the default")
    merged.add_argument("--no-merged", dest="allow_merged", action="store_false",
                        help="forward1/backward1 only: what bf16/fp16 layers get by default")
    regions.add_argument("-o", "--output", metavar="PNG", default=None,
                         help="where to write the plot (default regions.png; with --json, no plot unless given)")
    regions.add_argument("--json", action="store_true", help="print the grid of winners as JSON")
    regions.set_defaults(run=_run_regions)

    calibrate = commands.add_parser(
        "calibrate", help="measure this device's roofline constants",
        description=_CALIBRATE_DESCRIPTION,
        epilog=_CALIBRATE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    calibrate.add_argument("--device", default="cuda" if _cuda_available() else "cpu",
                           help="cuda, cuda:1 or cpu (default: cuda if available)")
    calibrate.add_argument("--dtypes", default="bfloat16,float32",
                           help="matmul dtypes to measure, comma-separated (default bfloat16,float32)")
    calibrate.add_argument("--json", metavar="FILE", help="write the device model here")
    calibrate.set_defaults(run=_run_calibrate)
    return parser


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _run_calibrate(args) -> int:
    import json

    import torch

    from .choose.roofline import calibrate, device_model_for

    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise CliError(f"--device: expected cpu, cuda or cuda:N, got {args.device!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise CliError(f"--device: expected cpu, cuda or cuda:N, got {args.device!r}")
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    unknown = [d for d in dtypes if not isinstance(getattr(torch, d, None), torch.dtype)]
    if unknown or not dtypes:
        raise CliError(f"--dtypes: expected torch dtype names such as bfloat16,float32, got {args.dtypes!r}")
    try:
        measured = calibrate(args.device, dtypes)
    except RuntimeError as exc:
        raise CliError(str(exc)) from None
    table = device_model_for(args.device)
    print(f"{measured.name}  (table: {table.name})")
    for key in dtypes:
        table_peak = table.peak_flops.get(key, 0) / 1e12
        print(f"  peak {key:<9} {measured.peak_flops[key] / 1e12:8.2f} TFLOP/s   table {table_peak:8.2f}")
    print(f"  bandwidth      {measured.bandwidth / 1e9:8.1f} GB/s       table {table.bandwidth / 1e9:8.1f}")
    print(f"  launch         {measured.launch_s * 1e6:8.2f} us          table {table.launch_s * 1e6:8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(measured.to_dict(), f, indent=2)
        print(f"{_PROG}: wrote {args.json}")
    return 0


def main(argv=None) -> int:
    """Runs ``runlora-fx``; returns the exit status (0 ok, 2 usage error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(name)s: %(message)s")
    try:
        return args.run(args)
    except CliError as exc:
        print(f"{_PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 2


# --- explain -------------------------------------------------------------------------------
def _run_explain(args) -> int:
    target = args.target
    if os.path.isfile(target) or target.endswith(".pt2"):
        report = _explain_program(target, args)
    elif ":" in target:
        if args.write:
            raise CliError(f"--write needs a FILE.pt2 target; {target!r} is a factory, "
                           f"which is explained, not exported")
        report = _explain_factory(target, args)
    else:
        raise CliError(f"expected FILE.pt2 (an existing torch.export.save file) or MODULE:FACTORY "
                       f"(such as mypkg.models:make_model), got {target!r}")
    print(report.to_json() if args.json else report)
    return 0


def _explain_program(path: str, args):
    if not os.path.isfile(path):
        raise CliError(f"no such file: {path!r}")
    import torch

    import runlora_fx  # registers torch.ops.runlora.* before a rewritten program is loaded

    try:
        ep = torch.export.load(path)
    except Exception as exc:  # noqa: BLE001 - any load failure is the file's, reported as such
        raise CliError(f"cannot load {path!r} with torch.export.load ({type(exc).__name__}: {exc})") from None
    already = sum(node.target is torch.ops.runlora.lora_linear.default for node in ep.graph.nodes)
    if already:
        print(f"{_PROG}: note: {path} already holds {_sites(already)} as runlora.lora_linear", file=sys.stderr)
    options = {} if args.allow_merged is None else {"allow_merged": args.allow_merged}
    runlora_fx.rewrite_exported_program(ep, graph_name=os.path.basename(path), **options)
    report = ep.runlora_report
    if args.write:
        torch.export.save(ep, args.write)
        print(f"{_PROG}: wrote {args.write} ({_sites(report.rewritten)} as runlora.lora_linear)", file=sys.stderr)
    return report


def _explain_factory(spec: str, args):
    model, example_args, example_kwargs = _call_factory(spec)
    import runlora_fx

    report = runlora_fx.explain(model, *example_args, allow_merged=args.allow_merged, **example_kwargs)
    report.graph = spec
    return report


def _call_factory(spec: str):
    """Imports MODULE:FACTORY, calls it, and checks it returned (model, args[, kwargs])."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise CliError(f"expected MODULE:FACTORY such as mypkg.models:make_model, got {spec!r}")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` would: factories next to the user's scripts
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise CliError(f"cannot import module {module_name!r} (from {spec!r}): no module named {exc.name!r}; "
                           f"is its directory the current one or on PYTHONPATH?") from None
        raise
    factory = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise CliError(f"module {module_name!r} has no attribute {attr!r} (from {spec!r})")
        factory = getattr(factory, part)
    if not callable(factory):
        raise CliError(f"{spec!r} is a {type(factory).__name__}, expected a function returning (model, args)")
    result = factory()

    import torch

    if not isinstance(result, (tuple, list)) or len(result) not in (2, 3):
        raise CliError(f"{spec}() returned {_describe(result)}, expected (model, args) or (model, args, kwargs)")
    model, example_args, example_kwargs = (*result, {}) if len(result) == 2 else result
    if not isinstance(model, torch.nn.Module):
        raise CliError(f"{spec}() returned {_describe(model)} as the model, expected a torch.nn.Module")
    if isinstance(example_args, torch.Tensor):
        example_args = (example_args,)
    if not isinstance(example_args, (tuple, list)):
        raise CliError(f"{spec}() returned {_describe(example_args)} as the example inputs, expected a tuple")
    if not isinstance(example_kwargs, dict):
        raise CliError(f"{spec}() returned {_describe(example_kwargs)} as the keyword inputs, expected a dict")
    return model, tuple(example_args), example_kwargs


def _sites(count: int) -> str:
    return f"{count} LoRA site" + ("" if count == 1 else "s")


def _describe(value) -> str:
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}"
    return f"a {type(value).__name__}"


# --- regions -------------------------------------------------------------------------------
def _run_regions(args) -> int:
    from .inspection import regions

    tokens = args.tokens or list(regions.DEFAULT_TOKENS)
    ranks = args.ranks or list(regions.DEFAULT_RANKS)
    output = args.output or (None if args.json else "regions.png")
    try:
        if output is None:
            grid = regions.region_grid(args.in_features, args.out_features, tokens, ranks,
                                       allow_merged=args.allow_merged)
        else:
            grid = regions.plot_regions(args.in_features, args.out_features, tokens, ranks, output,
                                        allow_merged=args.allow_merged)
    except (ImportError, ValueError) as exc:
        raise CliError(str(exc)) from None
    if output is not None:
        plans = ", ".join(f"{pair}: {cells}" for pair, cells in grid["plans"].items())
        print(f"{_PROG}: wrote {output} ({len(ranks)} ranks x {len(tokens)} token counts; {plans})",
              file=sys.stderr if args.json else sys.stdout)
    if args.json:
        import json

        print(json.dumps(grid, indent=2))
    return 0


# --- argument types ------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _grid(text: str) -> list[int]:
    """'64,256,1024' or the doubling range '64..131072'; strictly increasing positive ints."""
    if ".." in text:
        lo, _, hi = text.partition("..")
        start, stop = _positive_int(lo), _positive_int(hi)
        if stop < start:
            raise argparse.ArgumentTypeError(f"range {text!r} runs backwards; expected LOW..HIGH")
        values = []
        while start <= stop:
            values.append(start)
            start *= 2
    else:
        values = [_positive_int(part.strip()) for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected a comma list or LOW..HIGH, got {text!r}")
    if any(b <= a for a, b in zip(values, values[1:])):
        raise argparse.ArgumentTypeError(f"expected increasing values, got {text!r}")
    return values


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("runlora_fx")
    except Exception:  # noqa: BLE001 - a version string is cosmetic
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
