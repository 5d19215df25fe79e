"""Re-ID methods (meta-architectures): one file per method, built by name."""

from reidkit.methods.base import ReIDMethod, available_methods, build_method, register_method

__all__ = ["ReIDMethod", "available_methods", "build_method", "register_method"]
