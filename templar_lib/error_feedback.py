"""A miner's error feedback (DESIGN §5 steps 2–5): the momentum that carries what compression left out from one
window to the next, and the compression of each window's gradient out of it.

On a CPU every step is compression's torch code (the math the conformance vectors pin); on CUDA the same step runs as
two fused Triton kernels per parameter (templar_lib.kernels), which import triton only when first used.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from templar_lib import kernels
from templar_lib.compression import Sparse, decode, encode, round_values
from templar_lib.encodings import VALUE_ENCODINGS


class ErrorFeedback:
    """A miner's error-feedback momentum for a whole model, and the compression of each window's gradient.

    For each parameter with gradient g (DESIGN §5 steps 2–5; step 1, weight decay, is part of the outer step that
    every node applies to the shared θ):

        m ← momentum_decay · m + lr · g
        s = top-k(DCT(m))          (values rounded as the wire carries them: value_dtype, or int8 per-parameter)
        m ← m − IDCT(s)            (what was transmitted leaves the momentum; the rest carries over)

    momentum: dict name -> float32 tensor of the parameter's shape (zeros at start; state that outlives a window).

    fused: run each parameter's step as two Triton kernels (templar_lib.kernels: one pass to fold, encode and select,
    one to round and subtract) instead of about twenty torch operations. None (the default) = on CUDA when triton is
    installed (True forces them: an error where they cannot run); the selection is the same up to near-ties and the
    values within float32 rounding. `precision`: the kernels' float32 products, "tf32x3" (three TF32 tensor-core
    products, about float32 accuracy: the default), "ieee" (FMA, slower) or "tf32" (one product, not exact enough to
    keep the same selection; bench/RESULTS.md has both measured).
    """

    def __init__(self, momentum: Mapping[str, torch.Tensor], *, topk: int, target_chunk: int,
                 momentum_decay: float, value_dtype: str = "float32", fused: bool | None = None,
                 precision: str = "tf32x3") -> None:
        self.momentum = {name: tensor.float() for name, tensor in momentum.items()}
        self.topk = topk
        self.target_chunk = target_chunk
        self.momentum_decay = momentum_decay
        if value_dtype not in VALUE_ENCODINGS:
            raise ValueError(f"value_dtype must be one of {sorted(VALUE_ENCODINGS)}")
        self.value_dtype = value_dtype
        self.fused = fused
        self.precision = precision

    @classmethod
    def zeros_like(cls, parameters: Mapping[str, torch.Tensor], **settings) -> ErrorFeedback:
        return cls({name: torch.zeros_like(p, dtype=torch.float32) for name, p in parameters.items()}, **settings)

    def step(self, gradients: Mapping[str, torch.Tensor], *, lr: float) -> dict[str, Sparse]:
        """Fold this window's gradients into the momentum and return what to transmit, by parameter name."""
        transmitted = {}
        for name, g in gradients.items():
            m = self.momentum[name]
            if self._fuses(m):
                transmitted[name] = kernels.round_trip(
                    m, g, decay=self.momentum_decay, lr=lr, topk=self.topk, target_chunk=self.target_chunk,
                    value_dtype=self.value_dtype, precision=self.precision)
                continue
            m.mul_(self.momentum_decay).add_(g.float(), alpha=lr)
            sparse = encode(m, self.topk, self.target_chunk)
            sparse = Sparse(sparse.idx, round_values(sparse.vals, self.value_dtype), sparse.shape, sparse.chunk)
            m.sub_(decode(sparse))
            transmitted[name] = sparse
        return transmitted

    def _fuses(self, m: torch.Tensor) -> bool:
        if not m.is_contiguous():
            return False
        return kernels.chosen(self.fused, m.device, kernels.supports(tuple(m.shape), self.target_chunk),
                              f"fused compression needs CUDA and triton, and a 1-D or 2-D parameter with chunks of at "
                              f"most {kernels.MAX_CHUNK_SIDE} (momentum {tuple(m.shape)} on {m.device}, target_chunk "
                              f"{self.target_chunk})")
