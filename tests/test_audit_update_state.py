"""The update state kept packed between steps (lowprec.train.stored, train/state.py), used the way users use it
in loops lowprec did not write: the torch.amp-shaped API with torch's optimizers, an LR scheduler that rewrites
momentum, clipping, gradient accumulation, ``zero_grad(set_to_none=False)``, a parameter frozen for a few steps,
``torch.save``/``torch.load(weights_only=True)`` of ``optimizer.state_dict()`` and a resume, and code that reads
``optimizer.state`` directly. Each check is differential: packed (the default) against ``LOWPREC_PACKED=0``,
and a resumed run against an uninterrupted one, bit for bit."""

import gc
import io
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowprec as lp
from lowprec.formats.packing import Packed


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


_OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.01),
    "lp-sgd": lambda ps: lp.train.SGD(ps, lr=0.05, momentum=0.9),
    "lp-adamw": lambda ps: lp.train.AdamW(ps, lr=1e-2),
}


def _weights(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _amp_run(recipe: str, optimizer: str, steps: int, resume_at: int | None = None, accumulate: int = 2,
             frozen: tuple[int, ...] = ()) -> nn.Module:
    """A hand-written torch.amp-style loop: OneCycleLR (it rewrites momentum/betas every step), gradient
    accumulation, unscale + clipping, ``zero_grad(set_to_none=False)``; ``model[0].bias`` frozen at the steps
    in ``frozen``. ``resume_at``: the first ``resume_at`` steps run in another loop whose scaler, optimizer and
    scheduler state dicts go through torch.save/torch.load(weights_only=True)."""
    model = _model()
    opt = _OPTIMIZERS[optimizer](model.parameters())
    scaler = lp.GradScaler(recipe, model, opt)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=20)
    batches, start = _batches(steps * accumulate), 0
    if resume_at is not None:
        first = _amp_run(recipe, optimizer, resume_at, accumulate=accumulate, frozen=frozen)
        buf = io.BytesIO()
        torch.save({k: v.state_dict() for k, v in first._loop.items()}, buf)
        buf.seek(0)
        saved = torch.load(buf, weights_only=True)
        scaler.load_state_dict(saved["scaler"])
        opt.load_state_dict(saved["opt"])
        sched.load_state_dict(saved["sched"])
        start = resume_at
    for i in range(start, steps):
        model[0].bias.requires_grad_(i not in frozen)
        opt.zero_grad(set_to_none=False)
        if i in frozen:
            model[0].bias.grad = None
        for j in range(accumulate):
            x, y = batches[i * accumulate + j]
            with lp.autocast(scaler):
                loss = F.cross_entropy(model(x), y) / accumulate
            scaler.scale(loss).backward()
        scaler.unscale_(opt)
        scaler.clip_grad_norm_(1.0)
        scaler.step(opt)
        scaler.update()
        sched.step()
    model._loop = {"scaler": scaler, "opt": opt, "sched": sched}
    return model


@pytest.mark.parametrize("recipe,optimizer", [
    ("int8-lazy", "lp-sgd"), ("int16", "adamw"), ("dfx-10-12", "sgd"), ("fp8-hybrid", "sgd"),
    ("mixed-fp16", "adamw"),
])
def test_amp_loop_packed_equals_unpacked_and_resumes_bit_exactly(recipe, optimizer, monkeypatch):
    got = {}
    for packed in ("1", "0"):
        monkeypatch.setenv("LOWPREC_PACKED", packed)
        got[packed] = (_weights(_amp_run(recipe, optimizer, 3)), _weights(_amp_run(recipe, optimizer, 3, resume_at=1)))
    assert torch.equal(got["1"][0], got["0"][0])
    assert torch.equal(got["1"][0], got["1"][1])
    assert torch.equal(got["0"][0], got["0"][1])


@pytest.mark.parametrize("optimizer", ["lp-sgd", "lp-adamw", "sgd"])
def test_a_parameter_without_gradient_has_its_state_rounded_alike_packed_or_not(optimizer, monkeypatch):
    """A stochastic optimizer_state rounding draws from the RNG. Before the fix, under lowprec's optimizers the
    packed buffer of a parameter that had no gradient this step was left alone while its float32 container was
    rounded again (a draw, and a moving exponent's observation): the two runs drew different numbers and their
    weights parted. Now neither rounds a buffer its optimizer did not step."""
    recipe = "int16+optimizer_state=dfx<16>/stochastic"
    got = {}
    for packed in ("1", "0"):
        monkeypatch.setenv("LOWPREC_PACKED", packed)
        torch.manual_seed(5)
        got[packed] = _weights(_amp_run(recipe, optimizer, 5, accumulate=1, frozen=(1, 2)))
    assert torch.equal(got["1"], got["0"])


@pytest.mark.parametrize("optimizer", ["lp-sgd", "lp-adamw"])
def test_lowprecs_optimizers_round_each_buffer_once_a_step_packed_or_not(optimizer, monkeypatch):
    """Under lowprec's optimizers each parameter's state is rounded right after its update; before the fix the
    Trainer's rounding of "the rest" then rounded every float32 container a second time (a packed buffer was
    skipped as done). With the overflow exponent rule of dfx-10-12 the state's exponent observed each buffer
    twice a step unpacked, once packed, and the two runs' weights parted after an exponent interval."""
    got = {}
    for packed in ("1", "0"):
        monkeypatch.setenv("LOWPREC_PACKED", packed)
        got[packed] = _weights(_amp_run("dfx-10-12+update_rule=optimizer", optimizer, 12, accumulate=1))
    assert torch.equal(got["1"], got["0"])


def _amp_step(model: nn.Module, opt: torch.optim.Optimizer, scaler: lp.GradScaler, x: torch.Tensor,
              y: torch.Tensor) -> None:
    """One step of the torch.amp-style loop: zero_grad, forward under autocast, scaled backward, step, update."""
    opt.zero_grad()
    with lp.autocast(scaler):
        loss = F.cross_entropy(model(x), y)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()


def _state_of_first_weight(recipe: str, optimizer: str, steps: int, reset_at: int | None = None) -> nn.Module:
    """A loop that reads the first weight's optimizer state as users' code does, and at ``reset_at`` resets it
    by assigning a new tensor in its place (the portable way: packed values cannot be changed in place)."""
    model = _model()
    opt = _OPTIMIZERS[optimizer](model.parameters())
    scaler = lp.GradScaler(recipe, model, opt)
    for i, (x, y) in enumerate(_batches(steps)):
        if i == reset_at:
            state = opt.state[model[0].weight]
            for name in [k for k in state if k != "step"]:
                state[name] = torch.zeros_like(opt.state_dict()["state"][0][name])
        _amp_step(model, opt, scaler, x, y)
    model._opt, model._scaler = opt, scaler
    return model


@pytest.mark.parametrize("recipe,optimizer,buffer", [
    ("int16", "adamw", "exp_avg"), ("int8-lazy", "lp-sgd", "momentum_buffer"),
])
def test_reading_packed_state_as_a_tensor_names_the_way_to_its_values(recipe, optimizer, buffer, monkeypatch):
    """Before: ``optimizer.state[p]["exp_avg"].norm()`` raised Python's bare "'Codes' object has no attribute
    'norm'". Now the AttributeError names ``.unpack()`` (whose values are state_dict()'s), and a state reset by
    assignment gives the same weights packed and unpacked."""
    monkeypatch.setenv("LOWPREC_PACKED", "1")
    model = _state_of_first_weight(recipe, optimizer, 2)
    model_opt = model._opt
    state = model_opt.state[model[0].weight][buffer]
    with pytest.raises(AttributeError, match=r"has no attribute 'norm': .*\.unpack\(\) gives its float tensor"):
        state.norm()
    with pytest.raises(AttributeError, match="no attribute 'mul_'"):
        state.mul_(0)
    assert not hasattr(state, "not_a_tensor_attribute")
    # printed, it shows the values it holds (before: its integer codes, easy to take for the values)
    assert repr(state).endswith(f"values={state.unpack()!r})") and f"shape={tuple(state.shape)}" in repr(state)
    assert f"values={state.unpack()!r}" in str(model_opt.state[model[0].weight])
    assert torch.equal(state.unpack(), model_opt.state_dict()["state"][0][buffer])
    got = {}
    for packed in ("1", "0"):
        monkeypatch.setenv("LOWPREC_PACKED", packed)
        got[packed] = _weights(_state_of_first_weight(recipe, optimizer, 4, reset_at=2))
    assert torch.equal(got["1"], got["0"])
    assert not torch.equal(got["1"], _weights(_state_of_first_weight(recipe, optimizer, 4)))


def test_state_movers_move_packed_state_bit_for_bit_and_a_cast_is_refused(monkeypatch):
    """Code that moves an optimizer's state calls ``.to(...)`` on each value as on a tensor: Lightning's
    ``_optimizer_to_device`` (its teardown and checkpoint restore), accelerate's ``send_to_device``; the state moves
    and stays packed, bit for bit, and the next steps are those of an unmoved run. A dtype cast
    (``.to(torch.bfloat16)``, as a loop that shrinks its optimizer state writes) is a TypeError naming
    ``.unpack()``: before, it cast the int16 codes themselves (codes above 256 are not bfloat16 numbers), changing
    Adam's moments silently."""
    lightning = pytest.importorskip("lightning.fabric.utilities.optimizer")
    accelerate = pytest.importorskip("accelerate.utils")
    monkeypatch.setenv("LOWPREC_PACKED", "1")
    moved = _state_of_first_weight("int16", "adamw", 2)
    state = moved._opt.state[moved[0].weight]
    before = {k: v.unpack() for k, v in state.items() if isinstance(v, Packed)}
    assert set(before) == {"exp_avg", "exp_avg_sq"} and state["exp_avg"].codes().abs().max() > 256
    with pytest.raises(TypeError, match=r"unpacks to torch.float32; .*\.unpack\(\)\.to\(dtype\)"):
        state["exp_avg"].to(torch.bfloat16)
    with pytest.raises(TypeError, match="held packed"):
        state["exp_avg"].to("cpu", dtype=torch.float16)
    assert state["exp_avg"].to(torch.float32) is state["exp_avg"]  # its own dtype: nothing to do
    lightning._optimizer_to_device(moved._opt, torch.device("cpu"))
    state.update(accelerate.send_to_device(dict(state), "cpu", non_blocking=True))
    for name, values in before.items():
        assert isinstance(state[name], Packed) and torch.equal(state[name].unpack(), values)
    for x, y in _batches(4)[2:]:
        _amp_step(moved, moved._opt, moved._scaler, x, y)
    assert torch.equal(_weights(moved), _weights(_state_of_first_weight("int16", "adamw", 4)))


def _head_joins_at_step_2(recipe: str, optimizer: str, added: bool, how: str = "add_param_group") -> nn.Module:
    """The head ``model[2]`` trains from step 2 on. ``added``: frozen until then and unfrozen mid-run (a
    fine-tuning loop), ``how``: added to the optimizer by ``add_param_group`` then, or held by it from the
    start ("in_optimizer"); else (the reference) trainable and in the optimizer from the start, its gradients
    dropped before steps 0 and 1."""
    model = _model()
    head = list(model[2].parameters())
    for p in head:
        p.requires_grad_(not added)
    body = [p for p in model.parameters() if all(p is not q for q in head)]
    held = added and how == "add_param_group"
    opt = _OPTIMIZERS[optimizer](body if held else [{"params": body}, {"params": head, "lr": 0.01}])
    scaler = lp.GradScaler(recipe, model, opt)
    for i, (x, y) in enumerate(_batches(4)):
        if i == 2 and added:
            for p in head:
                p.requires_grad_(True)
            if held:
                opt.add_param_group({"params": head, "lr": 0.01})
        opt.zero_grad()
        with lp.autocast(scaler):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        if i < 2 and not added:
            for p in head:
                p.grad = None
        scaler.step(opt)
        scaler.update()
    model._opt = opt
    return model


@pytest.mark.parametrize("recipe,optimizer", [("int8-lazy", "lp-sgd"), ("int16", "adamw")])
def test_frozen_parameters_the_optimizer_holds_get_their_update_roles_when_unfrozen(recipe, optimizer, monkeypatch):
    """torch's optimizers accept frozen parameters (they get no gradient); fine-tuning loops build the optimizer
    over model.parameters() and unfreeze layers by requires_grad_ later. Before the fix lowprec refused such an
    optimizer ("not trainable parameters of the model (was it built over another model?)"). Now they are
    accepted and get their slot when unfrozen: the weights of the reference run, packed and unpacked."""
    for packed in ("1", "0"):
        monkeypatch.setenv("LOWPREC_PACKED", packed)
        late = _head_joins_at_step_2(recipe, optimizer, added=True, how="in_optimizer")
        assert torch.equal(_weights(late), _weights(_head_joins_at_step_2(recipe, optimizer, added=False)))


@pytest.mark.parametrize("recipe,optimizer", [("int8-lazy", "lp-sgd"), ("int16", "adamw"), ("mixed-fp16", "sgd")])
def test_parameters_added_to_the_optimizer_mid_run_get_their_update_roles(recipe, optimizer, monkeypatch):
    """Before the fix the Trainer knew only the parameters it was built with: a group added later was a KeyError
    under lowprec's optimizers, and under torch's it was silently stepped in fp32 with its gradient still
    multiplied by the loss scale, its weights off the master grid and its state unrounded and unpacked. Now it
    gets its slot at its first step: the same weights as a head in the optimizer from the start."""
    for packed in ("1", "0"):
        monkeypatch.setenv("LOWPREC_PACKED", packed)
        late = _head_joins_at_step_2(recipe, optimizer, added=True)
        assert torch.equal(_weights(late), _weights(_head_joins_at_step_2(recipe, optimizer, added=False)))
    if recipe != "mixed-fp16":  # its optimizer state has no format
        monkeypatch.setenv("LOWPREC_PACKED", "1")
        late = _head_joins_at_step_2(recipe, optimizer, added=True)
        assert any(isinstance(v, Packed) for v in late._opt.state[late[2].weight].values())


@pytest.fixture
def lightning(monkeypatch):
    """The lightning package (the test is skipped without it), with packing on and compilation off."""
    module = pytest.importorskip("lightning")
    monkeypatch.setenv("LOWPREC_COMPILE", "0")
    monkeypatch.setenv("LOWPREC_PACKED", "1")
    return module


def _fit_int16(module, batches: int, ckpt_path=None, **trainer_options):
    """Lightning's own loop over ``batches`` of ``_batches`` (batch 4, 2 epochs) with lowprec's int16 plugin,
    packing on and compilation off; returns the Lightning Trainer."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from lowprec.integrations.lightning import LowprecPrecision

    x = torch.cat([b[0] for b in _batches(batches)])
    y = torch.cat([b[1] for b in _batches(batches)])
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=2, plugins=[LowprecPrecision("int16")], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, **trainer_options)
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=4), ckpt_path=ckpt_path)
    return trainer


def test_lightning_checkpoint_resume_with_adamw_onecycle_clipping_and_accumulation(tmp_path, lightning):
    """Lightning's own loop (ModelCheckpoint, OneCycleLR per step, gradient_clip_val, accumulate_grad_batches)
    with AdamW under int16, its moments packed: the checkpoint holds float tensors only (torch.load with
    weights_only=True reads it) and a resume from it ends bit for bit where the uninterrupted run does."""
    L = lightning

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _model()

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=40)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def fit(directory, ckpt_path=None):
        module = Module()
        _fit_int16(module, 4, ckpt_path, gradient_clip_val=1.0, accumulate_grad_batches=2,
                   callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=directory, save_top_k=-1)])
        return module

    whole = fit(tmp_path / "whole")
    assert any(isinstance(v, Packed) for s in whole.trainer.optimizers[0].state.values() for v in s.values())
    first = sorted((tmp_path / "whole").glob("epoch=0*.ckpt"))[0]
    saved = torch.load(first, weights_only=True)
    buffers = [v for s in saved["optimizer_states"][0]["state"].values() for k, v in s.items() if k != "step"]
    assert buffers and all(type(v) is torch.Tensor and v.dtype == torch.float32 for v in buffers)
    resumed = fit(tmp_path / "resumed", ckpt_path=first)
    assert torch.equal(_weights(whole), _weights(resumed))


@pytest.mark.parametrize("recipe,optimizer", [("int16", "adamw"), ("int8-lazy", "lp-sgd")])
def test_optimizer_load_state_dict_keeps_the_state_packed(recipe, optimizer, monkeypatch):
    """A loop's own resume loads ``optimizer.state_dict()`` (float tensors) with ``optimizer.load_state_dict``,
    not through the scaler. Before the fix the state stayed float32 until the next step (the memory packing
    saves, lost across forward and backward); now it is packed at the load, with the same values."""
    monkeypatch.setenv("LOWPREC_PACKED", "1")
    model = _state_of_first_weight(recipe, optimizer, 2)
    opt = model._opt
    saved = torch.load(io.BytesIO(_saved(opt.state_dict())), weights_only=True)
    opt.load_state_dict(saved)
    buffers = [(k, v) for s in opt.state.values() for k, v in s.items() if k != "step"]
    assert buffers and all(isinstance(v, Packed) for _, v in buffers)
    for i, s in opt.state_dict()["state"].items():
        for k, v in s.items():
            assert torch.equal(v, saved["state"][i][k])


def _trained_in_a_function(recipe: str, optimizer: str, steps: int):
    """A setup function that trains through a GradScaler and returns only the model and the optimizer (and a weak
    reference to the Trainer, to show nothing else holds it)."""
    model = _model()
    opt = _OPTIMIZERS[optimizer](model.parameters())
    scaler = lp.GradScaler(recipe, model, opt)
    for x, y in _batches(steps):
        _amp_step(model, opt, scaler, x, y)
    return model, opt, weakref.ref(scaler.trainer)


@pytest.mark.parametrize("recipe,optimizer", [("int16", "adamw"), ("int8-lazy", "lp-sgd")])
def test_the_state_is_packed_at_a_load_after_its_trainer_is_gone(recipe, optimizer, monkeypatch):
    """The load hook reached the Trainer through a weak reference: with the Trainer gone (built inside a function
    that returned the model and optimizer), ``optimizer.load_state_dict`` left the state as float32 tensors for
    good. The optimizer now records its state formats itself: packed at the load, the same values."""
    monkeypatch.setenv("LOWPREC_PACKED", "1")
    model, opt, trainer = _trained_in_a_function(recipe, optimizer, 2)
    gc.collect()
    assert trainer() is None
    saved = torch.load(io.BytesIO(_saved(opt.state_dict())), weights_only=True)
    opt.load_state_dict(saved)
    buffers = [v for s in opt.state.values() for k, v in s.items() if k != "step"]
    assert buffers and all(isinstance(v, Packed) for v in buffers)
    for i, s in opt.state_dict()["state"].items():
        for k, v in s.items():
            assert torch.equal(v, saved["state"][i][k])


def test_a_trainer_over_the_master_copies_of_an_earlier_trainer_is_refused(eager_update):
    """A native model's optimizer holds the float32 master copies its Trainer pointed it at; a second Trainer over
    it, the first one gone, was refused as "the optimizer does not hold 4 trainable parameters ... build it over
    the model after conversion" (it was). Now the error says what happened and both ways out."""
    model, opt, trainer = _trained_in_a_function("native-bf16", "sgd", 1)
    gc.collect()
    assert trainer() is None
    with pytest.raises(ValueError, match="master copies an earlier lowprec.Trainer pointed it at.* Keep that Trainer"):
        lp.Trainer(model, opt, "native-bf16")


def _saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_swa_averaged_model_and_swalr_over_packed_state(monkeypatch):
    """torch.optim.swa_utils in a lowprec amp loop (AveragedModel copies the converted model, SWALR rewrites the
    learning rate every step): the averaged weights and its forward are the same packed and unpacked."""
    got = {}
    for packed in ("1", "0"):
        monkeypatch.setenv("LOWPREC_PACKED", packed)
        model = _model()
        opt = _OPTIMIZERS["adamw"](model.parameters())
        scaler = lp.GradScaler("int16", model, opt)
        swa = torch.optim.swa_utils.AveragedModel(model)
        sched = torch.optim.swa_utils.SWALR(opt, swa_lr=0.01, anneal_epochs=2)
        for x, y in _batches(4):
            _amp_step(model, opt, scaler, x, y)
            sched.step()
            swa.update_parameters(model)
        got[packed] = (_weights(swa.module), swa(_batches(1)[0][0]).detach())
    assert torch.equal(got["1"][0], got["0"][0]) and torch.equal(got["1"][1], got["0"][1])


@pytest.mark.parametrize("optimizer,scalars", [
    (lambda ps: torch.optim.NAdam(ps, lr=1e-2), ("mu_product",)),
    (lambda ps: torch.optim.ASGD(ps, lr=1e-2, lambd=1e-2), ("eta", "mu")),
], ids=["NAdam", "ASGD"])
def test_an_optimizers_scalar_bookkeeping_is_not_rounded_to_the_state_format(optimizer, scalars):
    """NAdam's ``mu_product`` and ASGD's ``eta``/``mu`` are 0-dim coefficients, not per-element state; they
    depend on the step count alone, so the same optimizer on a plain float model gives their exact values.
    Before the fix they were rounded to int8 (int8-lazy's optimizer_state) like the moments: NAdam's bias
    correction off by up to 2**-7 relative, every step."""
    model = _model()
    opt = optimizer(model.parameters())
    scaler = lp.GradScaler("int8-lazy", model, opt)
    plain = _model()
    reference = optimizer(plain.parameters())
    for x, y in _batches(4):
        _amp_step(model, opt, scaler, x, y)
        reference.zero_grad()
        F.cross_entropy(plain(x), y).backward()
        reference.step()
    state, expected = opt.state_dict()["state"], reference.state_dict()["state"]
    for i in expected:
        for name in scalars:
            assert state[i][name].dtype == expected[i][name].dtype and torch.equal(state[i][name], expected[i][name])
    assert any(isinstance(v, Packed) for s in opt.state.values() for v in s.values())  # the moments still are


def test_lightning_backbone_finetuning_gives_the_unfrozen_backbone_its_update_roles(lightning):
    """Lightning's BackboneFinetuning freezes the backbone, then unfreezes it and adds it to the optimizer
    (add_param_group) at epoch 1. Before the fix the backbone was then stepped outside lowprec's update: its
    AdamW moments neither rounded nor packed, its weights off the int16 master grid."""
    L = lightning
    from lightning.pytorch.callbacks import BackboneFinetuning

    from lowprec.formats import parse_format
    from lowprec.formats.packing import pack

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            net = _model()
            self.backbone, self.head = net[:2], net[2]

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self.head(self.backbone(batch[0])), batch[1])

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)

    module = Module()
    trainer = _fit_int16(module, 2, enable_checkpointing=False,
                         callbacks=[BackboneFinetuning(unfreeze_backbone_at_epoch=1)])
    weight = module.backbone[0].weight
    state = trainer.optimizers[0].state[weight]
    assert isinstance(state["exp_avg"], Packed) and isinstance(state["exp_avg_sq"], Packed)
    pack(weight.detach(), parse_format("dfx<16>"), verify=True)  # ValueError off the master grid
