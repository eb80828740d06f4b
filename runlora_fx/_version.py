"""The package version (one place: the install pass keys the compile caches on it)."""

__all__ = ["__version__"]

__version__ = "0.1.0"
