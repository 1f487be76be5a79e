"""CoOp text encoder over a frozen CLIP text tower, computing only what reaches EOS.

The text for class c is ``[SOS] ctx_1..ctx_n <tokens of "classname."> [EOS]``. CLIP's
text tower is causal, which gives two savings that change no result:

* the hidden states of ``[SOS] ctx`` (the *prefix*) are identical for every class, so
  they are computed once per forward instead of once per class, and each class's
  *suffix* attends to the prefix's keys and values;
* nothing after EOS reaches the pooled EOS state, so each class's sequence stops at its
  own EOS instead of running to the 77-token context: classes are grouped by suffix
  length and each group runs unpadded (a padded batch would spend most of its work on
  tokens after EOS when names differ in length, and per-sample gradients repeat that
  work once per sample);
* in the last layer only the EOS row is pooled, so its queries, attention output and
  MLP are computed for that row alone (the other rows still provide keys and values).

``plain_features`` keeps the textbook formulation (every class, all 77 tokens, through
transformers' own encoder) as the reference the fast path is tested against, and as the
cost model of the authors' implementation in the benchmarks.

Attention is written with matmul + softmax rather than a fused kernel so that
``torch.func.vmap`` over the backward (per-sample gradients) has batching rules for
every op.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import CLIPModel, PreTrainedTokenizerBase

from dpfpl_app.backbones.backbone import FrozenClip


class CoOpTextEncoder(nn.Module):
    """Maps learned context vectors (n_ctx, d) to normalised class features (C, e)."""

    def __init__(
        self,
        clip: CLIPModel,
        tokenizer: PreTrainedTokenizerBase,
        class_names: Sequence[str],
        n_ctx: int,
    ) -> None:
        super().__init__()
        if not class_names:
            raise ValueError("class_names is empty: a classifier needs at least one class")
        text = clip.text_model
        self.layers = text.encoder.layers
        self.final_layer_norm = text.final_layer_norm
        self.projection = clip.text_projection
        self.n_ctx = n_ctx
        self.num_heads = int(self.layers[0].self_attn.num_heads)
        context_length = int(text.config.max_position_embeddings)

        suffix_ids = [_class_suffix_ids(tokenizer, name) for name in class_names]
        longest = max(len(ids) for ids in suffix_ids)
        for name, ids in zip(class_names, suffix_ids, strict=True):
            if 1 + n_ctx + len(ids) > context_length:
                raise ValueError(
                    f"class name {name!r} needs {len(ids)} tokens (with EOS); with n-ctx={n_ctx} "
                    f"the prompt exceeds CLIP's {context_length}-token context: shorten the "
                    "class name or lower n-ctx"
                )
        eos = int(tokenizer.eos_token_id)
        # (C, S): each suffix padded after its EOS; padding never reaches the pooled state.
        padded = torch.full((len(suffix_ids), longest), eos, dtype=torch.long)
        for row, ids in enumerate(suffix_ids):
            padded[row, : len(ids)] = torch.tensor(ids)
        token_embedding = text.embeddings.token_embedding
        positions = text.embeddings.position_embedding.weight
        bos = torch.tensor([int(tokenizer.bos_token_id)])
        with torch.no_grad():
            self.register_buffer("sos_embed", token_embedding(bos))  # (1, d)
            self.register_buffer("suffix_embed", token_embedding(padded))  # (C, S, d)
            self.register_buffer("positions", positions[: 1 + n_ctx + longest].clone())
        self.register_buffer("suffix_ids", padded)
        self.register_buffer("eos_index", torch.tensor([len(ids) - 1 for ids in suffix_ids]))
        # Classes grouped by suffix length: each group's rows, in class order, and the
        # permutation that puts the concatenated groups' features back in class order.
        lengths = torch.tensor([len(ids) for ids in suffix_ids])
        self.group_lengths = tuple(int(n) for n in torch.unique(lengths))
        groups = [torch.nonzero(lengths == n).flatten() for n in self.group_lengths]
        for n, rows in zip(self.group_lengths, groups, strict=True):
            self.register_buffer(f"group_rows_{n}", rows)
        self.register_buffer("class_order", torch.argsort(torch.cat(groups)))
        self.context_length = context_length
        self.requires_grad_(False)

    @property
    def num_classes(self) -> int:
        return int(self.suffix_embed.shape[0])

    def forward(self, ctx: Tensor) -> Tensor:
        """Normalised text features (C, e) for context vectors ``ctx`` (n_ctx, d)."""
        dtype = self.sos_embed.dtype
        n_prefix = 1 + self.n_ctx
        # prefix (P, d) = [SOS; ctx]; one suffix block (C_n, n, d) per suffix length n,
        # each row the class tokens through EOS, so EOS is every block's last row
        prefix = torch.cat([self.sos_embed, ctx.to(dtype)], dim=0) + self.positions[:n_prefix]
        positions = self.positions[n_prefix:]
        suffixes = [
            self.suffix_embed[getattr(self, f"group_rows_{n}"), :n] + positions[:n]
            for n in self.group_lengths
        ]
        masks = [_suffix_mask(n_prefix, n, ctx.device, dtype) for n in self.group_lengths]
        prefix_mask = _causal_mask(n_prefix, ctx.device, dtype)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            prefix, suffixes = _shared_prefix_layer(
                layer, prefix, suffixes, (prefix_mask, masks), self.num_heads, last=i == last
            )
        pooled = torch.cat([s[:, -1] for s in suffixes])[self.class_order]  # (C, d)
        features = self.projection(self.final_layer_norm(pooled))  # (C, e)
        return F.normalize(features.float(), dim=-1)

    def plain_features(self, ctx: Tensor, text_model: nn.Module) -> Tensor:
        """Reference: every class at the full context length through transformers' encoder."""
        dtype = self.sos_embed.dtype
        n_classes, length = self.num_classes, self.context_length
        embeds = torch.zeros(n_classes, length, ctx.shape[-1], dtype=dtype, device=ctx.device)
        embeds = (
            embeds + text_model.embeddings.token_embedding.weight[int(self.suffix_ids[0, -1])]
        )  # pad every position with EOS, as CLIP's tokenizer does
        # (C, 77, d) = [SOS | ctx (n_ctx) | class suffix (S) | EOS padding]
        head = torch.cat([self.sos_embed, ctx.to(dtype)], dim=0).expand(n_classes, -1, -1)
        n_prefix = head.shape[1]
        embeds = torch.cat(
            [head, self.suffix_embed, embeds[:, n_prefix + self.suffix_embed.shape[1] :]], dim=1
        )
        hidden = text_model.embeddings(inputs_embeds=embeds)
        causal = torch.full((length, length), float("-inf"), device=ctx.device, dtype=dtype)
        mask = torch.triu(causal, diagonal=1)[None, None].expand(n_classes, 1, -1, -1)
        hidden = text_model.encoder(inputs_embeds=hidden, attention_mask=mask).last_hidden_state
        hidden = text_model.final_layer_norm(hidden)
        pooled = hidden[torch.arange(n_classes, device=ctx.device), n_prefix + self.eos_index]
        return F.normalize(self.projection(pooled).float(), dim=-1)


def template_context(clip: FrozenClip, template: str, *, key: str = "zeroshot-template") -> Tensor:
    """Token embeddings (k, d) of hand-written words: the zero-shot prompt, or ctx-init's.

    ``key`` is the run-config key the words came from, so an empty template is named.
    """
    ids = clip.tokenizer(template, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"{key} {template!r} has no tokens")
    table = clip.model.text_model.embeddings.token_embedding.weight
    return table[torch.tensor(ids, device=table.device)].detach().float().cpu()


def _class_suffix_ids(tokenizer: PreTrainedTokenizerBase, name: str) -> list[int]:
    ids = tokenizer(f"{name}.", add_special_tokens=False)["input_ids"]
    return [int(i) for i in ids] + [int(tokenizer.eos_token_id)]


def _causal_mask(n: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Additive causal mask (n, n): row i sees columns 0..i."""
    neg = torch.finfo(dtype).min
    return torch.triu(torch.full((n, n), neg, device=device, dtype=dtype), 1)


def _suffix_mask(n_prefix: int, n_suffix: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Additive mask (S, P+S) of suffix queries: the whole prefix, then the suffix causally."""
    within = _causal_mask(n_suffix, device, dtype)
    return torch.cat([torch.zeros(n_suffix, n_prefix, device=device, dtype=dtype), within], dim=1)


def _heads(x: Tensor, num_heads: int) -> Tensor:
    """(..., L, d) -> (..., H, L, d/H)."""
    split = x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)
    return split.transpose(-3, -2)


def _merge(x: Tensor) -> Tensor:
    """(..., H, L, h) -> (..., L, H*h)."""
    merged = x.transpose(-3, -2)
    return merged.reshape(*merged.shape[:-2], -1)


def _shared_prefix_layer(
    layer: nn.Module,
    prefix: Tensor,
    suffixes: list[Tensor],
    masks: tuple[Tensor, list[Tensor]],
    num_heads: int,
    *,
    last: bool,
) -> tuple[Tensor, list[Tensor]]:
    """One pre-LN CLIP encoder layer on a shared prefix (P, d) and suffix blocks (C_n, n, d).

    In the ``last`` layer the prefix is not needed any more and each block keeps only
    its EOS row (C_n, 1, d).
    """
    attn = layer.self_attn
    x_p = layer.layer_norm1(prefix)
    k_p, v_p = _heads(attn.k_proj(x_p), num_heads), _heads(attn.v_proj(x_p), num_heads)  # (H,P,h)
    suffixes = [
        _suffix_block(layer, suffix, (k_p, v_p), mask, num_heads, eos_only=last)
        for suffix, mask in zip(suffixes, masks[1], strict=True)
    ]
    if not last:
        q_p = _heads(attn.q_proj(x_p), num_heads)
        w_p = torch.softmax((q_p @ k_p.transpose(-1, -2)) * attn.scale + masks[0], dim=-1)
        prefix = prefix + attn.out_proj(_merge(w_p @ v_p))
        prefix = prefix + layer.mlp(layer.layer_norm2(prefix))
    return prefix, suffixes


def _suffix_block(
    layer: nn.Module,
    suffix: Tensor,
    prefix_kv: tuple[Tensor, Tensor],
    mask: Tensor,
    num_heads: int,
    *,
    eos_only: bool,
) -> Tensor:
    """One layer on a suffix block (C_n, n, d) attending to the prefix keys and values.

    With ``eos_only`` every row still gives keys and values, but queries, attention
    output and MLP run for the last (EOS) row alone: the rest never reaches the pool.
    """
    attn = layer.self_attn
    k_p, v_p = prefix_kv
    x_s = layer.layer_norm1(suffix)
    k_s, v_s = _heads(attn.k_proj(x_s), num_heads), _heads(attn.v_proj(x_s), num_heads)
    if eos_only:
        suffix, x_s, mask = suffix[:, -1:], x_s[:, -1:], mask[-1:]
    q_s = _heads(attn.q_proj(x_s), num_heads)  # (C_n, H, rows, h)
    n_prefix = k_p.shape[-2]
    # scores (C_n, H, rows, P+n): suffix queries against the shared prefix keys, then their own
    scores = torch.cat([q_s @ k_p.transpose(-1, -2), q_s @ k_s.transpose(-1, -2)], dim=-1)
    weights = torch.softmax(scores * attn.scale + mask, dim=-1)
    mixed = weights[..., :n_prefix] @ v_p + weights[..., n_prefix:] @ v_s  # (C_n, H, rows, h)
    suffix = suffix + attn.out_proj(_merge(mixed))
    return suffix + layer.mlp(layer.layer_norm2(suffix))
