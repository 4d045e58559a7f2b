"""A torch.amp-style training loop under any lowprec policy: only the two precision lines differ from torch.amp.

    python examples/amp_loop.py --policy int8-lazy --steps 50
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import lowprec as lp


def main(argv=None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="mixed-fp16", help="preset, policy string or Policy (default mixed-fp16)")
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    x = torch.randn(256, 20)
    y = (x[:, :5].sum(1) > 0).long()  # a learnable two-class problem
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    scaler = lp.GradScaler(args.policy, model, optimizer)  # torch.amp: torch.amp.GradScaler()
    losses = []
    for step in range(args.steps):
        batch = slice(step * 32 % 256, step * 32 % 256 + 32)
        optimizer.zero_grad()
        with lp.autocast(scaler):  # torch.amp: torch.autocast("cpu", dtype=torch.bfloat16)
            loss = F.cross_entropy(model(x[batch]), y[batch])
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        scaler.clip_grad_norm_(5.0)
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
        if scaler.last_result.skipped:
            print(f"step {step}: skipped, overflow in {', '.join(scaler.last_result.overflow_modules)}")
    print(f"{args.policy}: loss {losses[0]:.3f} -> {losses[-1]:.3f}, loss scale {scaler.get_scale():g}")
    return losses


if __name__ == "__main__":
    main()
