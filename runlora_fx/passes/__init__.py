"""The FX passes: ``normalize`` (dialect views), ``match`` (sites, legality), ``rewrite``."""

from .match import LoraSite, Rejection, find_sites, match_lora
from .rewrite import rewrite

__all__ = ["LoraSite", "Rejection", "find_sites", "match_lora", "rewrite"]
