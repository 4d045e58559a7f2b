"""The rounding's own packed form (lowprec.formats.packing.RoundingPacks): inside a packing forward, a fixed-point
or dfx rounding encodes its integer codes on the way; the packed saved tensors then use that form instead of
packing the result again. The form unpacks to the rounded tensor bit for bit and holds what ``pack`` would have
stored. Casts and uniform roundings make none (packed at the save, as before: measured, a form made by them
saved no time and, made before the op that saves the tensor runs, raised the peak)."""

import pytest
import torch
from torch import nn

import lowprec as lp
from lowprec.formats import parse_format, quantize, quantize_counting
from lowprec.formats import packing
from lowprec.formats.packing import RoundingPacks, marked_format, marked_packed, pack
from lowprec.nn import packed as packed_mod
from lowprec.train import cross_entropy

#: formats whose rounding makes its packed form (integer codes: whole bytes, and 4- and 2-bit codes a byte holds
#: two or four of)
FORMS = ["fixed<8,4>", "fixed<16,10>", "fixed<4,2>", "fixed<2,0>", "fixed<12,100>", "fixed<8,-4>", "dfx<8>", "dfx<16>",
         "dfx<4>"]
#: formats whose rounding makes none
NO_FORMS = ["e4m3", "e5m2", "fp16", "bf16", "uniform<4,unsigned>", "uniform<4>"]
#: a small and a large tensor (one odd, not a whole number of bytes of sub-byte codes)
SIZES = [4096, 70001]


def _inputs(n: int, special: bool) -> torch.Tensor:
    """N(0, 1) scaled over many binades, with -0, subnormals, values past every format's range and (``special``)
    NaN and infinities in it."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * torch.exp2(torch.randint(-12, 6, (n,), generator=g).float())
    x[:8] = torch.tensor([-0.0, 0.0, 1e-40, -3e-39, 7e5, -7e5, 0.5, -1.0])
    if special:
        x[8:11] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    return x


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32)


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal as numbers (integer codes have one zero), NaN where the other has NaN."""
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("spec", FORMS)
def test_the_rounding_packs_its_result_as_pack_would(spec, n):
    fmt = parse_format(spec)
    x = _inputs(n, special=False)
    plain = quantize(x, fmt)
    assert marked_packed(plain) is None  # outside a packing forward: no packed form is made
    with RoundingPacks():
        y = quantize(x, fmt)
    assert torch.equal(_bits(y), _bits(plain))  # the rounding itself is unchanged
    made = marked_packed(y)
    again = pack(y, marked_format(y))  # verify=True: the tensor is on the grid
    assert type(again) is type(made) and made.nbytes == again.nbytes and made.data.dtype == again.data.dtype
    # the same codes and scale; values back exactly (a -0 comes back +0, the same number)
    assert (made.bits, made.signed, made.frac, made.levels) == (again.bits, again.signed, again.frac, again.levels)
    assert torch.equal(made.codes().reshape(-1), again.codes().reshape(-1))
    back = made.unpack()
    assert back.shape == y.shape and torch.equal(back, y)
    nonzero = y != 0
    assert torch.equal(_bits(back)[nonzero], _bits(y)[nonzero])


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("spec", ["dfx<10>", "dfx<4>", "dfx<16>"])
def test_the_overflow_counting_rounding_packs_its_result_too(spec, n):
    """dfx with the overflow-rate exponent rule (Courbariaux) rounds through ``quantize_counting``, one scaled copy
    for both the rounding and the overflow counts: it makes the same form as ``pack``, and the same rounding and
    counts as without forms."""
    fmt, thresholds = parse_format(spec), (0.25, 1.0, 4.0)
    x = _inputs(n, special=False)
    plain, counts = quantize_counting(x, fmt, 2, thresholds)
    assert marked_packed(plain) is None
    with RoundingPacks():
        y, counts_packing = quantize_counting(x, fmt, 2, thresholds)
    assert torch.equal(_bits(y), _bits(plain)) and torch.equal(counts, counts_packing)
    made, again = marked_packed(y), pack(y, marked_format(y))
    assert (made.bits, made.frac, made.data.dtype) == (again.bits, again.frac, again.data.dtype) == (
        fmt.bits, fmt.bits - 1 - 2, again.data.dtype)
    assert torch.equal(made.codes().reshape(-1), again.codes().reshape(-1))
    assert torch.equal(made.unpack(), y)


@pytest.mark.parametrize("spec", NO_FORMS)
def test_casts_and_uniform_roundings_make_none(spec):
    with RoundingPacks():
        y = quantize(_inputs(70001, special=False), spec)
    assert marked_packed(y) is None


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("spec", ["fixed<8,4>", "fixed<4,2>", "dfx<8>"])
def test_nan_makes_no_form(spec, n):
    """Integer codes cannot hold NaN: the rounding (its NaN put back bit for bit as without packing) then makes
    no form, and the saved tensor is kept as it is, as ``pack`` keeps it; infinities alone saturate to codes."""
    fmt = parse_format(spec)
    x = _inputs(n, special=True)
    with RoundingPacks():
        y = quantize(x, fmt)
    assert torch.equal(_bits(y), _bits(quantize(x, fmt)))
    assert marked_packed(y) is None
    assert type(pack(y, marked_format(y) or fmt)).__name__ == "Raw"
    x[8] = 0.0  # no NaN left: +-inf saturate (fixed point), or are skipped by the exponent (dfx: no form then)
    with RoundingPacks():
        y = quantize(x, fmt)
    made = marked_packed(y)
    assert (made is not None) == spec.startswith("fixed")
    if made is not None:
        assert _same_values(made.unpack(), y) and made.unpack()[9] == y[9] > 0


def test_an_in_place_change_after_rounding_drops_the_form():
    with RoundingPacks():
        y = quantize(_inputs(4096, False), "fixed<8,4>")
        z = quantize(_inputs(4096, False), "dfx<8>")
    assert marked_packed(y) is not None and marked_packed(z) is not None
    y.mul_(3)
    z.add_(1)
    assert marked_packed(y) is None and marked_format(y) is None
    assert marked_packed(z) is None and marked_format(z) is None


def test_small_tensors_and_other_layouts_make_none():
    """Below MIN_NUMEL the hook stores a tensor as it is: no form is made; a non-contiguous result is packed by
    the hook in its memory order (no form either)."""
    with RoundingPacks():
        small = quantize(torch.randn(packing.MIN_NUMEL - 1), "dfx<8>")
        large = quantize(torch.randn(packing.MIN_NUMEL), "dfx<8>")
        codes_t = quantize(torch.randn(64, 128).t(), "dfx<8>")
    assert marked_packed(small) is None and marked_packed(large) is not None
    assert marked_packed(codes_t) is None and marked_format(codes_t) is not None


class Wide(nn.Module):
    """Activations above 65536 elements (the compiled kernels), a ReLU changed in place after the rounding of
    the next layer's input read it, and a rounded tensor that a later op changes in place before saving it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.fc = nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8 * 16 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu_(self.bn(self.conv1(x)))
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


def _steps(recipe: str, on: bool, monkeypatch, compiled: bool = False):
    monkeypatch.setenv("LOWPREC_PACKED", "1" if on else "0")
    torch.manual_seed(0)
    model = lp.convert(Wide(), recipe)
    lazy = lp.Policy.preset(recipe).get("accumulator") is not None
    trainer = lp.Trainer(model, (lp.train.SGD if lazy else torch.optim.SGD)(model.parameters(), lr=0.05,
                                                                             momentum=0.9), recipe)
    run = torch.compile(model) if compiled else model
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 1, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)
    grads = []
    for _ in range(2):
        trainer.backward(cross_entropy(run(x), y))
        grads.append([p.grad.clone() for p in model.parameters()])
        trainer.apply_update()
    return grads, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("recipe", ["int8-lazy", "int16", "fixed-20", "dfx-10-12", "fp8-e4m3", "wrpn-4-4"])
def test_large_steps_identical_and_the_roundings_forms_used(recipe, monkeypatch):
    used: list[int] = []
    inner = packed_mod.take_packed

    def counting(t):
        made = inner(t)
        if made is not None:
            used.append(t.numel())
        return made

    monkeypatch.setattr(packed_mod, "take_packed", counting)
    on = _steps(recipe, True, monkeypatch)
    # the large activations' forms came from the rounding (not for casts and WRPN's uniform)
    assert any(n >= 65536 for n in used) == (recipe in ("int8-lazy", "int16", "fixed-20", "dfx-10-12"))
    off = _steps(recipe, False, monkeypatch)
    for a, b in zip(on[0] + [on[1]], off[0] + [off[1]]):
        assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_compiled_model_steps_identical(monkeypatch):
    """Under torch.compile the quantizers run eagerly between graphs (opaque to the user's graph): the same
    forms, the same steps."""
    on = _steps("int16", True, monkeypatch, compiled=True)
    off = _steps("int16", False, monkeypatch, compiled=True)
    for a, b in zip(on[0] + [on[1]], off[0] + [off[1]]):
        assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_a_rounded_tensor_changed_in_place_before_it_is_saved_is_saved_as_it_is_now():
    """The rounding's form holds the values of the rounding; a tensor changed after it (``y.mul_(2)``) and then
    saved by an op is stored from its values now (its mark is gone): the same gradient as without packing."""

    def grad(packed: bool) -> torch.Tensor:
        y0 = _inputs(4096, False).reshape(64, 64)
        hooks = packed_mod.PackedSavedTensors() if packed else torch.autograd.graph.saved_tensors_hooks(
            lambda t: t, lambda t: t)
        with hooks:
            y = quantize(y0 * 1.5, "dfx<8>")
            assert (marked_packed(y) is not None) == packed
            y.mul_(2)
            assert marked_packed(y) is None
            y.requires_grad_()
            out = (y.sigmoid() * y).sum()  # mul saves y, sigmoid its result
        out.backward()
        return y.grad

    assert torch.equal(grad(True), grad(False))


def test_a_call_site_whose_results_nobody_saves_stops_making_forms(monkeypatch):
    """A layer's output that only a ReLU reads (the ReLU saves its own result): its quantizer made a form at
    the first forward, none was taken, so it makes none from then on; the layer's input, which the layer saves,
    keeps getting its form, taken at every step."""
    monkeypatch.setenv("LOWPREC_PACKED", "1")
    model = lp.convert(nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10)), "activation=int8,"
                       "output=int8,exponent_rule=maxabs")
    first = model[0]
    x = torch.randn(64, 64)
    for step in range(3):
        model(x).sum().backward()
        out, inp = first.quantizers["output"]._forms.demand, first.quantizers["activation"]._forms.demand
        assert (out.made, out.taken) == (1, 0)  # made once, never taken: not made again
        assert (inp.made, inp.taken) == (step + 1, step + 1)


def test_a_copy_carries_the_form_only_with_the_same_layout():
    with RoundingPacks():
        y = quantize(torch.randn(64, 128), "dfx<8>")
    same = packing.copy_mark(y, y.clone())
    assert marked_packed(same) is marked_packed(y) and marked_format(same) == marked_format(y)
    other = packing.copy_mark(y, y.t().contiguous().t())  # the same values, column-major
    assert marked_packed(other) is None and marked_format(other) == marked_format(y)
    y.mul_(2)  # changed since its rounding: a copy of it now is not marked
    assert marked_format(packing.copy_mark(y, y.clone())) is None


@pytest.mark.parametrize("n", [4099, 70001])
def test_a_relus_saved_result_as_bits_gives_torchs_gradient_nan_included(n):
    """ReLU's backward passes the gradient where its result is not <= 0, a NaN result included (torch's
    threshold_backward); its result stored as one bit a value (``result.bool()``: NaN true, -0 false) gives
    those same bits, unpacked to 0/1 values of each float dtype by numpy on a CPU as by the one-pass kernel that
    other devices run."""
    g = torch.Generator().manual_seed(n)
    x0 = torch.randn(n, generator=g)
    x0[:6] = torch.tensor([float("nan"), -float("nan"), 0.0, -0.0, float("inf"), -float("inf")])
    grad_out = torch.randn(n, generator=g)

    def grad(packed: bool) -> torch.Tensor:
        x = x0.clone().requires_grad_()
        hooks = packed_mod.PackedSavedTensors() if packed else torch.autograd.graph.saved_tensors_hooks(
            lambda t: t, lambda t: t)
        with hooks:
            y = torch.relu(x * 1.0)
        y.backward(grad_out)
        return x.grad

    got, want = grad(True), grad(False)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    assert got[0] == grad_out[0] and got[1] == grad_out[1]  # NaN results pass the gradient
    bits = packing.pack_bool(x0 != 0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        want = (x0 != 0).to(dtype)
        assert torch.equal(bits.unpack_as(dtype), want)
        assert torch.equal(packing._bits_as(bits.data, dtype)[:n], want)


def test_a_quantizer_pickled_without_its_form_demand_gets_one():
    import pickle

    q = lp.policy.Quantizer(lp.Policy.parse("activation=int8").get("activation"))
    state = dict(q.__dict__)
    del state["_forms"]  # as pickled before quantizers had one
    old = lp.policy.Quantizer.__new__(lp.policy.Quantizer)
    old.__setstate__(state)
    again = pickle.loads(pickle.dumps(old))
    x = torch.randn(4096)
    assert torch.equal(again(x), q(x)) and again._forms.demand.made == 0
