"""The tiny LightningModule the Lightning integration tests train (imported only where lightning is installed)."""

from __future__ import annotations

import lightning as L

from integration_setup import sgd, step_loss, tiny_net


class Module(L.LightningModule):
    """``tiny_net`` trained by SGD on ``step_loss``: the loss at INF_STEP is inf, on every rank or (``inf_rank``)
    on that rank alone."""

    def __init__(self, inf_rank: int | None = None):
        super().__init__()
        self.net = tiny_net()
        self.inf_rank = inf_rank

    def forward(self, x):
        return self.net(x)

    def loss_step(self) -> int:
        """The step number ``step_loss`` sees: global_step (it counts skipped steps too), or -1 (never inf) on a
        rank other than ``inf_rank``."""
        return self.global_step if self.inf_rank in (None, self.global_rank) else -1

    def training_step(self, batch, batch_idx):
        return step_loss(self, batch, self.loss_step())

    def configure_optimizers(self):
        return sgd(self)
