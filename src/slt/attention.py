"""PyTorch's attention as slt evaluates it: batchable by ``torch.func``, fast on short sequences.

Two things go wrong when a model with ``nn.MultiheadAttention`` (or a
``nn.TransformerEncoderLayer``, which holds one) runs under ``vmap``:

- In eval mode it takes PyTorch's fused inference kernel, because the swapped-in weights
  do not report ``requires_grad`` under the transforms; that kernel has no derivative and
  no batching rule. :func:`plain_attention` turns the fast path off, and puts
  ``scaled_dot_product_attention`` on its plain (math) backend, which vmap can batch.
- The math backend's softmax over the keys is PyTorch's CPU softmax, which is slow on
  short rows (one thread: 16,384 rows of 8 in 2.1 ms, against 0.4 ms for max, exp, sum
  and divide as separate operations). Toy transformers have short sequences, so for
  ``scaled_dot_product_attention`` calls on the CPU with at most :data:`SHORT_KEYS` keys, no
  dropout and no grouped-query attention, :func:`plain_attention` computes attention from those
  operations instead (:func:`attention_by_parts`). Same function, different rounding.

slt runs every evaluation of a model inside :func:`plain_attention`: the batched passes
always (:class:`slt.losses.LossModule`), the one-chain loop and the passes at w* where the
model holds an ``nn.MultiheadAttention`` or its first evaluation called
``scaled_dot_product_attention`` (:meth:`slt.posterior.Posterior.loss`; without forcing the
math backend there), so all of them compute the same function the same way.
"""

from __future__ import annotations

import contextlib
import math
import threading

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

# scaled_dot_product_attention with at most this many keys is computed by parts. Measured
# on a 2-layer transformer encoder (d_model 32, 4 heads, batch 128, one thread), forward and
# backward, PyTorch's kernels (flash in the loop, math under vmap) ÷ by parts: loop 1.18,
# 1.25, 1.36, 1.03, 0.94, 0.63 and vmap (4 chains) 1.17, 1.29, 1.44, 0.91, 0.83, 0.62 at
# 4, 8, 12, 16, 32, 64 keys
SHORT_KEYS = 12


def attention_by_parts(query, key, value, attn_mask=None, is_causal=False, scale=None):
    """softmax(q kᵀ · scale + mask) v from matmul, max, exp, sum and divide.

    The max is detached (softmax does not depend on it), so autograd does not route
    gradients through it. A row whose keys are all masked gives 0, as PyTorch's math
    backend does."""
    scale = 1 / math.sqrt(query.size(-1)) if scale is None else scale
    scores = (query @ key.transpose(-2, -1)) * scale
    if is_causal:
        keep = torch.ones(query.size(-2), key.size(-2), dtype=torch.bool,
                          device=query.device).tril()  # fmt: skip
        scores = scores.masked_fill(~keep, -math.inf)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, -math.inf)
        else:
            scores = scores + attn_mask
    top = scores.detach().amax(-1, keepdim=True)
    if attn_mask is not None:  # a fully masked row: -inf - -inf would be NaN
        top = top.clamp_min(torch.finfo(top.dtype).min)
    weights = (scores - top).exp()
    total = weights.sum(-1, keepdim=True)
    if attn_mask is not None:  # ... and 0 / 0 here. Other rows sum to >= 1 exactly (their
        total = total.clamp_min(1.0)  # largest term is exp(0)), so this changes nothing there
    return (weights / total) @ value


_ORIGINAL = torch.nn.functional.scaled_dot_product_attention
calls = 0  # of scaled_dot_product_attention inside plain_attention, by parts or not


def _scaled_dot_product_attention(*args, **kwargs):
    """``torch.nn.functional.scaled_dot_product_attention``, by parts where that applies."""
    global calls
    calls += 1
    options = _short(*args, **kwargs)
    if options is None:
        return (_state.function or _ORIGINAL)(*args, **kwargs)
    return attention_by_parts(*options)


def _short(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
           enable_gqa=False):  # fmt: skip
    """The arguments of :func:`attention_by_parts`, or None where it does not apply (the
    slow softmax is PyTorch's CPU kernel's, so only on the CPU)."""
    if dropout_p or enable_gqa or key.size(-2) > SHORT_KEYS or query.device.type != "cpu":
        return None
    if is_causal and attn_mask is not None:
        return None  # PyTorch raises for this; let it
    return query, key, value, attn_mask, is_causal, scale


def has_attention(module: torch.nn.Module) -> bool:
    """Whether ``module`` holds an ``nn.MultiheadAttention``."""
    return any(isinstance(m, torch.nn.MultiheadAttention) for m in module.modules())


class _Switches:
    """What :func:`plain_attention` changed, and how many are inside it (threads included):
    the first to enter changes PyTorch's switches, the last to leave puts back what the
    first found, so overlapping entries from several threads restore them exactly."""

    def __init__(self):
        self.lock = threading.Lock()
        self.inside = self.on_math = 0
        self.fastpath = self.function = self.backend = None


_state = _Switches()


def _enter(math_backend: bool) -> None:
    functional = torch.nn.functional
    with _state.lock:
        if _state.inside == 0:
            _state.fastpath = torch.backends.mha.get_fastpath_enabled()
            _state.function = functional.scaled_dot_product_attention
            torch.backends.mha.set_fastpath_enabled(False)
            functional.scaled_dot_product_attention = _scaled_dot_product_attention
        _state.inside += 1
        if math_backend:
            if _state.on_math == 0:
                _state.backend = sdpa_kernel(SDPBackend.MATH)
                _state.backend.__enter__()
            _state.on_math += 1


def _leave(math_backend: bool) -> None:
    with _state.lock:
        if math_backend:
            _state.on_math -= 1
            if _state.on_math == 0:
                _state.backend.__exit__(None, None, None)
                _state.backend = None
        _state.inside -= 1
        if _state.inside == 0:
            torch.backends.mha.set_fastpath_enabled(_state.fastpath)
            torch.nn.functional.scaled_dot_product_attention = _state.function
            _state.fastpath = _state.function = None


@contextlib.contextmanager
def plain_attention(*, math_backend: bool = True, enabled: bool = True):
    """PyTorch's attention as slt evaluates models, inside; as it was, after: the fused fast
    path off, ``scaled_dot_product_attention`` by parts where that applies (its function in
    ``torch.nn.functional``, where ``nn.MultiheadAttention`` finds it, is swapped for the
    duration), and otherwise on the math backend if ``math_backend`` (the one vmap can
    batch). These switches are process-wide: another thread calling attention meanwhile
    gets the same function, computed this way; with several threads inside at once, the
    switches stay until the last leaves and are then put back as the first found them.
    ``enabled=False`` (a model known to have no attention) changes nothing: the set-up
    costs ~10 µs."""
    if not enabled:
        yield
        return
    _enter(math_backend)
    try:
        yield
    finally:
        _leave(math_backend)
