"""lowprec under transformers.Trainer (``lowprec.integrations.hf.LowprecTrainer``): the same steps as a
``lowprec.GradScaler`` loop, clipping on unscaled gradients, skipped steps that hold the LR schedule, bit-exact
resume from transformers' own checkpoints; under two-process DDP (accelerate on gloo, forked ranks) every rank
skips the same steps and holds the same weights, loss scale, exponents and amax histories."""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from torch.utils.data import SequentialSampler  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback, TrainingArguments  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import lowprec as lp  # noqa: E402
from lowprec.integrations.hf import LowprecTrainer  # noqa: E402
from ranks import assert_identical, run_ranks  # noqa: E402

hf_logging.set_verbosity_error()
pytestmark = pytest.mark.filterwarnings("ignore:optimizer_state=dfx<8> with an Adam-type optimizer")

TOKENS = torch.randint(0, 64, (16, 16), generator=torch.Generator().manual_seed(0))
DATA = [{"input_ids": t, "labels": t} for t in TOKENS]
BATCH = 4


@pytest.fixture(autouse=True)
def _eager(monkeypatch):
    monkeypatch.setenv("LOWPREC_COMPILE", "0")


def gpt2() -> GPT2LMHeadModel:
    """A tiny GPT-2 without dropout (its masks would draw from the RNG in a different order in the two loops)."""
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                                      bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0))


class InOrder(LowprecTrainer):
    """Batches in dataset order and the model's mean loss (no token-count kwargs), as the reference loop."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False  # else the loss is divided by a token count of its own

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


def hf_args(tmp_path, steps: int, **kw) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=BATCH, learning_rate=1e-3,
                lr_scheduler_type="constant", report_to=[], use_cpu=True, logging_steps=1, save_strategy="no",
                seed=0, disable_tqdm=True, max_grad_norm=1.0)
    return TrainingArguments(**{**base, **kw})


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("policy", ["mixed-fp16", "int8-lazy", "fp8-delayed", "mixed-bf16+path=native"])
def test_steps_are_a_gradscaler_loops_steps_bit_for_bit(tmp_path, policy):
    model = gpt2()
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    trainer = InOrder(model=model, args=hf_args(tmp_path, 6), train_dataset=DATA, policy=policy,
                      optimizers=(adamw, None))
    trainer.train()
    hf_norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]

    ref = gpt2()
    optimizer = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.0)
    scaler = lp.GradScaler(policy, ref, optimizer)
    norms = []
    for i in range(6):
        x = TOKENS[(i * BATCH) % len(TOKENS):][:BATCH]
        loss = ref(input_ids=x, labels=x).loss
        scaler.scale(loss).backward()
        norms.append(float(scaler.clip_grad_norm_(1.0)))
        scaler.step(optimizer)
        scaler.update()
    got, want = weights(model), weights(ref)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert hf_norms == pytest.approx(norms, rel=0, abs=0)


def test_gradient_accumulation_scales_each_micro_batch_and_steps_once(tmp_path):
    model = gpt2()
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    args = hf_args(tmp_path, 2, gradient_accumulation_steps=2, per_device_train_batch_size=2)
    InOrder(model=model, args=args, train_dataset=DATA, policy="mixed-fp16", optimizers=(adamw, None)).train()

    ref = gpt2()
    optimizer = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.0)
    scaler = lp.GradScaler("mixed-fp16", ref, optimizer)
    for step in range(2):
        for micro in range(2):
            x = TOKENS[step * 4 + micro * 2:][:2]
            scaler.scale(ref(input_ids=x, labels=x).loss / 2).backward()
        scaler.clip_grad_norm_(1.0)
        scaler.step(optimizer)
        scaler.update()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), name


def test_logged_grad_norm_is_the_unscaled_norm(tmp_path):
    """Under a loss scale of 2**16 the norm transformers logs (and clips) is the gradients' own, within fp16
    rounding of a float32 reference, not 65536 times it (what accelerate's clip_grad_norm_ would see)."""
    model = gpt2()
    x = TOKENS[:BATCH]
    ref = gpt2()
    ref(input_ids=x, labels=x).loss.backward()
    fp32_norm = float(torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()]))
    trainer = InOrder(model=model, args=hf_args(tmp_path, 1, max_grad_norm=1e-3), train_dataset=DATA,
                      policy="mixed-fp16")
    trainer.train()
    assert trainer.lowprec_scaler.get_scale() == 2.0**16
    logged = trainer.state.log_history[0]["grad_norm"]
    assert logged == pytest.approx(fp32_norm, rel=2e-2)


def test_skipped_steps_leave_weights_and_learning_rate_schedule_alone(tmp_path):
    """A static loss scale of 1e30 overflows every fp16 gradient: each step is skipped, the weights stay as
    converted, the linear schedule does not advance (accelerate is told the step did not run) and the count is
    logged."""
    model = gpt2()
    args = hf_args(tmp_path, 3, lr_scheduler_type="linear")
    trainer = InOrder(model=model, args=args, train_dataset=DATA, policy="mixed-fp16+loss_scale=static:1e30")
    before = None

    def remember(*_):
        nonlocal before
        before = before or weights(model)

    model.register_forward_pre_hook(remember)
    trainer.train()
    after = weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    history = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["learning_rate"] for h in history] == [1e-3] * 3
    assert [h["lowprec/skipped_steps"] for h in history] == [1, 2, 3]
    assert trainer.lowprec_skipped_steps == 3


def test_the_skipped_step_count_survives_a_resume(tmp_path):
    args = hf_args(tmp_path, 3, save_strategy="steps", save_steps=2)
    policy = "mixed-fp16+loss_scale=static:1e30"  # every step skipped
    InOrder(model=gpt2(), args=args, train_dataset=DATA, policy=policy).train()
    resumed = InOrder(model=gpt2(), args=args, train_dataset=DATA, policy=policy)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert resumed.lowprec_skipped_steps == 3


def test_steps_of_lowprecs_own_optimizer_advance_the_learning_rate_schedule(tmp_path):
    """lowprec's SGD updates without calling its step() (which accelerate watches to tell a skipped step): the
    schedule still advances on every step taken."""
    model = gpt2()
    trainer = InOrder(model=model, args=hf_args(tmp_path, 3, lr_scheduler_type="linear"), train_dataset=DATA,
                      policy="int8-lazy", optimizers=(lp.train.SGD(model.parameters(), lr=1e-3, momentum=0.9), None))
    trainer.train()
    rates = [h["learning_rate"] for h in trainer.state.log_history if "loss" in h]
    assert rates == pytest.approx([1e-3, 2e-3 / 3, 1e-3 / 3], rel=1e-12)
    assert trainer.lowprec_skipped_steps == 0


def test_resume_from_a_transformers_checkpoint_is_bit_exact(tmp_path):
    straight = gpt2()
    InOrder(model=straight, args=hf_args(tmp_path / "a", 4), train_dataset=DATA, policy="int8-lazy").train()

    first = gpt2()
    args = hf_args(tmp_path / "b", 4, save_strategy="steps", save_steps=2)
    InOrder(model=first, args=args, train_dataset=DATA, policy="int8-lazy").train()
    resumed = gpt2()
    trainer = InOrder(model=resumed, args=args, train_dataset=DATA, policy="int8-lazy")
    trainer.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    got, want = weights(resumed), weights(straight)
    for k in want:
        assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("flag", ["fp16", "bf16"])
def test_transformers_own_mixed_precision_is_refused(tmp_path, flag):
    args = hf_args(tmp_path, 1)
    setattr(args, flag, True)  # set after construction: TrainingArguments checks the device for these itself
    with pytest.raises(ValueError, match="policy sets every format"):
        LowprecTrainer(model=gpt2(), args=args, train_dataset=DATA, policy="mixed-fp16")


# -- data parallel: two ranks (accelerate's MULTI_CPU on a gloo group; tests/ranks.py) ----------------------------
INF_LOSS_STEP, INF_GRAD_STEP = 1, 2  # rank 1 alone: an inf loss, then an inf gradient after DDP's all-reduce
#: dynamic fixed point whose exponents move by the pooled overflow rate, each starting from its first tensor
DFX_OVERFLOW = ("weight=dfx<8>,activation=dfx<8>,output_grad=dfx<10>,activation_grad=dfx<10>,weight_grad=dfx<10>,"
                "master=dfx<12>,exponent_rule=overflow,exponent_interval=2,init_int_bits=auto,max_overflow_rate=0.01")


class OneRankOverflows(InOrder):
    """Rank 1 alone overflows: its loss is inf at INF_LOSS_STEP (DDP's all-reduce carries the inf gradients to
    rank 0) and one of its gradients is set to inf after the all-reduce at INF_GRAD_STEP (only lowprec's
    agreement on the inf/NaN flags tells rank 0). Records each step's (skipped, scale)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps: list[tuple[bool, float]] = []
        owner = self

        class Record(TrainerCallback):
            def on_step_end(self, *_, **__):
                result = owner.lowprec_scaler.last_result
                owner.steps.append((result.skipped, result.scale))

        self.add_callback(Record)

    def compute_loss(self, model, inputs, *args, **kwargs):
        loss = super().compute_loss(model, inputs, *args, **kwargs)
        return loss * float("inf") if dist.get_rank() == 1 and self.state.global_step == INF_LOSS_STEP else loss

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)  # its backward ran DDP's all-reduce
        if dist.get_rank() == 1 and self.state.global_step == INF_GRAD_STEP:
            self.model.transformer.h[0].mlp.c_fc.weight.grad[0, 0] = float("inf")
        return loss


def _ddp_run(out: Path, policy: str, steps: int, resume: str | None = None, **kw) -> dict:
    """One rank's LowprecTrainer run: the weights, every quantizer's state (layers' and functional ops'), the
    Trainer's checkpoint state (loss scale, optimizer, master copies, its own groups) and the steps."""
    model = gpt2()
    trainer = OneRankOverflows(model=model, args=hf_args(out, steps, **kw), train_dataset=DATA, policy=policy)
    trainer.train(resume_from_checkpoint=resume)
    state = trainer.lowprec_scaler.state_dict()
    assert trainer.lowprec_scaler.trainer.distributed and isinstance(trainer.model_wrapped,
                                                                      torch.nn.parallel.DistributedDataParallel)
    kinds = sorted({type(v).__name__ for s in trainer.optimizer.state.values() for v in s.values()})
    return {"steps": trainer.steps, "weights": weights(model), "skipped": trainer.lowprec_skipped_steps,
            "optimizer_state_kinds": kinds,
            "quantizers": {f"{n}:{r}": q.state_dict() for n, r, q in lp.nn.quantizers(model)},
            "trainer": {k: state[k] for k in ("scaler", "optimizer", "master_copies", "accumulators", "quantizers",
                                              "rng")}}


def _fresh_accelerate() -> None:
    """Forget the parent process's accelerate state (one process, no group): this rank's is built anew."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def _train_on_rank(rank: int, out: Path, policy: str) -> dict:
    _fresh_accelerate()
    return _ddp_run(out, policy, 4)


@pytest.mark.parametrize("policy", ["mixed-fp16", "fp8-delayed", DFX_OVERFLOW], ids=["mixed-fp16", "fp8-delayed",
                                                                                    "dfx-overflow"])
def test_ddp_ranks_skip_together_and_stay_identical(tmp_path, policy):
    """Both ranks skip the steps where rank 1 alone overflowed, back off the same loss scale, and end with the same
    weights, optimizer state and quantizer state bit for bit: the amax histories (fp8-delayed) and dfx exponents of
    GPT-2's functional ops (attention, Conv1D's addmm, layer norms), made at the first forward, agree too."""
    a, b = run_ranks(_train_on_rank, tmp_path, policy)
    expected = [step in (INF_LOSS_STEP, INF_GRAD_STEP) for step in range(4)]
    assert [s for s, _ in a["steps"]] == expected and a["skipped"] == 2
    if policy == "mixed-fp16":  # dynamic loss scale: one backoff per skipped step
        assert [scale for _, scale in a["steps"]] == [2.0**16, 2.0**16, 2.0**15, 2.0**14]
    assert any(":attention[" in k or ":addmm[" in k for k in a["quantizers"])  # functional ops are covered
    assert_identical(a, b)
    assert not torch.equal(a["weights"]["transformer.h.0.mlp.c_fc.weight"],
                           weights(gpt2())["transformer.h.0.mlp.c_fc.weight"])  # it trained


def _resume_on_rank(rank: int, out: Path, policy: str) -> tuple[dict, dict]:
    _fresh_accelerate()
    straight = _ddp_run(out / "straight", policy, 4)
    _ddp_run(out / "cut", policy, 4, save_strategy="steps", save_steps=2)
    resumed = _ddp_run(out / "cut", policy, 4, resume=str(out / "cut" / "checkpoint-2"), save_strategy="steps",
                       save_steps=2)
    return straight, resumed


#: every kind of state a resume must restore: loss scale, amax histories, Adam's moments kept packed (fp16)
RESUME_POLICY = "fp8-delayed+loss_scale=dynamic,optimizer_state=fp16"


def _accumulate_on_rank(rank: int, out: Path) -> dict:
    _fresh_accelerate()
    return _ddp_run(out, "native-bf16", 4, gradient_accumulation_steps=2, per_device_train_batch_size=2)


def test_ddp_gradient_accumulation_of_a_native_model_keeps_the_ranks_identical(tmp_path):
    """gradient_accumulation_steps under DDP: accelerate runs the first micro-batch's backward in ``no_sync()``;
    its bf16 gradients reach the all-reduce of the second, so both ranks take the same steps (the two where rank
    1 alone overflowed skipped)."""
    a, b = run_ranks(_accumulate_on_rank, tmp_path)
    assert [s for s, _ in a["steps"]] == [step in (INF_LOSS_STEP, INF_GRAD_STEP) for step in range(4)]
    assert_identical(a, b)


def test_ddp_resume_from_a_transformers_checkpoint_is_bit_exact(tmp_path):
    """Rank 0 writes the checkpoint (scaler.pt holds the lowprec state: loss scale, amax histories; the optimizer's
    file its packed moments as float tensors); both ranks resume from it after step 2 and end where the
    uninterrupted run ends, bit for bit, with the step after the resume (an inf gradient on rank 1) skipped as
    before."""
    for straight, resumed in run_ranks(_resume_on_rank, tmp_path, RESUME_POLICY):
        assert straight["optimizer_state_kinds"] == ["Cast", "Tensor"]  # the moments packed, the step counters
        assert resumed["steps"] == straight["steps"][2:]
        assert_identical({**straight, "steps": None}, {**resumed, "steps": None})
