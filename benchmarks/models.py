"""Benchmark-only models: a GPT-2-shaped decoder (optionally with Houlsby adapters)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import linen as nn


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    vocab: int = 50257
    d: int = 768
    heads: int = 12
    layers: int = 4
    seq: int = 128
    houlsby: int = 0  # bottleneck width of Houlsby adapters; 0 = none


class HoulsbyAdapter(nn.Module):
    """Houlsby et al. (2019): a residual bottleneck MLP after a sub-layer."""

    width: int

    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(self.width, name="down")(x))
        return x + nn.Dense(x.shape[-1], name="up", kernel_init=nn.initializers.zeros)(h)


class DecoderBlock(nn.Module):
    config: DecoderConfig

    @nn.compact
    def __call__(self, x, mask):
        c = self.config
        h = nn.LayerNorm(name="ln_1")(x)
        h = nn.MultiHeadDotProductAttention(num_heads=c.heads, name="attn")(h, h, mask=mask)
        if c.houlsby:
            h = HoulsbyAdapter(c.houlsby, name="adapter_attn")(h)
        x = x + h
        h = nn.LayerNorm(name="ln_2")(x)
        h = nn.Dense(4 * c.d, name="fc")(h)
        h = nn.Dense(c.d, name="proj")(nn.gelu(h))
        if c.houlsby:
            h = HoulsbyAdapter(c.houlsby, name="adapter_mlp")(h)
        return x + h


class Decoder(nn.Module):
    """Token + position embeddings, pre-LN blocks, tied output head (GPT-2's shape)."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, ids):
        c = self.config
        embed = nn.Embed(c.vocab, c.d, name="wte")
        x = embed(ids) + nn.Embed(c.seq, c.d, name="wpe")(jnp.arange(ids.shape[-1]))
        mask = nn.make_causal_mask(ids)
        for i in range(c.layers):
            x = DecoderBlock(c, name=f"h_{i}")(x, mask)
        return embed.attend(nn.LayerNorm(name="ln_f")(x))


ATTENTION_AND_MLP = [
    "**/attn/query/kernel",
    "**/attn/key/kernel",
    "**/attn/value/kernel",
    "**/attn/out/kernel",
    "**/fc/kernel",
    "**/proj/kernel",
]
