"""Attention-influence profiling: how much the loss depends on each (query block, key block) of every head."""

from pipeline.profile.influence import (
    attention_influence,
    attention_influences,
    entry_influence,
    tile_influence,
    token_influence,
)
from pipeline.profile.naive import naive_attention_influence, naive_token_influence

__all__ = [
    "attention_influence",
    "attention_influences",
    "entry_influence",
    "naive_attention_influence",
    "naive_token_influence",
    "tile_influence",
    "token_influence",
]
