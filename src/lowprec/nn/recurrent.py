"""Quantized recurrent layers: QLSTM, QGRU and QRNN (the Elman RNN, tanh or relu; any depth, bidirectional,
batch_first, PackedSequence input, an initial state h0/(h0, c0)) and their cells.

The recurrence is written out in Python, one time step at a time, with the same parameters (names, shapes,
gate order i,f,g,o for LSTM and r,z,n for GRU, ``nonlinearity`` for RNN) as torch's layers, and the same inputs and results: a
PackedSequence in gives a PackedSequence out (same batch_sizes and indices), h0 and h_n in the caller's batch
order, the two directions' outputs concatenated and their final states interleaved per layer as torch does.
Each sequence runs on its own rows only (torch's packed algorithm): padding is never read, rounded or counted.
With nothing rounded (every role fp32) the results equal torch's to float32 rounding, not bit for bit: torch
sums the gate pre-activations in another order. Numerics per forward:

* The weights and biases of each layer are quantized once (weight / bias roles; weight_grad / bias_grad round
  their gradient once, summed over all time steps) through a role boundary.
* Each matmul is a QLinearFunction: the input-to-hidden one over the whole sequence at once, the
  hidden-to-hidden one at every step. It quantizes its input (activation role: x_t, or h_{t-1}), its result
  (output role: the gate pre-activations W x + b, U h + b), dE/dz (output_grad) and dE/dx or dE/dh
  (activation_grad), and emulates the policy's accumulator if any.
* The gates, the cell state c and the new h (an RNN's tanh or relu of its two pre-activations' sum) are computed
  in float32 (MPT: point-wise ops in fp32). The
  returned hidden states are these float32 values; whatever consumes them (the next step, the next layer)
  quantizes them as its activation.

For dynamic fixed point with the overflow rule, every quantized tensor is one observation of its group, so a
recurrent layer's groups see several per batch (the weight and bias groups two per layer and direction, the
activation, output and gradient groups one per matmul: 1 + T per layer and direction): their
``exponent_interval`` counts observations.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from ..policy import Policy, Quantizer, Role
from .functions import QLinearFunction, quantize_boundary
from .layers import QuantizedModule
from .roles import IDENTITY, Accumulator

__all__ = ["QLSTM", "QGRU", "QRNN", "QLSTMCell", "QGRUCell", "QRNNCell"]

State = tuple[Tensor, ...]
Step = Callable[[Tensor, State, Tensor, "Tensor | None", Mapping[str, Quantizer], "Accumulator | None"], State]

_PARAM_ROLES = Role.select(layer=True, parameter=True)  # applied once per forward, not per matmul


def lstm_step(zx: Tensor, state: State, w_hh: Tensor, b_hh: Tensor | None,
              roles: Mapping[str, Quantizer], accumulator: Accumulator | None) -> State:
    """One LSTM step from the input projection zx = W_ih x_t + b_ih: returns (h_t, c_t)."""
    h, c = state
    gates = zx + QLinearFunction.apply(h, w_hh, b_hh, roles, accumulator)
    i, f, g, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def gru_step(zx: Tensor, state: State, w_hh: Tensor, b_hh: Tensor | None,
             roles: Mapping[str, Quantizer], accumulator: Accumulator | None) -> State:
    """One GRU step from the input projection zx = W_ih x_t + b_ih: returns (h_t,)."""
    (h,) = state
    zh = QLinearFunction.apply(h, w_hh, b_hh, roles, accumulator)
    x_r, x_z, x_n = zx.chunk(3, dim=-1)
    h_r, h_z, h_n = zh.chunk(3, dim=-1)
    r = torch.sigmoid(x_r + h_r)
    z = torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n)
    return ((1 - z) * n + z * h,)


def rnn_step(zx: Tensor, state: State, w_hh: Tensor, b_hh: Tensor | None,
             roles: Mapping[str, Quantizer], accumulator: Accumulator | None, nonlinearity: str = "tanh") -> State:
    """One Elman RNN step from the input projection zx = W_ih x_t + b_ih: returns (h_t,), h_t = tanh or relu of
    zx + W_hh h_{t-1} + b_hh."""
    (h,) = state
    z = zx + QLinearFunction.apply(h, w_hh, b_hh, roles, accumulator)
    return (torch.tanh(z) if nonlinearity == "tanh" else torch.relu(z),)


class _QRecurrent(QuantizedModule):
    """What QLSTM, QGRU and the cells share: parameter quantization, state packing, the step."""

    ACCUMULATES = True
    SIGNED_INPUTS = True  # the activation role also rounds h_{t-1}, a tanh output in (-1, 1)
    _STATES: int  # tensors in the recurrent state: 2 for LSTM (h, c), 1 for GRU and RNN (h)
    _step: Step

    def _has_bias(self) -> bool:
        return bool(self.bias)

    def parameter_roles(self) -> dict[str, str]:
        return {name: "weight" if name.startswith("weight") else "bias"
                for name, p in self._parameters.items() if p is not None}

    def _weights(self, suffix: str) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """(W_ih, W_hh, b_ih, b_hh) of one layer, through the weight and bias role boundaries."""
        q = self.quantizers
        w_ih, w_hh = (quantize_boundary(getattr(self, n + suffix), q, "weight", "weight_grad")
                      for n in ("weight_ih", "weight_hh"))
        if not self.bias:
            return w_ih, w_hh, None, None
        b_ih, b_hh = (quantize_boundary(getattr(self, n + suffix), q, "bias", "bias_grad")
                      for n in ("bias_ih", "bias_hh"))
        return w_ih, w_hh, b_ih, b_hh

    def _matmul_roles(self) -> dict[str, Quantizer]:
        """The roles of each matmul: the parameters are already quantized."""
        return {**self.quantizers, **{role: IDENTITY for role in _PARAM_ROLES}}

    def _pack(self, hx: Any, zeros: Callable[[], Tensor], unsqueeze: int | None) -> State:
        """torch's hx ((h, c) or h, or None) as a tuple of state tensors, batched."""
        if hx is None:
            return (zeros(),) * self._STATES
        state = tuple(hx) if self._STATES > 1 else (hx,)
        return state if unsqueeze is None else tuple(s.unsqueeze(unsqueeze) for s in state)

    def _unpack(self, state: State, squeeze: int | None) -> Any:
        """A state tuple back in torch's form ((h, c) or h)."""
        if squeeze is not None:
            state = tuple(s.squeeze(squeeze) for s in state)
        return state if self._STATES > 1 else state[0]


@dataclass(frozen=True)
class _Layout:
    """A batch of sequences as torch's packed layout: time-major rows, the first ``batch_sizes[t]`` sequences
    (in sorted order, longest first) present at step t. A padded tensor is the case of equal lengths."""

    batch_sizes: tuple[int, ...]
    sorted_indices: Tensor | None
    unsorted_indices: Tensor | None

    def offsets(self) -> list[int]:
        return list(itertools.accumulate(self.batch_sizes, initial=0))


class _QRNN(_QRecurrent):
    """The multi-layer, one- or two-directional recurrence of QLSTM and QGRU, on tensors or PackedSequences.

    Every sequence is processed on its own rows only (torch's packed algorithm): step t of the forward
    direction runs the ``batch_sizes[t]`` sequences still going, the others keep their state; the reverse
    direction runs from each sequence's own last step to its first. Padding is never read, rounded or counted
    in an exponent's statistics."""

    @classmethod
    def check_supported(cls, module: nn.Module, policy: Policy) -> None:
        if cls.quantizes_under(policy) and getattr(module, "proj_size", 0):
            raise NotImplementedError(
                "lowprec's quantized LSTM does not support proj_size > 0 (keep this layer in fp32 with a "
                "per-module override, e.g. '<name>: params=none,activations=none,grads=none')"
            )

    def forward(self, input: Tensor | PackedSequence, hx: Any = None) -> tuple[Any, Any]:
        if not self.quantizing:
            return super().forward(input, hx)  # type: ignore[misc]
        directions = 2 if self.bidirectional else 1
        packed = isinstance(input, PackedSequence)
        if packed:
            data, layout = input.data, _Layout(tuple(input.batch_sizes.tolist()), input.sorted_indices,
                                               input.unsorted_indices)
            batch, unbatched = layout.batch_sizes[0], False
        else:
            unbatched = input.dim() == 2
            x = input.unsqueeze(1) if unbatched else input.transpose(0, 1) if self.batch_first else input
            steps, batch = x.shape[:2]
            if steps == 0:
                raise ValueError(f"{type(self).__name__[1:]} input has no time steps: shape {tuple(input.shape)}")
            data, layout = x.reshape(steps * batch, -1), _Layout((batch,) * steps, None, None)
        state = self._pack(hx, lambda: data.new_zeros(self.num_layers * directions, batch, self.hidden_size),
                           1 if unbatched else None)
        expected = (self.num_layers * directions, batch, self.hidden_size)
        for i, part in enumerate(state):
            if tuple(part.shape) != expected:  # torch's own check and message
                which = f"hidden[{i}]" if self._STATES > 1 else "hidden"
                raise RuntimeError(f"Expected {which} size {expected}, got {list(part.shape)}")
        if layout.sorted_indices is not None:  # torch takes hx in the caller's order
            state = tuple(s.index_select(1, layout.sorted_indices) for s in state)
        finals = []
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(directions):
                index = layer * directions + direction
                out, last = self._direction(data, layout, tuple(s[index] for s in state),
                                            f"_l{layer}" + ("_reverse" if direction else ""), reverse=direction == 1)
                outputs.append(out)
                finals.append(last)
            data = torch.cat(outputs, dim=-1) if directions > 1 else outputs[0]
            if self.dropout and self.training and layer < self.num_layers - 1:
                data = F.dropout(data, self.dropout, training=True)
        last = tuple(torch.stack(parts) for parts in zip(*finals))
        if layout.unsorted_indices is not None:
            last = tuple(s.index_select(1, layout.unsorted_indices) for s in last)
        if packed:
            out = PackedSequence(data, input.batch_sizes, layout.sorted_indices, layout.unsorted_indices)
            return out, self._unpack(last, None)
        out = data.reshape(steps, batch, -1)
        if unbatched:
            return out.squeeze(1), self._unpack(last, 1)
        return (out.transpose(0, 1) if self.batch_first else out), self._unpack(last, None)

    def _direction(self, data: Tensor, layout: _Layout, state: State, suffix: str,
                   reverse: bool) -> tuple[Tensor, State]:
        """One direction of one layer over packed rows ``data``: (its output rows, its final state per sequence).

        Forward: at step t the first ``batch_sizes[t]`` sequences advance, the rest keep their (final) state.
        Reverse: t runs backwards; the sequences that start at t (their last step) join with their initial
        state."""
        w_ih, w_hh, b_ih, b_hh = self._weights(suffix)
        roles = self._matmul_roles()
        zx = QLinearFunction.apply(data, w_ih, b_ih, roles, self.accumulator)
        offsets = layout.offsets()
        outputs: list[Tensor] = [data.new_empty(0)] * len(layout.batch_sizes)
        steps = range(len(layout.batch_sizes))
        s = state if not reverse else tuple(part[:0] for part in state)
        for t in (reversed(steps) if reverse else steps):
            size = layout.batch_sizes[t]
            if reverse and size > s[0].shape[0]:
                s = tuple(torch.cat([mine, initial[mine.shape[0]:size]]) for mine, initial in zip(s, state))
            new = self._step(zx[offsets[t]:offsets[t + 1]], tuple(part[:size] for part in s), w_hh, b_hh, roles,
                             self.accumulator)
            outputs[t] = new[0]
            s = new if size == s[0].shape[0] else tuple(torch.cat([n, old[size:]]) for n, old in zip(new, s))
        return torch.cat(outputs), s


class _QCell(_QRecurrent):
    """One step of QLSTMCell and QGRUCell. The weights are quantized at every call (every step), so their
    gradient is rounded per step and summed over the steps of the caller's loop in float32."""

    def forward(self, input: Tensor, hx: Any = None) -> Any:
        if not self.quantizing:
            return super().forward(input, hx)  # type: ignore[misc]
        batched = input.dim() == 2
        x = input if batched else input.unsqueeze(0)
        state = self._pack(hx, lambda: x.new_zeros(x.shape[0], self.hidden_size), None if batched else 0)
        w_ih, w_hh, b_ih, b_hh = self._weights("")
        roles = self._matmul_roles()
        zx = QLinearFunction.apply(x, w_ih, b_ih, roles, self.accumulator)
        return self._unpack(self._step(zx, state, w_hh, b_hh, roles, self.accumulator), None if batched else 0)


class QLSTM(_QRNN, nn.LSTM):
    """``nn.LSTM`` with quantized matmuls (see the module docstring); no proj_size."""

    _STATES = 2
    _step = staticmethod(lstm_step)


class QGRU(_QRNN, nn.GRU):
    """``nn.GRU`` with quantized matmuls (see the module docstring)."""

    _STATES = 1
    _step = staticmethod(gru_step)


class _ElmanStep:
    """The step of QRNN and QRNNCell: ``rnn_step`` with the layer's ``nonlinearity``."""

    nonlinearity: str

    def _step(self, *args: Any) -> State:
        return rnn_step(*args, nonlinearity=self.nonlinearity)


class QRNN(_ElmanStep, _QRNN, nn.RNN):
    """``nn.RNN`` (tanh or relu) with quantized matmuls (see the module docstring)."""

    _STATES = 1


class QLSTMCell(_QCell, nn.LSTMCell):
    """``nn.LSTMCell`` with quantized matmuls."""

    _STATES = 2
    _step = staticmethod(lstm_step)


class QGRUCell(_QCell, nn.GRUCell):
    """``nn.GRUCell`` with quantized matmuls."""

    _STATES = 1
    _step = staticmethod(gru_step)


class QRNNCell(_ElmanStep, _QCell, nn.RNNCell):
    """``nn.RNNCell`` (tanh or relu) with quantized matmuls."""

    _STATES = 1
