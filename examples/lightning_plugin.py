"""Lightning under any lowprec policy: pass the precision plugin instead of a precision string.

    pip install 'lowprec[lightning]'
    python examples/lightning_plugin.py --policy int8-lazy --epochs 3
"""

import argparse

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lowprec.integrations.lightning import LowprecPrecision


class Classifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 2))
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.losses.append(loss.item())
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def main(argv=None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="int8-lazy", help="preset, policy or recipe string")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    x = torch.randn(256, 20)
    data = DataLoader(TensorDataset(x, (x[:, :5].sum(1) > 0).long()), batch_size=32)
    model = Classifier()
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", plugins=[LowprecPrecision(args.policy)],
                        logger=False, enable_checkpointing=False, enable_model_summary=False,
                        enable_progress_bar=False)
    trainer.fit(model, data)
    print(f"{args.policy}: loss {model.losses[0]:.3f} -> {model.losses[-1]:.3f}, skipped steps "
          f"{trainer.precision_plugin.skipped_steps}")
    return model.losses


if __name__ == "__main__":
    main()
