"""Removing lowprec's own forward and state-dict hooks from a module, found by what they are (so a deep copy works
too)."""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

__all__ = ["remove_forward_hooks", "remove_state_dict_hooks"]


def remove_forward_hooks(module: nn.Module, is_ours: Callable[[Any], bool]) -> None:
    """Delete every forward pre-hook and forward hook of ``module`` for which ``is_ours(hook)``, with its entries
    in torch's side tables (``with_kwargs``, ``always_call``)."""
    for hooks in (module._forward_pre_hooks, module._forward_hooks):
        for key in [k for k, h in hooks.items() if is_ours(h)]:
            del hooks[key]
            module._forward_hooks_always_called.pop(key, None)
            module._forward_hooks_with_kwargs.pop(key, None)
            module._forward_pre_hooks_with_kwargs.pop(key, None)


def remove_state_dict_hooks(module: nn.Module, is_ours: Callable[[Any], bool]) -> None:
    """Delete every ``state_dict`` post-hook and ``load_state_dict`` pre-hook of ``module`` for which
    ``is_ours(hook)`` (a pre-hook registered with its module is looked at through torch's wrapper)."""
    for hooks in (module._state_dict_hooks, module._load_state_dict_pre_hooks):
        for key in [k for k, h in hooks.items() if is_ours(getattr(h, "hook", h))]:
            del hooks[key]
