"""Whether ``@first`` / ``@last`` reach the model's first and last products with a weight.

``@first`` and ``@last`` stand for the first and last weight layer in module order (``resolve.Resolution``):
layers ``convert`` swaps and the weight layers the op-level emulation quantizes. A product with a weight that no
such layer runs (``F.linear(h, self.head)`` in a module's forward, a hand-written head ``h @ self.w``) is not one
of them, so a model whose forward multiplies by a weight before its ``@first`` layer runs, or after its ``@last``
layer has run, keeps those products under the policy's formats while the overrides meant for the model's edges
(WRPN's fp32 first and last layers, the nvfp4 preset's bf16 head, Park's classifier rule) land on an inner
layer. :class:`EdgeCheck` watches the first forward and names such products, so that this is never silent.
"""

from __future__ import annotations

from .resolve import Resolution

__all__ = ["EdgeCheck"]


class EdgeCheck:
    """Records, during one forward, the products with a weight (op-level linear, convolution and matmul calls
    with a Parameter operand) that run outside every weight layer before the ``@first`` layer is entered or after
    the ``@last`` layer has returned, where the policy has ``@first`` / ``@last`` overrides (``@last`` also under
    the classifier rule)."""

    def __init__(self, resolution: Resolution) -> None:
        patterns = {pattern for pattern, _ in resolution.policy.overrides}
        self.first, self.last = resolution.first, resolution.last
        self.layers = frozenset(resolution.layers)
        self.watch_first = self.first is not None and "@first" in patterns
        self.watch_last = self.last is not None and ("@last" in patterns or resolution.policy.classifier_rule)
        self.start()

    def start(self) -> None:
        """A new forward."""
        self.first_entered = self.last_returned = False
        self.outside: dict[tuple[str, str, str], set[int]] = {}  # (edge, module, op) -> parameter ids

    def enter(self, name: str) -> None:
        if name == self.first:
            self.first_entered = True

    def exit(self, name: str) -> None:
        if name == self.last:
            self.last_returned = True

    def product(self, module: str, op: str, parameters: set[int]) -> None:
        """A product with the weights ``parameters`` (ids) ran in ``module``'s forward."""
        if not parameters or module in self.layers:
            return
        for edge, outside in (("@first", self.watch_first and not self.first_entered),
                              ("@last", self.watch_last and self.last_returned)):
            if outside:
                self.outside.setdefault((edge, module, op), set()).update(parameters)

    def messages(self, names: dict[int, str]) -> list[str]:
        """One message per product found (``names``: parameter id -> qualified name)."""
        out = []
        for (edge, module, op), ids in self.outside.items():
            layer, when = (self.first, "before it runs") if edge == "@first" else (self.last, "after it has run")
            params = ", ".join(sorted(names.get(i, "?") for i in ids))
            out.append(
                f"{edge} stands for the weight layer {layer!r}, but {op} in {module or '(root)'} multiplies by "
                f"{params} {when}: the policy's {edge} overrides do not reach that product. Make it a layer "
                f"(nn.Linear, nn.Conv2d) or give it an override of its own (by module, or 'op:{op}: ...')"
            )
        return out
