"""Kernels whose fake implementation leaves memory out: put it back where it can be sized, refuse where not.

Used by the fake device (:mod:`batchlab.planning.fake`) on its dispatch-mode stack, between the fake mode and
MemTracker, so that MemTracker and the allocator model see the memory the real kernel would allocate.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode  # the documented home of TorchDispatchMode

from batchlab.planning.allocator import round_up

# oneDNN's LSTM training workspace, which torch's CPU kernel allocates as the 4th output of aten.mkldnn_rnn_layer
# (aten/src/ATen/native/mkldnn/RNN.cpp: at::empty(pd.workspace_desc().get_size()) when grad mode is on) and
# its fake kernel returns empty (torch/_meta_registrations.py, mkldnn_rnn_layer: torch.empty(0, dtype=uint8)).
# The sizes are oneDNN's (src/cpu/rnn/rnn_utils.hpp init_conf and set_workspace_sizes, rnn_utils.cpp
# get_good_ld and set_offsets); tests/test_fake.py checks them byte for byte against the real kernel.
ONEDNN_PAGE_BYTES = 4096  # set_offsets: "page_size = 4096"; every part of the workspace starts page-aligned
ONEDNN_ACC_BYTES = 4  # gemm_acc_t, the diff states' type: f32 for f32/bf16/f16 data (cpu/rnn/ref_rnn.hpp)


def _onednn_good_ld(dim: int, itemsize: int) -> int:
    """oneDNN's padded leading dimension (rnn_utils.cpp ``get_good_ld``): a multiple of 64 bytes, never of 256."""
    ld = round_up(dim, 64 // itemsize)
    return ld + 64 // itemsize if ld % 256 == 0 else ld


def onednn_lstm_workspace_bytes(
    seq_len: int,
    batch: int,
    input_size: int,
    hidden_size: int,
    *,
    gates: int = 4,
    itemsize: int = 4,
    cell_itemsize: int = 4,
) -> int:
    """The bytes of oneDNN's training workspace for one LSTM layer in one direction (one ``mkldnn_rnn_layer`` call).

    oneDNN's ``set_workspace_sizes`` for ``n_layer = n_dir = 1``, ``n_iter = seq_len``, ``mb = batch``: every
    step's gates and hidden output, then the layer's input and output states, the cell states and the three
    diff-state buffers the backward pass writes, each over ``seq_len + 1`` steps and 2 layer slots (its input
    and its own); ``set_offsets`` starts each part on a 4 KiB page. ``itemsize`` is the data's (4: f32, 2:
    bf16/f16), ``cell_itemsize`` the cell state's; the diff states are f32 accumulators.
    """
    wide = max(input_size, hidden_size)  # states: max(slc, sic, dlc); diff states: max(slc, dic, sic, dhc)
    state_row = _onednn_good_ld(wide, itemsize) * itemsize
    diff_row = _onednn_good_ld(wide, ONEDNN_ACC_BYTES) * ONEDNN_ACC_BYTES
    per_step = seq_len * batch  # n_iter * mb
    per_state = 2 * (seq_len + 1) * batch  # (n_layer + 1) slots * (n_iter + 1) steps, the initial one, * mb
    parts = (
        per_step * _onednn_good_ld(gates * hidden_size, itemsize) * itemsize,  # ws_gates
        per_step * _onednn_good_ld(hidden_size, itemsize) * itemsize,  # ws_ht
        per_state * state_row,  # ws_states_layer (ws_states_iter shares it)
        per_state * hidden_size * cell_itemsize,  # ws_states_iter_c
        per_state * diff_row,  # ws_diff_states_layer
        per_state * diff_row,  # ws_diff_states_iter
        per_state * hidden_size * ONEDNN_ACC_BYTES,  # ws_diff_states_iter_c
    )
    return sum(round_up(part, ONEDNN_PAGE_BYTES) for part in parts)


class UncountedKernel(RuntimeError):
    """A kernel whose memory the fake run cannot count; :func:`_fake_error` turns it into a FakeTensorError."""

    def __init__(self, func: Any, why: str):
        super().__init__(f"{func} {why}")
        self.func = func
        self.why = why


def _bound(func: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    """An aten op's arguments by their schema names."""
    names = [argument.name for argument in func._schema.arguments]
    return {**dict(zip(names, args)), **kwargs}


class KernelWorkspaces(TorchDispatchMode):
    """Put back the memory of kernels whose fake implementation leaves it out, or refuse what cannot be counted.

    ``aten.mkldnn_rnn_layer`` (``nn.LSTM`` on the CPU, one call per layer and direction) gets its training
    workspace back, sized as oneDNN sizes it, so MemTracker and the allocator model above this mode see it
    live from the forward pass until its backward frees it, as they would see the real one. cuDNN's and
    MIOpen's RNN kernels (``nn.LSTM``/``GRU``/``RNN`` on a GPU) are refused in training: their reserve space is
    sized by the library at run time (torch's fake kernel says "TODO: Query cudnnGetRNNTrainingReserveSize")
    and returned empty. Must sit between the fake mode and MemTracker on the mode stack.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.ops.aten._cudnn_rnn.default, torch.ops.aten.miopen_rnn.default):
            if _bound(func, args, kwargs)["train"]:
                raise UncountedKernel(
                    func,
                    "(a recurrent layer on the GPU) has a reserve space that the GPU library sizes at run time "
                    "and torch's fake kernel returns empty",
                )
        out = func(*args, **kwargs)
        if func is torch.ops.aten.mkldnn_rnn_layer.default and torch.is_grad_enabled():
            # The CPU kernel allocates the workspace only with grad mode on (inference returns none).
            bound = _bound(func, args, kwargs)
            data, cell, hidden = bound["input"], bound["cx_"], bound["hidden_size"]
            seq_len, batch, input_size = data.shape  # time-major, as RNNParams reads sizes 0, 1, 2
            size = onednn_lstm_workspace_bytes(
                seq_len,
                batch,
                input_size,
                hidden,
                gates=bound["weight0"].shape[0] // hidden,
                itemsize=data.element_size(),
                cell_itemsize=cell.element_size(),
            )
            # Created under the fake mode below this one: a fake tensor, no memory; the modes above count it.
            out = (*out[:3], torch.empty(size, dtype=torch.uint8, device=data.device))
        return out
