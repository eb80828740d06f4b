"""Every torch-version branch and every private torch API runlora_fx touches lives here."""

from __future__ import annotations

import torch

__all__ = ["TORCH_MIN", "TORCH_MAX_EXCLUSIVE", "check_torch_version", "detect_fake_mode", "size_hint", "torch_version"]

# Tested on 2.11 (GPU machine) and 2.13 (CPU CI). torch.library.custom_op with
# register_autograd / register_fake and ExportedProgram.run_decompositions() as used here
# exist from 2.5 on, but only the tested range is declared.
TORCH_MIN = (2, 11)
TORCH_MAX_EXCLUSIVE = (2, 14)


def torch_version(version: str | None = None) -> tuple[int, int]:
    """Returns (major, minor) of the given or installed torch version string."""
    text = (version or torch.__version__).split("+")[0]
    major, minor = text.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def check_torch_version(version: str | None = None) -> None:
    """Raises ImportError naming the supported range when torch is outside it."""
    found = torch_version(version)
    if not TORCH_MIN <= found < TORCH_MAX_EXCLUSIVE:
        lo = ".".join(map(str, TORCH_MIN))
        hi = ".".join(map(str, TORCH_MAX_EXCLUSIVE))
        raise ImportError(
            f"runlora_fx supports torch>={lo},<{hi}; found torch {version or torch.__version__}"
        )


def detect_fake_mode(tensors):
    """The FakeTensorMode the given tensors belong to, or None."""
    from torch._guards import detect_fake_mode as _detect

    return _detect(tensors)


def size_hint(size) -> int:
    """A concrete value for an int or SymInt (its size hint)."""
    if isinstance(size, torch.SymInt):
        node = size.node
        return int(node.shape_env.size_hint(node.expr)) if node.hint is None else int(node.hint)
    return int(size)
