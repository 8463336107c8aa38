"""The sink-plus-band pattern as a FlexAttention mask (attention-gym style), and compiled FlexAttention on it.

Used as the strong baseline of the kernel benchmark: same mask, PyTorch's block-sparse compiled kernel. The block
masks and the compiled functions are built once per process; a block mask per (length, spans, sink, device), a
decode mask per (cache length, spans, sink, device).

The block mask is built by ``torch.compile(create_block_mask)`` wherever the token mask would be large (always on
CUDA): built eagerly, ``create_block_mask`` materialises the ``[H, N, N]`` mask and its int64 index
intermediates, which at 32k-128k tokens and 32 heads is 128-256 GiB; compiled, the mask is fused into the block
reduction. Small CPU masks are built eagerly, which is exact too and saves the compile (seconds on CPU).
"""

from __future__ import annotations

import functools

import torch

COMPILE_MASK_ABOVE = 1 << 22
"""Token-mask entries (heads x queries x keys) above which the block mask is built compiled on any device."""


def generate_sink_band_mask_mod(spans: torch.Tensor, sink: int, q_offset: int = 0):
    """``mask_mod(b, h, q_idx, kv_idx)``: head ``h`` keeps key ``kv_idx <= i`` iff it is a sink key
    (``kv_idx < sink``) or in the band (``i - kv_idx < spans[h]``), with ``i = q_idx + q_offset`` the query's
    position (``q_offset = cache length - 1`` for one decode query)."""

    def sink_band(b, h, q_idx, kv_idx):
        i = q_idx + q_offset
        return (kv_idx <= i) & ((kv_idx < sink) | (i - kv_idx < spans[h]))

    return sink_band


@functools.lru_cache(maxsize=8)
def sink_band_block_mask(n: int, spans: tuple[int, ...], sink: int, device: str, compiled: bool | None = None):
    """FlexAttention ``BlockMask`` of the pattern at length ``n`` for per-head ``spans``.

    ``compiled``: build with ``torch.compile(create_block_mask)``; None (default) decides by device and size (see
    the module docstring)."""
    return _block_mask(generate_sink_band_mask_mod(torch.tensor(spans, device=device), sink), len(spans), n, n,
                       device, compiled)


@functools.lru_cache(maxsize=8)
def sink_band_decode_block_mask(n: int, spans: tuple[int, ...], sink: int, device: str, compiled: bool | None = None):
    """``BlockMask`` of one decode query at position ``n - 1`` over a dense cache of ``n`` keys."""
    mask_mod = generate_sink_band_mask_mod(torch.tensor(spans, device=device), sink, q_offset=n - 1)
    return _block_mask(mask_mod, len(spans), 1, n, device, compiled)


def _block_mask(mask_mod, heads: int, q_len: int, kv_len: int, device: str, compiled: bool | None):
    from torch.nn.attention.flex_attention import create_block_mask

    if compiled is None:
        compiled = torch.device(device).type == "cuda" or heads * q_len * kv_len > COMPILE_MASK_ABOVE
    build = compiled_create_block_mask() if compiled else create_block_mask
    return build(mask_mod, None, heads, q_len, kv_len, device=device)


@functools.cache
def compiled_create_block_mask():
    """``torch.compile(create_block_mask)`` (attention-gym's way; the ``_compile=True`` flag is deprecated). Spans
    are a tensor in the mask's closure, so new spans reuse the compiled code; a second length recompiles once with
    dynamic shapes."""
    from torch.nn.attention.flex_attention import create_block_mask

    return torch.compile(create_block_mask)


@functools.cache
def compiled_flex_attention():
    """``torch.compile``'d ``flex_attention`` (compiled once per process, specialised per shape)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def moa_attention_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: torch.Tensor, sink: int,
                       scale: float | None = None) -> torch.Tensor:
    """q: (B, Hq, N, D); k, v: (B, Hkv, N, D); spans: (Hq,). Compiled FlexAttention under the pattern."""
    block_mask = sink_band_block_mask(q.shape[2], _ints(spans), int(sink), str(q.device))
    return compiled_flex_attention()(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def moa_decode_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: torch.Tensor, sink: int,
                    scale: float | None = None) -> torch.Tensor:
    """One decode step over a dense cache under the pattern: q (B, Hq, 1, D) at position ``n - 1``; k, v
    (B, Hkv, n, D) holding every token; spans (Hq,). Compiled FlexAttention skips the blocks the mask drops."""
    block_mask = sink_band_decode_block_mask(k.shape[2], _ints(spans), int(sink), str(q.device))
    return compiled_flex_attention()(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def _ints(spans) -> tuple[int, ...]:
    return tuple(int(s) for s in torch.as_tensor(spans).tolist())


def main(n: int = 256, span: int = 48, sink: int = 8, path: str = "sink_band_mask.png") -> None:
    """Save a picture of one head's token mask and its block mask."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kernels.pattern import token_mask

    block = sink_band_block_mask(n, (span,), sink, "cpu")
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 4.5))
    left.imshow(token_mask(n, span, sink), cmap="Blues")
    left.set_title(f"token mask: N={n}, span={span}, sink={sink}")
    right.imshow(block.to_dense()[0, 0], cmap="Blues")
    right.set_title("FlexAttention blocks computed")
    fig.savefig(path, bbox_inches="tight")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
