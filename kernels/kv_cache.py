"""Per-head static KV cache for sparse decoding, gpt-fast style: pre-allocated, indexed, and boring.

Which tokens a KV head keeps. The pattern (:mod:`kernels.pattern`) lets query ``i`` see key ``j`` iff
``j <= i`` and (``j < sink`` or ``i - j < S``): the sink tokens plus a band of ``S`` tokens that *includes ``i``
itself*. So a head's cache holds its ``sink`` first tokens plus a ring buffer of its last ``S`` tokens (those at
positions ``>= sink``), ``min(sink + S, total)`` slots in all. When token ``i`` is written it evicts token
``i - S``, and the query at ``i`` then sees exactly the tokens its mask keeps. This is the mask, token for token;
a ring of ``S - sink`` tokens (one reading of DESIGN.md's wording) would drop keys the mask keeps. The slot
count also matches the plan's KV density ``min(sink + S, N) / N``.

Which ``S``. Spans are fixed when the cache is built, from the planned total length ``prompt + max_new_tokens``
(``S = S(total)``), and the ``moa`` attention uses these same spans for the prefill that fills the cache. So
``generate()`` with this cache gives the same tokens as recomputing the whole sequence at every step under the
fixed mask with span ``S(total)``. (A forward without this cache evaluates spans at its own length instead.)

Memory layout. Each layer owns one packed buffer for keys and one for values, ``[B, T, D]`` with
``T = sum_h C_h``; KV head ``h`` owns slots ``offsets[h] .. offsets[h+1] - 1`` (``C_h = min(sink + S_h, total)``),
so allocated memory is the plan's KV density times the dense cache, per head, with no padding. Slots
``0 .. sink-1`` of a head hold its sink tokens; slot ``sink + (t - sink) mod S_h`` holds token ``t >= sink``. Since
every sequence in the batch has the same length, a head's filled slots are always its first
``min(seen, C_h)``; ``lengths`` holds these counts as a device int32 tensor, updated in place without a host
sync, for kernels that read them on the device. Decode reads the packed buffers
(:func:`kernels.decode.packed_decode_attention`).

A layer accepts one prefill (any length up to ``total``) and then one token per step; it raises otherwise.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class PerHeadLayer(CacheLayerMixin):
    """One decoder layer's packed per-head cache.

    query_spans: ``[Hq]`` spans the attention uses; kv_spans: ``[Hkv]`` ring sizes (each the largest span of its
    query-head group); sink; total: the planned number of tokens (prompt + new tokens).
    """

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, query_spans, kv_spans, sink: int, total: int, *, batch_size: int, head_dim: int,
                 dtype: torch.dtype, device):
        super().__init__()
        self.device = torch.device(device)
        self.sink, self.total, self.batch_size = int(sink), int(total), int(batch_size)
        self.query_spans = torch.as_tensor(query_spans, dtype=torch.int64).cpu()  # (Hq,) on the host, like offsets
        self.ring = torch.as_tensor(kv_spans, dtype=torch.int64, device=self.device)  # (Hkv,)
        if int(self.ring.min()) < 1:
            raise ValueError("every KV head needs a span of at least 1")
        hkv, hq = self.ring.numel(), self.query_spans.numel()
        if hq % hkv:
            raise ValueError(f"{hq} query heads are not a multiple of {hkv} KV heads")
        self.group = hq // hkv
        self.ring_sizes = self.ring.cpu().tolist()  # (Hkv,) on the host, read once
        self.capacities = [min(self.sink + s, self.total) for s in self.ring_sizes]
        self.offsets = [0]
        for c in self.capacities:
            self.offsets.append(self.offsets[-1] + c)
        self.starts = torch.tensor(self.offsets[:-1], dtype=torch.int64, device=self.device)  # (Hkv,)
        self._capacity = torch.tensor(self.capacities, dtype=torch.int32, device=self.device)  # (Hkv,)
        self.lengths = torch.zeros(hkv, dtype=torch.int32, device=self.device)  # (Hkv,) valid_lengths() on device
        shape = (self.batch_size, self.offsets[-1], head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=self.device)  # (B, T, D)
        self.values = torch.zeros(shape, dtype=dtype, device=self.device)
        # Query heads whose span is below their group's ring must mask some cached tokens at decode.
        self.needs_keep = bool((self.query_spans.view(hkv, self.group) < self.ring.cpu().view(hkv, 1)).any())
        self.seen = 0
        self._step_slots = None  # (total, Hkv) slot of each position, see _position_slots()
        self._bias = None  # (Hq * T + 1,) float32 decode mask, see decode_bias(); the last element is scratch
        self._bias_edits = None  # (first, hide, show), see _decode_mask_edits
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Buffers are allocated up front, so there is nothing to allocate: only check the states fit."""
        self._check(key_states)

    def _check(self, key_states: torch.Tensor) -> None:
        b, hkv, _, d = key_states.shape
        if (b, hkv, d) != (self.batch_size, self.ring.numel(), self.keys.shape[-1]) or key_states.dtype != self.keys.dtype:
            raise ValueError(
                f"per-head cache was built for batch {self.batch_size}, {self.ring.numel()} KV heads of size "
                f"{self.keys.shape[-1]} in {self.keys.dtype}; got states {tuple(key_states.shape)} in {key_states.dtype}"
            )

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *_, **__):
        """Write new states (``[B, Hkv, n, D]``) into their slots; return what the attention reads.

        Prefill (empty cache) returns the prompt's own states, so prefill attention sees every prompt key; a
        decode step returns the packed buffers. Extra arguments (``cache_kwargs`` or the attention ``kwargs``,
        depending on the transformers version) are ignored: the ``moa`` attention finds this layer through the
        cache its module was called with (:func:`kernels.hf_attention.per_head_layer`).
        """
        self._check(key_states)
        n = key_states.shape[-2]
        if self.seen + n > self.total:
            raise ValueError(f"per-head cache was planned for {self.total} tokens; {self.seen + n} do not fit")
        if self.seen == 0:
            for head, dst, src in self._prefill_copies(n):
                for buffer, states in ((self.keys, key_states), (self.values, value_states)):
                    buffer[:, dst:dst + src.stop - src.start] = states[:, head, src]
            self.seen = n
            torch.clamp(self._capacity, max=self.seen, out=self.lengths)
            return key_states, value_states
        if n != 1:
            raise ValueError("per-head cache takes one prefill, then one token per step")
        slots = self._position_slots()[self.seen]  # (Hkv,)
        self.keys.index_copy_(1, slots, key_states[:, :, 0])
        self.values.index_copy_(1, slots, value_states[:, :, 0])
        if self._bias is not None:  # the new token's edits of the decode mask: what leaves a band, then the token
            first, hide, show = self._bias_edits
            self._bias.index_fill_(0, hide[self.seen - first], float("-inf"))
            self._bias.index_fill_(0, show[self.seen - first], 0.0)
        self.seen += 1
        torch.clamp(self._capacity, max=self.seen, out=self.lengths)
        return self.keys, self.values

    def _prefill_copies(self, n: int):
        """``(head, first slot, token slice)`` for each contiguous run of slots a prefill of ``n`` tokens writes: a
        head's sink tokens, then its last ``S_h`` tokens at positions ``>= sink``, which fill the ring from slot
        ``sink + (first - sink) mod S_h`` and wrap around to slot ``sink`` at most once. Slices, not gathers: no
        index tensors and no device sync."""
        for head, (start, ring) in enumerate(zip(self.offsets[:-1], self.ring_sizes, strict=True)):
            if self.sink:
                yield head, start, slice(0, min(self.sink, n))
            first = max(self.sink, n - ring)  # the oldest band token kept
            if first >= n:
                continue
            slot = (first - self.sink) % ring
            run = min(n - first, ring - slot)
            yield head, start + self.sink + slot, slice(first, first + run)
            if first + run < n:
                yield head, start + self.sink, slice(first + run, n)

    def _position_slots(self) -> torch.Tensor:
        """``[total, Hkv]``: the packed slot of every token position in each KV head, built once (a decode step,
        and the decode mask's edits, then only index it)."""
        if self._step_slots is None:
            positions = torch.arange(self.total, device=self.device).expand(self.ring.numel(), self.total)
            self._step_slots = self._slots(positions).t().contiguous()  # (total, Hkv)
        return self._step_slots

    def _slots(self, positions: torch.Tensor) -> torch.Tensor:
        """Packed slot index of each token position (``[Hkv, n]`` -> ``[Hkv, n]``)."""
        ring = self.ring.view(-1, 1)
        local = torch.where(positions < self.sink, positions, self.sink + (positions - self.sink) % ring)
        return self.starts.view(-1, 1) + local

    def valid_lengths(self) -> list[int]:
        """Filled slots per KV head: its first ``min(seen, C_h)`` slots."""
        return [min(self.seen, c) for c in self.capacities]

    def slot_positions(self) -> torch.Tensor:
        """Token position held by every packed slot, ``[T]`` int64; -1 for an empty slot."""
        head = self._slot_heads()
        local = torch.arange(self.offsets[-1], device=self.device) - self.starts[head]
        ring = self.ring[head]
        back = (self.seen - 1 - local) % ring  # ring slots: steps back from the newest token with that residue
        pos = torch.where(local < self.sink, local, self.seen - 1 - back)
        filled = (local < self.sink) & (local < self.seen) | (local >= self.sink) & (pos >= self.sink)
        return torch.where(filled, pos, torch.full_like(pos, -1))

    def decode_keep(self) -> torch.Tensor | None:
        """``[Hq, T]`` bool: which packed slots each query head sees at the current decode step.

        None when every query head's span equals its group's ring, as then each head sees all its filled slots.
        """
        return self._visible() if self.needs_keep else None

    def decode_bias(self) -> torch.Tensor:
        """``[Hq, T]`` float32 additive mask of the current decode step: 0 where a query head sees a packed slot
        (one of its own KV head's, filled, and kept by its span), -inf elsewhere.

        The first call builds it from :meth:`slot_positions`; from then on each decode :meth:`update` edits it in
        place with two index writes: the slot of the token that leaves a narrower query head's band is hidden from
        that head, and the new token's slot is shown to its group. So a step pays two small writes per layer
        instead of rebuilding ``[Hq, T]`` from the slot positions.
        """
        hq, slots = self.query_spans.numel(), self.offsets[-1]
        if self._bias is None:
            self._bias_edits = (self.seen, *self._decode_mask_edits(self.seen))
            self._bias = torch.zeros(hq * slots + 1, dtype=torch.float32, device=self.device)
            self._bias[:-1].view(hq, slots).masked_fill_(~self._visible(), float("-inf"))
        return self._bias[:-1].view(hq, slots)

    def _decode_mask_edits(self, first: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat indices into the decode mask (``Hq * T + 1`` elements, the last one scratch) that each token position
        ``p`` in ``[first, total)`` hides and shows, ``(total - first, Hq)`` each.

        Query head ``q`` of KV head ``h`` (span ``s_q``, ring ``R_h``) at position ``p``:

        - sees the new token (slot of ``p``) when ``s_q >= 1`` or ``p`` is a sink token;
        - stops seeing ``p - s_q`` when ``s_q < R_h`` and ``p - s_q >= sink``; that token is still in the ring,
          as the ring holds ``(p - R_h, p]``. With ``s_q = R_h`` the token leaving the band is the one the new token
          overwrites, so there is nothing to hide.
        """
        hq, slots = self.query_spans.numel(), self.offsets[-1]
        scratch = hq * slots
        positions = torch.arange(first, self.total, device=self.device).view(-1, 1)  # (P, 1)
        spans = self.query_spans.to(self.device).view(1, -1)  # (1, Hq)
        owner = torch.arange(hq, device=self.device).view(1, -1) // self.group  # (1, Hq)
        rows = torch.arange(hq, device=self.device).view(1, -1) * slots  # (1, Hq): each query head's row start
        slot_of = self._position_slots()  # (total, Hkv)

        shown = (spans >= 1) | (positions < self.sink)  # (P, Hq)
        show = torch.where(shown, rows + slot_of[positions, owner], scratch)
        leaving = positions - spans  # (P, Hq)
        hidden = (spans < self.ring[owner]) & (leaving >= self.sink)
        hide = torch.where(hidden, rows + slot_of[leaving.clamp(min=0), owner], scratch)
        return hide, show

    def _visible(self) -> torch.Tensor:
        """``[Hq, T]`` bool: which packed slots each query head sees at the current decode step."""
        pos = self.slot_positions()  # (T,)
        head = self._slot_heads()
        owner = torch.arange(self.query_spans.numel(), device=self.device) // self.group  # (Hq,)
        query = self.seen - 1
        band = (query - pos).view(1, -1) < self.query_spans.to(self.device).view(-1, 1)  # (Hq, T)
        return (owner.view(-1, 1) == head.view(1, -1)) & (pos >= 0) & ((pos < self.sink) | band)

    def _slot_heads(self) -> torch.Tensor:
        """KV head owning each packed slot, ``[T]``."""
        counts = torch.tensor(self.capacities, device=self.device)
        return torch.repeat_interleave(torch.arange(len(self.capacities), device=self.device), counts)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        """Tokens seen so far (not slots filled), so positions and RoPE continue correctly."""
        return self.seen

    def get_max_length(self) -> int:
        return self.total

    def reset(self) -> None:
        self.keys.zero_()
        self.values.zero_()
        self.lengths.zero_()
        self.seen = 0
        self._bias = None

    @property
    def nbytes_allocated(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    @property
    def nbytes_used(self) -> int:
        per_slot = 2 * self.batch_size * self.keys.shape[-1] * self.keys.element_size()
        return per_slot * sum(self.valid_lengths())


class PerHeadKVCache(Cache):
    """A transformers :class:`Cache` of :class:`PerHeadLayer` s, for ``model.generate(past_key_values=...)``.

    query_spans / kv_spans: per layer, ``[Hq]`` and ``[Hkv]`` spans at the planned ``total`` length.
    """

    def __init__(self, query_spans, kv_spans, sink: int, total: int, *, batch_size: int, head_dim: int,
                 dtype: torch.dtype, device):
        layers = [
            PerHeadLayer(q, kv, sink, total, batch_size=batch_size, head_dim=head_dim, dtype=dtype, device=device)
            for q, kv in zip(query_spans, kv_spans, strict=True)
        ]
        super().__init__(layers=layers)
        self.total = int(total)

    @property
    def nbytes_allocated(self) -> int:
        """Bytes of all key and value buffers."""
        return sum(layer.nbytes_allocated for layer in self.layers)

    @property
    def nbytes_used(self) -> int:
        """Bytes of the slots holding a token now, summed per head."""
        return sum(layer.nbytes_used for layer in self.layers)
