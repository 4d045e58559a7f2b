"""Memory: the measurement counts what it should; the estimate is within 15 % of the measured peak of a training
step for every recipe on LeNet, ResNet-20, the LSTM and the GPT; the WRPN formulas; the bar chart."""

import matplotlib.image as mpimg
import pytest
import torch

import lowprec as lp
from lowprec.diagnostics import estimate_memory, measure_peak_memory, measure_step_memory, wrpn_footprint
from lowprec.diagnostics.memory import profile_peak_memory
from lowprec.diagnostics.plots import plot_memory
from lowprec.models import build_model

MB = 1 << 20
#: benchmarks/training.py's packed-storage recipes, fp32 and int8
RECIPES = ["fp32", "mixed-fp16", "mixed-bf16", "fp8-hybrid", "fp8-e4m3", "int8", "int8-lazy", "int16", "dfx-10-12",
           "wrpn-4-4", "wrpn-4-4+recompute=off"]


def test_measured_peak_of_known_allocations():
    def work():
        a = torch.empty(MB, dtype=torch.uint8)
        b = torch.empty(2 * MB, dtype=torch.uint8)
        del a
        c = torch.empty(MB // 2, dtype=torch.uint8)
        return b, c

    m = profile_peak_memory(work)
    assert (m.baseline, m.peak, m.final) == (0, 3 * MB, 0)  # the result is dropped after fn returns


def test_held_tensors_count_until_freed():
    model = torch.nn.Linear(512, 512)
    model(torch.randn(4, 512)).sum().backward()
    held = sum(p.numel() * 4 for p in model.parameters()) * 2  # parameters and their gradients

    def step():
        model.zero_grad(set_to_none=True)  # frees the gradients: the peak must not count them twice
        model(torch.randn(4, 512)).sum().backward()

    m = profile_peak_memory(step, held=(model,))
    assert m.baseline == held
    assert held <= m.peak < held + 64 * 1024  # gradients re-created, plus small activations
    assert measure_peak_memory(step, held=(model,)) == m.peak


def _workload(name: str) -> tuple[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """The four models of the memory claim, each with a small batch (LeNet at the benchmark's batch 64)."""
    torch.manual_seed(0)
    if name == "gpt":
        from lowprec.models import GPT

        tokens = torch.randint(0, 128, (8, 32))
        return GPT(128, block_size=32, n_layer=2, n_embd=64, n_head=4), (tokens, tokens.roll(-1, 1))
    shape, batch = {"lenet": ((1, 28, 28), 64), "resnet20": ((3, 32, 32), 16), "lstm": ((50, 13), 8)}[name]
    return build_model(name), (torch.randn(batch, *shape), torch.randint(0, 10, (batch,)))


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("name", ["lenet", pytest.param("resnet20", marks=pytest.mark.slow), "lstm", "gpt"])
def test_estimate_within_15_percent_of_the_measured_peak(name, recipe):
    """Every recipe of the packed-storage benchmark (and int8), packed storage on (the default), one steady-state
    step measured. ResNet-20's peak is in forward for WRPN (the float32 activations in flight beside the 4-bit
    saves: 0.70x of the measured peak while the estimate had no forward phase) and in backward for the others."""
    model, data = _workload(name)
    estimate = estimate_memory(model, recipe, data)
    measured = measure_step_memory(model, recipe, data).peak
    assert abs(estimate.total - measured) <= 0.15 * measured, (estimate.emulated, estimate.forward, measured)
    params = sum(p.numel() for p in model.parameters())
    assert estimate.emulated["gradients"] == 4 * params
    packed_state = lp.Policy.parse(recipe).get("optimizer_state") is not None  # int8, dfx<10>: kept as codes
    assert (estimate.emulated["optimizer state"] < 4 * params) == packed_state  # else float32 containers
    assert (estimate.emulated["accumulators"] > 0) == (recipe == "int8-lazy")
    assert estimate.total_ideal <= estimate.total


def test_ideal_view_follows_the_formats():
    model = build_model("lenet")
    data = (torch.randn(2, 1, 28, 28), torch.randint(0, 10, (2,)))
    fp32, mixed, int8 = (estimate_memory(model, r, data).ideal for r in ("fp32", "mixed-fp16", "int8"))
    params = sum(p.numel() for p in model.parameters())
    assert fp32["weights"] == 4 * params and fp32["master copy"] == 0
    assert mixed["weights"] == 2 * params and mixed["master copy"] == 4 * params  # MPT: fp16 copy + fp32 master
    assert int8["weights"] == params and int8["master copy"] == 0  # Park: parameters stored in INT8


def test_wrpn_formulas_match_a_widened_lenet():
    f = wrpn_footprint(2, 4, 4)
    assert (f["inner-layer weight memory"], f["activation memory"], f["MACs"]) == (0.5, 0.25, 4)
    assert wrpn_footprint(2, 4, 2)["activation memory"] == 0.125

    def inner_weights(width):  # conv2 and fc1: both sides widened
        m = build_model("lenet", width=width)
        return m.features[3].weight.numel() + m.classifier[1].weight.numel()

    ratio = inner_weights(2) * 4 / (inner_weights(1) * 32)  # 4-bit weights at width 2 vs fp32 at width 1
    assert ratio == pytest.approx(f["inner-layer weight memory"])


def test_memory_bar_chart(tmp_path):
    model = build_model("lenet")
    data = (torch.randn(2, 1, 28, 28), torch.randint(0, 10, (2,)))
    estimates = [estimate_memory(model, r, data) for r in ("fp32", "int8-lazy")]
    path = plot_memory(tmp_path / "memory.png", estimates, "LeNet")
    assert path.stat().st_size > 15_000
    assert mpimg.imread(path).std() > 0.05


@pytest.mark.parametrize("recipe,optimizer", [("int8-lazy", "sgd"), ("dfx-10-12", "sgd"), ("int16", "adam"),
                                              ("mixed-fp16", "sgd"), ("int8-lazy+packed=off", "sgd")])
def test_estimate_counts_optimizer_state_and_accumulators_as_the_trainer_keeps_them(recipe, optimizer):
    """Differential: the estimate's optimizer state and accumulators are the bytes a Trainer holds after real
    steps (packed int8/int16 codes where the policy packs, float32 where not)."""
    from lowprec.train import SGD, AdamW, stored

    torch.manual_seed(0)
    model = build_model("lenet")
    data = (torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,)))
    estimate = estimate_memory(model, recipe, data, optimizer=optimizer)
    work = lp.convert(model, recipe)
    opt = SGD(work.parameters(), lr=0.01, momentum=0.9) if optimizer == "sgd" else AdamW(work.parameters(), lr=1e-3)
    trainer = lp.Trainer(work, opt, recipe)
    for _ in range(2):
        trainer.step(torch.nn.functional.cross_entropy(work(data[0]), data[1]))
    state = sum(stored.nbytes(v) for s in opt.state.values() for k, v in s.items() if k != "step")
    assert estimate.emulated["optimizer state"] == state
    assert estimate.emulated["accumulators"] == sum(s.acc_nbytes for s in trainer.slots)
    params = sum(p.numel() for p in model.parameters())
    n_state = 1 if optimizer == "sgd" else 2
    if recipe in ("mixed-fp16", "int8-lazy+packed=off"):
        assert state == 4 * n_state * params
    else:
        assert state < 4 * n_state * params
