"""How each parameter is stored after an optimizer step: the three update modes of the papers.

The mode of a parameter is read from its policy's ``master`` and ``accumulator`` roles:

* ``master=None`` (Micikevicius et al., MPT; also WRPN's shadow weights): the parameter *is* the fp32 master
  copy; the optimizer updates it in fp32 and nothing else happens here. The low-precision copy is made by the
  layer's ``weight`` quantizer in each forward. A native fp16/bf16 parameter (``lowprec.nn.native``) gets a
  separate fp32 master copy instead: the optimizer holds the copy, gradients are added into it in fp32, and
  after each step the parameter becomes the copy rounded to its dtype (nearest even).
* ``master=F``, ``accumulator=None`` (Courbariaux et al.'s update width; Park et al.'s plain INT8): the
  parameter lives in F, there is no fp32 copy: ``θ <- Q_F(θ + Δ)``, i.e. the optimizer's fp32 result rounded
  once to F. An update smaller than half of θ's quantum in F is lost (swamping).
* ``master=F``, ``accumulator=A`` (Park et al.'s lazy update, their Algorithm 1 with the sign of the residual
  step corrected, see spec/papers.md §5 item 5)::

      acc  = Q_A(acc + Δ)           # Δ: this step's optimizer update (−η·g, momentum or Adam step, decay)
      θnew = Q_F(θ + acc)           # only the part of acc above θ's quantum "sticks"
      acc  = Q_A(acc − (θnew − θ))  # keep the residual; the paper prints "acc + (θ_update − θ)"
      θ    = θnew

  One accumulator per parameter element, initialised to 0, kept between steps packed in A's width (int16
  codes and the exponent for Park's INT16: ``stored.py``) and unpacked to the parameter's dtype (fp32 for
  emulated formats) inside the update of its own parameter, so one parameter's float accumulator exists at a
  time. Each sum is formed in that dtype and rounded once by Q (in fp32 the sums are exact when the two grids
  span at most 24 bits together: an INT8 θ and an INT16 accumulator a few θ quanta in size span 22). Weight decay is part of Δ, so a decay step below
  θ's quantum is not lost but accumulates until it moves θ (the failure of torch/optimi bf16 training).

Orthogonal to the three modes, the policy's ``update_rule`` says where a rounded momentum enters:

* ``optimizer`` (default; MPT, WRPN, Park's INT8/INT16 presets): the optimizer steps as torch does, from its
  state in fp32 (the momentum of the previous step as rounded), and Δ is applied; the new state is then rounded
  to ``optimizer_state`` (``state.py``). The update of a step thus uses that step's unrounded momentum.
* ``courbariaux`` (fixed-20, dfx-10-12; Courbariaux et al., spec D1), SGD only (``courbariaux_step_``)::

      v = Q_state(M·v − LR·(g + wd·θ))   # the velocity, LR included, kept as optimizer.state[θ]["momentum_buffer"]
      θ = Q_F(θ + v)                     # the ROUNDED velocity moves the weight (or the lazy update by Δ = v)

  The optimizer's param group supplies LR, M (``momentum``) and wd; nesterov, dampening and maximize are refused.

Q rounds with the role's rounding mode (ties to even for "nearest"). Dynamic fixed point formats use the
policy's exponent rule through one ``lowprec.policy.Quantizer`` per parameter and role (Courbariaux's separate
groups for W and b): "maxabs" takes the exponent from the rounded tensor itself; "overflow" keeps a moving
exponent that observes once per step the tensor it rounds (master: θ + Δ, or θ + acc in the lazy update;
accumulator: acc + Δ); the residual rounding reuses the accumulator's exponent without recording it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

from ..formats.packing import Packed
from ..policy import Policy, Quantizer
from . import stored
from .optim import SGD, DeltaOptimizer

__all__ = ["ParamSlot", "step_parameters", "check_update_roles", "assign_", "use_master_copies", "courbariaux_step_",
           "check_courbariaux_optimizer"]

_HALF = (torch.float16, torch.bfloat16)


def check_update_roles(policy: Policy, where: str) -> None:
    """ValueError for update roles that make no sense together (an accumulator without a master format)."""
    accumulator = policy.get("accumulator")
    if accumulator is not None and policy.get("master") is None:
        raise ValueError(
            f"{where}: accumulator={accumulator} is set but master is not. The lazy update (Park et al.) "
            "accumulates what a low-precision parameter cannot absorb; with an fp32 master copy (master=none) "
            "nothing is lost. Set master=<format> (e.g. master=int8) or accumulator=none."
        )


def use_master_copies(optimizer: torch.optim.Optimizer, slots: Sequence[ParamSlot]) -> None:
    """Point the optimizer at the float32 master copies of native parameters (before its first step)."""
    masters = {id(s.param): s.master_copy for s in slots if s.master_copy is not None}
    if not masters:
        return
    if any(optimizer.state.get(p) for g in optimizer.param_groups for p in g["params"] if id(p) in masters):
        raise ValueError(
            "the optimizer already holds state for fp16/bf16 parameters; build lowprec.Trainer before the first "
            "optimizer step, so that the optimizer updates float32 master copies from the start"
        )
    for group in optimizer.param_groups:
        group["params"] = [masters.get(id(p), p) for p in group["params"]]


def assign_(dst: Tensor, src: Tensor) -> None:
    """dst <- src in place (nothing to do when a quantizer returned its input itself)."""
    if src is not dst:
        dst.copy_(src)


class _GradInMaster(Tensor):
    """The ``.grad`` of a native fp16/bf16 parameter after ``Trainer.unscale_()``: the real gradient is the float32
    one of the master copy. Any use raises RuntimeError naming the way to reach it (no memory: an expanded 0-d)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(
            "after trainer.unscale_(), the gradient of an fp16/bf16 (native) parameter is in its float32 master "
            "copy (unscaled, summed over backward passes there): model.parameters() do not hold it. Clip or read "
            "trainer.master_params() instead, e.g. torch.nn.utils.clip_grad_norm_(trainer.master_params(), 1.0), "
            "or call trainer.clip_grad_norm_(1.0)."
        )


class ParamSlot:
    """One trainable parameter with its storage format (``master``), lazy-update accumulator and
    optimizer-state format, as its module's policy gives them. Building it rounds the parameter once into its
    master format (without counting that as an observed batch of a moving exponent)."""

    def __init__(self, name: str, param: Tensor, policy: Policy):
        check_update_roles(policy, name)
        master, accumulator = policy.get("master"), policy.get("accumulator")
        self.name, self.param, self.policy = name, param, policy
        self.master = Quantizer(master, policy) if master is not None else None
        self.accumulator = Quantizer(accumulator, policy) if accumulator is not None else None
        self._acc: stored.Stored | None = None
        if self.accumulator is not None:
            self.set_acc(torch.zeros_like(param, memory_format=torch.preserve_format))
        self.state_quant = policy.get("optimizer_state")
        self.courbariaux = policy.update_rule == "courbariaux"
        # native fp16/bf16 parameter (lowprec.nn.native) under an fp32 master: the optimizer updates this copy
        self.master_copy = param.detach().float() if master is None and param.dtype in _HALF else None
        if self.master is not None:  # start inside the master format (not an observed batch)
            with torch.no_grad():
                assign_(param, self.master.round(param))

    @property
    def holder(self) -> Tensor:
        """The tensor the optimizer updates and whose ``.grad`` holds the step's gradient: the float32 master
        copy of a native parameter, the parameter itself otherwise."""
        return self.param if self.master_copy is None else self.master_copy

    @torch.no_grad()
    def gather_grad_(self) -> None:
        """Native parameter: add its gradient, in float32, to the master copy's and drop it (exact: fp16 and
        bf16 values are float32 values; a sum of several backward passes is formed in float32)."""
        grad = self.param.grad
        if self.master_copy is None or grad is None:
            return
        master = self.master_copy
        master.grad = grad.float() if master.grad is None else master.grad.add_(grad)
        self.param.grad = None

    def refer_grad_to_master_(self) -> None:
        """Native parameter whose gradient is in the master copy: its ``.grad`` becomes a placeholder that raises
        on any use (``_GradInMaster``), so that clipping or reading ``model.parameters()`` fails loudly instead of
        missing the gradient (torch.distributed's DTensor parameters are left as they are)."""
        if self.master_copy is not None and self.master_copy.grad is not None and type(self.param.data) is Tensor:
            p = self.param
            self.param.grad = torch.zeros((), dtype=p.dtype, device=p.device).expand(p.shape).as_subclass(_GradInMaster)

    @property
    def lazy(self) -> bool:
        return self.accumulator is not None

    def quantizers(self) -> list[tuple[str, Quantizer]]:
        """(role, quantizer) of the master and accumulator roles this parameter has."""
        return [(r, q) for r, q in (("master", self.master), ("accumulator", self.accumulator)) if q is not None]

    @torch.no_grad()
    def store_(self, observe: bool = True) -> None:
        """θ <- Q_master(θ) in place (nothing for an fp32 master); ``observe=False`` keeps θ out of a moving
        exponent's statistics (a re-rounding after a constraint such as max-norm, not a new batch). A native
        parameter is its master copy rounded to its dtype (nearest even); with ``observe=False`` (after the
        caller changed the parameter) the changed elements are copied into the master first."""
        if self.master_copy is not None:
            if not observe:
                changed = self.param != self.master_copy.to(self.param.dtype)
                self.master_copy.copy_(torch.where(changed, self.param.float(), self.master_copy))
            self.param.copy_(self.master_copy)
        elif self.master is not None:
            assign_(self.param, self.master(self.param) if observe else self.master.round(self.param))

    @property
    def acc(self) -> Tensor | None:
        """The lazy-update accumulator as a float tensor in the parameter's dtype (None without one): a new
        tensor when it is kept packed, so change it with ``set_acc``, not in place."""
        return None if self._acc is None else stored.load(self._acc)

    def set_acc(self, value: Tensor) -> None:
        """Make ``value`` (float, the parameter's shape) the accumulator: kept packed in the accumulator's format
        where every value lies on its grid and packing is on (``stored.repack``), as it is otherwise."""
        if self.accumulator is None:
            raise ValueError(f"{self.name} has no lazy-update accumulator (its policy sets accumulator=none)")
        if value.shape != self.param.shape:
            raise ValueError(f"accumulator of {self.name}: expected shape {tuple(self.param.shape)}, "
                             f"got {tuple(value.shape)}")
        value = value.to(device=self.param.device, dtype=self.param.dtype)
        kept = stored.repack(value, self.accumulator.quant.format, stored.packing_on(self.policy))
        self._acc = value.clone() if kept is value else kept  # never shared with the caller's tensor

    @property
    def acc_nbytes(self) -> int:
        """Bytes the accumulator holds between steps (packed, or its float tensor); 0 without one."""
        return 0 if self._acc is None else stored.nbytes(self._acc)

    @torch.no_grad()
    def lazy_update_(self, delta: Tensor) -> None:
        """Park's lazy update of θ by Δ (module docstring), in place on θ; the accumulator is unpacked here
        and stored packed again (``stored.py``)."""
        theta = self.param
        acc = self.accumulator(stored.load_add(self._acc, delta))
        new = self.master(theta + acc)
        residual = acc - (new - theta)
        del acc
        assign_(theta, new)
        self._acc = stored.store_rounded(self.accumulator, residual, stored.packing_on(self.policy), observe=False)


def unpack_state_of_(optimizer: torch.optim.Optimizer, params: Iterable[Tensor]) -> None:
    """The optimizer state of ``params`` kept packed between steps (``state.py``) as float tensors again."""
    for p in params:
        state = optimizer.state.get(p)
        for buffer, value in (state or {}).items():
            if isinstance(value, Packed):
                state[buffer] = value.unpack()


@torch.no_grad()
def step_parameters(
    optimizer: torch.optim.Optimizer, slots: Sequence[ParamSlot], state_done: Callable[[ParamSlot], None] | None = None
) -> None:
    """One optimizer step, then each parameter's storage rule (parameters without a gradient are untouched).

    State kept packed between steps is unpacked first (the optimizers read float tensors). A
    ``DeltaOptimizer`` (lowprec.train.SGD/AdamW) takes one parameter at a time: its state unpacked, its Δ
    (``parameter_delta``), its storage rule, then ``state_done(slot)`` (the Trainer rounds and packs that
    parameter's optimizer state there), so that one parameter's float state and Δ exist at a time. Any other
    optimizer steps all parameters at once (the caller rounds the state afterwards); lazy parameters need Δ
    itself, so θ is snapshot, ``optimizer.step()`` runs in fp32, Δ = θ_after − θ_before (exact in fp32 when the
    two are within a factor 2: Sterbenz) and θ is restored before the lazy update.
    """
    if isinstance(optimizer, DeltaOptimizer):
        by_holder = {id(s.holder): s for s in slots}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                unpack_state_of_(optimizer, [p])
                _store_update_(by_holder[id(p)], optimizer.parameter_delta(group, p))
                if state_done is not None:
                    state_done(by_holder[id(p)])
        return
    lazy = {id(s.param): s for s in slots if s.lazy and s.param.grad is not None}
    before = {k: s.param.detach().clone() for k, s in lazy.items()}
    optimizer.step()  # its pre-hook (state.install_state_hooks) unpacks the state kept packed
    deltas: dict[int, Tensor] = {}
    for k, s in lazy.items():
        deltas[k] = s.param - before[k]
        s.param.copy_(before.pop(k))
    for s in slots:
        if s.holder.grad is None:
            continue
        if id(s.param) in lazy:
            s.lazy_update_(deltas.pop(id(s.param)))
        else:
            s.store_()


def _store_update_(slot: ParamSlot, delta: Tensor) -> None:
    """θ <- θ + Δ by the slot's storage rule: Park's lazy update, or the sum rounded into the master format."""
    if slot.lazy:
        slot.lazy_update_(delta)
    else:
        slot.holder.add_(delta)
        slot.store_()


def check_courbariaux_optimizer(optimizer: torch.optim.Optimizer, slots: Sequence[ParamSlot]) -> None:
    """ValueError unless the optimizer can drive Courbariaux's update for the slots that ask for it: SGD
    (torch.optim.SGD or lowprec.train.SGD) without nesterov, dampening or maximize."""
    rule = {id(s.holder) for s in slots if s.courbariaux}
    if not rule:
        return
    fix = ("Use torch.optim.SGD(params, lr, momentum=M) (plain momentum), or keep the optimizer's own update "
           "with update_rule=optimizer (e.g. 'dfx-10-12+update_rule=optimizer').")
    if not isinstance(optimizer, (torch.optim.SGD, SGD)):
        raise ValueError(f"update_rule=courbariaux (v <- Q(M v - LR g), W <- Q(W + v)) is SGD with momentum; got "
                         f"{type(optimizer).__name__}. {fix}")
    for group in optimizer.param_groups:
        if any(id(p) in rule for p in group["params"]) and (
            group.get("nesterov") or group.get("dampening", 0) != 0 or group.get("maximize")
        ):
            raise ValueError("update_rule=courbariaux takes plain momentum: nesterov, dampening and maximize are "
                             f"not part of it. {fix}")


@torch.no_grad()
def courbariaux_step_(
    optimizer: torch.optim.Optimizer, slots: Sequence[ParamSlot], round_velocity: Callable[[ParamSlot, Tensor], Tensor],
    state_done: Callable[[ParamSlot], None] | None = None,
) -> None:
    """Courbariaux et al.'s update (module docstring) of every slot with a gradient: v = round_velocity(slot,
    M·v − LR·(g + wd·θ)) (the slot's optimizer_state format), stored as the optimizer's momentum buffer, then
    θ = Q_master(θ + v) (or Park's lazy update by v), then ``state_done(slot)`` (the Trainer packs v there)."""
    groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    for s in slots:
        theta = s.holder
        if theta.grad is None:
            continue
        group = groups[id(theta)]
        lr, mu, wd = float(group["lr"]), float(group.get("momentum", 0.0)), float(group.get("weight_decay", 0.0))
        g = theta.grad if wd == 0 else theta.grad + wd * theta
        state = optimizer.state[theta]
        # the velocity kept packed is read straight into M·v (never unpacked first; not at all where M = 0)
        v = g * -lr if mu == 0 or "momentum_buffer" not in state else \
            stored.load_scaled(state["momentum_buffer"], mu) - g * lr
        v = round_velocity(s, v)
        state["momentum_buffer"] = v
        _store_update_(s, v)
        if state_done is not None:
            state_done(s)
