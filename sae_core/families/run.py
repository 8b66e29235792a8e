"""Links and map for a release whose SAEs were not all in one precompute pass (each alone, by an
older saescope, or some already complete when the others were precomputed): ``saescope
families``, and precompute's fallback for such layers. One pass over the same tokens as their
precompute, every batch through the subject once (to the layer) and through every SAE there."""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Collection
from typing import NamedTuple

from sqlalchemy.orm import Session

from sae_core.errors import SaescopeError
from sae_core.families.build import FamiliesResult, FamilySae, build_families
from sae_core.families.cofiring import CoFiring
from sae_core.store.db import SaeRow, create_engine_for, migrate
from sae_core.store.releases import get_release, release_saes


class FamiliesError(SaescopeError):
    """Links cannot be computed as asked; the message says why."""


class FamiliesConfig(NamedTuple):
    db_url: str
    release: str
    memory_budget_mb: int = 1024  # bounds the co-firing tables (a quarter of it) and cosine chunks
    max_active: int = 64  # features per token counted, as precompute's co-activation
    device: str | None = None
    progress: bool = True

    @property
    def memory_budget(self) -> int:
        return self.memory_budget_mb << 20


def layer_groups(session: Session, release: str) -> dict[int, list[SaeRow]]:
    """The release's complete SAEs by layer, for layers with two or more (families need two)."""
    row = get_release(session, release)
    if row is None:
        raise FamiliesError(f"no release named {release!r} in the store; see /api/v1/releases")
    by_layer: dict[int, list[SaeRow]] = defaultdict(list)
    for sae in release_saes(session, row.id):
        by_layer[sae.layer].append(sae)
    groups = {layer: saes for layer, saes in by_layer.items() if len(saes) > 1}
    if not groups:
        raise FamiliesError(f"release {release!r} has no two SAEs on one layer; links need at least two")
    for saes in groups.values():
        first = saes[0].precompute_cfg
        for other in saes[1:]:
            if {k: other.precompute_cfg.get(k) for k in ("model", "corpus", "tokens")} != {
                k: first.get(k) for k in ("model", "corpus", "tokens")
            }:
                raise FamiliesError(
                    f"{saes[0].name} and {other.name} were precomputed over different tokens or models; "
                    "precompute them together (same --corpus, --tokens, --seed, --ctx-len)"
                )
    return groups


def run_families(cfg: FamiliesConfig, layers: Collection[int] | None = None) -> list[FamiliesResult]:
    """Links and map of every layer of the release with two or more SAEs (or of ``layers``)."""
    engine = create_engine_for(cfg.db_url)
    try:
        migrate(engine)
        with Session(engine) as session:
            groups = layer_groups(session, cfg.release)
        return [families_of_layer(engine, cfg, layer, saes) for layer, saes in sorted(groups.items()) if layers is None or layer in layers]
    finally:
        engine.dispose()


def families_of_layer(engine, cfg: FamiliesConfig, layer: int, rows: list[SaeRow]) -> FamiliesResult:
    import torch

    from sae_core.inputs.activations import iter_activations
    from sae_core.inputs.corpus import build_contexts
    from sae_core.inputs.device import pick_device
    from sae_core.inputs.subject import load_subject
    from sae_core.precompute.encode import DictionaryCodes, sae_fingerprint
    from sae_core.precompute.stats import one_thread
    from sae_core.saes.formats import load_sae, stored_prefix
    from sae_core.store.families import dictionary_width

    precompute = rows[0].precompute_cfg
    subject = load_subject(precompute["model"], device=pick_device(cfg.device))
    subject.drop_blocks_after(layer)
    saes, dictionaries, loaded = [], [], {}  # loaded: a Matryoshka dictionary per folder, encoded once a batch
    for row in rows:
        sae = load_sae(row.path, prefix=stored_prefix(row.train_cfg or {}, row.d_sae))
        if sae_fingerprint(sae) != row.precompute_cfg.get("sae"):
            raise FamiliesError(f"the SAE at {row.path} changed since {row.name} was precomputed; precompute it again")
        if dictionary_width(row) is not None and row.path not in loaded:
            loaded[row.path] = load_sae(row.path).to(subject.device)
        saes.append(sae.to(subject.device))
        dictionaries.append(loaded.get(row.path))
    corpus = rows[0].corpus
    bos = 1 if subject.tokenizer.bos_token_id is not None else 0
    contexts = build_contexts(
        corpus["spec"], subject.tokenizer, text_field=corpus["text_field"], ctx_len=corpus["seq_len"] - bos,
        seed=corpus["seed"], max_contexts=corpus["n_contexts"],
    )  # fmt: skip
    if contexts.fingerprint != precompute["corpus"]:
        raise FamiliesError(f"the corpus {corpus['spec']!r} is not the one {rows[0].name} was precomputed over")
    cofiring = CoFiring([s.d_sae for s in saes], max_active=cfg.max_active, memory_budget=cfg.memory_budget)
    batches = iter_activations(subject, layer, contexts, batch_size=precompute.get("batch_size") or 32, progress=cfg.progress)
    with torch.no_grad():
        for batch in batches:
            codes = DictionaryCodes(cfg.memory_budget)  # a nested prefix's codes: its dictionary's, cut
            encoded = [codes.encode(sae, dictionary, batch).acts for sae, dictionary in zip(saes, dictionaries, strict=True)]
            with one_thread():  # small ops: see one_thread
                cofiring.update(encoded, encoded[0].token_ids.numel())
    result = build_families(
        engine, [FamilySae(r.id, s.W_dec.detach().cpu()) for r, s in zip(rows, saes, strict=True)], cofiring,
        memory_budget=cfg.memory_budget, seed=precompute.get("seed") or 0,
    )  # fmt: skip
    names = ", ".join(r.name for r in rows)
    print(f"saescope: layer {layer}: {result.n_links} links and {result.n_points} map points for {names}", file=sys.stderr)
    return result
