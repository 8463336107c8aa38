"""Saving and loading adapters: bitwise round trip after training, refusal of tampered files and wrong bases."""

import json
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_model

from pipeline.adapters import (
    Composition,
    ExpertSpec,
    RouterSpec,
    adapter_digest,
    attach_adapters,
    base_fingerprint,
    load_adapters,
    save_adapters,
)
from pipeline.adapters.saving import CONFIG_FILE, WEIGHTS_FILE
from pipeline.models import fingerprint

COMPOSITION = Composition(
    experts=(ExpertSpec("lora", size=4, alpha=8.0, targets=("q", "v", "down"), count=2), ExpertSpec("parallel", size=6),
             ExpertSpec("prompt", size=3), ExpertSpec("ia3")),
    router=RouterSpec("sparse", hidden=8, threshold_cap=0.7, load_balance_weight=0.01),
    layers=(0, 2),
)


def tiny():
    return make_tiny_model("qwen3", vocab=300)


def ids(seed=0):
    return torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A few Adam steps on the LM loss, saved; returns (directory, digest, fingerprint, logits on ids())."""
    model = tiny()
    adapters = attach_adapters(model, COMPOSITION, seed=11)
    optimizer = torch.optim.Adam(adapters.trainable_parameters(), lr=2e-2)
    model.train()
    for step in range(4):
        optimizer.zero_grad()
        x = ids(step + 1)
        logits = model(x).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, 300), x[:, 1:].reshape(-1)) + adapters.weighted_aux_loss()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        logits = model(ids()).logits
    directory = tmp_path_factory.mktemp("adapters") / "trial-0"
    fp = base_fingerprint(model)
    digest = save_adapters(adapters, directory, base_fingerprint=fp)
    assert digest == adapter_digest(adapters)
    return directory, digest, fp, logits


def test_round_trip_is_bitwise(trained):
    directory, digest, fp, logits = trained
    assert sorted(os.listdir(directory)) == [CONFIG_FILE, WEIGHTS_FILE]
    assert not [p for p in directory.parent.iterdir() if p.name.startswith(".")]  # no staging left behind
    config = json.loads((directory / CONFIG_FILE).read_text())
    assert config["adapter_digest"] == digest and config["base_fingerprint"] == fp
    assert config["composition"] == COMPOSITION.to_dict() and config["format_version"] == "moa-adapters/1"
    model = tiny()
    assert fingerprint(model) == fp
    adapters = load_adapters(model, directory, base_fingerprint=fingerprint(model))
    assert adapters.composition == COMPOSITION and adapter_digest(adapters) == digest
    with torch.no_grad():
        assert torch.equal(model(ids()).logits, logits)
        assert (model(ids()).logits - tiny()(ids()).logits).abs().max() > 1e-3  # the training did something


def test_wrong_base_is_refused(trained):
    directory, _, fp, _ = trained
    model = make_tiny_model("qwen3", vocab=300, seed=1)
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        load_adapters(model, directory, base_fingerprint=fingerprint(model))
    assert not hasattr(model, "moa_adapters")


def test_tampered_weights_are_refused(trained, tmp_path):
    directory, _, fp, _ = trained
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        (copy / name).write_bytes((directory / name).read_bytes())
    data = bytearray((copy / WEIGHTS_FILE).read_bytes())
    data[-5] ^= 0x01  # one bit of the last tensor's data; the header stays valid
    (copy / WEIGHTS_FILE).write_bytes(bytes(data))
    model = tiny()
    with pytest.raises(ValueError, match="corrupted"):
        load_adapters(model, copy, base_fingerprint=fp)
    assert not hasattr(model, "moa_adapters")
    (copy / CONFIG_FILE).unlink()
    with pytest.raises(ValueError, match="cannot read adapter config"):
        load_adapters(model, copy, base_fingerprint=fp)


def test_save_replaces_an_adapter_but_not_other_directories(tmp_path):
    model = tiny()
    adapters = attach_adapters(model, Composition((ExpertSpec("lora", 2),)))
    target = tmp_path / "adapter"
    first = save_adapters(adapters, target, base_fingerprint="f" * 16)
    with torch.no_grad():
        adapters.layers["0"].experts[0]["q"].B.weight.fill_(0.5)
    second = save_adapters(adapters, target, base_fingerprint="f" * 16)
    assert first != second and json.loads((target / CONFIG_FILE).read_text())["adapter_digest"] == second
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    other = tmp_path / "results"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not an adapter directory"):
        save_adapters(adapters, other, base_fingerprint="f" * 16)
    assert (other / "notes.txt").read_text() == "keep me"
