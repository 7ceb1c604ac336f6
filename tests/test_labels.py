"""Labels: the vectorised scorer against brute-force predicates, the whole labelling job on
a tiny model, the optional LLM explainer against a fake loopback server, and the monitor."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch

from activations.corpus import CorpusConfig, load_contexts
from activations.model import run_to_hooks
from analysis.atlas import AtlasConfig, build_atlas
from analysis.labels import (
    Candidate, LabelConfig, _is_punctuation, _Scorer, class_candidates, label_features, label_predicate, llm_candidates, logit_candidates,
    token_set_candidates,
)
from analysis.monitor import find_features, monitor, monitor_html

from .test_atlas import HOOK, tiny_sae


@pytest.fixture(scope="module")
def setup(tiny_model, text_corpus):
    sae = tiny_sae()
    corpus = CorpusConfig(source=str(text_corpus), context_len=32)
    cfg = AtlasConfig(corpus=corpus, n_tokens=31 * 30, batch_contexts=8, autocast="none", device="cpu")
    return sae, build_atlas(sae, tiny_model, cfg), corpus


def brute_force_predicate(c: Candidate, tokens: torch.Tensor, punctuation: torch.Tensor) -> torch.Tensor:
    b, n = tokens.shape
    out = torch.zeros(b, n, dtype=torch.bool)
    for r in range(b):
        for p in range(n):
            if c.kind in ("token-set", "llm"):
                out[r, p] = int(tokens[r, p]) in c.tokens
            elif c.kind == "logit":
                out[r, p] = p + 1 < n and int(tokens[r, p + 1]) in c.tokens
            elif c.kind == "pattern":
                out[r, p] = any(p + 1 >= len(pat) and tuple(tokens[r, p + 1 - len(pat):p + 1].tolist()) == pat for pat in c.patterns)
            elif c.kind == "punctuation":
                out[r, p] = bool(punctuation[tokens[r, p]])
            elif c.kind == "position":
                out[r, p] = p <= c.max_position
            elif c.kind == "dense":
                out[r, p] = True
    return out


def test_scorer_matches_brute_force(setup, tiny_model):
    sae, atlas, corpus = setup
    candidates = token_set_candidates(atlas, 12) + logit_candidates(atlas, 3) + class_candidates(atlas, 8)
    live = torch.nonzero(atlas.tensors["fire_count"] > 0).flatten().tolist()
    # patterns of several lengths, some of which occur in the scoring text
    text_tokens = torch.from_numpy(load_contexts(corpus, tiny_model.tokenizer, max_contexts=40)[30:36]).long()
    candidates += [Candidate(live[0], "pattern", "p", patterns=[tuple(text_tokens[0, 3:5].tolist()), tuple(text_tokens[1, 10:11].tolist())]),
                   Candidate(live[1], "pattern", "q", patterns=[tuple(text_tokens[2, 5:9].tolist())])]
    punctuation = torch.tensor([_is_punctuation(chr(i)) for i in range(257)])
    scorer = _Scorer(candidates, atlas, 257, punctuation)
    with torch.no_grad():
        f = sae.encode(run_to_hooks(tiny_model, text_tokens, [HOOK])[HOOK])
    scorer.update(f, text_tokens)
    results = scorer.results()

    fires = f[:, 1:] > 0
    for c in candidates:
        pred = brute_force_predicate(c, text_tokens, punctuation)[:, 1:]
        tp = int((pred & fires[..., c.feature]).sum())
        fp = int((pred & ~fires[..., c.feature]).sum())
        fn = int((~pred & fires[..., c.feature]).sum())
        scored = next(s for s in results[c.feature]["candidates"] if s["kind"] == c.kind)
        assert scored["f1"] == pytest.approx(2 * tp / max(2 * tp + fp + fn, 1), abs=1e-4), c.kind
        assert scored["precision"] == pytest.approx(tp / max(tp + fp, 1), abs=1e-4), c.kind
        if c.kind != "punctuation":  # the saved label rebuilds the same predicate (steering scores text with it)
            assert torch.equal(label_predicate(scored)(text_tokens)[:, 1:], pred), c.kind
    assert results[live[0]]["held_out_fires"] == int(fires[..., live[0]].sum())
    # the best label is the candidate with the highest held-out F1
    best = results[live[0]]
    assert best["f1"] == max(s["f1"] for s in best["candidates"])


def test_label_features_end_to_end(setup, tiny_model):
    sae, atlas, _ = setup
    labels = label_features(atlas, sae, tiny_model, LabelConfig(n_score_contexts=20, autocast="none"))
    live = int((atlas.tensors["fire_count"] > 0).sum())
    assert len(labels["features"]) == atlas.d_sae and labels["summary"]["live_features"] == live
    entry = next(e for e in labels["features"] if e is not None)
    assert {"label", "kind", "f1", "precision", "recall", "recall_by_quartile", "fpr_random", "fpr_hard", "candidates"} <= set(entry)
    assert {c["kind"] for c in entry["candidates"]} >= {"token-set", "logit", "punctuation", "position", "dense"}
    json.dumps(labels)  # serialisable as written


def test_labels_need_unseen_text(tiny_model, text_corpus):
    sae = tiny_sae()
    corpus = CorpusConfig(source=str(text_corpus), context_len=32)
    everything = len(load_contexts(corpus, tiny_model.tokenizer))
    atlas = build_atlas(sae, tiny_model, AtlasConfig(corpus=corpus, n_tokens=31 * everything, autocast="none", device="cpu"))
    with pytest.raises(ValueError, match="unseen text"):
        label_features(atlas, sae, tiny_model, LabelConfig(autocast="none"))


class _FakeExplainer(BaseHTTPRequestHandler):
    requests: list[dict] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _FakeExplainer.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        answer = {"explanation": "the word cat", "words": ["cat", "mat"]}
        reply = {"choices": [{"message": {"role": "assistant", "content": "Sure: " + json.dumps(answer)}}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_llm_explainer_against_a_fake_loopback_server(setup, tiny_model):
    sae, atlas, _ = setup
    server = HTTPServer(("127.0.0.1", 0), _FakeExplainer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        live = torch.nonzero(atlas.tensors["fire_count"] > 0).flatten().tolist()[:2]
        base_url = f"http://127.0.0.1:{server.server_port}/v1"
        candidates = llm_candidates(atlas, tiny_model.tokenizer, live, base_url, "fake-model", api_key="k")
        labels = label_features(atlas, sae, tiny_model, LabelConfig(n_score_contexts=10, autocast="none",
                                                                     llm={"base_url": base_url, "model": "fake-model", "features": live}))
    finally:
        server.shutdown()
    request = _FakeExplainer.requests[0]
    assert request["path"] == "/v1/chat/completions" and request["body"]["model"] == "fake-model" and request["auth"] == "Bearer k"
    assert "<<" in request["body"]["messages"][0]["content"]  # the top contexts, strongest token marked
    # "cat" and " cat" -> their first tokens ('c', ' '), scored like every other label
    assert candidates[0].kind == "llm" and candidates[0].tokens == sorted({ord("c"), ord("m"), ord(" ")})
    scored = [c for c in labels["features"][live[0]]["candidates"] if c["kind"] == "llm"]
    assert len(scored) == 1 and 0 <= scored[0]["f1"] <= 1 and scored[0]["label"] == "LLM: the word cat"


# ----------------------------------------------------------------------------- explainer security
SECRET = "sk-test-DO-NOT-LEAK-0123456789"


def _serve(handler):
    server = HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _reply(handler, status: int, payload: bytes, location: str | None = None) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(payload)))
    if location:
        handler.send_header("Location", location)
    handler.end_headers()
    handler.wfile.write(payload)


def _chat(content: str) -> bytes:
    return json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()


class _Recorder(BaseHTTPRequestHandler):
    """Answers every POST / GET with a valid explanation and records the Authorization header."""
    seen: list[tuple[str, str | None]] = []

    def _answer(self):
        if self.headers.get("Content-Length"):
            self.rfile.read(int(self.headers["Content-Length"]))
        type(self).seen.append((self.command, self.headers.get("Authorization")))
        _reply(self, 200, _chat(json.dumps({"explanation": "cats", "words": ["cat"]})))

    do_POST = do_GET = _answer

    def log_message(self, *args):
        pass


def test_llm_api_key_comes_from_the_environment_and_is_never_saved_or_printed(setup, tiny_model, tmp_path, monkeypatch, capsys):
    from analysis import cli

    sae, _, _ = setup
    sae.save(tmp_path / "sae")
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.setattr(cli, "_model", lambda args: tiny_model)
    _Recorder.seen = []
    server = _serve(_Recorder)
    try:
        cli.main(["analyze", "--preset", "smoke", "--sae", str(tmp_path / "sae"), "--atlas-tokens", str(31 * 8), "--label-contexts", "16",
                  "--llm-base-url", f"http://127.0.0.1:{server.server_port}/v1", "--llm-features", "0", "--out", str(tmp_path / "out")])
    finally:
        server.shutdown()
    assert _Recorder.seen == [("POST", f"Bearer {SECRET}")]  # the key was read from the environment when called
    saved = (tmp_path / "sae" / "atlas" / "labels.json").read_text()
    assert SECRET not in saved and "api_key" not in json.loads(saved)["config"]["llm"]
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err
    # a key put in the config itself is refused (the config is saved in labels.json)
    with pytest.raises(ValueError, match="must not hold a secret.*OPENAI_API_KEY"):
        LabelConfig(llm={"base_url": "https://example.com/v1", "model": "m", "api_key": SECRET})


def test_llm_explainer_errors_never_show_the_api_key(setup, tiny_model):
    _, atlas, _ = setup

    class Echo(BaseHTTPRequestHandler):
        status = 200

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            auth = self.headers.get("Authorization") or ""
            if Echo.status == 200:  # a chat answer that is not the requested JSON, echoing the key
                _reply(self, 200, _chat(f"no JSON here, your header was {auth}"))
            else:
                _reply(self, Echo.status, json.dumps({"error": f"bad key {auth}"}).encode())

        def log_message(self, *args):
            pass

    server = _serve(Echo)
    url = f"http://127.0.0.1:{server.server_port}/v1"
    live = torch.nonzero(atlas.tensors["fire_count"] > 0).flatten().tolist()[:1]
    try:
        with pytest.raises(ValueError, match="not the requested JSON") as error:
            llm_candidates(atlas, tiny_model.tokenizer, live, url, "m", api_key=SECRET)
        assert SECRET not in str(error.value) and "***" in str(error.value)
        Echo.status = 401
        with pytest.raises(RuntimeError, match="HTTP 401.*OPENAI_API_KEY") as error:
            llm_candidates(atlas, tiny_model.tokenizer, live, url, "m", api_key=SECRET)
        assert SECRET not in str(error.value)
    finally:
        server.shutdown()


def test_llm_endpoint_must_be_https_or_loopback_unless_insecure_is_allowed(setup, tiny_model, tmp_path, monkeypatch):
    from analysis import cli

    _, atlas, _ = setup
    insecure = "http://explainer.invalid/v1"  # plain http to a non-loopback host (.invalid never resolves)
    # the explainer itself, the config and the CLI refuse it before sending anything
    with pytest.raises(ValueError, match="not a loopback address.*--allow-insecure-endpoint"):
        llm_candidates(atlas, tiny_model.tokenizer, [0], insecure, "m", api_key=SECRET)
    with pytest.raises(ValueError, match="not a loopback address"):
        LabelConfig(llm={"base_url": insecure, "model": "m"})
    assert LabelConfig(llm={"base_url": insecure, "model": "m"}, allow_insecure_endpoint=True).allow_insecure_endpoint

    def no_model(args):
        raise AssertionError("the model was loaded before the endpoint was checked")

    monkeypatch.setattr(cli, "_model", no_model)
    for command in ("analyze", "run"):
        with pytest.raises(SystemExit, match="not a loopback address.*--allow-insecure-endpoint"):
            cli.cmd_analyze(cli.parse([command, "--sae", str(tmp_path), "--llm-base-url", insecure]), [tmp_path])
    args = cli.parse(["analyze", "--sae", str(tmp_path), "--llm-base-url", insecure, "--allow-insecure-endpoint"])
    with pytest.raises(AssertionError, match="model was loaded"):  # accepted: it goes on to load the model
        cli.cmd_analyze(args, [tmp_path])
    config = tmp_path / "analyze.json"
    config.write_text(json.dumps({"llm_base_url": insecure, "allow_insecure_endpoint": True}))
    assert cli.parse(["analyze", "--config", str(config)]).allow_insecure_endpoint is True

    # which URLs pass
    from analysis.labels import check_endpoint

    for ok in ("https://api.example.com/v1", "http://127.0.0.1:8000/v1", "http://127.5.6.7/v1", "http://[::1]:8000/v1", "http://localhost/v1",
               "HTTP://LocalHost:1234/v1"):
        assert check_endpoint(ok) == ok
    for bad in ("http://example.com/v1", "http://10.0.0.2:8000/v1", "http://[::2]/v1", "http://localhost.example.com/v1", "http://128.0.0.1/v1"):
        with pytest.raises(ValueError, match="not a loopback address.*--allow-insecure-endpoint"):
            check_endpoint(bad)
        assert check_endpoint(bad, allow_insecure=True) == bad
    for bad in ("ftp://example.com/v1", "file:///etc/passwd", "localhost:8000/v1"):
        with pytest.raises(ValueError, match="not an http\\(s\\) URL"):
            check_endpoint(bad, allow_insecure=True)
    with pytest.raises(ValueError, match="credentials in the URL") as error:
        check_endpoint(f"https://user:{SECRET}@api.example.com/v1")
    assert SECRET not in str(error.value)


def test_llm_redirect_to_another_origin_drops_the_authorization_header(setup, tiny_model):
    _, atlas, _ = setup
    _Recorder.seen = []
    target = _serve(_Recorder)
    where = {"location": f"http://127.0.0.1:{target.server_port}/v1/chat/completions"}  # another port: another origin

    class Redirect(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            _reply(self, 302, b"", location=where["location"])

        def log_message(self, *args):
            pass

    source = _serve(Redirect)
    live = torch.nonzero(atlas.tensors["fire_count"] > 0).flatten().tolist()[:1]
    url = f"http://127.0.0.1:{source.server_port}/v1"
    try:
        candidates = llm_candidates(atlas, tiny_model.tokenizer, live, url, "m", api_key=SECRET)
        assert candidates[0].text == "LLM: cats"
        assert _Recorder.seen == [("GET", None)]  # followed, but without the key
        where["location"] = "http://localhost:{}/v1/chat/completions".format(target.server_port)  # another host name
        llm_candidates(atlas, tiny_model.tokenizer, live, url, "m", api_key=SECRET)
        assert _Recorder.seen[-1] == ("GET", None)
        where["location"] = "http://explainer.invalid/v1/chat/completions"  # plain http to a non-loopback host is refused
        with pytest.raises(ValueError, match="redirected to a refused endpoint.*not a loopback address"):
            llm_candidates(atlas, tiny_model.tokenizer, live, url, "m", api_key=SECRET)
    finally:
        source.shutdown()
        target.shutdown()


def test_monitor_and_concept_search(setup, tiny_model):
    sae, atlas, _ = setup
    rows = monitor("the cat sat <script>", tiny_model, sae, top_k=3)
    assert [r.token for r in rows] == list("the cat sat <script>")
    assert all(len(r.features) <= 3 and r.values == sorted(r.values, reverse=True) for r in rows)
    page = monitor_html(rows)
    # the page has no script of its own: model text must never open one
    assert "<script" not in page and "&lt;" in page and "<span class=\"tok\"" in page
    with pytest.raises(ValueError, match="empty"):
        monitor("  ", tiny_model, sae)
    found = find_features("cat", tiny_model, sae, atlas, n=5)
    assert len(found) == 5 and found[0]["corpus_occurrences"] > 0
    assert [r["score"] for r in found] == sorted((r["score"] for r in found), reverse=True)
    # the top feature really fires more often on "cat" than its density elsewhere
    assert found[0]["fire_rate_on_query"] > found[0]["density"]


def test_labels_of_another_sae_are_refused_by_monitor_concept_search_and_the_cli(setup, tiny_model, tmp_path, monkeypatch):
    from analysis import cli
    from analysis.labels import load_labels

    sae, atlas, _ = setup
    short = {"features": [{"feature": 0, "kind": "dense", "label": "dense", "f1": 0.1}] + [None] * 3}  # 4 entries, the SAE has 64
    with pytest.raises(ValueError, match="4 feature entries but the SAE has 64 features"):
        monitor("the cat sat", tiny_model, sae, short)
    with pytest.raises(ValueError, match="4 feature entries but the SAE has 64 features"):
        find_features("cat", tiny_model, sae, atlas, short)
    path = tmp_path / "sae" / "atlas" / "labels.json"
    sae.save(tmp_path / "sae")
    path.parent.mkdir()
    path.write_text(json.dumps(short))
    assert load_labels(path) == short  # without an SAE to check against, read as is
    with pytest.raises(ValueError, match=f"{path} has 4 feature entries but the SAE has 64"):
        load_labels(path, d_sae=64)
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="not a labels file"):
        load_labels(path, d_sae=64)
    path.write_text(json.dumps(short))
    monkeypatch.setattr(cli, "_model", lambda args: tiny_model)
    with pytest.raises(SystemExit, match="4 feature entries but the SAE has 64 features.*saewb analyze"):
        cli.main(["monitor", "--sae", str(tmp_path / "sae"), "the cat sat"])
