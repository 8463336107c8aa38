"""The CPU kernel's guard around PyTorch's private fused flash-attention ops (tested on torch 2.13 only).

Where an op is missing, or its log-sum-exp disagrees with ``torch.logsumexp`` on a tiny input, the kernel warns once
and runs a portable matmul-softmax path; its output and gradients must still equal the dense masked reference.
"""

import warnings

import pytest
import torch

import kernels.cpu as cpu
from kernels.cpu import moa_attention_cpu
from kernels.reference import moa_attention_reference

REAL_FUSED_OPS = cpu.fused_ops  # the fixture replaces cpu.fused_ops; the stand-ins below wrap the real ones


def scrambled_lse_ops():
    """The real fused ops, but the forward's log-sum-exp comes back in another layout (same shape)."""
    fwd, bwd = REAL_FUSED_OPS()

    def forward(*args, **kwargs):
        out, lse = fwd(*args, **kwargs)
        return out, lse.transpose(-1, -2).reshape(lse.shape)  # (..., H, L) data read as if stored (..., L, H)

    return forward, bwd


def tiled_kv_ops():
    """The real fused ops, but given fewer KV heads the forward tiles them (query head h reads KV head h % Hkv)
    instead of sharing each between consecutive query heads."""
    fwd, bwd = REAL_FUSED_OPS()

    def forward(q, k, v, *args, **kwargs):
        repeat = q.shape[1] // k.shape[1]
        return fwd(q, k.repeat(1, repeat, 1, 1), v.repeat(1, repeat, 1, 1), *args, **kwargs)

    return forward, bwd


@pytest.fixture(params=["missing-op", "lse-layout", "kv-tiled"])
def broken_fused_ops(request, monkeypatch):
    """Make the fused ops fail the first-use check; the selection is redone and restored after the test."""
    monkeypatch.setattr(cpu, "_selected_ops", None)
    if request.param == "missing-op":
        monkeypatch.setattr(cpu, "FUSED_OPS", ("no_such_flash_op", "no_such_flash_op_backward"))
    else:
        monkeypatch.setattr(cpu, "fused_ops", scrambled_lse_ops if request.param == "lse-layout" else tiled_kv_ops)
    return request.param


def reference_grads(q, k, v, spans, sink, upstream):
    """Output and (dq, dk, dv) of the dense masked reference in float64."""
    inputs = [x.detach().double().requires_grad_() for x in (q, k, v)]
    out = moa_attention_reference(*inputs, spans, sink)
    return out, torch.autograd.grad(out, inputs, upstream.double())


@pytest.mark.parametrize("block", [cpu.PORTABLE_BLOCK, 50], ids=["default-block", "tiny-blocks"])
def test_fallback_equals_reference_and_warns_once(broken_fused_ops, monkeypatch, block):
    monkeypatch.setattr(cpu, "PORTABLE_BLOCK", block)
    gen = torch.Generator().manual_seed(0)
    b, hq, hkv, n, d = 2, 6, 2, 150, 16
    cases = [(torch.tensor([0, 7, 7, 40, 150, 3]), 4), (torch.tensor([5, 5, 5, 5, 5, 5]), 0)]  # GQA, mixed spans
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for spans, sink in cases:
            q = torch.randn(b, hq, n, d, generator=gen, requires_grad=True)
            k, v = (torch.randn(b, hkv, n, d, generator=gen, requires_grad=True) for _ in range(2))
            upstream = torch.randn(b, hq, n, d, generator=gen)
            out = moa_attention_cpu(q, k, v, spans, sink, chunk=16)
            grads = torch.autograd.grad(out, (q, k, v), upstream)
            ref, ref_grads = reference_grads(q, k, v, spans, sink, upstream)
            torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
            for got, expected in zip(grads, ref_grads, strict=True):
                torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=1e-4)
    ours = [w for w in caught if "portable attention path" in str(w.message)]
    assert len(ours) == 1 and issubclass(ours[0].category, RuntimeWarning)
    assert cpu._selected_ops == (cpu.portable_flash_forward, cpu.portable_flash_backward)


def test_portable_ops_match_fused_ops_on_low_precision():
    """The portable pair keeps the fused pair's contract in bf16 too (dtypes, lse in float32, masked rows)."""
    gen = torch.Generator().manual_seed(1)
    q, k, v, dout = (torch.randn(3, 2, 40, 16, generator=gen).bfloat16() for _ in range(4))
    mask = torch.zeros(40, 40, dtype=torch.bfloat16).masked_fill_(torch.rand(40, 40, generator=gen) < 0.5, float("-inf"))
    fwd, bwd = cpu.fused_ops()
    for kwargs in (dict(is_causal=True), dict(attn_mask=mask)):
        out, lse = fwd(q, k, v, 0.0, kwargs.get("is_causal", False), attn_mask=kwargs.get("attn_mask"), scale=0.3)
        p_out, p_lse = cpu.portable_flash_forward(q, k, v, 0.0, scale=0.3, **kwargs)
        assert (p_out.dtype, p_lse.dtype, p_lse.shape) == (out.dtype, lse.dtype, lse.shape)
        torch.testing.assert_close(p_out.float(), out.float(), atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(p_lse, lse, atol=1e-3, rtol=1e-3)
        grads = bwd(dout, q, k, v, out, lse, 0.0, kwargs.get("is_causal", False), attn_mask=kwargs.get("attn_mask"),
                    scale=0.3)
        p_grads = cpu.portable_flash_backward(dout, q, k, v, out, lse, 0.0, scale=0.3, **kwargs)
        for got, expected in zip(p_grads, grads, strict=True):
            assert got.dtype == expected.dtype
            torch.testing.assert_close(got.float(), expected.float(), atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("context", [torch.enable_grad, torch.no_grad, torch.inference_mode])
def test_check_accepts_this_torchs_fused_ops(monkeypatch, context):
    """On the tested torch the check passes, so the fast path is used, whatever the grad mode of the first call
    (a false alarm would silently slow every call down)."""
    monkeypatch.setattr(cpu, "_selected_ops", None)
    q, k, v = torch.randn(1, 2, 40, 8), torch.randn(1, 1, 40, 8), torch.randn(1, 1, 40, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with context():
            moa_attention_cpu(q, k, v, torch.tensor([5, 9]), 2)
    assert cpu._selected_ops == cpu.fused_ops()
    assert "log-sum-exp" in cpu._check_ops(*scrambled_lse_ops())
    assert "GQA" in cpu._check_ops(*tiled_kv_ops())
