"""Parameters and gradients living in two contiguous float32 buffers.

Every parameter's `.data` and `.grad` become views into one `bytearray` each, so the wire sends
and receives a whole model with one `sendmsg` / `recv_into` and no copy: backward accumulates
straight into the gradient buffer, the received average lands where `optimizer.step()` reads it,
and a checksum of the parameters is one pass over one buffer.

The gradient buffer ends with the model's floating-point buffers (BatchNorm's running mean and
variance) and then one float: the batch's mean loss. Both travel in bucket 0, right after the
forward pass, and are averaged (by sample count) like the gradient: the loss so the server learns
the global training loss at no extra message, the buffers so that every replica, the server's
too, holds the same running statistics after every step. The model's buffers *are* that part of
the wire buffer, so forward updates them in place and the average lands in place: no copies.
Integer buffers (BatchNorm's `num_batches_tracked`) are set to the step count on every replica.

On a GPU the model cannot live in the socket's memory, so it gets flat buffers of the same layout
on the device (`dev_params`, `dev_wire`) and the wire's stay on the CPU: `stage` copies a bucket out
when backward has finished it, `land` copies the averages in, `pull` and `push` move parameters for
checksums, resyncs and checkpoints. On the CPU the `dev_` names are the wire's own tensors and
those methods do nothing.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn


class FlatModel:
    """A model whose trainable parameters and gradients are views into flat buffers.

    On the CPU the model's tensors *are* the wire buffers. On a GPU (see devices.py) the model's
    tensors are views into flat buffers of the same layout on the device (`dev_params`,
    `dev_wire`), and the methods below copy ranges between the two at the step's edges."""

    def __init__(self, model: nn.Module, device: torch.device | None = None) -> None:
        from smolcluster import devices

        self.device = device = device or torch.device("cpu")
        self.copies = devices.copies(device)
        if device.type != "cpu":
            devices.model_to(model, device)
        self.model = model
        params = [p for p in model.parameters() if p.requires_grad]
        self.numel = sum(p.numel() for p in params)
        self.nbytes = self.numel * 4
        floats = [(n, b) for n, b in model.named_buffers() if b.is_floating_point()]
        self.counters = [b for _, b in model.named_buffers() if not b.is_floating_point()]
        self.nbuf = sum(b.numel() for _, b in floats)
        self.param_bytes, self.params = devices.host_buffer(self.nbytes, device)
        # + buffers + the loss slot
        self.grad_bytes, self.wire = devices.host_buffer(self.nbytes + 4 * self.nbuf + 4, device)
        """Gradient, buffers, loss slot: what goes on the wire."""
        self.grads = self.wire[: self.numel]
        self.buffers = self.wire[self.numel : self.numel + self.nbuf]
        """The model's floating-point buffers (views of this), averaged with bucket 0."""
        if self.copies:  # the model's own flat memory; the loss slot stays on the CPU
            self.dev_params = torch.empty(self.numel, dtype=torch.float32, device=device)
            self.dev_wire = torch.zeros(self.numel + self.nbuf, dtype=torch.float32, device=device)
        else:
            self.dev_params, self.dev_wire = self.params, self.wire[: self.numel + self.nbuf]
        self.dev_grads = self.dev_wire[: self.numel]
        self.dev_buffers = self.dev_wire[self.numel :]
        at = self.numel
        for _, b in floats:
            if b.dtype != torch.float32:
                raise ValueError(f"buffer of dtype {b.dtype}: smolcluster averages float32 buffers only")
            view = self.dev_wire[at : at + b.numel()]
            view.copy_(b.reshape(-1))
            b.data = view.view_as(b)
            at += b.numel()
        self.buffer_layout = [[n, list(b.shape)] for n, b in floats]
        offset = 0
        for p in params:
            n = p.numel()
            view = self.dev_params[offset : offset + n]
            view.copy_(p.detach().reshape(-1))
            # Re-pointing .data keeps the Parameter object (and so the optimizer's references).
            p.data = view.view_as(p)
            p.grad = self.dev_grads[offset : offset + n].view_as(p)
            offset += n
        self._params = params
        self.pull()

    # --- copies between the model's memory and the wire's (no-ops on the CPU) --------------------

    def pull(self) -> None:
        """Parameters and buffers from the model to the wire's memory: before they are checksummed,
        sent, snapshotted or saved."""
        if self.copies:
            from smolcluster.devices import to_host

            to_host(self.params, self.dev_params)
            to_host(self.buffers, self.dev_buffers)

    def push(self) -> None:
        """Parameters and buffers from the wire's memory to the model: after they were received or loaded."""
        if self.copies:
            from smolcluster.devices import to_device

            to_device(self.dev_params, self.params)
            to_device(self.dev_buffers, self.buffers)

    def stage(self, lo: int, hi: int) -> None:
        """Elements [lo, hi) of the wire (a gradient bucket, or bucket 0's buffers) from the model's
        memory, before the bucket is encoded and sent; the loss slot is the CPU's already."""
        hi = min(hi, self.numel + self.nbuf)
        if self.copies and hi > lo:
            from smolcluster.devices import to_host

            to_host(self.wire[lo:hi], self.dev_wire[lo:hi])

    def land(self) -> None:
        """The averaged gradients and buffers, received into the wire's memory, to the model's."""
        if self.copies:
            from smolcluster.devices import to_device

            to_device(self.dev_wire, self.wire[: self.numel + self.nbuf])

    def zero_grad(self) -> None:
        """Zero in place: backward then accumulates into the buffer (set_to_none would detach it)."""
        self.dev_grads.zero_()

    @property
    def loss(self) -> float:
        return float(self.wire[self.numel + self.nbuf])

    @loss.setter
    def loss(self, value: float) -> None:
        self.wire[self.numel + self.nbuf] = value

    def count_steps(self, steps: int) -> None:
        """Integer buffers (BatchNorm's batches seen) as every replica agrees on them: steps done."""
        for c in self.counters:
            c.fill_(steps)

    def checksum(self) -> int:
        """CRC32 of the parameters and the float buffers: replicas are bit-identical or they drifted."""
        self.pull()
        crc = zlib.crc32(self.param_bytes)
        if self.nbuf:
            crc = zlib.crc32(memoryview(self.grad_bytes)[4 * self.numel : 4 * (self.numel + self.nbuf)], crc)
        return crc

    def grads_are_views(self) -> bool:
        """True while every .grad still points into the flat buffer (autograd could replace it)."""
        base = self.dev_grads.data_ptr()
        return all(
            p.grad is not None and base <= p.grad.data_ptr() < base + self.nbytes for p in self._params
        )

    def layer_grad_norms(self) -> dict[str, float]:
        """L2 norm of each parameter's gradient, by parameter name."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        return {names[id(p)]: float(p.grad.norm()) for p in self._params}
