"""``PrecomputeConfig`` (every knob of ``saescope precompute``, and ``PrecomputeError``, in a module free of
torch so the CLI can show defaults and refuse bad flags without loading it."""

from __future__ import annotations

from dataclasses import dataclass, field

from sae_core.errors import SaescopeError
from sae_core.store.db import default_db_url


class PrecomputeError(SaescopeError):
    """Precompute cannot run as asked; the message says what to pass instead."""


@dataclass
class PrecomputeConfig:
    # SAEs to precompute in one corpus pass: anything sae_core.saes.formats.load_sae reads (ours,
    # SAELens, sparsify, Gemma Scope), or a folder of such SAEs (a release)
    sae_paths: list[str]
    db_url: str = field(default_factory=default_db_url)  # SQLAlchemy URL; SAESCOPE_DB_URL or ./saescope.db
    model: str | None = None  # subject model; None: the one the SAE's config names
    layer: int | None = None  # block whose output the SAE reads (one SAE only); None: from its config
    corpus: str = "default"  # corpus spec, as every command takes it
    text_field: str = "text"  # JSONL / datasets field with the text
    ctx_len: int = 64  # tokens per context, the length SAEs here are trained on
    tokens: int | None = 500_000  # tokens to run over: ~20 min for SmolLM2 on 2 idle CPU cores; None: all
    top_k: int = 20  # top examples per feature (Anthropic's browser and Neuronpedia show ~20)
    bins: int = 5  # activation intervals per feature
    per_bin: int = 5  # random examples per interval: 5 x 5 = 25, enough to see weak activations
    seed: int = 0  # corpus shuffle and interval sampling
    name: str | None = None  # URL id of the SAE in the store (one SAE only); None: <model>-l<layer>-<arch>-<width>
    release: str | None = None  # URL id of the set in the store; None: the SAE's name for one, else derived
    force: bool = False  # replace complete SAEs of the same names; take a release name held by others
    batch_size: int = 32  # contexts per forward pass: ~2k tokens, where CPU throughput levels off
    memory_budget_mb: int = 1024  # bounds the feature chunks of encoding, neighbours and dense pair counts
    device: str | None = None  # None: cuda when available, else cpu
    checkpoint_every: int = 50  # batches between checkpoints: ~2 min of SmolLM2 on 2 cores
    max_active: int = 64  # features per token counted for co-activation (all of them for TopK k <= 64)
    neighbours: int = 10  # neighbours by decoder cosine and by co-activation
    logit_tokens: int = 10  # top and bottom tokens of the logit effects
    hist_bins: int = 32  # bins of the logit-effect histogram
    token_index_size: int = 20  # features kept per vocabulary token for search by token
    # tokens kept per feature, the words its label may add (labels.corpus_words). On the demo 4k
    # SAE, 32 / 64 / 128 / 256 gave held-out F1 median 0.444 / 0.462 / 0.473 / 0.480, F1 = 0 for
    # 424 / 400 / 391 / 391 features and F1 >= 0.5 for 1,676 / 1,792 / 1,871 / 1,907; packed, 128
    # words take ~1.2 KB per feature
    feature_words_size: int = 128
    families: bool = True  # links across SAEs of one layer and the feature map (sae_core.families)
    # a Matryoshka dictionary as its nested SAEs, one per prefix (a family from one folder);
    # False: the full dictionary only
    nested: bool = True
    # read each layer's residual stream from an activation cache of the same model and corpus that
    # covers the contexts (the one `saescope train` built) instead of running the model: no forward
    # pass, at the fp16 precision training read; a layer without such a cache runs the model
    reuse_activations: bool = False
    progress: bool = True  # tqdm bars on stderr

    @property
    def memory_budget(self) -> int:
        return self.memory_budget_mb << 20
