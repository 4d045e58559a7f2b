"""One rank of the two-process run in test_distributed.py (launched by torchrun, gloo backend).

Usage: python -m torch.distributed.run --standalone --nproc_per_node 2 distributed_worker.py OUT_DIR

Phase 1 trains a converted MLP under DDP with a dynamic loss scale and dynamic fixed point gradients (overflow
rule, interval 2, start exponents from the first tensor), each rank on its own data. Rank 1 alone gets an inf in
its input at step INF_DATA_STEP (DDP's all-reduce spreads it) and an inf written into one of its gradients after
the all-reduce at step INF_GRAD_STEP (only lowprec's agreement can spread that one). Phase 2 averages gradients
through ``quantized_allreduce_hook("bf16")`` and records what each rank expects from its neighbour's local
gradients. Phase 3 trains a task with the runner three times (uninterrupted; interrupted on every rank after
step STOP_STEP; resumed) with checkpoints every 2 steps. Phase 4 shards a native-bf16 model with FSDP
(``fully_shard``) and writes an inf into rank 1's shard of one gradient at step INF_SHARD_STEP. Each rank writes
OUT_DIR/rank<r>.pt.
"""

import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

import lowprec as lp
from lowprec.experiments import get_task, load_task_data, parse_recipe, run
from lowprec.train import distributed

STEPS = 8
INF_DATA_STEP = 2
INF_GRAD_STEP = 5
# 95 examples a rank: 3 steps an epoch, the last of 31 examples
RUN_TASK = replace(get_task("mnist-lenet"), epochs=2, train_limit=190, test_limit=50, batch_size=32)
STOP_STEP = 4
FSDP_STEPS, INF_SHARD_STEP, FSDP_LR = 4, 2, 0.05
POLICY = ("weight=dfx<8>,activations=fp16,output_grad=dfx<10>,activation_grad=dfx<10>,weight_grad=dfx<10>,"
          "master=dfx<12>,exponent_rule=overflow,exponent_interval=2,init_int_bits=auto,max_overflow_rate=0.01")


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def local_batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data, of its own scale
    return [(torch.randn(8, 6, generator=g) * (1 + 3 * rank), torch.randint(0, 3, (8,), generator=g))
            for _ in range(STEPS)]


def layer_exponents(model: torch.nn.Module) -> dict[str, tuple[int | None, list[float]]]:
    return {f"{name}:{role}": (q.exponent.int_bits, q.exponent.counters().tolist())
            for name, role, q in lp.nn.quantizers(model) if q.exponent is not None}


def train_with_agreement(rank: int) -> dict:
    model = lp.convert(mlp(), POLICY)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    trainer = lp.Trainer(model, optimizer, POLICY,
                         scaler=lp.LossScaler.dynamic(init=2.0**10, growth_interval=3))
    ddp = DDP(model)
    steps, before_update = [], []
    for step, (x, y) in enumerate(local_batches(rank)):
        if step == INF_DATA_STEP and rank == 1:
            x[0, 0] = float("inf")
        trainer.backward(F.cross_entropy(ddp(x).float(), y))
        if step == INF_GRAD_STEP and rank == 1:
            model[0].weight.grad[0, 0] = float("inf")
        before_update.append(layer_exponents(model))
        result = trainer.apply_update()
        steps.append({"skipped": result.skipped, "scale": result.scale, "next_scale": result.next_scale,
                      "overflow_modules": result.overflow_modules})
    return {
        "steps": steps,
        "before_update": before_update,
        "exponents": layer_exponents(model),
        "trainer_exponents": {f"{n}:{r}": q.exponent.int_bits for n, r, q in trainer.quantizers()
                              if q.exponent is not None},
        "scaler": trainer.scaler.state_dict(),
        "weights": {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)},
    }


def quantized_hook_gradients(rank: int) -> dict:
    model = mlp()
    x, y = local_batches(rank)[0]
    F.cross_entropy(model(x), y).backward()
    local = [p.grad.clone() for p in model.parameters()]
    gathered = [[torch.empty_like(g) for _ in range(2)] for g in local]
    for g, out in zip(local, gathered):
        dist.all_gather(out, g)
    model.zero_grad()
    ddp = DDP(model)
    ddp.register_comm_hook(None, distributed.quantized_allreduce_hook("bf16"))
    F.cross_entropy(ddp(x), y).backward()
    bf16 = lambda t: t.bfloat16().float()  # noqa: E731
    return {
        "reduced": [p.grad.clone() for p in model.parameters()],
        "expected": [bf16(bf16(a / 2) + bf16(b / 2)) for a, b in gathered],
    }


class Interrupt(Exception):
    pass


def resumed_runs(out: Path) -> dict:
    data, recipe = load_task_data(RUN_TASK), parse_recipe("mixed-fp16")
    full = run(RUN_TASK, recipe, data, seed=2, out_dir=out / "full", checkpoint_every=2)

    def stop(step: int, _) -> None:
        if step == STOP_STEP:
            raise Interrupt

    try:
        run(RUN_TASK, recipe, data, seed=2, out_dir=out / "cut", checkpoint_every=2, after_step=stop)
    except Interrupt:
        pass
    resumed = run(RUN_TASK, recipe, data, seed=2, out_dir=out / "cut", checkpoint_every=2, resume=True)
    return {"full": full.losses, "resumed": resumed.losses}


def fsdp_native(rank: int) -> dict:
    model = lp.convert(mlp(), "native-bf16")
    reduce_fp32 = MixedPrecisionPolicy(reduce_dtype=torch.float32)  # average the bf16 gradients in float32
    for layer in (model[0], model[2]):
        fully_shard(layer, mp_policy=reduce_fp32)
    fully_shard(model, mp_policy=reduce_fp32)
    trainer = lp.Trainer(model, torch.optim.SGD(model.parameters(), lr=FSDP_LR), "native-bf16")
    skipped = []
    for step, (x, y) in enumerate(local_batches(rank)[:FSDP_STEPS]):
        trainer.backward(F.cross_entropy(model(x), y))
        if step == INF_SHARD_STEP and rank == 1:
            model[0].weight.grad.to_local()[0, 0] = float("inf")  # this rank's shard of 0.weight's grad (bf16)
        skipped.append(trainer.apply_update().skipped)
    return {
        "skipped": skipped,
        "dtypes": [p.dtype for p in model.parameters()],
        "masters": [s.holder.full_tensor() for s in trainer.slots],
        "weights": [p.full_tensor() for p in model.parameters()],
    }


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results = {"world_size": dist.get_world_size(), "agreement": train_with_agreement(rank),
               "hook": quantized_hook_gradients(rank), "runs": resumed_runs(out), "fsdp": fsdp_native(rank)}
    torch.save(results, out / f"rank{rank}.pt")
    distributed.leave(0)  # both ranks done, then out without an interpreter teardown that could abort


if __name__ == "__main__":
    main(Path(sys.argv[1]))
