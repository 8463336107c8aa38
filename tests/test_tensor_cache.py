"""The kernels' shared mask cache: bounded in bytes, least recently used dropped first, built once per key."""

import pytest
import torch

from kernels import tensor_cache


@pytest.fixture(autouse=True)
def small_cache(monkeypatch):
    monkeypatch.setattr(tensor_cache, "MAX_BYTES", 100)
    tensor_cache.clear()
    yield
    tensor_cache.clear()


def test_a_key_is_built_once_and_the_oldest_goes_first():
    builds = []

    def build(name):
        def make():
            builds.append(name)
            return torch.zeros(10, dtype=torch.float32)  # 40 bytes
        return make

    a = tensor_cache.cached(("t", "a"), build("a"))
    assert tensor_cache.cached(("t", "a"), build("a")) is a
    tensor_cache.cached(("t", "b"), build("b"))
    tensor_cache.cached(("t", "a"), build("a"))  # a is now the most recently used
    tensor_cache.cached(("t", "c"), build("c"))  # 120 bytes: b, the least recently used, goes
    tensor_cache.cached(("t", "a"), build("a"))
    tensor_cache.cached(("t", "b"), build("b"))
    assert builds == ["a", "b", "c", "b"]


def test_none_is_remembered_and_an_oversized_tensor_is_not_kept():
    builds = []
    assert tensor_cache.cached(("t", "none"), lambda: builds.append("none")) is None
    assert tensor_cache.cached(("t", "none"), lambda: builds.append("none")) is None
    big = tensor_cache.cached(("t", "big"), lambda: builds.append("big") or torch.zeros(26, dtype=torch.float32))
    assert big.numel() == 26
    tensor_cache.cached(("t", "big"), lambda: builds.append("big") or torch.zeros(26, dtype=torch.float32))
    assert builds == ["none", "big", "big"]
