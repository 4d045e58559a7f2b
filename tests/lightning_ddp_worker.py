"""One rank of a 2-process Lightning DDP run (gloo, CPU) under the lowprec plugin; run by torchrun from
tests/test_integrations_lightning.py. Rank 1 alone gets an inf loss at INF_STEP. Writes rank<r>.pt to argv[1]."""

import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
from integration_setup import INF_STEP, batches  # noqa: E402
from lightning_module import Module  # noqa: E402

from lowprec.integrations.lightning import LowprecPrecision  # noqa: E402


def main(out: Path, policy: str) -> None:
    data = batches(2 * (INF_STEP + 1))  # each rank sees every other sample: INF_STEP + 1 steps of 6
    x, y = torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data])
    plugin = LowprecPrecision(policy)
    module = Module(inf_rank=1)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, plugins=[plugin], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=6))
    state = plugin.scaler.trainer.state_dict()
    torch.save({"net": module.net.state_dict(), "scaler": state["scaler"], "skipped": plugin.skipped_steps,
                "steps": state["steps"]}, out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
