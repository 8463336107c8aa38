"""The sink-plus-band pattern as a FlexAttention mask (attention-gym style), and compiled FlexAttention on it.

Used as the strong baseline of the kernel benchmark: same mask, PyTorch's block-sparse compiled kernel. The block
mask and the compiled function are built once per (length, spans, sink) and per process.
"""

from __future__ import annotations

import functools

import torch


def generate_sink_band_mask_mod(spans: torch.Tensor, sink: int):
    """``mask_mod(b, h, q_idx, kv_idx)``: head ``h`` keeps key ``kv_idx <= q_idx`` iff it is a sink key
    (``kv_idx < sink``) or in the band (``q_idx - kv_idx < spans[h]``)."""

    def sink_band(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & ((kv_idx < sink) | (q_idx - kv_idx < spans[h]))

    return sink_band


@functools.lru_cache(maxsize=4)
def sink_band_block_mask(n: int, spans: tuple[int, ...], sink: int, device: str):
    """FlexAttention ``BlockMask`` of the pattern at length ``n`` for per-head ``spans``."""
    from torch.nn.attention.flex_attention import create_block_mask

    mask_mod = generate_sink_band_mask_mod(torch.tensor(spans, device=device), sink)
    return create_block_mask(mask_mod, None, len(spans), n, n, device=device)


@functools.cache
def compiled_flex_attention():
    """``torch.compile``'d ``flex_attention`` (compiled once per process, specialised per shape)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def moa_attention_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: torch.Tensor, sink: int,
                       scale: float | None = None) -> torch.Tensor:
    """q: (B, Hq, N, D); k, v: (B, Hkv, N, D); spans: (Hq,). Compiled FlexAttention under the pattern."""
    block_mask = sink_band_block_mask(q.shape[2], tuple(int(s) for s in spans.tolist()), int(sink), str(q.device))
    return compiled_flex_attention()(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


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
