"""Fingerprints of a few hundred responses over a 16k-feature store, to prove a refactor changed
no byte a user sees.

The store is the serving benchmark's synthetic one (built by code, seeded), in SQLite and in a
scratch Postgres schema. Every request runs in-process (Starlette's TestClient, no live model):
pages, fragments, JSON twins, searches, error pages and the OpenAPI schema. Each response is
reduced to ``status content-type sha256(body)``, with timestamps (the store's ``created_at``,
the time it was built) blanked first.

    python bench/snapshot_responses.py --out /tmp/before.json      # on the old code
    python bench/snapshot_responses.py --compare /tmp/before.json  # on the new code: exit 1 on a difference
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import sys
import tempfile
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastapi.testclient import TestClient  # noqa: E402

from app.main import create_app  # noqa: E402
from app.settings import Settings  # noqa: E402
from bench.bench_serve import (  # noqa: E402
    PG_URL,
    SPEC,
    build_postgres,
    build_sqlite,
    drop_postgres,
    next_request,
)

TIMESTAMP = re.compile(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?")

EXTRA = [  # error pages and the pages the load mix never asks for
    "/",
    "/saes",
    "/openapi.json",
    "/docs",
    "/saes/nope",
    "/saes/nope/features/1",
    "/api/v1/saes",
    "/api/v1/saes/nope",
    "/api/v1/saes/{sae}",
    "/api/v1/saes/{sae}/features/999999",
    "/api/v1/saes/{sae}/features/-1",
    "/api/v1/saes/{sae}/features?limit=0",
    "/api/v1/saes/{sae}/features?sort=nonsense",
    "/api/v1/saes/{sae}/features/0",
    "/saes/{sae}/features/0",
    "/saes/{sae}/features/1",
    "/saes/{sae}/features/4",
    "/saes/{sae}/features/1/examples",
    "/saes/{sae}/features/1/preview",
    "/saes/{sae}/features?q=paris",
    "/saes/{sae}/jump?index=5",
    "/saes/{sae}/jump?index=abc",
    "/saes/{sae}/prompt",
    "/api/v1/saes/{sae}/features/1/labels",
    "/api/v1/saes/{sae}/search?q=capital",
    "/api/v1/saes/{sae}/search?q=capital&mode=semantic",
    "/api/v1/saes/{sae}/features?token=%20Paris",
    "/api/v1/saes/{sae}/features/1/activations",
    "/saes/{sae}/-/fragments/features/1/label",
    "/saes/{sae}/-/fragments/features/1/try",
]


def paths(sae: str, n_random: int) -> list[str]:
    rng = random.Random(7)
    drawn = [next_request(rng, sae).path for _ in range(n_random)]
    return [p.format(sae=sae) for p in EXTRA] + drawn


def fingerprints(url: str, n_random: int) -> dict[str, str]:
    settings = Settings(db_url=url, live=False)
    out: dict[str, str] = {}
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        for path in paths(SPEC.sae_name, n_random):
            r = client.get(path)
            digest = hashlib.sha256(TIMESTAMP.sub(b"<time>", r.content)).hexdigest()[:16]
            out[path] = f"{r.status_code} {r.headers.get('content-type', '')} {digest}"
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the fingerprints here")
    parser.add_argument("--compare", type=Path, help="compare with fingerprints written before")
    parser.add_argument("--requests", type=int, default=300, help="random requests of the load mix")
    parser.add_argument("--pg-url", default=PG_URL)
    args = parser.parse_args()

    result: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        result["sqlite"] = fingerprints(build_sqlite(Path(tmp)), args.requests)
    schema = f"snap_{uuid.uuid4().hex[:8]}"
    try:
        result["postgres"] = fingerprints(build_postgres(args.pg_url, schema), args.requests)
    finally:
        drop_postgres(args.pg_url, schema)

    n = sum(len(v) for v in result.values())
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, sort_keys=True))
        print(f"{n} responses fingerprinted into {args.out}")
    if args.compare:
        before = json.loads(args.compare.read_text())
        diffs = [
            (backend, path, before[backend].get(path), fp)
            for backend, fps in result.items()
            for path, fp in fps.items()
            if before.get(backend, {}).get(path) != fp
        ]
        for backend, path, old, new in diffs:
            print(f"DIFFERENT {backend} {path}: {old} -> {new}")
        print(f"{n} responses compared, {len(diffs)} different")
        return 1 if diffs else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
