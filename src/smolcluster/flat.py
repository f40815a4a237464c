"""Parameters and gradients living in two contiguous float32 buffers.

Every parameter's `.data` and `.grad` become views into one `bytearray` each, so the wire sends
and receives a whole model with one `sendmsg` / `recv_into` and no copy: backward accumulates
straight into the gradient buffer, the received average lands where `optimizer.step()` reads it,
and a checksum of the parameters is one pass over one buffer.

The gradient buffer has one extra float at the end: the batch's mean loss. It travels and is
averaged with the gradient, so the server learns the global training loss (measured before the
update) at no extra message, and every worker receives it back.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn


class FlatModel:
    """A model whose trainable parameters and gradients are views into flat buffers."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        params = [p for p in model.parameters() if p.requires_grad]
        self.numel = sum(p.numel() for p in params)
        self.nbytes = self.numel * 4
        self.param_bytes = bytearray(self.nbytes)
        self.grad_bytes = bytearray(self.nbytes + 4)  # + the loss slot
        self.params = torch.frombuffer(self.param_bytes, dtype=torch.float32)
        self.wire = torch.frombuffer(self.grad_bytes, dtype=torch.float32)
        """Gradient plus loss slot: what goes on the wire."""
        self.grads = self.wire[: self.numel]
        offset = 0
        for p in params:
            n = p.numel()
            view = self.params[offset : offset + n]
            view.copy_(p.detach().reshape(-1))
            # Re-pointing .data keeps the Parameter object (and so the optimizer's references).
            p.data = view.view_as(p)
            p.grad = self.grads[offset : offset + n].view_as(p)
            offset += n
        self._params = params

    def zero_grad(self) -> None:
        """Zero in place: backward then accumulates into the buffer (set_to_none would detach it)."""
        self.grads.zero_()

    @property
    def loss(self) -> float:
        return float(self.wire[self.numel])

    @loss.setter
    def loss(self, value: float) -> None:
        self.wire[self.numel] = value

    def checksum(self) -> int:
        """CRC32 of the parameter bytes: replicas are bit-identical or they have drifted."""
        return zlib.crc32(self.param_bytes)

    def grads_are_views(self) -> bool:
        """True while every .grad still points into the flat buffer (autograd could replace it)."""
        base = self.grads.data_ptr()
        return all(
            p.grad is not None and base <= p.grad.data_ptr() < base + self.nbytes for p in self._params
        )

    def layer_grad_norms(self) -> dict[str, float]:
        """L2 norm of each parameter's gradient, by parameter name."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        return {names[id(p)]: float(p.grad.norm()) for p in self._params}
