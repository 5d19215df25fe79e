"""The meta-architecture contract every method follows, and the method registry.

A method is an ``nn.Module`` built from a :class:`~reidkit.config.Config` and the number
of training identities. The engine only relies on this contract:

- ``forward(images)`` in training mode returns a dict of named tensors (``logits``,
  ``global_feat``, ...); in eval mode it returns the test feature ``(B, D)``
  (``forward_features`` gives the dict of alternatives, e.g. ``pre_bn``/``post_bn``).
- ``compute_loss(outputs, pids)`` returns a dict of named scalar losses; the engine
  optimises their sum and logs each term.
- optional hooks: ``on_epoch_start(epoch, max_epochs)``, ``on_step_end(outputs, pids)``
  (e.g. CGE's memory write, done after the optimiser step),
  ``classifier_parameters()`` (the classifier-only warm phase),
  ``aux_parameters()`` (parameters with their own optimiser, e.g. center loss).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from reidkit.config import Config

_METHODS: dict[str, Callable[[Config, int], ReIDMethod]] = {}


def register_method(name: str) -> Callable:
    def deco(builder: Callable[[Config, int], ReIDMethod]):
        if name in _METHODS:
            raise ValueError(f"method '{name}' registered twice")
        _METHODS[name] = builder
        return builder

    return deco


def available_methods() -> list[str]:
    _import_all()
    return sorted(_METHODS)


def build_method(cfg: Config, num_classes: int) -> ReIDMethod:
    """Build the method named by ``cfg.model.name`` for ``num_classes`` train identities."""
    _import_all()
    name = cfg.model.name
    if name not in _METHODS:
        import difflib

        close = difflib.get_close_matches(name, list(_METHODS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ValueError(
            f"model.name: unknown method '{name}'{hint} (available: {', '.join(sorted(_METHODS))})"
        )
    return _METHODS[name](cfg, num_classes)


def _import_all() -> None:
    # Importing the modules runs their @register_method decorators.
    import importlib
    import pkgutil

    import reidkit.methods as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name != "base":
            importlib.import_module(f"reidkit.methods.{info.name}")


class ReIDMethod(nn.Module):
    """Base class with no-op hooks; subclasses implement forward and compute_loss."""

    def compute_loss(
        self, outputs: dict[str, torch.Tensor], pids: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def on_epoch_start(self, epoch: int, max_epochs: int) -> None:  # noqa: B027
        pass

    def on_step_end(self, outputs: dict[str, torch.Tensor], pids: torch.Tensor) -> None:  # noqa: B027
        pass

    def classifier_parameters(self) -> Iterator[nn.Parameter]:
        return iter(())

    def aux_parameters(self) -> Iterator[nn.Parameter]:
        return iter(())
