"""The server's settings: one class, read from ``SAESCOPE_*`` environment variables.

Built in ``create_app`` (never at import), so tests and ``saescope serve`` pass their own.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SAESCOPE_", extra="ignore")

    db_url: str = Field(
        default="sqlite:///saescope.db",
        description="SQLAlchemy URL of the store to serve; the default is the file "
        "`saescope precompute` writes in the current folder.",
    )
    live: bool | None = Field(
        default=None,
        description="Load the subject model for live prompts, attribution and steering. "
        "None (auto) turns it on when the SAE's model can be loaded; false serves the store only, "
        "without importing torch weights.",
    )
    model: str | None = Field(
        default=None,
        description="Subject model to load for live features instead of the one the store names "
        "(a folder, .gguf file or hub id holding the same weights).",
    )
    live_socket: str | None = Field(
        default=None,
        description="Unix socket of the live model process. `saescope serve` starts that process "
        "and sets this for its web workers, which then share one model; unset, the app loads the "
        "model itself.",
    )
    write_token: str | None = Field(
        default=None,
        description="Bearer token that lets a request edit labels. None (the default) keeps the "
        "server read-only: SQLite is then opened read-only.",
    )
    max_prompt_tokens: int = Field(
        default=256,
        ge=1,
        description="Longest live prompt in tokens; ~200 is what public browsers allow, and it "
        "bounds a CPU forward pass to well under a second.",
    )
    max_new_tokens: int = Field(
        default=64,
        ge=1,
        description="Most tokens one steering request may generate (twice: default and steered); "
        "64 on a 135M model is a few seconds of CPU.",
    )
    live_queue_size: int = Field(
        default=4,
        ge=1,
        description="Live requests that may wait for the model; more get 503 with Retry-After at once. "
        "Four short jobs wait a few seconds, well inside live_timeout_s.",
    )
    live_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="Longest a live request waits for its answer (queue included) before a 504; "
        "a full queue of steering jobs on a CPU fits in it.",
    )
    search_queue_size: int = Field(
        default=4,
        ge=1,
        description="Semantic searches that may wait for the query embedding model; more get 503 "
        "with Retry-After at once. An uncached query embeds in about 20 ms of one CPU thread; "
        "repeated queries come from a cache and never wait.",
    )
    search_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="Longest a semantic search waits for its query embedding (queue included) "
        "before a 504. The embedding model loads in a process of its own when the server starts "
        "(a few seconds), where the store has label vectors; a search meanwhile waits for it.",
    )
    max_body_bytes: int = Field(
        default=1_000_000,
        ge=1,
        description="Largest request body in bytes; a larger one is answered 413 before it is "
        "read. 1 MB holds the longest prompt and label many times over.",
    )
    graph_max_prompt_tokens: int = Field(
        default=64,
        ge=2,
        description="Longest prompt an attribution graph accepts, BOS included (Neuronpedia's cap "
        "too); a 32-token graph over four SAE layers takes tens of seconds on two cores.",
    )
    graph_max_features: int = Field(
        default=1000,
        ge=1,
        description="Feature nodes of a graph before pruning; the rest fold into error nodes. "
        "Time and memory grow with it.",
    )
    graph_queue_size: int = Field(
        default=2,
        ge=1,
        description="Graph jobs that may wait; more get 503 with Retry-After. Graphs run one at a "
        "time on a thread of their own, beside live prompts.",
    )
    graph_timeout_s: float = Field(
        default=300.0,
        gt=0,
        description="Longest a graph job may run; past it the job stops at its next batch and "
        "fails with that reason.",
    )
    host: str = Field(
        default="127.0.0.1",
        description="Interface to listen on; loopback by default, so nothing is exposed by accident.",
    )
    port: int = Field(default=8000, ge=1, le=65535, description="TCP port to listen on.")

    def to_environment(self) -> dict[str, str]:
        """The ``SAESCOPE_*`` variables that rebuild these settings in another process."""
        prefix = self.model_config["env_prefix"]
        return {
            f"{prefix}{name.upper()}": str(value).lower() if isinstance(value, bool) else str(value)
            for name, value in self.model_dump().items()
            if value is not None
        }
