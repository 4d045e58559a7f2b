"""The Lightning and Fabric precision plugins take exactly lp.Trainer's steps, skipped steps and resumes included;
under two-process DDP (gloo, forked ranks) every rank skips the same steps and holds the same state."""

import logging
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")

import lightning as L  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import lowprec as lp  # noqa: E402
from integration_setup import (  # noqa: E402
    INF_STEP, POLICIES, assert_same_tensors, batches, sgd, step_loss, tiny_net, trainer_run,
)
from lightning_module import Module  # noqa: E402
from lowprec.integrations.lightning import LowprecFabricPrecision, LowprecPrecision, resolve_policy  # noqa: E402
from ranks import assert_identical, run_ranks  # noqa: E402

EPOCH = batches(3)  # one epoch: 3 batches of 6, in order; two epochs repeat them
TWO_EPOCHS = EPOCH + EPOCH


@pytest.fixture(autouse=True)
def _eager(monkeypatch):
    monkeypatch.setenv("LOWPREC_COMPILE", "0")  # the reference's native update unfused, as under the plugin


def loader():
    x = torch.cat([b[0] for b in EPOCH])
    y = torch.cat([b[1] for b in EPOCH])
    return DataLoader(TensorDataset(x, y), batch_size=6, shuffle=False)


def fit(policy, epochs, ckpt_path=None, **kwargs):
    module = Module()
    plugin = LowprecPrecision(policy)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, plugins=[plugin], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **kwargs)
    trainer.fit(module, loader(), ckpt_path=ckpt_path)
    return module, trainer, plugin


def net_state(module):
    return {k.removeprefix("net."): v for k, v in module.state_dict().items()}


@pytest.mark.parametrize("policy", POLICIES)
def test_lightning_plugin_equals_trainer_and_resumes_bit_exactly(policy, tmp_path, caplog):
    ref_model, ref_trainer, ref_results = trainer_run(policy, TWO_EPOCHS)
    assert [r.skipped for r in ref_results] == [i == INF_STEP for i in range(6)]
    with caplog.at_level(logging.INFO, logger="lowprec.integrations.lightning"):
        module, trainer, plugin = fit(policy, 1)
    assert plugin.skipped_steps == 1 and trainer.progress_bar_metrics["lowprec/skipped_steps"] == 1.0
    assert "step 2 skipped" in caplog.text and "net.0.weight" in caplog.text  # overflow attribution
    path = tmp_path / "epoch1.ckpt"
    trainer.save_checkpoint(path)
    Module().load_state_dict(torch.load(path, weights_only=True)["state_dict"], strict=True)  # before convert

    whole, _, _ = fit(policy, 2)
    resumed, _, plugin2 = fit(policy, 2, ckpt_path=path)
    assert_same_tensors(net_state(whole), ref_model.state_dict())
    assert_same_tensors(net_state(resumed), ref_model.state_dict())
    assert plugin2.skipped_steps == 1  # restored with the checkpoint, no new skip in epoch 2
    state, ref_state = plugin2.scaler.trainer.state_dict(), ref_trainer.state_dict()
    assert state["scaler"] == ref_state["scaler"] and state["steps"] == ref_state["steps"] == 6
    assert_same_tensors(state["accumulators"], {f"net.{k}": v for k, v in ref_state["accumulators"].items()})
    assert_same_tensors(state["master_copies"], {f"net.{k}": v for k, v in ref_state["master_copies"].items()})


class ManualModule(Module):
    """The same steps through manual optimization: manual_backward and optimizer.step() in training_step."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(step_loss(self, batch, self.loss_step()))
        optimizer.step()


@pytest.mark.parametrize("policy", ["mixed-fp16", "native-bf16"])
def test_lightning_manual_optimization_equals_trainer(policy):
    ref_model, _, _ = trainer_run(policy, EPOCH)
    module, plugin = ManualModule(), LowprecPrecision(policy)
    L.Trainer(accelerator="cpu", devices=1, max_epochs=1, plugins=[plugin], logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False).fit(module, loader())
    assert plugin.skipped_steps == 1
    assert_same_tensors(net_state(module), ref_model.state_dict())


def test_lightning_gradient_clipping_clips_unscaled_gradients():
    """gradient_clip_val clips after unscaling, as lp.Trainer(clip_grad_norm=...) does."""
    model = lp.convert(tiny_net(), "mixed-fp16")
    ref = lp.Trainer(model, sgd(model), "mixed-fp16", clip_grad_norm=0.05)
    for i, b in enumerate(EPOCH):
        ref.step(step_loss(model, b, i))
    module, _, _ = fit("mixed-fp16", 1, gradient_clip_val=0.05)
    assert_same_tensors(net_state(module), model.state_dict())


def fabric_run(policy, data, first_step=0, load=None, save=None):
    plugin = LowprecFabricPrecision(policy)
    fabric = L.Fabric(accelerator="cpu", devices=1, plugins=[plugin])
    net = tiny_net()
    model, optimizer = fabric.setup(net, sgd(net))
    if load is not None:
        fabric.load(load, {"model": model, "optimizer": optimizer, "lowprec": plugin})
    for i, b in enumerate(data, start=first_step):
        optimizer.zero_grad()
        fabric.backward(step_loss(model, b, i))
        optimizer.step()
    if save is not None:
        fabric.save(save, {"model": model, "optimizer": optimizer, "lowprec": plugin})
    return net, plugin


@pytest.mark.parametrize("policy", POLICIES)
def test_fabric_plugin_equals_trainer_and_resumes_bit_exactly(policy, tmp_path):
    ref_model, _, _ = trainer_run(policy, TWO_EPOCHS)
    net, plugin = fabric_run(policy, TWO_EPOCHS)
    assert plugin.skipped_steps == 1 and plugin.last_result.step == 5
    assert_same_tensors(net.state_dict(), ref_model.state_dict())
    path = tmp_path / "half.ckpt"
    fabric_run(policy, TWO_EPOCHS[:3], save=path)
    resumed, plugin2 = fabric_run(policy, TWO_EPOCHS[3:], first_step=3, load=path)
    assert_same_tensors(resumed.state_dict(), ref_model.state_dict())
    assert plugin2.skipped_steps == 1


def test_fabric_clip_gradients_clips_the_master_copies():
    """fabric.clip_gradients unscales first and clips what the optimizer updates (a native model's fp32
    masters), as lp.Trainer(clip_grad_norm=...) does."""
    ref = lp.convert(tiny_net(), "native-bf16")
    trainer = lp.Trainer(ref, sgd(ref), "native-bf16", clip_grad_norm=0.05)
    plugin = LowprecFabricPrecision("native-bf16")
    fabric = L.Fabric(accelerator="cpu", devices=1, plugins=[plugin])
    net = tiny_net()
    model, optimizer = fabric.setup(net, sgd(net))
    for b in EPOCH:
        ref_norm = trainer.step(step_loss(ref, b, 0)).grad_norm
        fabric.backward(step_loss(model, b, 0))
        norm = fabric.clip_gradients(model, optimizer, max_norm=0.05)
        assert torch.equal(norm, ref_norm) and norm > 0.05
        optimizer.step()
    assert_same_tensors(net.state_dict(), ref.state_dict())


def test_recipe_strings_and_their_limits():
    assert resolve_policy("mixed-bf16+path=native").spec() == lp.Policy.preset("native-bf16").spec()
    assert resolve_policy("weight=int8").spec() == lp.Policy.parse("weight=int8").spec()
    with pytest.raises(ValueError, match="belong to the LightningModule"):
        LowprecPrecision("wrpn-4-4+width=2")
    with pytest.raises(ValueError, match="one optimizer"):
        LowprecPrecision("int8").connect(tiny_net(), [sgd(tiny_net()), sgd(tiny_net())], [])


@pytest.mark.slow  # two processes importing torch and lightning
def test_ddp_two_processes_agree_on_skips_scale_and_weights(tmp_path):
    """2-process DDP (gloo) through Lightning's strategy: an inf on one rank skips the step on both, the loss
    scale backs off on both, and both ranks end with the same weights bit for bit."""
    from test_distributed import torchrun

    torchrun(Path(__file__).parent / "lightning_ddp_worker.py", str(tmp_path), "mixed-fp16", timeout=240)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for rank in ranks:
        assert rank["skipped"] == 1 and rank["steps"] == INF_STEP + 1
        assert rank["scaler"]["scale"] == lp.LossScaler.dynamic().scale / 2
    assert ranks[0]["scaler"] == ranks[1]["scaler"]
    assert_same_tensors(ranks[0]["net"], ranks[1]["net"])
    assert not torch.equal(ranks[0]["net"]["0.weight"], tiny_net().state_dict()["0.weight"])  # it trained


# -- data parallel: two forked ranks on a gloo group (tests/ranks.py), Lightning's DDP strategy and Fabric's ---------
INF_GRAD_STEPS = (1, 5)  # rank 1 alone: an inf written into a gradient after DDP's all-reduce
#: dynamic fixed point whose exponents move by the overflow rate pooled over the ranks, from auto start exponents
DFX_OVERFLOW = ("weight=dfx<8>,activation=dfx<8>,output_grad=dfx<10>,activation_grad=dfx<10>,weight_grad=dfx<10>,"
                "master=dfx<12>,exponent_rule=overflow,exponent_interval=2,init_int_bits=auto,max_overflow_rate=0.01")
DDP_EPOCH = batches(8)  # 4 steps of 6 examples a rank


def ddp_loader():
    return DataLoader(TensorDataset(torch.cat([b[0] for b in DDP_EPOCH]), torch.cat([b[1] for b in DDP_EPOCH])),
                      batch_size=6, shuffle=False)


class OneRankModule(Module):
    """Rank 1 alone overflows: an inf loss at INF_STEP (DDP's all-reduce carries its inf gradients to rank 0) and
    an inf gradient written after the all-reduce at INF_GRAD_STEPS (only lowprec's agreement tells rank 0)."""

    def __init__(self):
        super().__init__(inf_rank=1)

    def on_after_backward(self):
        if self.global_rank == 1 and self.global_step in INF_GRAD_STEPS:
            self.net[0].weight.grad[0, 0] = float("inf")


def _ddp_fit(policy, epochs, ckpt_path=None, save=None) -> dict:
    module, plugin = OneRankModule(), LowprecPrecision(policy)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=epochs, plugins=[plugin],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, ddp_loader(), ckpt_path=ckpt_path)
    if save is not None:
        trainer.save_checkpoint(save)  # every rank calls it, rank 0 writes
    assert plugin.scaler.trainer.distributed and trainer.world_size == 2
    return {"net": net_state(module), "plugin": plugin.state_dict(), "quantizers":
            {f"{n}:{r}": q.state_dict() for n, r, q in lp.nn.quantizers(module)}}


def _fit_on_rank(rank, policy, path):
    first = _ddp_fit(policy, 1, save=path)
    return first, _ddp_fit(policy, 2), _ddp_fit(policy, 2, ckpt_path=path)


@pytest.mark.parametrize("policy", ["mixed-fp16", DFX_OVERFLOW], ids=["mixed-fp16", "dfx-overflow"])
def test_ddp_ranks_skip_together_stay_identical_and_resume_bit_exactly(policy, tmp_path):
    """Lightning's DDP strategy on two ranks: the steps where rank 1 alone overflowed (1, INF_STEP, 5) are
    skipped on both, the loss scale backs off on both, weights, optimizer state, master copies, exponents and
    RNG states agree bit for bit; a resume from Lightning's checkpoint after epoch 1 ends where two epochs
    straight end, on both ranks."""
    ranks = run_ranks(_fit_on_rank, policy, tmp_path / "epoch1.ckpt")
    first, straight, resumed = ranks[0]
    assert first["plugin"]["skipped_steps"] == 2 and straight["plugin"]["skipped_steps"] == 3
    assert straight["plugin"]["trainer"]["steps"] == 8
    if policy == "mixed-fp16":
        assert straight["plugin"]["trainer"]["scaler"]["scale"] == lp.LossScaler.dynamic().scale / 8
    assert_identical(ranks[0], ranks[1])
    assert_identical(straight, resumed)
    assert not torch.equal(straight["net"]["0.weight"], tiny_net().state_dict()["0.weight"])  # it trained


def _accumulated_on_rank(rank):
    module, plugin = Module(), LowprecPrecision("native-bf16")
    L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, accumulate_grad_batches=2,
              plugins=[plugin], logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(module, ddp_loader())
    return {"net": net_state(module), "plugin": plugin.state_dict()}


def test_ddp_gradient_accumulation_of_a_native_model_keeps_the_ranks_identical():
    """accumulate_grad_batches under DDP runs the first micro-batch's backward in ``no_sync()``: its gradient
    must reach the all-reduce of the second (before, the Trainer had moved it into the fp32 master copies, and
    the ranks' weights differed after the first step)."""
    a, b = run_ranks(_accumulated_on_rank)
    assert a["plugin"]["trainer"]["steps"] == 2
    assert_identical(a, b)
    assert not torch.equal(a["net"]["0.weight"].float(), tiny_net().state_dict()["0.weight"])  # it trained


def _fabric_on_rank(rank, policy):
    plugin = LowprecFabricPrecision(policy)
    fabric = L.Fabric(accelerator="cpu", devices=2, strategy="ddp", plugins=[plugin])
    fabric.launch()
    net = tiny_net()
    model, optimizer = fabric.setup(net, sgd(net))
    skipped = []
    for step, batch in enumerate(DDP_EPOCH[rank::2]):
        optimizer.zero_grad()
        fabric.backward(step_loss(model, batch, step if rank == 1 else -1))  # rank 1: an inf loss at INF_STEP
        if rank == 1 and step in INF_GRAD_STEPS:
            net[0].weight.grad[0, 0] = float("inf")  # after DDP's all-reduce
        optimizer.step()
        skipped.append(plugin.last_result.skipped)
    assert plugin.scaler.trainer.distributed
    return {"skipped": skipped, "net": net.state_dict(), "plugin": plugin.state_dict(),
            "quantizers": {f"{n}:{r}": q.state_dict() for n, r, q in lp.nn.quantizers(net)}}


@pytest.mark.parametrize("policy", ["mixed-fp16", DFX_OVERFLOW], ids=["mixed-fp16", "dfx-overflow"])
def test_fabric_ddp_ranks_skip_together_and_stay_identical(policy):
    """Fabric shows the plugin the optimizer only at the first step, so the Trainer is built after the first
    forward: the start exponents that forward chose on each rank from its own batch agree all the same (the
    plugin's GradScaler sets the agreement up when it converts the model)."""
    a, b = run_ranks(_fabric_on_rank, policy)
    assert a["skipped"] == [step in (1, INF_STEP) for step in range(4)]
    assert any(q["exponent"] is not None for q in a["quantizers"].values()) == (policy == DFX_OVERFLOW)
    assert_identical(a, b)
