"""Update state kept packed between steps (lowprec.train.stored): Park's lazy-update accumulator as int16 codes,
optimizer state in its optimizer_state format; the same weights, accumulators and momentum as float32
containers, bit-exact resume, checkpoints in float form."""

import io

import pytest
import torch
from torch import Tensor, nn

import lowprec as lp
from lowprec.formats.packing import Codes, Packed, marked_format, pack, storage_of
from lowprec.policy import Quantizer
from lowprec.policy.policy import Quant
from lowprec.train import SGD, AdamW, Trainer, stored

INT8_LAZY = lp.Policy.parse("int8-lazy")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 24)
        self.fc2 = nn.Linear(24, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def batches(n, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 12, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(n)]


def build(recipe="int8-lazy", optimizer=SGD, seed=0):
    torch.manual_seed(seed)
    model = lp.convert(Net(), recipe)
    kwargs = dict(lr=0.5, momentum=0.9, weight_decay=1e-3) if optimizer not in (AdamW, torch.optim.AdamW) \
        else dict(lr=3e-2, eps=1e-3)
    return model, Trainer(model, optimizer(model.parameters(), **kwargs), recipe)


def run(recipe, optimizer, data, packed, monkeypatch):
    """Train on ``data`` with the update state packed or in float32 containers (today's storage); returns
    (parameters, accumulators, optimizer-state tensors), all as float tensors."""
    with monkeypatch.context() as m:
        m.setattr(stored, "packing_on", lambda policy: packed)
        model, trainer = build(recipe, optimizer)
        for x, y in data:
            trainer.step(nn.functional.cross_entropy(model(x), y))
        accs = {s.name: s.acc for s in trainer.slots if s.lazy}
        state = trainer.optimizer.state_dict()["state"]
        return [p.detach().clone() for p in model.parameters()], accs, state, trainer


def assert_same(a, b):
    """Bit-identical values (integer codes have one zero: -0 and +0 are the same number)."""
    assert torch.equal(a, b) and a.dtype == b.dtype


# 1. the lazy-update accumulator ----------------------------------------------------------------------------------


def test_lazy_accumulators_are_kept_as_int16_codes_between_steps():
    model, trainer = build()
    for x, y in batches(3):
        trainer.step(nn.functional.cross_entropy(model(x), y))
    lazy = [s for s in trainer.slots if s.lazy]
    assert {s.name for s in lazy} == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    for s in lazy:
        assert isinstance(s._acc, Codes) and s._acc.data.dtype == torch.int16, s.name
        assert s.acc_nbytes == 2 * s.param.numel()
        acc = s.acc
        assert acc.dtype == torch.float32 and acc.shape == s.param.shape and acc.abs().sum() > 0
        # the codes are the accumulator's int16 values: acc = code * 2**-frac, |code| < 2**15
        assert torch.equal(s._acc.data.reshape(acc.shape).double() * 2.0**-s._acc.frac, acc.double())


@pytest.mark.parametrize("optimizer", [SGD, torch.optim.SGD, AdamW], ids=["lowprec-SGD", "torch-SGD", "lowprec-AdamW"])
def test_packed_accumulator_gives_the_same_weights_and_accumulators_as_float32_containers(optimizer, monkeypatch):
    data = batches(6)
    recipe = "int8-lazy" if optimizer is not AdamW else "int8-lazy+optimizer_state=int16"
    p_packed, acc_packed, _, _ = run(recipe, optimizer, data, True, monkeypatch)
    p_float, acc_float, _, trainer = run(recipe, optimizer, data, False, monkeypatch)
    assert all(isinstance(s._acc, torch.Tensor) for s in trainer.slots if s.lazy)  # the reference: containers
    for a, b in zip(p_packed, p_float):
        assert_same(a, b)
    assert acc_packed.keys() == acc_float.keys()
    for name in acc_packed:
        assert_same(acc_packed[name], acc_float[name])
        assert acc_packed[name].abs().sum() > 0  # the accumulators hold something: the comparison can fail


def test_resume_mid_run_from_a_packed_accumulator_is_bit_exact():
    data = batches(8)
    model, trainer = build()
    for x, y in data:
        trainer.step(nn.functional.cross_entropy(model(x), y))
    expected = [p.detach().clone() for p in model.parameters()]
    expected_acc = {s.name: s.acc for s in trainer.slots if s.lazy}

    model, trainer = build()
    for x, y in data[:3]:
        trainer.step(nn.functional.cross_entropy(model(x), y))
    state = trainer.state_dict()
    for s in trainer.slots:  # the checkpoint holds float tensors, the form it has always had
        if s.lazy:
            assert type(state["accumulators"][s.name]) is torch.Tensor
            assert_same(state["accumulators"][s.name], s.acc)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    model, trainer = build(seed=11)
    trainer.load_state_dict(torch.load(buffer, weights_only=True))
    assert all(isinstance(s._acc, Codes) for s in trainer.slots if s.lazy)  # packed again on load
    for x, y in data[3:]:
        trainer.step(nn.functional.cross_entropy(model(x), y))
    for a, b in zip(model.parameters(), expected):
        assert_same(a.detach(), b)
    for s in trainer.slots:
        if s.lazy:
            assert_same(s.acc, expected_acc[s.name])


def test_an_accumulator_off_its_grid_is_kept_exactly_as_float():
    _, trainer = build()
    slot = next(s for s in trainer.slots if s.lazy)
    value = torch.full_like(slot.param, 1.0 / 3.0)  # not on any 16-bit grid
    slot.set_acc(value)
    assert isinstance(slot._acc, torch.Tensor) and slot._acc is not value
    assert_same(slot.acc, value)
    on_grid = torch.full_like(slot.param, 0.375)
    slot.set_acc(on_grid)
    assert isinstance(slot._acc, Packed) and slot.acc_nbytes == 2 * slot.param.numel()
    assert_same(slot.acc, on_grid)


def test_set_acc_refuses_a_wrong_shape_and_a_parameter_without_accumulator():
    _, trainer = build()
    slot = next(s for s in trainer.slots if s.lazy)
    with pytest.raises(ValueError, match="expected shape"):
        slot.set_acc(torch.zeros(3))
    _, plain = build("int8")
    with pytest.raises(ValueError, match="no lazy-update accumulator"):
        plain.slots[0].set_acc(torch.zeros_like(plain.slots[0].param))


def test_packing_off_keeps_the_accumulator_in_float32(monkeypatch):
    monkeypatch.setenv("LOWPREC_PACKED", "0")
    model, trainer = build()
    x, y = batches(1)[0]
    trainer.step(nn.functional.cross_entropy(model(x), y))
    assert all(type(s._acc) is torch.Tensor and s.acc_nbytes == 4 * s.param.numel() for s in trainer.slots if s.lazy)


# 2. optimizer state --------------------------------------------------------------------------------------------

STATE_CASES = {  # recipe, optimizer, the state's packed code dtype
    "int8-lazy/lowprec-SGD": ("int8-lazy", SGD, torch.int8),
    "int8-lazy/torch-SGD": ("int8-lazy", torch.optim.SGD, torch.int8),
    "int8/torch-SGD": ("int8", torch.optim.SGD, torch.int8),
    "int16/lowprec-AdamW": ("int16", AdamW, torch.int16),
    "int16/torch-AdamW": ("int16", torch.optim.AdamW, torch.int16),
    "dfx-10-12/courbariaux": ("dfx-10-12", torch.optim.SGD, torch.int16),
    "fixed-20/courbariaux": ("fixed-20", SGD, None),  # int32 codes are no smaller: kept in float32
    "bf16-state/torch-SGD": ("int8+optimizer_state=bf16", torch.optim.SGD, torch.bfloat16),
}


def packed_buffers(trainer):
    return [(s.name, b, v) for s in trainer.slots for b, v in trainer.optimizer.state.get(s.holder, {}).items()
            if b != "step"]


@pytest.mark.parametrize("case", STATE_CASES.values(), ids=STATE_CASES.keys())
def test_optimizer_state_is_kept_packed_and_gives_the_same_training_as_float32_containers(case, monkeypatch):
    recipe, optimizer, code_dtype = case
    data = batches(5)
    p_packed, _, sd_packed, trainer = run(recipe, optimizer, data, True, monkeypatch)
    buffers = packed_buffers(trainer)
    assert buffers and all(isinstance(v, Packed) == (code_dtype is not None) for _, _, v in buffers), buffers
    for name, buffer, v in buffers if code_dtype is not None else ():
        assert v.data.dtype == code_dtype, (name, buffer)
        assert v.nbytes == v.shape.numel() * v.data.element_size()
    assert trainer.state_formats.nbytes(trainer.optimizer) == sum(stored.nbytes(v) for _, _, v in buffers)
    p_float, _, sd_float, reference = run(recipe, optimizer, data, False, monkeypatch)
    assert all(type(v) is torch.Tensor for _, _, v in packed_buffers(reference))  # the reference: containers
    for a, b in zip(p_packed, p_float):
        assert_same(a, b)
    assert sd_packed.keys() == sd_float.keys()
    for k in sd_packed:  # state_dict(): float tensors, the same values
        assert sd_packed[k].keys() == sd_float[k].keys()
        for buffer in sd_packed[k]:
            a, b = sd_packed[k][buffer], sd_float[k][buffer]
            assert type(a) is torch.Tensor
            assert_same(a, b)
            assert buffer == "step" or a.abs().sum() > 0


@pytest.mark.parametrize("optimizer", [torch.optim.SGD, AdamW], ids=["torch-SGD", "lowprec-AdamW"])
def test_optimizer_checkpoint_by_hand_round_trips_and_resumes_bit_exactly(optimizer):
    """A user's own checkpoint code: torch.save(opt.state_dict()) of float tensors, load_state_dict into a new
    optimizer (weights_only), then training goes on as if never interrupted."""
    recipe = "int16" if optimizer is AdamW else "int8-lazy"
    data = batches(7)
    model, trainer = build(recipe, optimizer)
    for x, y in data:
        trainer.step(nn.functional.cross_entropy(model(x), y))
    expected = [p.detach().clone() for p in model.parameters()]

    model, trainer = build(recipe, optimizer)
    for x, y in data[:3]:
        trainer.step(nn.functional.cross_entropy(model(x), y))
    assert all(isinstance(v, Packed) for _, _, v in packed_buffers(trainer))
    buffer = io.BytesIO()
    torch.save({"optimizer": trainer.optimizer.state_dict(), "trainer": trainer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert all(type(v) is torch.Tensor for s in saved["optimizer"]["state"].values() for v in s.values())
    model, trainer = build(recipe, optimizer, seed=5)
    trainer.optimizer.load_state_dict(saved["optimizer"])  # torch's own load accepts it
    trainer.load_state_dict(saved["trainer"])
    assert all(isinstance(v, Packed) for _, _, v in packed_buffers(trainer))  # packed again on load
    for x, y in data[3:]:
        trainer.step(nn.functional.cross_entropy(model(x), y))
    for a, b in zip(model.parameters(), expected):
        assert_same(a.detach(), b)


def test_state_dict_leaves_the_packed_state_packed():
    model, trainer = build()
    x, y = batches(1)[0]
    trainer.step(nn.functional.cross_entropy(model(x), y))
    before = {(n, b): v for n, b, v in packed_buffers(trainer)}
    trainer.optimizer.state_dict()
    trainer.state_dict()
    assert {(n, b): v for n, b, v in packed_buffers(trainer)} == before  # the same Packed objects


def test_packed_state_moves_between_devices_as_code_that_moves_optimizer_state_expects():
    """Lightning's teardown moves optimizer.state with move_data_to_device, which calls ``.to(device)``."""
    model, trainer = build()
    x, y = batches(1)[0]
    trainer.step(nn.functional.cross_entropy(model(x), y))
    for _, _, v in packed_buffers(trainer):
        moved = v.to("cpu", non_blocking=False)
        assert type(moved) is type(v) and moved is not v and moved.data.device.type == "cpu"
        assert_same(moved.unpack(), v.unpack())


def test_a_direct_optimizer_step_reads_the_packed_state_as_floats():
    """optimizer.step() called by hand (warmup_exponents without a Trainer does) unpacks the state first: the
    same step as torch takes from the float state."""
    model, trainer = build("int8-lazy", torch.optim.SGD)
    x, y = batches(1)[0]
    trainer.step(nn.functional.cross_entropy(model(x), y))
    reference = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-3)
    reference.load_state_dict(trainer.optimizer.state_dict())
    nn.functional.cross_entropy(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    trainer.optimizer.step()
    after = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p, b in zip(model.parameters(), before):
            p.copy_(b)
    reference.step()
    assert all(type(v) is torch.Tensor for _, _, v in packed_buffers(trainer))
    for p, a in zip(model.parameters(), after):
        assert_same(p.detach(), a)
    assert any(not torch.equal(a, b) for a, b in zip(after, before))


@pytest.mark.parametrize("optimizer", [SGD, AdamW], ids=["lowprec-SGD", "lowprec-AdamW"])
def test_lowprec_optimizers_unpack_one_parameters_state_at_a_time(optimizer, monkeypatch):
    """Each parameter's state is rounded and packed right after its update, before the next parameter's is
    unpacked: at every such moment the float buffers in optimizer.state are that parameter's only."""
    recipe = "int8-lazy" if optimizer is SGD else "int16"
    model, trainer = build(recipe, optimizer)
    seen = []
    apply_to = trainer.state_formats.apply_to_

    def watch(opt, slot):
        floats = {id(p) for p, state in opt.state.items() for k, v in state.items()
                  if k != "step" and type(v) is torch.Tensor}
        seen.append((slot.name, floats <= {id(slot.holder)}, id(slot.holder) in floats))
        apply_to(opt, slot)

    monkeypatch.setattr(trainer.state_formats, "apply_to_", watch)
    for x, y in batches(2):
        trainer.step(nn.functional.cross_entropy(model(x), y))
    # per step: each parameter right after its update (its own state float); apply_'s pass over the rest skips
    # them (done: each buffer is rounded once a step)
    names = [s.name for s in trainer.slots]
    assert seen == [(n, True, True) for n in names] * 2


def test_warmup_restores_the_update_state_packed_with_its_values():
    model, trainer = build("dfx-10-12", torch.optim.SGD)
    data = batches(4)
    x, y = data[0]
    trainer.step(nn.functional.cross_entropy(model(x), y))
    before = {(n, b): v.unpack() for n, b, v in packed_buffers(trainer)}
    assert before and all(isinstance(v, Packed) for _, _, v in packed_buffers(trainer))
    trainer.warmup_exponents(data[1:], lambda m, batch: nn.functional.cross_entropy(m(batch[0]), batch[1]))
    after = packed_buffers(trainer)
    assert all(isinstance(v, Packed) for _, _, v in after)
    assert {(n, b) for n, b, _ in after} == set(before)
    for n, b, v in after:
        assert_same(v.unpack(), before[(n, b)])


@pytest.mark.parametrize("fmt", ["dfx<8>", "dfx<10>", "dfx<16>", "fixed<16,20>", "fixed<8,-3>", "fixed<4,2>",
                                 "fixed<20,14>", "e4m3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_store_gives_the_codes_pack_gives_formed_in_the_rounded_tensor(fmt, dtype):
    """store forms whole-byte integer codes in the rounded tensor's own memory: the same Codes (payload
    dtype, bits, frac, every code) as formats.packing.pack, unpacking bit for bit to the rounded values; the
    other formats go through pack itself."""
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(37, 11, generator=g, dtype=dtype) * 3.0) ** 3
    x[0, 0], x[1, 1] = 0.0, -0.0
    q = Quantizer(Quant.parse(fmt), lp.Policy.parse(""))
    rounded = q(x)
    kept = rounded.clone()
    reference = pack(kept, marked_format(rounded), verify=True)
    got = stored.store(rounded, True)
    if storage_of(q.quant.format).bytes_per_value >= x.element_size():
        assert got is rounded and torch.equal(got, kept)  # fixed<20,14>: int32 codes, no smaller than float32
        return
    assert type(got) is type(reference)
    assert got.unpack().dtype == dtype
    assert torch.equal(got.unpack(), kept)  # -0 comes back as +0 from integer codes: the same number
    if isinstance(reference, Codes):
        assert (got.data.dtype, got.bits, got.frac, got.shape) == \
            (reference.data.dtype, reference.bits, reference.frac, reference.shape)
        assert torch.equal(got.codes(), reference.codes())


def test_store_keeps_a_rounded_tensor_holding_nan_as_it_is():
    q = Quantizer(Quant.parse("fixed<16,8>"), lp.Policy.parse(""))
    x = torch.tensor([1.0, float("nan"), -2.5, 3.0])
    got = stored.store(q(x), True)
    assert not isinstance(got, Codes)
    assert torch.equal(stored.load(got).isnan(), torch.tensor([False, True, False, False]))
    assert stored.load(got)[[0, 2, 3]].tolist() == [1.0, -2.5, 3.0]


@pytest.mark.parametrize("fmt", ["dfx<8>", "dfx<16>", "fixed<16,100>", "fixed<12,-20>", "fixed<4,2>", "e5m2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_load_add_is_the_sum_of_the_unpacked_values_bit_for_bit(fmt, dtype):
    """load_add sums integer codes into ``other`` in one scaled pass: bit for bit load(stored) + other, -0 and
    ties included, for codes of every scale; other packings and float tensors as load(...) + other."""
    g = torch.Generator().manual_seed(7)
    q = Quantizer(Quant.parse(fmt), lp.Policy.parse(""))
    scale = {"fixed<16,100>": 2.0**-95, "fixed<12,-20>": 2.0**25}.get(fmt, 1.0)
    kept = stored.store(q(torch.randn(29, 3, generator=g, dtype=dtype) * scale), True)
    assert isinstance(kept, Codes) == (fmt != "e5m2")
    other = torch.randn(29, 3, generator=g, dtype=dtype) * scale
    other[0, 0], other[1, 1] = -0.0, stored.load(kept)[1, 1]  # a signed zero, an exact double
    expected = stored.load(kept) + other
    got = stored.load_add(kept, other)
    assert got.dtype == dtype and torch.equal(got.view(torch.int64 if dtype == torch.float64 else torch.int32),
                                              expected.view(torch.int64 if dtype == torch.float64 else torch.int32))
    assert got is not other
    plain = torch.randn(4, generator=g, dtype=dtype)
    assert torch.equal(stored.load_add(plain, plain), plain + plain)


@pytest.mark.parametrize("role", ["dfx<8>", "dfx<16>", "dfx<4>", "fixed<16,8>", "e4m3"])
@pytest.mark.parametrize("rule", ["maxabs", "overflow"])
@pytest.mark.parametrize("observe", [True, False])
def test_store_rounded_keeps_what_store_of_the_rounding_keeps(role, rule, observe):
    """store_rounded takes the codes from the rounding (max-abs dfx) or rounds and stores: either way the same
    kept value, codes and exponent as store(quantizer(x)) (quantizer.round(x) with observe=False), and the
    same exponent statistics."""
    g = torch.Generator().manual_seed(11)
    xs = [torch.randn(33, 5, generator=g) * 0.01 for _ in range(3)]
    xs[2][4, 4] = float("nan")
    policy = lp.Policy.parse(f"exponent_rule={rule}")
    a, b = Quantizer(Quant.parse(role), policy), Quantizer(Quant.parse(role), policy)
    for x in xs:
        got = stored.store_rounded(a, x.clone(), True, observe=observe)
        want = stored.store((b if observe else b.round)(x.clone()), True)
        assert type(got) is type(want)
        assert torch.equal(stored.load(got).isnan(), stored.load(want).isnan())
        assert torch.equal(stored.load(got).nan_to_num().view(torch.int32),
                           stored.load(want).nan_to_num().view(torch.int32))
        if isinstance(want, Codes):
            assert (got.data.dtype, got.bits, got.frac) == (want.data.dtype, want.bits, want.frac)
            assert torch.equal(got.codes(), want.codes())
        assert repr(a.state_dict()) == repr(b.state_dict())  # the same exponent and statistics
    off = stored.store_rounded(a, xs[0].clone(), False)
    assert type(off) is Tensor and torch.equal(off, a(xs[0]))


@pytest.mark.parametrize("fmt", ["dfx<10>", "dfx<16>", "fixed<16,100>", "fixed<12,-20>", "e4m3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("factor", [0.9, 1 / 3, 0.0, 1e-30, 3e30, 7.0])
def test_load_scaled_is_the_product_of_the_unpacked_values_bit_for_bit(fmt, dtype, factor):
    """load_scaled multiplies integer codes by one combined factor: bit for bit load(stored) * factor (the
    float32 scalar of torch's own product), tiny and huge factors included (they take the unpacked path)."""
    g = torch.Generator().manual_seed(13)
    q = Quantizer(Quant.parse(fmt), lp.Policy.parse(""))
    scale = {"fixed<16,100>": 2.0**-95, "fixed<12,-20>": 2.0**25}.get(fmt, 1.0)
    kept = stored.store(q(torch.randn(23, 4, generator=g, dtype=dtype) * scale), True)
    assert isinstance(kept, Codes) == (fmt != "e4m3")
    expected = stored.load(kept) * factor
    got = stored.load_scaled(kept, factor)
    bits = torch.int64 if dtype == torch.float64 else torch.int32
    assert got.dtype == dtype and torch.equal(got.view(bits), expected.view(bits))
