"""Re-ID methods (meta-architectures): one file per method, built by name."""

from reidkit.methods.base import (
    Batch,
    EvalExtras,
    MethodOptions,
    MethodSpec,
    MissingBatchKeyError,
    ReIDMethod,
    ReportView,
    all_method_specs,
    available_methods,
    build_method,
    check_requirements,
    method_options,
    method_spec,
    register_method,
)

__all__ = [
    "Batch",
    "EvalExtras",
    "MethodOptions",
    "MethodSpec",
    "MissingBatchKeyError",
    "ReIDMethod",
    "ReportView",
    "all_method_specs",
    "available_methods",
    "build_method",
    "check_requirements",
    "method_options",
    "method_spec",
    "register_method",
]
