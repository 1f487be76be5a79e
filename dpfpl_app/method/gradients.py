"""Gradients of the CoOp loss with respect to the prompt: batch-mean or per sample.

Every sample's loss depends on the prompt only through the class text features T
(C, e), which all samples share. So one forward of the text encoder serves the whole
batch, and sample j's gradient is the encoder's vector-Jacobian product with
dL_j/dT. ``torch.func.vmap`` batches those products into one batched backward (chunked
to bound memory) instead of B separate backward passes in a Python loop.

Why B backward passes, although dL_j/dT = s (softmax_j - onehot_j) f_j^T is rank one:
sample j's gradient is sum_c a_jc J_c^T f_j (J_c the Jacobian of class c's feature).
Expanding the prompt per class would give every J_c^T v from one backward, but only for
one v at a time, and the B image features f_j span B dimensions (B <= e), so that route
also needs B backward passes over all classes' tokens: no fewer than this one. The
weights are frozen, so each pass computes input gradients only; its cost is set by the
class tokens the encoder runs (``CoOpTextEncoder`` runs no padding and, in the last
layer, only the EOS rows).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def _sample_loss(text: Tensor, feature: Tensor, label: Tensor, logit_scale: Tensor) -> Tensor:
    logits = logit_scale * (feature @ text.T)  # (C,)
    return F.cross_entropy(logits.unsqueeze(0), label.unsqueeze(0))


def class_logits(text: Tensor, features: Tensor, logit_scale: Tensor) -> Tensor:
    """``exp(logit_scale) * cos``: features and text are already L2-normalised."""
    return logit_scale * (features @ text.T)


def prompt_gradients(
    encode: Callable[[Tensor], Tensor],
    prompt: Tensor,
    features: Tensor,
    labels: Tensor,
    logit_scale: Tensor,
    *,
    per_sample: bool,
    chunk_size: int = 16,
) -> tuple[Tensor, Tensor]:
    """Loss gradients w.r.t. ``prompt`` (n_ctx, d) and the per-sample losses (B,).

    Returns the (B, n_ctx, d) per-sample gradients when ``per_sample`` is set, else the
    (n_ctx, d) gradient of the batch-mean loss. ``features`` (B, e) are normalised image
    features; ``logit_scale`` is already exponentiated.
    """
    text, vjp_fn = torch.func.vjp(encode, prompt)  # text (C, e)
    text = text.detach()
    per_sample_cot = torch.func.vmap(torch.func.grad(_sample_loss), in_dims=(None, 0, 0, None))(
        text, features, labels, logit_scale
    )  # (B, C, e): dL_j / dT
    with torch.no_grad():
        losses = F.cross_entropy(
            class_logits(text, features, logit_scale), labels, reduction="none"
        )
    if per_sample:
        (grads,) = torch.func.vmap(vjp_fn, chunk_size=chunk_size)(per_sample_cot)
        return grads, losses
    (grad,) = vjp_fn(per_sample_cot.mean(dim=0))
    return grad, losses
