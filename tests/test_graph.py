"""sae_core.live.graph: exact edges with exact SAEs, finite differences through the frozen
replacement model, batching, the node cap, and the errors a user can cause."""

from __future__ import annotations

import json

import pytest
import torch

from sae_core.inputs.subject import load_subject
from sae_core.live import probe as live
from sae_core.live.attribution import Target
from sae_core.live.graph import (
    GraphSae,
    build_graph,
    predicted_change,
    replacement_model,
)
from sae_core.live.graph_json import GRAPH_SCHEMA, dumps, graph_document, loads
from sae_core.live.graph_prune import influence, normalised, prune
from sae_core.live.graph_settings import GraphError, GraphLimits, Pruning
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


# -- pruning, scores and JSON ------------------------------------------------------------------


@pytest.fixture(scope="module")
def topk_graph(llama64, topk_saes):
    return build_graph(llama64, topk_saes, live.encode_prompt(llama64, TEXT))


@pytest.mark.parametrize("node_share, edge_share", [(0.8, 0.98), (0.5, 0.9)])
def test_pruning_keeps_the_required_influence_share(topk_graph, node_share, edge_share):
    graph = topk_graph
    pruned = prune(graph, Pruning(node_share, edge_share))
    prunable = torch.zeros(graph.n_nodes, dtype=torch.bool)
    prunable[: graph.embedding_start] = True
    total = pruned.influence[prunable].sum()
    kept = pruned.influence[prunable & pruned.by_influence].sum()
    assert kept >= node_share * total
    # ... and not much more: dropping the least influential kept node falls below the share
    least = pruned.influence[prunable & pruned.by_influence].min()
    assert kept - least < node_share * total
    assert bool(pruned.nodes[graph.embedding_start :].all())
    assert not bool((pruned.nodes & ~pruned.by_influence).any())
    # every kept edge joins kept nodes; every kept feature has an edge in and one out
    dst, src = pruned.edges.nonzero(as_tuple=True)
    assert bool(pruned.nodes[dst].all() and pruned.nodes[src].all())
    for i in pruned.nodes[: graph.n_features].nonzero()[:, 0].tolist():
        assert pruned.edges[i].any() and pruned.edges[:, i].any()
    assert 0 < pruned.replacement_score < 1 and 0 < pruned.completeness < 1
    assert pruned.nodes.sum() < graph.n_nodes


def test_influence_is_the_sum_over_paths(topk_graph):
    """Against a direct sum over every path, on the normalised matrix."""
    shares = normalised(topk_graph.adjacency)
    start = torch.zeros(topk_graph.n_nodes, dtype=torch.float64)
    start[-1] = 1.0
    by_paths = torch.zeros_like(start)
    power = start
    for _ in range(len(LAYERS) + 1):  # embeddings -> 3 SAE layers -> target: at most 4 hops
        power = power @ shares
        by_paths += power
    torch.testing.assert_close(influence(shares, start), by_paths)
    assert float(
        by_paths[topk_graph.embedding_start : -1].sum()
        + by_paths[topk_graph.error_start : topk_graph.embedding_start].sum()
    ) == pytest.approx(1.0)


def test_exact_saes_replace_everything(llama64, exact_saes):
    graph = build_graph(llama64, exact_saes, TEXT, limits=GraphLimits(max_features=10_000))
    pruned = prune(graph)
    assert pruned.replacement_score == pytest.approx(1.0)
    assert pruned.completeness == pytest.approx(1.0)


def document_of(graph, labels=None):
    pruning = Pruning()
    return graph_document(
        graph,
        prune(graph, pruning),
        slug="tiny-fox",
        release="tiny-release",
        sae_names=[f"sae-l{layer}" for layer in graph.layers],
        prompt=TEXT,
        n_model_layers=4,
        pruning=pruning,
        limits=GraphLimits(),
        labels=labels,
    )


def test_json_validates_against_the_schema_and_round_trips_byte_for_byte(topk_graph):
    jsonschema = pytest.importorskip("jsonschema")
    slot, pos, feature = topk_graph.features[0].tolist()
    labels = {(layer, f): f"<script>alert({f})</script>" for layer in LAYERS for f in range(96)}
    document = document_of(topk_graph, labels)
    document.qParams.pinnedIds = [document.nodes[0].node_id]
    document.qParams.supernodes = [
        ["a group", document.nodes[0].node_id, document.nodes[1].node_id]
    ]
    text = dumps(document)
    jsonschema.validate(json.loads(text), GRAPH_SCHEMA)
    assert dumps(loads(text)) == text
    assert dumps(loads(dumps(loads(text)))) == text
    data = json.loads(text)
    assert data["metadata"]["prompt_tokens"][0] == "<|bos|>"
    assert len(data["metadata"]["prompt_tokens"]) == topk_graph.n_positions
    assert {n["feature_type"] for n in data["nodes"]} >= {
        "embedding",
        "logit",
        "cross layer transcoder",
    }
    assert any(n["clerp"].startswith("<script>") for n in data["nodes"])
    ids = {n["node_id"] for n in data["nodes"]}
    assert all(link["source"] in ids and link["target"] in ids for link in data["links"])
    meta = data["metadata"]["saescope"]
    assert meta["nodes_after"] == len(data["nodes"]) and meta["edges_after"] == len(data["links"])


def test_a_circuit_tracer_document_imports_and_keeps_unknown_keys(topk_graph):
    foreign = json.loads(dumps(document_of(topk_graph)))
    foreign["metadata"] = {
        k: foreign["metadata"][k]
        for k in ("slug", "scan", "transcoder_list", "prompt_tokens", "prompt", "node_threshold")
    }
    foreign["metadata"]["from_neuronpedia"] = {"x": 1}
    imported = loads(json.dumps(foreign))
    again = dumps(imported)
    assert json.loads(again)["metadata"]["from_neuronpedia"] == {"x": 1}
    assert dumps(loads(again)) == again


@pytest.mark.parametrize(
    "text, message",
    [
        ("{", "not a graph JSON file"),
        ('{"nodes": []}', "metadata"),
        (
            '{"metadata": {"slug": "s", "scan": "x", "prompt_tokens": [], "prompt": ""}, "nodes": [],'
            ' "links": [{"source": "a", "target": "b", "weight": 1}]}',
            "unknown node",
        ),
    ],
)
def test_bad_json_is_one_clear_error(text, message):
    with pytest.raises(GraphError, match=message):
        loads(text)
