"""The QAConv head: scalar BatchNorm -> fc -> scalar BatchNorm (PyTorch BatchNorm1d semantics).

Head state is a dict with PyTorch's key names and shapes:
  bn.weight (1,), bn.bias (1,), bn.running_mean (1,), bn.running_var (1,), bn.num_batches_tracked () int64,
  fc.weight (1, 2S) [separate] or (1, S) [shared], fc.bias (1,),
  logit_bn.weight, logit_bn.bias, logit_bn.running_mean, logit_bn.running_var, logit_bn.num_batches_tracked.
"""

from __future__ import annotations

import numpy as np


def init_head(S: int, fc: str = "separate", rng: np.random.Generator | None = None) -> dict:
    """Fresh head state: BN weight 1 / bias 0 / running 0 and 1, fc.weight = 1/S, fc.bias ~ U(+-1/sqrt(fan_in))."""
    raise NotImplementedError  # CONTRACT STUB


def head_forward(mp, mg, head: dict, *, fc: str = "separate", training: bool = True,
                 momentum: float = 0.1, eps: float = 1e-5, n_threads=None):
    """mp, mg [..., S] -> (logits [...] float32, cache).

    training=True uses batch statistics and updates head's running stats in place (like
    torch.nn.functional.batch_norm); cache is what head_backward needs (None in eval mode).
    """
    raise NotImplementedError  # CONTRACT STUB


def head_backward(grad_logits, cache, *, n_threads=None):
    """grad_logits [...] -> (grad_mp [..., S], grad_mg [..., S], grads: dict keyed like the state:
    bn.weight, bn.bias, fc.weight, fc.bias, logit_bn.weight, logit_bn.bias; same shapes as the state)."""
    raise NotImplementedError  # CONTRACT STUB


def head_eval_affine(head: dict, S: int, fc: str = "separate") -> tuple[np.ndarray, float]:
    """Eval-mode head as an affine map: (w [2S] float32, b) with logit = mp . w[:S] + mg . w[S:] + b."""
    raise NotImplementedError  # CONTRACT STUB
