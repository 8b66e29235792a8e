"""sae_core.live.graph: exact edges with exact SAEs, finite differences through the frozen
replacement model, batching, the node cap, and the errors a user can cause."""

from __future__ import annotations

import pytest
import torch

from sae_core.inputs.subject import load_subject
from sae_core.live import probe as live
from sae_core.live.attribution import Target
from sae_core.live.freeze import GraphError
from sae_core.live.graph import (
    GraphLimits,
    GraphSae,
    build_graph,
    predicted_change,
    replacement_model,
)
from sae_core.saes.sae import SAE, SAEConfig
from tests.live_support import random_sae

TEXT = "The quick brown fox jumps over"
LAYERS = (0, 1, 3)


@pytest.fixture(scope="module")
def llama64(llama_dir):
    return load_subject(str(llama_dir), dtype=torch.float64)


def exact_sae(d: int, layer: int) -> SAE:
    """f = (relu(x), relu(-x)), x̂ = f @ [I; -I] = x: zero error at every token."""
    eye = torch.eye(d)
    tensors = {
        "W_enc": torch.cat([eye, -eye], dim=1),
        "W_dec": torch.cat([eye, -eye], dim=0),
        "b_enc": torch.zeros(2 * d),
        "b_dec": torch.zeros(d),
    }
    cfg = SAEConfig(d_in=d, d_sae=2 * d, architecture="standard", layer=layer)
    return SAE.from_tensors(cfg, tensors, origin="exact").double().eval()


@pytest.fixture(scope="module")
def exact_saes(llama64):
    return [GraphSae(layer, exact_sae(llama64.d_model, layer)) for layer in LAYERS]


@pytest.fixture(scope="module")
def topk_saes(llama64):
    return [
        GraphSae(
            layer,
            random_sae(
                llama64.d_model, d_sae=96, architecture="topk", k=6, layer=layer, seed=layer
            ).double(),
        )
        for layer in LAYERS
    ]


def check_inputs_are_edge_sums(graph):
    sums = graph.adjacency.double().sum(dim=1) + graph.bias.double()
    receivers = list(range(graph.n_features)) + [graph.target_index]
    torch.testing.assert_close(sums[receivers], graph.inputs.double()[receivers], rtol=0, atol=1e-4)


def test_exact_saes_edges_sum_to_every_input_and_the_target_logit(llama64, exact_saes):
    prompt = live.encode_prompt(llama64, TEXT)
    graph = build_graph(
        llama64, exact_saes, prompt, limits=GraphLimits(max_features=10_000, batch_size=17)
    )
    with torch.no_grad():
        logits = llama64.model(prompt.ids[None]).logits[0, -1]
    assert graph.target.token_id == int(logits.argmax())
    assert graph.metric == pytest.approx(float(logits.max()), abs=1e-9)
    # Every residual coordinate is a feature, so half of all (position, feature) pairs fire.
    assert graph.n_features > len(LAYERS) * (len(prompt) - 1) * llama64.d_model * 0.4
    check_inputs_are_edge_sums(graph)
    # zero error: error nodes send nothing, and the feature biases are zero
    assert graph.adjacency[:, graph.error_start : graph.embedding_start].abs().max() < 1e-9
    target = graph.adjacency[graph.target_index].double()
    assert float(target.sum()) == pytest.approx(graph.metric, abs=1e-4)
    # direct edges only between consecutive SAE layers, never from the future
    slots, positions = graph.features[:, 0], graph.features[:, 1]
    into_slot2 = graph.adjacency[(slots == 2).nonzero()[:, 0]][:, : graph.n_features]
    assert into_slot2[:, (slots == 0).nonzero()[:, 0]].abs().max() == 0
    later = positions[None, :] > positions[:, None]
    assert graph.adjacency[: graph.n_features, : graph.n_features][later].abs().max() == 0


def test_random_saes_with_errors_still_sum_exactly_and_batching_does_not_matter(llama64, topk_saes):
    prompt = live.encode_prompt(llama64, TEXT)
    one = build_graph(llama64, topk_saes, prompt, limits=GraphLimits(batch_size=1))
    many = build_graph(llama64, topk_saes, prompt, limits=GraphLimits(batch_size=1000))
    check_inputs_are_edge_sums(many)
    assert many.adjacency[:, many.error_start : many.embedding_start].abs().max() > 1e-3
    torch.testing.assert_close(one.adjacency, many.adjacency, rtol=1e-6, atol=1e-8)
    assert many.n_features == len(LAYERS) * (len(prompt) - 1) * 6 - int(
        (many.activations == 0).sum()
    )


@pytest.mark.parametrize("logit_difference", [False, True])
def test_scaling_one_feature_matches_the_graphs_prediction(llama64, topk_saes, logit_difference):
    prompt = live.encode_prompt(llama64, TEXT)
    target = Target(token=5, contrast=7) if logit_difference else Target()
    eps = 1e-4
    with replacement_model(llama64, topk_saes, prompt, target) as model:
        graph = model.graph()
        base, _ = model.metric()
        # the model's own norms round in float32; the frozen ones keep float64
        assert float(base) == pytest.approx(graph.metric, rel=1e-6)
        checked = 0
        for node in torch.randperm(graph.n_features, generator=torch.Generator().manual_seed(0))[
            :12
        ].tolist():
            slot, pos, feat = graph.features[node].tolist()
            scaled, _ = model.metric(scale=(slot, pos, feat, 1 - eps))
            actual = float(scaled - base)
            predicted = predicted_change(graph, node, -eps * float(graph.activations[node]))
            if abs(predicted) < 1e-9:
                assert abs(actual) < 1e-9
                continue
            assert actual == pytest.approx(predicted, rel=1e-3)
            checked += 1
    assert checked >= 6


def test_feature_cap_folds_the_rest_into_errors_and_keeps_sums_exact(llama64, topk_saes):
    prompt = live.encode_prompt(llama64, TEXT)
    full = build_graph(llama64, topk_saes, prompt)
    capped = build_graph(llama64, topk_saes, prompt, limits=GraphLimits(max_features=20))
    assert capped.n_features == 20 and capped.n_folded == full.n_features - 20
    check_inputs_are_edge_sums(capped)
    assert capped.metric == full.metric


def test_errors_a_user_can_cause(llama64, topk_saes, gpt2_dir):
    with pytest.raises(GraphError, match="same layer"):
        build_graph(llama64, [topk_saes[0], topk_saes[0]], TEXT)
    with pytest.raises(GraphError, match="position 99"):
        build_graph(llama64, topk_saes, TEXT, Target(position=99))
    gpt2 = load_subject(str(gpt2_dir))
    with pytest.raises(GraphError, match="Llama-family"):
        build_graph(gpt2, [GraphSae(0, random_sae(gpt2.d_model, layer=0))], TEXT)
