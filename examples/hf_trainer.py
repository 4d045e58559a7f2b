"""transformers.Trainer under a lowprec policy: LowprecTrainer, a tiny GPT-2 from its config (nothing downloaded).

    pip install 'lowprec[hf]'
    python examples/hf_trainer.py --policy int8-lazy --steps 20
"""

import argparse
import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments
from transformers.utils import logging as hf_logging

from lowprec.integrations.hf import LowprecTrainer


def main(argv=None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="mixed-fp16", help="preset, policy string or recipe string")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    hf_logging.set_verbosity_error()

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64,
                                       bos_token_id=0, eos_token_id=0))
    tokens = torch.randint(0, 128, (8, 32))  # stand-in data: any tokenized dataset works the same way
    dataset = [{"input_ids": t, "labels": t} for t in tokens]
    with tempfile.TemporaryDirectory() as out:
        training = TrainingArguments(output_dir=out, max_steps=args.steps, per_device_train_batch_size=8,
                                     learning_rate=3e-3, logging_steps=1, save_strategy="no", report_to=[],
                                     use_cpu=True, disable_tqdm=True)
        trainer = LowprecTrainer(model=model, args=training, train_dataset=dataset, policy=args.policy)
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(f"{args.policy}: loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
          f"skipped steps {trainer.lowprec_skipped_steps}, loss scale {trainer.lowprec_scaler.get_scale():g}")
    return losses


if __name__ == "__main__":
    main()
