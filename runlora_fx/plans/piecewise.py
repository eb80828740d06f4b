"""Plan strings: one plan name per range of the token count n.

A site's choice may depend on n (dynamic shapes), so the op's plan argument is piecewise:
``"forward1|741:forward2"`` runs forward1 for n < 741 and forward2 from 741 on. ``parse_plan``
reads such a string and ``resolve_plan`` turns it into a catalogue record at a concrete n,
inside the op: no guard, no recompile.
"""

from __future__ import annotations

import dataclasses
import functools

import sympy

from .catalogue import backward_plan, forward_plan

__all__ = ["PiecewisePlan", "parse_plan", "resolve_plan"]


@dataclasses.dataclass(frozen=True)
class PiecewisePlan:
    """A plan name per range of n: ``pieces[k] = (min_n, name)``, ascending, first min_n = 0.

    ``str()`` gives the op's plan argument: ``"forward1"`` or ``"forward1|741:forward2"``.
    """

    pieces: tuple[tuple[int, str], ...]

    def at(self, n_value: int) -> str:
        """The plan name for a concrete token count."""
        name = self.pieces[0][1]
        for min_n, piece in self.pieces[1:]:
            if n_value >= min_n:
                name = piece
        return name

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for _, name in self.pieces)

    @property
    def is_constant(self) -> bool:
        return len(self.pieces) == 1

    def as_sympy(self, n_expr: sympy.Expr) -> sympy.Piecewise:
        """The choice as a sympy Piecewise over n (plan names as symbols), for reports."""
        args = []
        for k in range(len(self.pieces) - 1, 0, -1):
            args.append((sympy.Symbol(self.pieces[k][1]), sympy.Ge(n_expr, self.pieces[k][0])))
        args.append((sympy.Symbol(self.pieces[0][1]), True))
        return sympy.Piecewise(*args)

    def __str__(self) -> str:
        head = self.pieces[0][1]
        tail = "".join(f"|{min_n}:{name}" for min_n, name in self.pieces[1:])
        return head + tail


@functools.lru_cache(maxsize=4096)
def parse_plan(spec: str) -> PiecewisePlan:
    """Parses an op plan argument (see ``PiecewisePlan``); raises ValueError if malformed."""
    parts = spec.split("|")
    pieces = [(0, parts[0])]
    for part in parts[1:]:
        min_n, sep, name = part.partition(":")
        if not sep or not min_n.isdigit():
            raise ValueError(f"malformed plan {spec!r}: expected 'name' or 'name|min_n:name...'")
        pieces.append((int(min_n), name))
    if any(b[0] <= a[0] for a, b in zip(pieces, pieces[1:])):
        raise ValueError(f"malformed plan {spec!r}: thresholds must increase")
    return PiecewisePlan(tuple(pieces))


def resolve_plan(spec: str, n_value: int, kind: str):
    """The ForwardPlan/BackwardPlan that ``spec`` names at token count ``n_value``."""
    name = parse_plan(spec).at(n_value)
    return forward_plan(name) if kind == "forward" else backward_plan(name)
