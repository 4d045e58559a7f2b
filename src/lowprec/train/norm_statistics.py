"""``RunningStatistics``: batch-norm running statistics that a skipped step's forward made inf/NaN, put back.

A step is skipped when its loss or gradients are not finite; its forward has already run, and a batch-norm in
training mode has already moved its running mean and variance by that batch (as under torch.amp). Where the
batch held NaN or inf (or overflowed a float16 activation), those statistics are now NaN or inf, and every
later evaluation of the model (which normalises by them) gives NaN, although training goes on. The Trainer
keeps a copy of every batch-norm's running statistics as the last step taken left them, and after a skipped
step puts back those of each module whose running mean or variance is no longer finite (with its
``num_batches_tracked``); finite statistics stay as the forward left them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

__all__ = ["RunningStatistics"]


def _statistics(module: _NormBase) -> list[Tensor]:
    return [t for t in (module.running_mean, module.running_var, module.num_batches_tracked) if t is not None]


class RunningStatistics:
    """The running statistics of ``model``'s batch norms (every ``_NormBase`` that tracks them: BatchNorm1d/2d/3d,
    SyncBatchNorm, lowprec's QBatchNorm, InstanceNorm with ``track_running_stats``) as of ``keep()``."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = [m for m in model.modules() if isinstance(m, _NormBase) and m.track_running_stats
                        and m.running_mean is not None]
        self.kept = [[t.detach().clone() for t in _statistics(m)] for m in self.modules]

    @torch.no_grad()
    def keep(self) -> None:
        """Copy the current statistics (after a step taken, or a checkpoint loaded)."""
        for module, kept in zip(self.modules, self.kept):
            current = _statistics(module)
            if any(k.shape != c.shape or k.device != c.device for k, c in zip(kept, current)):
                kept[:] = [c.detach().clone() for c in current]
            else:
                torch._foreach_copy_(kept, current)

    @torch.no_grad()
    def restore_nonfinite(self) -> list[nn.Module]:
        """After a skipped step: put back the kept statistics of each module whose running mean or variance holds
        inf or NaN; returns those modules."""
        if not self.modules:
            return []
        flags = torch.stack([~(torch.isfinite(m.running_mean).all() & torch.isfinite(m.running_var).all())
                             for m in self.modules]).tolist()  # one host sync
        restored = []
        for module, kept, bad in zip(self.modules, self.kept, flags):
            if bad:
                torch._foreach_copy_(_statistics(module), kept)
                restored.append(module)
        return restored
