"""Data-parallel training: two CPU processes under torchrun (gloo) agree on skips, scale and exponents."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import lowprec as lp
from lowprec.experiments import load_checkpoint
from lowprec.train import distributed

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import distributed_worker as worker  # noqa: E402


def torchrun(script: Path, *args: str, nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``script`` in ``nproc`` processes on this machine (rendezvous on a free localhost port), on the MNIST
    subset shipped with lowprec, without torch.compile (its warm-up would dominate these tiny runs). No restarts:
    a failure shows as itself. The workers end through ``distributed.leave``, so a loaded machine cannot turn a
    finished run into a failed one at teardown; the timeout is generous for the same reason."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LOWPREC_COMPILE": "0", "LOWPREC_DATA": "/nonexistent"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "--max-restarts=0", str(script), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    causes = [line for line in (done.stdout + done.stderr).splitlines() if "[rank" in line or "terminate" in line]
    assert done.returncode == 0, "\n".join(causes[-60:]) or done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def ddp_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    torchrun(HERE / "distributed_worker.py", str(out))
    return out


@pytest.fixture(scope="module")
def ranks(ddp_out):
    return [torch.load(ddp_out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def _pooled_rule(r: int, counters: list[torch.Tensor], max_rate: float) -> int:
    """Courbariaux's rule on the counters summed over the ranks, in DynamicExponent.update's arithmetic."""
    total = sum(counters)
    rate_r, rate_below = (total[:2].float() / int(total[2])).tolist()
    return r + 1 if rate_r > max_rate else r if rate_below > max_rate else r - 1


def test_an_inf_on_one_rank_skips_the_step_on_both(ranks):
    steps = [[s["skipped"] for s in rank["agreement"]["steps"]] for rank in ranks]
    expected = [step in (worker.INF_DATA_STEP, worker.INF_GRAD_STEP) for step in range(worker.STEPS)]
    assert steps[0] == steps[1] == expected
    # the gradient inf was written on rank 1 after DDP's all-reduce: only the agreement tells rank 0
    assert ranks[0]["agreement"]["steps"][worker.INF_GRAD_STEP]["overflow_modules"] == ("0.weight",)
    assert ranks[0]["agreement"]["steps"] == ranks[1]["agreement"]["steps"]


def test_ranks_keep_identical_weights_and_scaler_state(ranks):
    a, b = (rank["agreement"] for rank in ranks)
    assert a["weights"].keys() == b["weights"].keys()
    for key, value in a["weights"].items():
        assert torch.equal(value, b["weights"][key]), key
    assert a["scaler"] == b["scaler"]
    # one backoff per skipped step from 2**10; never 3 clean steps in a row (growth_interval 3), so no growth
    assert [s["scale"] for s in a["steps"]] == [2.0**10] * 3 + [2.0**9] * 3 + [2.0**8] * 2
    assert a["scaler"]["scale"] == 2.0**8 and a["scaler"]["growth_tracker"] == 2


def test_exponents_move_by_the_overflow_rate_pooled_over_ranks(ranks):
    a, b = (rank["agreement"] for rank in ranks)
    assert a["exponents"] == b["exponents"] and a["trainer_exponents"] == b["trainer_exponents"]
    max_rate = lp.Policy.parse(worker.POLICY).max_overflow_rate
    checked = decided_by_pooling = 0
    for step in range(worker.STEPS):
        after = a["before_update"][step + 1] if step + 1 < worker.STEPS else a["exponents"]
        for group, (r, counters) in a["before_update"][step].items():
            other_r, other_counters = b["before_update"][step][group]
            assert r == other_r, (step, group)
            if r is None or counters[2] < 2:  # never started, or its interval is not complete
                continue
            mine, theirs = torch.tensor(counters), torch.tensor(other_counters)
            new = _pooled_rule(r, [mine, theirs], max_rate)
            assert after[group][0] == new, (step, group)
            checked += 1
            decided_by_pooling += _pooled_rule(r, [mine], max_rate) != _pooled_rule(r, [theirs], max_rate)
    assert checked >= 20
    assert decided_by_pooling >= 1  # alone, the two ranks would have moved this exponent differently


def test_quantized_allreduce_hook_averages_in_the_format(ranks):
    a, b = (rank["hook"] for rank in ranks)
    for reduced, expected, other in zip(a["reduced"], a["expected"], b["reduced"]):
        assert torch.equal(reduced, expected)
        assert torch.equal(reduced, other)
        assert torch.equal(reduced, reduced.bfloat16().float())


class FunctionalNet(torch.nn.Module):
    """A linear layer, then a functional matmul by a parameter: the matmul's quantizers are made by the op
    emulation at the first forward, after the Trainer was built."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.first = torch.nn.Linear(6, 8)
        self.head = torch.nn.Parameter(torch.randn(8, 3) * 0.3)

    def forward(self, x):
        return torch.relu(self.first(x)) @ self.head


def _functional_ops_on_rank(rank: int, policy: str) -> dict:
    model = lp.convert(FunctionalNet(), policy)
    trainer = lp.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.05), policy)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    for x, y in worker.local_batches(rank)[:4]:  # each rank its own data, of its own scale
        trainer.step(F.cross_entropy(ddp(x).float(), y))
    return {"quantizers": {f"{n}:{r}": q.state_dict() for n, r, q in lp.nn.quantizers(model)},
            "weights": {k: v.clone() for k, v in model.state_dict().items()}}


@pytest.mark.parametrize("policy", ["fp8-delayed", worker.POLICY], ids=["fp8-delayed", "dfx-overflow-auto"])
def test_functional_ops_quantizers_made_after_the_trainer_agree_across_ranks(policy):
    """The amax histories and dfx exponents (start exponents from each rank's first tensor, then the pooled
    overflow rule) of a functional op's quantizers, which the model makes at its first forward, agree across
    ranks as the swapped layers' do: on each rank alone they would differ (the ranks' data differ in scale)."""
    from ranks import assert_identical, run_ranks

    a, b = run_ranks(_functional_ops_on_rank, policy)
    assert any(":matmul[0]:" in k for k in a["quantizers"])
    assert_identical(a, b)


def _trainer_before_the_group(rank: int, store: str) -> str:
    """Leave the group run_ranks made, build a Trainer, join a new group, step: the error, then the step of a
    Trainer built after the group (which agrees)."""
    dist.destroy_process_group()
    model = lp.convert(worker.mlp(), "mixed-fp16")
    early = lp.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), "mixed-fp16")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    x, y = worker.local_batches(rank)[0]
    message = "no error"
    try:
        early.step(F.cross_entropy(model(x).float(), y))
    except RuntimeError as err:
        message = str(err)
    late = lp.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), "mixed-fp16")
    assert late.distributed and not late.step(F.cross_entropy(model(x).float(), y)).skipped
    return message


def _accumulated_under_no_sync(rank: int, policy: str) -> dict:
    """Two steps of two micro-batches each, the first under DDP's ``no_sync()`` (what Lightning, accelerate and
    transformers do for gradient accumulation): the all-reduce comes with the second backward only."""
    model = lp.convert(worker.mlp(), policy)
    trainer = lp.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.05), policy)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    batches = worker.local_batches(rank)
    for step in range(2):
        (x1, y1), (x2, y2) = batches[2 * step], batches[2 * step + 1]
        with ddp.no_sync():
            trainer.backward(F.cross_entropy(ddp(x1).float(), y1) / 2)
        trainer.backward(F.cross_entropy(ddp(x2).float(), y2) / 2)
        assert not trainer.apply_update().skipped
    return {"weights": {k: v.clone() for k, v in model.state_dict().items()},
            "masters": [s.holder.detach().clone() for s in trainer.slots]}


@pytest.mark.parametrize("policy", ["native-bf16", "mixed-fp16"])
def test_gradient_accumulation_under_no_sync_keeps_the_ranks_identical(policy):
    """A native model's micro-batch gradients moved into the fp32 master copies between backward passes: under
    ``no_sync`` the first pass's never reached the all-reduce, and each rank's weights took its own (they
    differed after one step). Under torch.distributed they now accumulate on the parameters until the step."""
    from ranks import assert_identical, run_ranks

    a, b = run_ranks(_accumulated_under_no_sync, policy)
    assert_identical(a, b)
    assert not torch.equal(a["weights"]["0.weight"].float(), worker.mlp().state_dict()["0.weight"])


def _scaler_before_the_group(rank: int, store: str) -> dict:
    """A GradScaler without its optimizer built before the group (the Trainer comes at the first step), then a
    forward under DDP in which each rank's dfx groups choose their start exponents from its own batch."""
    dist.destroy_process_group()
    model = lp.convert(FunctionalNet(), worker.POLICY)
    scaler = lp.GradScaler(worker.POLICY, model)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    for x, y in worker.local_batches(rank)[:4]:
        scaler.scale(F.cross_entropy(ddp(x).float(), y)).backward()
        scaler.step(optimizer)
        scaler.update()
    return {f"{n}:{r}": q.state_dict() for n, r, q in lp.nn.quantizers(model)}


def test_start_exponents_chosen_before_the_trainer_was_built_agree_across_ranks(tmp_path):
    """The Trainer built at the first step agrees the start exponents that forward chose (MAX over the ranks)."""
    from ranks import assert_identical, run_ranks

    a, b = run_ranks(_scaler_before_the_group, str(tmp_path / "store"))
    assert any(":matmul[0]:" in k for k in a) and any(q["exponent"] is not None for q in a.values())
    assert_identical(a, b)


def test_a_trainer_built_before_the_process_group_is_refused_at_its_step(tmp_path):
    """Its ranks would each decide alone (no agreement was set up): the step raises, naming the fix."""
    from ranks import run_ranks

    for message in run_ranks(_trainer_before_the_group, str(tmp_path / "store")):
        assert message.startswith("apply_update(): this lowprec.Trainer was built before torch.distributed's")
        assert "its 2 processes would each decide alone" in message and "after init_process_group" in message


def test_without_a_process_group_everything_is_local():
    assert not distributed.is_initialized()
    assert (distributed.rank(), distributed.world_size()) == (0, 1)
    order = torch.randperm(10)
    assert distributed.shard(order) is order
    model = lp.convert(torch.nn.Linear(3, 2), "weight=dfx<8>")
    trainer = lp.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), "weight=dfx<8>")
    assert not trainer.distributed and trainer.scaler.agree is None
    g = lp.DynamicExponent("dfx<8>", int_bits=3, interval=1)
    g.observe(torch.ones(4) * 100)
    before = g.counters()
    distributed.sum_exponent_counters([g])
    assert torch.equal(g.counters(), before)


@pytest.mark.parametrize("n, world", [(10, 2), (10, 3), (1, 4), (12, 4)])
def test_shards_are_equal_sized_and_cover_the_order(monkeypatch, n, world):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(distributed, "world_size", lambda: world)
    parts = []
    for r in range(world):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        parts.append(distributed.shard(order))
    assert len({len(p) for p in parts}) == 1 and len(parts[0]) == -(-n // world)
    assert set(torch.cat(parts).tolist()) == set(order.tolist())
    assert torch.equal(torch.stack(parts, 1).reshape(-1)[:n], order)  # interleaved, as DistributedSampler


def test_exponent_counters_round_trip():
    g = lp.DynamicExponent("dfx<8>", int_bits=2, interval=4)
    assert g.counters().tolist() == [0.0, 0.0, 0.0] and not g.due
    for x in (torch.tensor([5.0, 0.5]), torch.tensor([1.0, 1.99]), torch.empty(0)):
        g.observe(x)
    counters = g.counters()
    assert counters.tolist() == [0.5, 1.0, 3.0]  # the empty batch counts, with no overflow
    h = lp.DynamicExponent("dfx<8>", int_bits=2, interval=4)
    h.set_counters(counters * 2)  # as if a second rank had seen the same
    assert h.batches == 6 and h.due and h.update() and h.int_bits == 3


def test_runner_resumes_a_two_rank_run_bit_exactly(ranks, ddp_out):
    a, b = (rank["runs"] for rank in ranks)
    assert a == b  # every rank logs the mean loss over the ranks
    assert a["resumed"] == a["full"] and len(a["full"]) == 6
    full, cut = (load_checkpoint(ddp_out / d / "checkpoint.pt") for d in ("full", "cut"))
    assert full["identity"]["world_size"] == 2 and full["next_step"] == cut["next_step"] == 6
    for key, value in full["trainer"]["model"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, cut["trainer"]["model"][key]), key
    assert full["trainer"]["scaler"] == cut["trainer"]["scaler"]
    assert (ddp_out / "cut" / "metrics.csv").read_text().count("\n") == 3


def test_cli_nproc_launches_ranks_and_a_one_process_resume_is_refused(tmp_path, capsys, monkeypatch):
    from lowprec.cli import main

    args = ["train", "--recipe", "int8", "--epochs", "1", "--train-limit", "128", "--test-limit", "50",
            "--out", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LOWPREC_COMPILE": "0", "LOWPREC_DATA": str(tmp_path / "none")}
    done = subprocess.run([sys.executable, "-m", "lowprec", *args, "--nproc", "2", "--allreduce-format", "grad"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes" in done.stdout and done.stdout.count("test acc") == 1  # rank 0 alone prints
    state = load_checkpoint(tmp_path / "int8" / "checkpoint.pt")
    assert state["identity"]["world_size"] == 2 and state["next_step"] == 1  # 64 examples a rank: one step
    assert state["identity"]["allreduce_format"] == "grad"  # int8's gradient format, dfx<8>
    monkeypatch.setenv("LOWPREC_DATA", env["LOWPREC_DATA"])
    assert main([*args, "--resume", "--allreduce-format", "grad"]) == 2
    assert "world_size: checkpoint 2, this run 1" in capsys.readouterr().err
    assert main(["train", "--recipe", "fp32", "--allreduce-format", "grad", "--epochs", "1"]) == 2
    assert "the policy leaves weight_grad in float32" in capsys.readouterr().err
    assert main(["train", "--nproc", "0"]) == 2
    assert "--nproc must be at least 1" in capsys.readouterr().err


def test_fsdp_shards_a_native_bf16_model_and_agrees_on_skips(ranks):
    a, b = (rank["fsdp"] for rank in ranks)
    expected = [step == worker.INF_SHARD_STEP for step in range(worker.FSDP_STEPS)]
    assert a["skipped"] == b["skipped"] == expected  # the inf sat in rank 1's shard only
    assert set(a["dtypes"]) == {torch.bfloat16}
    for mine, theirs in zip(a["masters"] + a["weights"], b["masters"] + b["weights"]):
        assert torch.equal(mine, theirs)
    # one process on both ranks' batches, the skipped step left out, trains the same float32 masters (up to the
    # order of the float32 gradient sums)
    model = lp.convert(worker.mlp(), "native-bf16")
    trainer = lp.Trainer(model, torch.optim.SGD(model.parameters(), lr=worker.FSDP_LR), "native-bf16")
    batches = list(zip(worker.local_batches(0), worker.local_batches(1)))[: worker.FSDP_STEPS]
    for step, ((x0, y0), (x1, y1)) in enumerate(batches):
        if step != worker.INF_SHARD_STEP:
            loss = (F.cross_entropy(model(x0), y0) + F.cross_entropy(model(x1), y1)) / 2
            assert not trainer.step(loss).skipped
    for sharded, single in zip(a["masters"], (s.holder for s in trainer.slots)):
        torch.testing.assert_close(sharded, single, rtol=0, atol=1e-6)


def test_a_worker_leaves_with_its_status_after_the_last_collective(tmp_path):
    """``leave`` flushes what the worker printed, ends the process group and exits with the given status without
    the interpreter's teardown (during which gloo's threads holding comm-hook tensors could abort it)."""
    code = textwrap.dedent("""
        import sys, torch, torch.distributed as dist
        from lowprec.train import distributed
        dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
        ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2))
        ddp.register_comm_hook(None, distributed.quantized_allreduce_hook("bf16"))
        ddp(torch.randn(3, 4)).sum().backward()
        print("trained", end="")  # block-buffered into a pipe: only a flush brings it out
        distributed.leave(3)
        print("never")
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "store")], capture_output=True, text=True,
                          timeout=120, env=env)
    assert (done.returncode, done.stdout) == (3, "trained"), done.stderr[-2000:]
    assert "terminate called" not in done.stderr


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text() if entry.isdigit() else ""
        except OSError:
            continue
        if stat and int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux's")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["sigkill", "sigint"])
def test_nproc_workers_end_with_their_launcher(tmp_path, sig):
    """A SIGKILLed launcher cannot stop its workers itself: the kernel ends them (PR_SET_PDEATHSIG), and they stop
    writing into --out. SIGINT (Ctrl-C) gives one line and exit 130. The directory's lock dies with them."""
    from lowprec.experiments.rundir import claim

    env = {**os.environ, "OMP_NUM_THREADS": "1", "LOWPREC_COMPILE": "0", "LOWPREC_DATA": str(tmp_path / "none"),
           "CI": "1"}
    out = tmp_path / "out"
    launcher = subprocess.Popen([sys.executable, "-m", "lowprec", "train", "--nproc", "2", "--epochs", "100",
                                 "--train-limit", "512", "--test-limit", "16", "--out", str(out)],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    workers = []
    try:
        deadline = time.monotonic() + 120
        while not (out / "fp32" / ".lock").exists() and launcher.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # rank 0 holds the run directory: both workers are up and training
        workers = _children(launcher.pid)
        assert len(workers) == 2 and launcher.poll() is None
        launcher.send_signal(sig)
        _, err = launcher.communicate(timeout=60)
        deadline = time.monotonic() + 30
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(w) for w in workers)
    finally:
        for pid in [launcher.pid, *workers]:  # whatever outlived the test
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    if sig == signal.SIGINT:
        assert launcher.returncode == 130
        assert err == "lowprec: interrupted (a run continues from its last checkpoint with --resume)\n"
    else:
        assert launcher.returncode == -signal.SIGKILL
    claim(out / "fp32", resume=True, overwrite=False).release()  # the lock went with the workers


def _rank_value(rank: int) -> int:
    return rank


def test_run_ranks_forms_the_group_again_when_it_never_formed(monkeypatch, tmp_path):
    """A gloo group that never formed (one rank's connection closed while the ranks met: seen on a loaded machine)
    is formed again, fn having run on no rank; a failure of fn itself is never retried (the other tests)."""
    import ranks

    marker = tmp_path / "failed-once"
    real = ranks.dist.init_process_group

    def flaky(*args, rank, **kwargs):
        if rank == 1 and not marker.exists():
            marker.touch()
            raise RuntimeError("Gloo connectFullMesh failed: Connection closed by peer")
        return real(*args, rank=rank, **kwargs)

    monkeypatch.setattr(ranks.dist, "init_process_group", flaky)
    assert ranks.run_ranks(_rank_value) == [0, 1] and marker.exists()
    marker.unlink()
    with pytest.raises(AssertionError, match="connectFullMesh"):
        ranks.run_ranks(_rank_value, attempts=1)
