"""A Hugging Face model under a lowprec policy: a tiny GPT-2 built from its config (nothing downloaded).

    pip install 'lowprec[hf]'
    python examples/hf_model.py --policy native-bf16 --steps 20
"""

import argparse
import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import lowprec as lp


def main(argv=None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="mixed-bf16", help="preset, policy string or Policy")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    tokens = torch.randint(0, 128, (8, 32))  # stand-in data: any token batch works the same way
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = lp.GradScaler(args.policy, model, optimizer)  # converts the model in place
    losses = []
    for _ in range(args.steps):
        with lp.autocast(scaler):
            loss = model(input_ids=tokens, labels=tokens).loss
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
    print(f"{args.policy}: loss {losses[0]:.3f} -> {losses[-1]:.3f}")

    with tempfile.TemporaryDirectory() as path:  # saved as stored; load in fp32 (native: fp32 norms), convert
        model.save_pretrained(path)
        reloaded = lp.convert(GPT2LMHeadModel.from_pretrained(path, dtype=torch.float32), args.policy)
    print("reloaded and converted again:", type(reloaded).__name__)
    return losses


if __name__ == "__main__":
    main()
