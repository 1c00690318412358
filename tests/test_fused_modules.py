"""backends/fused_modules.py: one q/k/v and one gate/up matmul, the elementwise ops between them the
backend's. The triton backend always runs them (tests/test_triton_backend.py); the torch backend on
a GPU only, so here it is made to on the CPU: the same flow, with the PyTorch references as ops,
against the reference backend (each pair alone through HF's own modules)."""

import dataclasses
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ARCHS, ragged_items
from darl_infer import Scorer
from darl_infer.backends.compiled_layers import gated_activation_for_inductor
from darl_infer.backends.fused_modules import FusedProjection, activation_of
from darl_infer.backends.torch_backend import TorchBackend
from darl_infer.kernels.gated_activation import gated_activation_reference
from tiny_models import random_text


@pytest.fixture
def fused_on_the_cpu(monkeypatch):
    """The torch backend's GPU layout on the CPU: every module fused, the PyTorch references between."""
    monkeypatch.setattr(TorchBackend, "uses_fused_modules", lambda self: True)
    monkeypatch.setattr(TorchBackend, "fused_module_ops", lambda self: dataclasses.replace(
        self.elementwise_ops, gated=gated_activation_for_inductor
    ) if self.compiled else self.elementwise_ops)


@pytest.mark.parametrize("arch", ARCHS)  # qwen2: biases on the fused q/k/v projection
@pytest.mark.parametrize("dtype, tolerance", [("fp32", 1e-5), ("bf16", 2e-2)])
def test_torch_backend_with_fused_modules_matches_the_reference(fused_on_the_cpu, tiny_checkpoints, arch, dtype, tolerance):
    rng = random.Random(f"fused-{arch}-{dtype}")
    query, items = random_text(rng, rng.randint(1, 12)), ragged_items(rng, 30)
    reference = Scorer.from_pretrained(tiny_checkpoints[arch], backend="reference", dtype=dtype).score(query, items)
    fused = Scorer.from_pretrained(tiny_checkpoints[arch], backend="torch", dtype=dtype, token_budget=60)
    assert {p.name for p in fused.backend.fused_projections} == {"qkv", "gate_up"}  # the fused path ran
    assert np.abs(fused.score(query, items).probs - reference.probs).max() <= tolerance


@pytest.mark.parametrize("dtype, tolerance", [("fp32", 1e-5), ("bf16", 2e-2)])
def test_compiled_fused_modules_match_the_reference_in_one_graph_per_attention_kind(fused_on_the_cpu, tiny_checkpoints, dtype, tolerance):
    """compile=True with the fused modules (the torch backend's GPU layout): the swapped forwards
    read only module attributes, so the layers still share their graphs, without a graph break."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    rng = random.Random(f"fused-compiled-{dtype}")
    query, items = random_text(rng, 5), ragged_items(rng, 12)
    reference = Scorer.from_pretrained(tiny_checkpoints["gemma3"], backend="reference", dtype=dtype).score(query, items)
    compiled = Scorer.from_pretrained(tiny_checkpoints["gemma3"], backend="torch", dtype=dtype, compile=True)
    assert np.abs(compiled.score(query, items).probs - reference.probs).max() <= tolerance
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert 1 <= counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])  # sliding and global layers


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_gated_activation_for_inductor_is_the_reference_within_a_bf16_step(activation):
    gate, up = (3 * torch.randn(2, 64, 256, generator=torch.Generator().manual_seed(0))).bfloat16()
    got, want = gated_activation_for_inductor(gate, up, activation).float(), gated_activation_reference(gate, up, activation).float()
    assert ((got - want).abs() <= 2**-7 * want.abs() + 1e-5).all()  # the exp form's GELU: at most a last-bit flip


def test_fused_projection_is_its_layers_and_follows_their_parameters():
    torch.manual_seed(0)
    owner = torch.nn.Module()
    owner.first, owner.second = torch.nn.Linear(8, 3), torch.nn.Linear(8, 5)
    parameters = list(owner.parameters())
    x = torch.randn(4, 8)
    expected = owner.first(x), owner.second(x)
    fused = FusedProjection(owner, "pair", [owner.first, owner.second])

    def through_fused():
        return F.linear(x, owner.darl_pair_weight, owner.darl_pair_bias).split(owner.darl_pair_sizes, dim=-1)

    for got, want, layer in zip(through_fused(), expected, (owner.first, owner.second)):
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(layer(x), want)  # the layers' parameters hold views of the fused ones
    assert all(a is b for a, b in zip(owner.parameters(), parameters))  # the same objects (an optimizer's)
    assert set(owner.state_dict()) == {"first.weight", "first.bias", "second.weight", "second.bias"}  # nothing new saved
    with torch.no_grad():
        owner.second.weight.mul_(2)  # updated in place, as an optimizer does: the fused weight shares the storage
    torch.testing.assert_close(through_fused()[1], owner.second(x))
    owner.first.weight = torch.nn.Parameter(torch.zeros(3, 8))  # replaced: fused again on refresh
    owner.second.bias.data = torch.ones(5)  # other storage: likewise
    fused.refresh()
    torch.testing.assert_close(through_fused()[0], owner.first(x))
    torch.testing.assert_close(through_fused()[1], owner.second(x))


def test_activation_of_tells_the_activation_by_what_it_computes():
    from transformers.activations import ACT2FN

    assert activation_of(ACT2FN["silu"]) == "silu"
    assert activation_of(ACT2FN["gelu_pytorch_tanh"]) == "gelu_tanh"
    assert activation_of(ACT2FN["gelu"]) is None  # the exact GELU: HF's forward runs
