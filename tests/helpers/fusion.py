"""MGIPS-CL / ESPVR test helpers: a tiny model with its batch, and attention written out by hand."""

from __future__ import annotations

import math

import torch

from helpers.models import LABELS, text_batch, tiny_feature_spec, tiny_visual
from mner.trainer.models import get_model_class


def build(name, tiny_bert, rng, **overrides):
    from transformers import AutoTokenizer

    cls = get_model_class(name)
    config = cls.Config(**{**getattr(cls, "TINY_OVERRIDES", {}), "num_heads": 2, **overrides})
    paths = cls.required_features(config)
    spec = tiny_feature_spec(paths, rng)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    model = cls(config, labels=LABELS, text_encoder=str(tiny_bert), tokenizer=tokenizer, features=spec)
    batch, _ = text_batch(tokenizer)
    batch["visual"] = tiny_visual(paths, spec, rng)
    return model, batch, tokenizer


def single_head_attention(queries, keys, values, key_mask, w_q, w_k, w_v, w_o):
    """softmax(q W_q (k W_k)^T / sqrt(d)) v W_v W_o for one post, one head, no biases, written out."""
    q, k, v = queries @ w_q.T, keys @ w_k.T, values @ w_v.T  # (Lq, d), (Lk, d), (Lk, d)
    out = torch.zeros_like(q)
    for i in range(q.size(0)):
        scores = [float(q[i] @ k[j]) / math.sqrt(q.size(1)) if key_mask[j] else -math.inf for j in range(k.size(0))]
        top = max(scores)
        weights = [math.exp(s - top) if s != -math.inf else 0.0 for s in scores]
        total = sum(weights)
        out[i] = sum((w / total) * v[j] for j, w in enumerate(weights))
    return out @ w_o.T


def layer_norm(x):
    return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)


def set_single_head(attention: torch.nn.MultiheadAttention, generator) -> tuple:
    width = attention.embed_dim
    w_q, w_k, w_v, w_o = (torch.randn(width, width, generator=generator) / math.sqrt(width) for _ in range(4))
    with torch.no_grad():
        attention.in_proj_weight.copy_(torch.cat([w_q, w_k, w_v]))
        attention.in_proj_bias.zero_()
        attention.out_proj.weight.copy_(w_o)
        attention.out_proj.bias.zero_()
    return w_q, w_k, w_v, w_o
