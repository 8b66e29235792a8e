"""Feature families: co-firing counts equal counting by hand, cosine links equal brute force."""

from __future__ import annotations

import multiprocessing
import signal
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sae_core.families.cofiring import CoFiring, SparseActs
from sae_core.families.feed import open_feeds
from sae_core.families.layout import LayoutsBeside, cosine_neighbours
from sae_core.families.links import links_both_ways, unit_directions
from sae_core.precompute.stats import active_sets


def random_acts(generator, n_tokens: int, width: int, k: int) -> SparseActs:
    """k distinct active features per token (a TopK SAE), random values."""
    feature = torch.stack([torch.randperm(width, generator=generator)[:k] for _ in range(n_tokens)])
    token = torch.arange(n_tokens).repeat_interleave(k)
    return SparseActs(token, feature.reshape(-1), torch.rand(n_tokens * k, generator=generator) + 0.1)


def token_sets(batches: list[SparseActs], width: int) -> list[set[int]]:
    """Feature -> the global token numbers it fired on, counted one entry at a time."""
    sets = [set() for _ in range(width)]
    offset = 0
    for acts in batches:
        for t, f in zip(acts.token.tolist(), acts.feature.tolist(), strict=True):
            sets[f].add(offset + t)
        offset += int(acts.token.max()) + 1
    return sets


@pytest.mark.parametrize("budget", [1 << 30, 0], ids=["dense", "sparse"])
def test_cofiring_counts_equal_counting_by_hand(budget):
    generator = torch.Generator().manual_seed(0)
    widths, ks, n_tokens = (6, 10, 14), (2, 3, 3), 40
    batches = [[random_acts(generator, n_tokens, w, k) for w, k in zip(widths, ks, strict=True)] for _ in range(3)]
    cofiring = CoFiring(widths, max_active=8, memory_budget=budget)
    assert all((counts.dense is not None) == (budget > 0) for counts in cofiring.pairs.values())
    cofiring.update(batches[0], n_tokens)
    restored = CoFiring(widths, max_active=8, memory_budget=budget)  # a resumed run
    restored.load_state_dict(cofiring.state_dict("co"), "co")
    for batch in batches[1:]:
        restored.update(batch, n_tokens)
    assert restored.n_tokens == 3 * n_tokens
    sets = [token_sets([b[s] for b in batches], w) for s, w in enumerate(widths)]
    for s, w in enumerate(widths):
        assert restored.occurrences[s].tolist() == [len(sets[s][i]) for i in range(w)]
    for a, b in [(0, 1), (1, 2), (2, 0)]:  # (2, 0): the stored (0, 2) table read the other way
        keys, both = restored.pair(a, b)
        counted = {i * widths[b] + j: len(sets[a][i] & sets[b][j]) for i in range(widths[a]) for j in range(widths[b])}
        assert dict(zip(keys.tolist(), both.tolist(), strict=True)) == {k: v for k, v in counted.items() if v}
        assert keys.tolist() == sorted(keys.tolist())


def brute_force_links(W_a, W_b, acts_a, acts_b):
    """Cosine and Jaccard of every pair, counted one token set at a time."""
    cos = torch.nn.functional.cosine_similarity(W_a.unsqueeze(1), W_b.unsqueeze(0), dim=2).double()
    sets_a, sets_b = token_sets([acts_a], W_a.shape[0]), token_sets([acts_b], W_b.shape[0])
    jac = torch.tensor([[len(x & y) / len(x | y) if x | y else 0.0 for y in sets_b] for x in sets_a], dtype=torch.float64)
    return cos, jac, sets_a, sets_b


def check_against_brute_force(links, W_a, W_b, acts_a, acts_b):
    cos, jac, sets_a, sets_b = brute_force_links(W_a, W_b, acts_a, acts_b)
    got = {(s, t) for s, t in zip(links.source.tolist(), links.target.tolist(), strict=True)}
    for i in range(W_a.shape[0]):
        top_cos = set(cos[i].topk(5).indices.tolist())
        positive = [j for j in range(W_b.shape[0]) if jac[i, j] > 0]
        top_jac = set(sorted(positive, key=lambda j: -jac[i, j].item())[:5])
        assert {t for s, t in got if s == i} == top_cos | top_jac
    assert torch.allclose(links.cosine, cos[links.source, links.target], atol=1e-6)
    assert torch.allclose(links.jaccard, jac[links.source, links.target])
    assert links.n_source.tolist() == [len(sets_a[i]) for i in links.source.tolist()]
    assert links.n_target.tolist() == [len(sets_b[j]) for j in links.target.tolist()]
    assert links.n_both.tolist() == [len(sets_a[i] & sets_b[j]) for i, j in sorted(got)]


@pytest.mark.parametrize("table_budget", [1 << 20, 0], ids=["dense", "sparse"])
def test_links_both_ways_equal_brute_force(table_budget):
    generator = torch.Generator().manual_seed(1)
    W_a, W_b = torch.randn(12, 8, generator=generator), torch.randn(30, 8, generator=generator)
    acts_a, acts_b = random_acts(generator, 50, 12, 2), random_acts(generator, 50, 30, 3)
    cofiring = CoFiring([12, 30], max_active=8, memory_budget=table_budget)
    cofiring.update([acts_a, acts_b], 50)
    forward, backward = links_both_ways(
        unit_directions(W_a), unit_directions(W_b), cofiring, 0, 1, n=5, memory_budget=2 * 16 * 30
    )  # 2 rows of a per cosine chunk (results.rows_per_chunk): b's running top 5 merges 6 chunks;
    # one row per Jaccard chunk
    check_against_brute_force(forward, W_a, W_b, acts_a, acts_b)
    check_against_brute_force(backward, W_b, W_a, acts_b, acts_a)


@pytest.mark.parametrize("max_active", [8, 2], ids=["all", "top-2"])
def test_active_sets_are_each_tokens_largest_whatever_the_entry_order(max_active):
    generator = torch.Generator().manual_seed(2)
    acts = random_acts(generator, 30, 20, 4)
    order = torch.randperm(acts.token.numel(), generator=generator)
    for token, feature, value in [acts, (acts.token[order], acts.feature[order], acts.value[order])]:
        active = active_sets(token, feature, value, 30, max_active)
        for t in range(30):
            mine = [(v, f) for tt, f, v in zip(token.tolist(), feature.tolist(), value.tolist(), strict=True) if tt == t]
            expected = {f for _, f in sorted(mine, reverse=True)[:max_active]}
            assert set(active[t].tolist()) - {-1} == expected


def fake_streams(layers, widths, done):
    """What open_feeds reads of precompute's streams."""
    return [
        SimpleNamespace(target=SimpleNamespace(inputs=SimpleNamespace(layer=layer), sae=SimpleNamespace(d_sae=width), sae_id=i + 1), batches_done=d)
        for i, (layer, width, d) in enumerate(zip(layers, widths, done, strict=True))
    ]


def test_feeds_open_fresh_resume_or_leave_a_layer_to_a_pass_of_its_own():
    generator = torch.Generator().manual_seed(4)
    layers, widths = [1, 1, 2, 1], [30, 10, 10, 20]
    budget = dict(max_active=8, memory_budget=1 << 20)
    feeds, unfed = open_feeds("sqlite:///x.db", fake_streams(layers, widths, [None] * 4), set(), **budget)
    assert unfed == [] and [(f.layer, f.members) for f in feeds] == [(1, [1, 3, 0])]  # smallest width first
    (feed,) = feeds
    codes = {i: random_acts(generator, 16, widths[i], 2) for i in (0, 1, 3)}  # as BatchActs carry them:
    feed.update({i: SimpleNamespace(**acts._asdict(), token_ids=torch.zeros(16)) for i, acts in codes.items()})
    assert feed.cofiring.n_tokens == 16
    feed.save(3)
    resumed, unfed = open_feeds("sqlite:///x.db", fake_streams(layers, widths, [3, 3, None, 3]), set(), **budget)
    assert unfed == [] and resumed[0].cofiring.state_dict("c").keys() == feed.cofiring.state_dict("c").keys()
    for key, value in feed.cofiring.state_dict("c").items():
        assert torch.equal(resumed[0].cofiring.state_dict("c")[key], value)
    assert open_feeds("sqlite:///x.db", fake_streams(layers, widths, [5, 5, None, 5]), set(), **budget) == ([], [1])  # none saved at 5
    assert open_feeds("sqlite:///x.db", fake_streams(layers, widths, [3, 5, None, 3]), set(), **budget) == ([], [1])  # joins differ
    assert open_feeds("sqlite:///x.db", fake_streams(layers, widths, [None] * 4), {1}, **budget) == ([], [1])  # one kept as it was
    feeds, unfed = open_feeds("sqlite:///x.db", fake_streams([1, 2], [10, 10], [None, None]), {2}, **budget)
    assert feeds == [] and unfed == [2]  # layer 2: one computed now, one kept


def test_map_neighbours_are_the_exact_cosine_neighbours_itself_first():
    """What UMAP is given for a large map: each row's nearest rows by cosine distance, itself first
    at 0 even beside a duplicate direction, the same whatever the chunk, and a zero row at
    distance 1 from everything."""
    torch.manual_seed(0)
    unit = unit_directions(torch.randn(300, 16))
    unit[7] = unit[3]  # a duplicate direction
    unit[11] = 0  # a dead decoder row
    indices, distances, index = cosine_neighbours(unit, 15, memory_budget=1 << 30)
    assert index is None and indices.shape == distances.shape == (300, 15)
    assert (indices[:, 0] == range(300)).all() and (distances[:, 0] == 0).all()
    assert indices[3, 1] == 7 and indices[7, 1] == 3 and distances[3, 1] < 1e-6
    assert (distances[11, 1:] == 1).all()
    brute = 1 - unit @ unit.T
    brute.fill_diagonal_(-1)  # itself first
    expected = brute.topk(15, dim=1, largest=False)
    assert torch.allclose(torch.from_numpy(distances[:, 1:]), expected.values[:, 1:].clamp(min=0), atol=1e-6)
    chunked, chunked_distances, _ = cosine_neighbours(unit, 15, memory_budget=4 * 4 * 300 * 7)  # 7 rows at a time
    # A product's last bits may depend on the chunk (and the BLAS threads): only near-ties may swap.
    assert np.allclose(chunked_distances, distances, atol=1e-6)
    rows, cols = np.nonzero(chunked != indices)
    assert torch.allclose(brute[rows, chunked[rows, cols]], brute[rows, indices[rows, cols]], atol=1e-6)


def test_an_error_beside_a_map_ends_the_map_process():
    """Precompute's tail failing while the map is made in its own process ends that process too:
    the error reaches the user at once, and nothing is left running."""
    before = set(multiprocessing.active_children())
    with pytest.raises(RuntimeError, match="the tail failed"), LayoutsBeside() as layouts:
        layouts.submit([unit_directions(torch.randn(64, 8))], seed=0, memory_budget=1 << 20)
        started = set(multiprocessing.active_children()) - before
        assert started
        raise RuntimeError("the tail failed")
    assert [child.exitcode for child in started] == [-signal.SIGTERM]  # stopped, not waited for
