"""The Lightning and Fabric precision plugins take exactly lp.Trainer's steps, skipped steps and resumes included."""

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
