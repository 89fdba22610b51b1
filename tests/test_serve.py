"""The web workbench's API and pages on a tiny model (HTTP client tests), and `engram serve`'s
checks before any model loads."""

from __future__ import annotations

import json
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
                           ({"prompt": " ".join(["w1"] * 300)}, "at most"),
                           ({"prompt": " ".join(["w1"] * 10_000)}, "10000 tokens")):
        r = client.get("/api/lens", params=params)
        assert r.status_code == 400 and needle in r.json()["error"], params


def test_pages_and_info(client):
    info = client.get("/api/info").json()
    assert info == {"model": client.lm.label, "n_layers": client.lm.n_layers,
                    "lenses": ["logit"], "atlas": False}
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


# a random tiny model needs a free, unclamped target to take an edit
TINY_ROME = {"layers": [1], "templates": [],
             "target": {"steps": 40, "clamp": 50.0, "weight_decay": 0.0, "lr": 1.0,
                        "kl_factor": 0.0}, "stats": {"tokens": 2048, "seq_len": 32}}


def _wait(client, job_id: str) -> dict:
    import time

    for _ in range(600):
        j = client.get(f"/api/jobs/{job_id}").json()
        if j["state"] in ("done", "error"):
            return j
        time.sleep(0.05)
    raise AssertionError("the edit job did not finish")


def test_an_edit_runs_in_the_background_and_is_applied_only_where_asked(tmp_path,
                                                                        isolated_cache):
    from starlette.testclient import TestClient

    from engramlab.delta import WeightDelta
    from engramlab.serve import make_app

    lm = make_tiny("llama")
    weights = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    body = {"method": "rome", "prompt": "w1 {} w2", "subject": "w5", "target_new": "w40",
            "target_true": "w60", "paraphrases": "w9 w5 w2\n\n", "neighbours": ["w1 w6 w2"],
            "set": TINY_ROME}
    with TestClient(make_app(lm, out=tmp_path / "saved")) as client:
        r = client.post("/api/edit", json=body)
        assert r.status_code == 202
        job = _wait(client, r.json()["job"])
        assert job["state"] == "done", job["error"]
        assert job["step"] == job["steps"] == 3
        result = job["result"]
        assert result["request"]["paraphrases"] == ["w9 w5 w2"]  # blank lines dropped
        assert result["scores"]["after"]["efficacy"] == 1.0
        assert result["generations"][0]["after"].split()[0] == "w40"
        # the model itself was never left edited
        assert all(torch.equal(p, weights[n]) for n, p in lm.model.named_parameters())
        delta_id = result["delta"]
        assert [d["id"] for d in client.get("/api/deltas").json()] == [delta_id]
        edited = client.get("/api/lens", params={"prompt": "w1 w5 w2", "delta": delta_id})
        plain = client.get("/api/lens", params={"prompt": "w1 w5 w2"})
        assert edited.json()["top"][-1][-1][0]["token"] == "w40"
        assert plain.json()["top"][-1][-1][0]["token"] != "w40"
        saved = client.post(f"/api/deltas/{delta_id}/save").json()["saved"]
        assert WeightDelta.load(saved, lm).entries.keys() == \
            bench_delta(client, delta_id).entries.keys()
    # a later workbench on the same folder lists the saved edit again, and can apply it
    with TestClient(make_app(lm, out=tmp_path / "saved")) as again:
        listed = again.get("/api/deltas").json()
        assert [d["id"] for d in listed] == [delta_id]
        assert listed[0]["request"]["target_new"] == "w40"
        assert again.get("/api/lens", params={"prompt": "w1 w5 w2", "delta": delta_id}
                         ).json()["top"][-1][-1][0]["token"] == "w40"
    other = make_tiny("llama", seed=1)  # another model: its edits are not offered
    with TestClient(make_app(other, out=tmp_path / "saved")) as elsewhere:
        assert elsewhere.get("/api/deltas").json() == []
    with TestClient(make_app(lm, out=tmp_path / "saved")) as client:
        assert client.delete(f"/api/deltas/{delta_id}").json() == {"deleted": delta_id}
        assert client.get("/api/deltas").json() == []
        assert client.get("/api/lens", params={"prompt": "w1", "delta": delta_id}
                          ).status_code == 400
        assert client.get("/api/jobs/nope").status_code == 404


def bench_delta(client, delta_id: str):
    return client.app.state.workbench.deltas[delta_id].delta


def test_bad_edit_requests_are_refused_before_any_work(client):
    cases = [({"method": "sculpt", "prompt": "w1 {}", "subject": "w2", "target_new": "w3"},
              "unknown editing method"),
             ({"prompt": "w1 w2", "subject": "w2", "target_new": "w3"}, "placeholder"),
             ({"prompt": "w1 {}", "subject": "w2", "target_new": " "}, "empty target_new"),
             ({"prompt": "w1 {}", "subject": "w2", "target_new": "w3", "neighbours": 5},
              "list of strings"),
             ({"prompt": "w1 {}", "subject": "w2", "target_new": "w3",
               "paraphrases": ["w1"] * 50}, "at most"),
             ({"prompt": "w1 {}", "subject": "w2", "target_new": "w3", "set": [1]}, "'set'")]
    for body, needle in cases:
        r = client.post("/api/edit", json=body)
        assert r.status_code == 400 and needle in r.json()["error"], body
    r = client.post("/api/edit", content=b"not json", headers={"content-type": "text/plain"})
    assert r.status_code == 400 and "JSON object" in r.json()["error"]
    r = client.post("/api/edit", content=b"x" * 70_000)
    assert r.status_code == 400 and "at most" in r.json()["error"]
    r = client.post("/api/deltas/abc/save")
    assert r.status_code == 400 and "no edit" in r.json()["error"]


def test_two_edits_at_once_each_keep_their_own_delta(isolated_cache):
    from starlette.testclient import TestClient

    from engramlab.serve import make_app

    lm = make_tiny("llama")
    weights = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    with TestClient(make_app(lm)) as client:
        jobs = {new: client.post("/api/edit", json={
                    "method": "rome", "prompt": "w1 {} w2", "subject": subject,
                    "target_new": new, "set": TINY_ROME}).json()["job"]
                for subject, new in (("w5", "w40"), ("w7", "w41"))}
        done = {new: _wait(client, job) for new, job in jobs.items()}
        assert all(j["state"] == "done" for j in done.values())
        ids = [j["result"]["delta"] for j in done.values()]
        c = client.get("/api/deltas/compare", params={"a": ids[0], "b": ids[1]}).json()
        bench = client.app.state.workbench
        da, db = (bench.deltas[i].delta for i in ids)
        assert c["cosine"] == pytest.approx(da.overlap(db))
        assert -1 <= c["cosine"] < 0.999  # two different facts: two different deltas
        assert [p["norm_a"] for p in c["parameters"]] == pytest.approx(list(da.norms().values()))
        assert client.get("/api/deltas/compare", params={"a": ids[0], "b": "x"}
                          ).status_code == 400
        for new, j in done.items():
            subject = j["result"]["request"]["subject"]
            lens = client.get("/api/lens", params={"prompt": f"w1 {subject} w2",
                                                   "delta": j["result"]["delta"]}).json()
            assert lens["top"][-1][-1][0]["token"] == new
        assert all(torch.equal(p, weights[n]) for n, p in lm.model.named_parameters())


def test_an_uploaded_concept_is_erased_in_the_background_and_reported(isolated_cache):
    from starlette.testclient import TestClient

    from engramlab.serve import make_app
    from tests.test_erase import _known_probes

    lm = make_tiny("llama")
    concept = {"name": "tiny", "probes": [{"prompt": p.prompt, "answer": p.answer}
                                          for p in _known_probes(lm, 8)],
               "near_controls": [{"prompt": p.prompt, "answer": p.answer}
                                 for p in _known_probes(lm, 4, seed=100)],
               "text": ". ".join(" ".join(f"w{i + s}" for i in range(8)) for s in range(4))}
    with TestClient(make_app(lm)) as client:
        assert "Harry Potter" in client.get("/api/concepts").json()
        r = client.post("/api/erase", json={"concept": concept, "method": "ga",
                                            "relearn_steps": 2,
                                            "set": {"steps": 3, "lr": 1e-3, "tune": False}})
        assert r.status_code == 202, r.json()
        job = _wait(client, r.json()["job"])
        assert job["state"] == "done", job["error"]
        report = job["result"]["report"]
        assert report["concept"] == "tiny" and report["pre"]["target_accuracy"] == 1.0
        assert report["split"]["held_out_probes"] == 4
        assert job["result"]["lines"][0].startswith("ga erasure of 'tiny'")
        for body, needle in (({"concept": "Atlantis"}, "Atlantis"),
                             ({"concept": {"probes": []}}, "name"),
                             ({"concept": concept, "method": "forget"}, "unknown erasure"),
                             ({"concept": concept, "method": "ga", "set": {"speed": 1}},
                              "unknown setting"),
                             ({"concept": concept, "relearn_steps": -1}, "relearn_steps"),
                             ({"concept": 3}, "bundled concept")):
            r = client.post("/api/erase", json=body)
            assert r.status_code == 400 and needle in r.json()["error"], body
        assert client.get("/erase").status_code == 200


def test_a_fact_is_traced_in_the_background_with_its_heatmap(client):
    import base64

    r = client.post("/api/trace", json={"prompt": "w3 {} w9 w4", "subject": "w7 w8",
                                        "samples": 2, "window": 1})
    assert r.status_code == 202, r.json()
    job = _wait(client, r.json()["job"])
    assert job["state"] == "done", job["error"]
    result = job["result"]
    assert result["prompt"] == "w3 w7 w8 w9 w4" and result["subject_range"] == [1, 3]
    assert set(result["grids"]) == {"resid", "mlp", "attn"}
    assert all(len(g) == client.lm.n_layers for g in result["grids"].values())
    head, data = result["png"].split(",", 1)
    assert head == "data:image/png;base64" and base64.b64decode(data)[:4] == b"\x89PNG"
    for body, needle in (({"prompt": "w3 w9", "subject": "w7"}, "exactly once"),
                         ({"prompt": "w3 {}", "subject": "w7", "samples": 0}, "at least 1"),
                         ({"prompt": "w3 {}", "subject": "w7", "samples": 500}, "at most 50"),
                         ({"prompt": "w3 {}", "subject": "w7", "window": "wide"},
                          "whole numbers")):
        r = client.post("/api/trace", json=body)
        assert r.status_code == 400 and needle in r.json()["error"], body
    assert client.get("/trace").status_code == 200


def test_the_neuron_pages_read_the_atlas_the_workbench_was_given():
    from starlette.testclient import TestClient

    from engramlab.inspect import build_atlas
    from engramlab.serve import make_app
    from tests.test_atlas import CONFIG, CORPUS

    lm = make_tiny("llama")
    book = build_atlas(lm, CORPUS, CONFIG)
    with TestClient(make_app(lm, atlas=book)) as c:
        summary = c.get("/api/atlas").json()
        assert summary["layers"] == [0, 2] and summary["lines"] == book.lines()
        page = c.get("/api/neuron", params={"layer": 2, "index": 5}).json()
        assert page == json.loads(json.dumps(book.neuron(2, 5)))
        for params, needle in (({"layer": 1, "index": 0}, "not in this atlas"),
                               ({"layer": 0, "index": 10_000}, "out of range"),
                               ({"layer": "x", "index": 0}, "whole numbers")):
            r = c.get("/api/neuron", params=params)
            assert r.status_code == 400 and needle in r.json()["error"], params
        assert c.get("/neurons").status_code == 200
    with TestClient(make_app(lm)) as c:  # no atlas: the page says how to get one
        r = c.get("/api/atlas")
        assert r.status_code == 400 and "engram atlas --out" in r.json()["error"]
