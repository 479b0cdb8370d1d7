"""Forward/backward schedules over micro-batches: no pipelining, 1F1B, and interleaved 1F1B.

A schedule calls ``forward(chunk, micro_batch, input)`` and ``backward(input, output, output_grad)`` in the order
that keeps every stage busy, and moves tensors with ``PipeComm``. ``forward`` returns the hidden states to send on,
or, on the last virtual stage, the micro-batch's share of the loss (already divided by the number of
micro-batches), so summing gradients over micro-batches gives exactly the one-process step.

1F1B (PipeDream-flush, as in Megatron-LM): stage ``r`` of ``P`` runs ``P - r - 1`` warm-up forwards, then
alternates one forward with one backward, then drains the remaining backwards. The first stage therefore holds at
most ``P`` micro-batches of activations, instead of all ``m`` with all-forward-then-all-backward. Idle time (the
bubble) is ``(P - 1) / (m + P - 1)`` of the step. Interleaving gives each rank ``V`` chunks of layers (virtual
stages ``c * P + r``); the bubble shrinks to ``(P - 1) / (V m + P - 1)`` for ``V`` times more transfers.
"""
from __future__ import annotations

from collections import deque
from typing import Callable, Optional

import torch
from torch.autograd import Variable

from megalm.pipeline.p2p import PipeComm


class LiveActivations:
    """Measures, rather than trusts the schedule's bookkeeping, how many micro-batches' activations are alive at
    once: every tensor autograd saves in a micro-batch's forward is packed in a holder, and a holder dies when
    backward frees its graph. ``during(i)`` wraps micro-batch ``i``'s forward."""

    class _Held:
        __slots__ = ("tensor", "micro", "owner")

        def __init__(self, tensor, micro, owner):
            self.tensor, self.micro, self.owner = tensor, micro, owner
            owner.live[micro] = owner.live.get(micro, 0) + 1
            owner.peak = max(owner.peak, len(owner.live))

        def __del__(self):
            live = self.owner.live
            live[self.micro] -= 1
            if not live[self.micro]:
                del live[self.micro]

    def __init__(self):
        self.live, self.peak = {}, 0

    def during(self, micro: int):
        return torch.autograd.graph.saved_tensors_hooks(lambda t: self._Held(t, micro, self), lambda h: h.tensor)


def bubble_fraction(pp: int, micro_batches: int, virtual: int = 1) -> float:
    """Idle share of a step for equal-cost stages: ``(P - 1) / (V m + P - 1)``."""
    return (pp - 1) / (virtual * micro_batches + pp - 1)


def free_output(t: Optional[torch.Tensor]) -> None:
    """Drop a sent activation's storage: only its autograd node is needed for backward (Megatron does the same).
    Views share storage with something else and are kept."""
    if t is not None and t._base is None and t.requires_grad:
        t.data = torch.empty((1,), device=t.device, dtype=t.dtype)


def backward_step(input_tensor, output_tensor, output_grad):
    """Backward through one chunk; returns the gradient for the previous stage (None on the first)."""
    if output_grad is None:  # the loss
        torch.autograd.backward(output_tensor)
    else:  # run the engine directly: the freed output's shape no longer matches its gradient's
        Variable._execution_engine.run_backward((output_tensor,), (output_grad,), False, False, (), True, True)
    return None if input_tensor is None else input_tensor.grad


Forward = Callable[[int, int, Optional[torch.Tensor]], torch.Tensor]


def no_pipelining(forward: Forward, micro_batches: int, forward_only: bool) -> None:
    """Gradient accumulation on one stage: forward and backward each micro-batch in turn."""
    for i in range(micro_batches):
        out = forward(0, i, None)
        if not forward_only:
            backward_step(None, out, None)


def one_f_one_b(forward: Forward, comm: PipeComm, micro_batches: int, pp: int, pp_rank: int,
                forward_only: bool) -> None:
    first, last = pp_rank == 0, pp_rank == pp - 1
    if forward_only:
        for i in range(micro_batches):
            x, _ = comm.communicate(recv_prev=not first)
            y = forward(0, i, x)
            comm.communicate(send_next=None if last else y)
        return
    warmup = min(pp - pp_rank - 1, micro_batches)
    steady = micro_batches - warmup
    inputs, outputs = deque(), deque()

    def run_forward(i, x):
        y = forward(0, i, x)
        inputs.append(x)
        outputs.append(y)
        return y

    for i in range(warmup):
        x, _ = comm.communicate(recv_prev=not first)
        y = run_forward(i, x)
        comm.communicate(send_next=y)
        free_output(y)
    x = comm.communicate(recv_prev=not first)[0] if steady else None
    for i in range(steady):
        y = run_forward(warmup + i, x)
        _, grad = comm.communicate(send_next=None if last else y, recv_next=not last)
        if not last:
            free_output(y)
        input_grad = backward_step(inputs.popleft(), outputs.popleft(), grad)
        final = i == steady - 1
        x, _ = comm.communicate(send_prev=None if first else input_grad, recv_prev=not first and not final)
    for _ in range(warmup):
        _, grad = comm.communicate(recv_next=not last)
        input_grad = backward_step(inputs.popleft(), outputs.popleft(), grad)
        comm.communicate(send_prev=None if first else input_grad)


def interleaved_1f1b(forward: Forward, comm: PipeComm, micro_batches: int, pp: int, pp_rank: int, virtual: int,
                     forward_only: bool) -> None:
    """Megatron-LM's interleaved schedule. Step ``k`` of the ``V m`` forward (or backward) steps runs chunk
    ``(k mod P V) div P`` (reversed for backward) on micro-batch ``(k div P V) P + k mod P``: groups of ``P``
    micro-batches go through chunk 0, then chunk 1, and so on."""
    first, last = pp_rank == 0, pp_rank == pp - 1
    total = micro_batches * virtual

    def chunk_of(k, is_forward):
        c = (k % (pp * virtual)) // pp
        return c if is_forward else virtual - 1 - c

    def micro_of(k):
        return (k // (pp * virtual)) * pp + k % pp

    all_warmup = micro_batches == pp
    warmup = total if forward_only or all_warmup else min((pp - pp_rank - 1) * 2 + (virtual - 1) * pp, total)
    steady = total - warmup
    inputs = [[] for _ in range(virtual)]
    outputs = [[] for _ in range(virtual)]
    grads = [[] for _ in range(virtual)]

    def run_forward(k):
        c = chunk_of(k, True)
        if first and c == 0 and len(inputs[c]) == len(outputs[c]):
            inputs[c].append(None)  # the first virtual stage reads tokens, not a received tensor
        y = forward(c, micro_of(k), inputs[c][-1])
        outputs[c].append(y)
        if forward_only:
            inputs[c].pop()
            outputs[c].pop()
        return None if last and c == virtual - 1 else y  # the loss stays here

    def run_backward(k):
        c = chunk_of(k, False)
        if last and c == virtual - 1 and not grads[c]:
            grads[c].append(None)
        return backward_step(inputs[c].pop(0), outputs[c].pop(0), grads[c].pop(0))

    inputs[0].append(None if first else comm.communicate(recv_prev=True)[0])
    for k in range(warmup):
        y = run_forward(k)
        next_chunk = chunk_of(k + 1, True)
        recv_prev = not (first and next_chunk == 0) and k != total - 1
        if k == warmup - 1 and not forward_only and not all_warmup:
            x, grad = comm.communicate(send_next=y, recv_prev=recv_prev, recv_next=not last)
            grads[virtual - 1].append(grad)
        else:
            x, _ = comm.communicate(send_next=y, recv_prev=recv_prev)
        inputs[next_chunk].append(x)
        free_output(y)
    for k in range(steady):
        fk = k + warmup
        y = run_forward(fk)
        input_grad = run_backward(k)
        recv_prev, recv_next = True, True
        if first:
            next_fchunk = chunk_of(fk - (pp - 1), True)
            recv_prev = next_fchunk != virtual - 1
            next_fchunk += 1
        else:
            next_fchunk = chunk_of(fk + 1, True)
        if last:
            next_bchunk = chunk_of(k - (pp - 1), False)
            recv_next = next_bchunk != 0
            next_bchunk -= 1
        else:
            next_bchunk = chunk_of(k + 1, False)
        if k == steady - 1:
            recv_prev = False
        x, grad = comm.communicate(send_next=y, send_prev=input_grad, recv_prev=recv_prev, recv_next=recv_next)
        free_output(y)
        if recv_prev:
            inputs[next_fchunk].append(x)
        if recv_next:
            grads[next_bchunk].append(grad)
    if forward_only:
        return
    if all_warmup:
        grads[virtual - 1].append(comm.communicate(recv_next=not last)[1])
    for k in range(steady, total):
        input_grad = run_backward(k)
        next_chunk = chunk_of(k + 1, False)
        recv_next = not (last and next_chunk == virtual - 1) and k != total - 1
        _, grad = comm.communicate(send_prev=input_grad, recv_next=recv_next)
        grads[next_chunk].append(grad)


def run_schedule(forward: Forward, comm: Optional[PipeComm], micro_batches: int, pp: int, pp_rank: int,
                 virtual: int, forward_only: bool) -> None:
    if pp == 1:
        return no_pipelining(forward, micro_batches, forward_only)
    if virtual > 1:
        return interleaved_1f1b(forward, comm, micro_batches, pp, pp_rank, virtual, forward_only)
    return one_f_one_b(forward, comm, micro_batches, pp, pp_rank, forward_only)
