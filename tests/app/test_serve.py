"""`saescope serve`: flags, failing fast on a bad store, and several workers over Postgres."""

from __future__ import annotations

import httpx
import pytest

from sae_core.cli import build_parser, main
from tests.app.server_process import serving


def test_a_missing_store_fails_in_one_line_before_serving(tmp_path, capsys):
    assert main(["serve", "--db", f"sqlite:///{tmp_path / 'none.db'}", "--no-live"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("saescope: error: no store at") and "\n" not in err


def test_flags_parse():
    args = build_parser().parse_args(
        ["serve", "--db", "sqlite:///x.db", "--workers", "3", "--no-live"]
    )
    assert (args.db, args.workers, args.live, args.port) == ("sqlite:///x.db", 3, False, None)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--workers", "0"])


@pytest.mark.postgres
@pytest.mark.slow
def test_two_workers_serve_one_postgres_store(postgres_store):
    with serving(postgres_store.url, "--workers", "2") as base:
        with httpx.Client(base_url=base, timeout=10) as client:
            pages = [client.get(f"/saes/{postgres_store.sae}/features/{i}") for i in range(8)]
            assert [p.status_code for p in pages] == [200] * 8
            assert client.get("/api/v1/saes").json()["data"][0]["name"] == postgres_store.sae
