"""The web workbench's API and pages on a tiny model (HTTP client tests), and `engram serve`'s
checks before any model loads."""

from __future__ import annotations

import socket

import pytest
import torch

from tests.conftest import make_tiny

pytest.importorskip("starlette")
pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def client():
    from starlette.testclient import TestClient

    from engramlab.serve import make_app

    lm = make_tiny("llama")
    with TestClient(make_app(lm)) as c:
        c.lm = lm
        yield c


def test_lens_api_reads_every_layer_and_ends_on_the_models_own_prediction(client):
    lm = client.lm
    prompt = "w1 w2 w3 w4"
    r = client.get("/api/lens", params={"prompt": prompt, "k": 3})
    assert r.status_code == 200
    data = r.json()
    n_tokens = len(lm.tokenize(prompt)["input_ids"][0])
    assert data["layers"] == list(range(lm.n_layers + 1))
    assert len(data["top"]) == lm.n_layers + 1 and data["tokens"] == [
        lm.decode(int(t)) for t in lm.tokenize(prompt)["input_ids"][0]]
    assert all(len(row) == n_tokens and all(len(c) == 3 for c in row) for row in data["top"])
    with torch.no_grad():
        logits = lm.model(**lm.tokenize(prompt)).logits[0]
    own = [lm.decode(int(i)) for i in logits.argmax(-1)]
    assert [pos[0]["token"] for pos in data["top"][-1]] == own  # the output row
    probs = torch.softmax(logits.float(), -1).max(-1).values
    assert [pos[0]["prob"] for pos in data["top"][-1]] == pytest.approx(probs.tolist(), abs=1e-5)
    # the logit lens at the last block's input: the final norm and unembedding of that state
    for layer, row in enumerate(data["top"][:-1]):
        for pos, cands in enumerate(row):
            ps = [c["prob"] for c in cands]
            assert ps == sorted(ps, reverse=True)
            # the final token's rank is 0 exactly where the layer's top token is the final one
            assert (data["final_rank"][layer][pos] == 0) == (cands[0]["token"] == own[pos])


def test_bad_requests_get_a_400_with_the_reason(client):
    for params, needle in (({"prompt": "  "}, "empty"), ({"prompt": "w1", "lens": "tuned"},
                                                          "unknown lens"),
                           ({"prompt": "w1", "k": "many"}, "whole number"),
                           ({"prompt": "w1", "k": "0"}, "between"),
                           ({"prompt": " ".join(["w1"] * 300)}, "at most")):
        r = client.get("/api/lens", params=params)
        assert r.status_code == 400 and needle in r.json()["error"], params


def test_pages_and_info(client):
    info = client.get("/api/info").json()
    assert info == {"model": client.lm.label, "n_layers": client.lm.n_layers,
                    "lenses": ["logit"]}
    page = client.get("/lens")
    assert page.status_code == 200 and "/api/lens" in page.text
    assert client.get("/", follow_redirects=False).headers["location"] == "/lens"


def test_serve_refuses_a_taken_port_before_loading_a_model(capsys):
    from engramlab.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model", "no-such-model", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot listen" in err and "--port" in err and len(err.splitlines()) == 1
    assert main(["serve", "--model", "no-such-model", "--port", "70000"]) == 2
    assert "not a TCP port" in capsys.readouterr().err
