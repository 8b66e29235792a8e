"""`saescope graph` and ``release_graph``: a release in the store to a JSON file, reused when
asked again, and one clear line for what a user gets wrong."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from sae_core.cli import main
from sae_core.live.graph_json import loads
from sae_core.live.graph_run import release_graph
from sae_core.store.db import GraphRow, create_engine_for
from tests.graph_support import GRAPH_LAYERS, RELEASE, build_graph_store

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return build_graph_store(tmp_path_factory.mktemp("graph-store"))


def graph_rows(url):
    engine = create_engine_for(url)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(GraphRow.slug, GraphRow.request_key)).all()
    engine.dispose()
    return rows


def graph_args(store: str, llama_dir, out) -> list[str]:
    """`saescope graph` on the test release's prompt, written to ``out``."""
    return ["graph", "--db", store, "--release", RELEASE, "--prompt", PROMPT, "--out", str(out), "--model", str(llama_dir)]


def test_cli_writes_the_graph_and_reuses_it(store, llama_dir, tmp_path, capsys):
    out = tmp_path / "g.json"
    args = graph_args(store, llama_dir, out)
    assert main(args) == 0
    text = out.read_text()
    document = loads(text)
    assert document.metadata.scan == RELEASE
    assert document.metadata.saescope["layers"] == list(GRAPH_LAYERS)
    assert {n.layer for n in document.nodes if n.feature_type == "cross layer transcoder"} <= {
        "0",
        "1",
        "2",
    }
    assert len(graph_rows(store)) == 1
    assert "running the prompt" in capsys.readouterr().err
    # the same request again: the saved graph, byte for byte, and no new row
    again = tmp_path / "again.json"
    assert main(args[:-3] + [str(again), "--model", str(llama_dir)]) == 0
    assert again.read_text() == text
    assert "running the prompt" not in capsys.readouterr().err
    assert len(graph_rows(store)) == 1


def test_python_api_with_a_chosen_target_and_a_contrast(store, llama_dir):
    document = release_graph(
        store, RELEASE, PROMPT, target=" the", contrast="a", model=str(llama_dir)
    )
    logit = next(n for n in document.nodes if n.feature_type == "logit")
    assert logit.clerp == 'Output " the" − "a"'
    assert document.metadata.saescope["target"]["text"] == " the"
    assert document.metadata.saescope["contrast"]["text"] == "a"
    assert len(graph_rows(store)) >= 1


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--release", "nope"], "no release named 'nope'"),
        (["--target", "two tokens here"], "tokens for this model"),
        (["--max-prompt-tokens", "3"], "at most 3 are allowed"),
        (["--node-share", "1.5"], "--node-share must be in"),
    ],
)
def test_cli_errors_are_one_line(store, llama_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "g.json"
    args = graph_args(store, llama_dir, out)
    assert main(args + extra) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("saescope")]
    assert len(err) == 1 and err[0].startswith("saescope: error:") and message in err[0]
    assert not out.exists()
