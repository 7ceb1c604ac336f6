"""Labels: every kind's predicate (scored in batches and used alone) against a brute force
written from the label's meaning, the whole labelling job on a tiny model, labels.json, the
optional LLM explainer against a fake loopback server, and the monitor."""
from __future__ import annotations

import json
import string
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch

from activations.corpus import CorpusConfig, load_contexts
from activations.model import run_to_hooks, token_strings
from analysis.features.atlas import AtlasConfig, build_atlas
from analysis.features.labels import (
    KINDS,
    Label,
    LabelConfig,
    LabelContext,
    Scorer,
    label_features,
    label_predicate,
    llm_candidates,
    load_labels,
    save_labels,
)
from analysis.features.labels.genre import GenreLabel
from analysis.features.labels.llm import LLMLabel
from analysis.features.labels.pattern import PatternLabel
from analysis.features.labels.structure import RULES as STRUCTURE_RULES
from analysis.features.labels.structure import StructureLabel
from analysis.features.labels.word_piece import WordPieceLabel
from analysis.features.monitor import find_features, monitor, monitor_html

from .test_atlas import HOOK, tiny_sae
from .test_label_structure import genre_by_hand, structure_by_hand


@pytest.fixture(scope="module")
def setup(tiny_model, text_corpus):
    sae = tiny_sae()
    corpus = CorpusConfig(source=str(text_corpus), context_len=32)
    cfg = AtlasConfig(corpus=corpus, n_tokens=31 * 30, batch_contexts=8, autocast="none", device="cpu")
    return sae, build_atlas(sae, tiny_model, cfg), corpus


def ends_with(seq: list[int], pattern: tuple[int, ...]) -> bool:
    return len(seq) >= len(pattern) and all(seq[len(seq) - len(pattern) + k] == pattern[k] for k in range(len(pattern)))


def punctuation_by_hand(text: str) -> bool:
    """Punctuation, whitespace or the boundary token: nothing but punctuation once the
    surrounding whitespace is stripped (nothing at all counts too), or <|endoftext|>."""
    return text == "<|endoftext|>" or all(c in string.punctuation for c in text.strip())


# What each kind's label means, as a plain loop: does `label` hold at position `p` of the
# token ids `row` (a list)? `strings[t]` is token t's text. One line per registered kind.
BRUTE_FORCE = {
    "token-set": lambda label, row, p, strings: row[p] in label.tokens,
    "logit": lambda label, row, p, strings: p + 1 < len(row) and row[p + 1] in label.tokens,
    "punctuation": lambda label, row, p, strings: punctuation_by_hand(strings[row[p]]),
    "position": lambda label, row, p, strings: p <= label.max_position,
    "dense": lambda label, row, p, strings: True,
    "pattern": lambda label, row, p, strings: any(ends_with(row[:p + 1], pattern) for pattern in label.patterns),
    "llm": lambda label, row, p, strings: row[p] in label.tokens,
    "structure": lambda label, row, p, strings: structure_by_hand(label.rule, row, p, strings),  # a plain loop per rule
    "genre": lambda label, row, p, strings: genre_by_hand(label, row, p),  # >= min_hits of row[:p + 1] in label.tokens
    "semantic": lambda label, row, p, strings: row[p] in label.tokens,  # the ball itself is checked in test_label_semantic.py
    "context": lambda label, row, p, strings: p >= 1 and row[p - 1] in label.previous and (not label.current or row[p] in label.current),
    "word-piece": lambda label, row, p, strings: (not label.previous or (p >= 1 and row[p - 1] in label.previous)) and (
        p >= 1 and strings[row[p]][:1].isalnum() and strings[row[p - 1]][-1:].isalnum() if label.which == "continuation"
        else strings[row[p]][:1] == " " and strings[row[p]][1:2].isalpha()),
}


def hand_made(live: list[int], rows: list[list[int]]) -> list[Label]:
    """Labels the candidate makers may not give on the tiny atlas: patterns of 1, 2 and 4
    tokens that occur in the scoring text (plus one that cannot: longer than a context), and
    an LLM token set (its candidates need an endpoint)."""
    return [
        PatternLabel(kind="pattern", feature=live[0], patterns=[tuple(rows[0][3:5]), tuple(rows[1][10:11])]),
        PatternLabel(kind="pattern", feature=live[1], patterns=[tuple(rows[2][5:9]), tuple(range(40))]),
        LLMLabel(kind="llm", feature=live[2], tokens=[ord("c"), ord(" ")], explanation="c words"),
        # every structure rule, and a genre label (the tiny text has no structure and one genre: no candidates)
        *(StructureLabel(kind="structure", feature=live[n % len(live)], rule=rule) for n, rule in enumerate(STRUCTURE_RULES)),
        GenreLabel(kind="genre", feature=live[5], tokens=[ord("q"), ord("b"), ord("g")], min_hits=2),
        # word-piece rules without candidates here (the byte-level tokenizer has no " word" token: starts never hold)
        WordPieceLabel(kind="word-piece", feature=live[3], which="continuation"),
        WordPieceLabel(kind="word-piece", feature=live[4], which="start", previous=[ord(" "), ord("a")]),
    ]


def test_every_kind_matches_its_brute_force(setup, tiny_model):
    sae, atlas, corpus = setup
    tokenizer = tiny_model.tokenizer
    text_tokens = torch.from_numpy(load_contexts(corpus, tokenizer, max_contexts=40)[30:36]).long()
    rows = text_tokens.tolist()
    context = LabelContext(sae, tiny_model, LabelConfig(n_logit_tokens=3, autocast="none"))
    labels = [label for kind in KINDS.values() for label in kind.candidates(atlas, context)] + hand_made(atlas.live_features, rows)
    assert set(BRUTE_FORCE) == set(KINDS), "every registered label kind needs its line in BRUTE_FORCE"
    assert {label.kind for label in labels} == set(KINDS)  # each kind is checked below
    scorer = Scorer(labels, atlas, tokenizer)
    with torch.no_grad():
        f = sae.encode(run_to_hooks(tiny_model, text_tokens, [HOOK])[HOOK])
    scorer.update(f[:4], text_tokens[:4])  # two batches: counts accumulate
    scorer.update(f[4:], text_tokens[4:])
    strings = token_strings(tokenizer, list(range(len(tokenizer))))

    fires = f[:, 1:] > 0
    for label, scores in zip(labels, scorer.scores()):
        expected = torch.tensor([[BRUTE_FORCE[label.kind](label, row, p, strings) for p in range(len(row))] for row in rows])
        # the label alone (as steering uses it), and read back from its labels.json record, gives the same predicate
        assert torch.equal(label_predicate(label, tokenizer)(text_tokens), expected), label.kind
        assert torch.equal(label_predicate(json.loads(json.dumps(label.to_json())), tokenizer)(text_tokens), expected), label.kind
        pred, fire = expected[:, 1:], fires[..., label.feature]  # position 0 (the sink) is not scored
        tp, fp, fn = int((pred & fire).sum()), int((pred & ~fire).sum()), int((~pred & fire).sum())
        assert scores.f1 == pytest.approx(2 * tp / max(2 * tp + fp + fn, 1), abs=1e-4), label.kind
        assert scores.precision == pytest.approx(tp / max(tp + fp, 1), abs=1e-4), label.kind
        assert scores.recall == pytest.approx(tp / max(tp + fn, 1), abs=1e-4), label.kind
        assert scores.fpr_random == pytest.approx(fp / max(int((~fire).sum()), 1), abs=1e-6), label.kind
    results = scorer.results()
    live = atlas.live_features
    assert results[live[0]].held_out_fires == int(fires[..., live[0]].sum())
    # the best label is the candidate with the highest held-out F1
    best = results[live[0]]
    assert best.best.scores.f1 == max(c.scores.f1 for c in best.candidates)


def test_label_features_read_given_rows_as_they_read_the_corpus(setup, tiny_model):
    """A caller that tokenised the held-out text passes the rows after the atlas's: the same labels."""
    from activations.corpus import load_contexts

    sae, atlas, corpus = setup
    cfg = LabelConfig(n_score_contexts=16, autocast="none")
    rows = load_contexts(corpus, tiny_model.tokenizer, max_contexts=atlas.n_contexts + 40)[atlas.n_contexts:]
    assert label_features(atlas, sae, tiny_model, cfg, tokens=rows).to_json() == label_features(atlas, sae, tiny_model, cfg).to_json()


def test_label_features_end_to_end(setup, tiny_model, tmp_path):
    sae, atlas, _ = setup
    labels = label_features(atlas, sae, tiny_model, LabelConfig(n_score_contexts=20, autocast="none"))
    live = len(atlas.live_features)
    assert len(labels) == atlas.d_sae and labels.summary.live_features == live
    saved = labels.to_json()
    entry = next(e for e in saved["features"] if e is not None)
    assert {"label", "kind", "f1", "precision", "recall", "recall_by_quartile", "fpr_random", "fpr_hard", "candidates"} <= set(entry)
    assert {c["kind"] for c in entry["candidates"]} >= {"token-set", "logit", "punctuation", "position", "dense"}
    json.dumps(saved)  # serialisable as written
    assert load_labels(save_labels(labels, tmp_path / "labels.json"), atlas.d_sae) == labels  # labels.json reads back the same


def test_older_labels_files_still_read():
    # a position label written before "max_position" was saved: its number is read from its text, once, when loading
    old = Label.from_json({"kind": "position", "label": "position <= 3", "f1": 0.2, "recall_by_quantile": [0.1, None, None, 1.0]}, 7)
    assert old.max_position == 3 and old.scores.recall_by_quartile == [0.1, None, None, 1.0]
    assert label_predicate(old)(torch.zeros(2, 6, dtype=torch.long)).tolist() == [[True] * 4 + [False] * 2] * 2
    # a kind this version does not know is read (and shown), but has no predicate
    unknown = Label.from_json({"kind": "future-kind", "label": "something", "f1": 0.1}, 0)
    assert unknown.text == "something" and unknown.to_json() == {"kind": "future-kind", "label": "something", "f1": 0.1}
    with pytest.raises(ValueError, match="no predicate for a label of kind 'future-kind'"):
        label_predicate(unknown)


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
    scored = [c for c in labels.candidates(live[0]) if c.kind == "llm"]
    assert len(scored) == 1 and 0 <= scored[0].scores.f1 <= 1 and scored[0].text == "LLM: the word cat"


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
    from activations.model import ModelLoader
    from analysis import cli

    sae, _, _ = setup
    sae.save(tmp_path / "sae")
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.setattr(ModelLoader, "get", lambda self, recorded=None: tiny_model)
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
    from activations.model import ModelLoader
    from analysis import cli
    from analysis.features.cli import analyze_saes

    _, atlas, _ = setup
    insecure = "http://explainer.invalid/v1"  # plain http to a non-loopback host (.invalid never resolves)
    # the explainer itself, the config and the CLI refuse it before sending anything
    with pytest.raises(ValueError, match="not a loopback address.*--allow-insecure-endpoint"):
        llm_candidates(atlas, tiny_model.tokenizer, [0], insecure, "m", api_key=SECRET)
    with pytest.raises(ValueError, match="not a loopback address"):
        LabelConfig(llm={"base_url": insecure, "model": "m"})
    assert LabelConfig(llm={"base_url": insecure, "model": "m"}, allow_insecure_endpoint=True).allow_insecure_endpoint

    def no_model(self, recorded=None):
        raise AssertionError("the model was loaded before the endpoint was checked")

    monkeypatch.setattr(ModelLoader, "get", no_model)
    for command in ("analyze", "run"):
        with pytest.raises(SystemExit, match="not a loopback address.*--allow-insecure-endpoint"):
            analyze_saes(cli.parse([command, "--sae", str(tmp_path), "--llm-base-url", insecure]), ModelLoader(), [tmp_path])
    args = cli.parse(["analyze", "--sae", str(tmp_path), "--llm-base-url", insecure, "--allow-insecure-endpoint"])
    with pytest.raises(FileNotFoundError, match="is not an SAE directory"):  # accepted: it goes on to read the SAE
        analyze_saes(args, ModelLoader(), [tmp_path])
    config = tmp_path / "analyze.json"
    config.write_text(json.dumps({"llm_base_url": insecure, "allow_insecure_endpoint": True}))
    assert cli.parse(["analyze", "--config", str(config)]).allow_insecure_endpoint is True

    # which URLs pass
    from analysis.features.labels import check_endpoint

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
        where["location"] = f"http://localhost:{target.server_port}/v1/chat/completions"  # another host name
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
    from activations.model import ModelLoader
    from analysis import cli
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
    assert load_labels(path).to_json() == short  # without an SAE to check against, read as is
    with pytest.raises(ValueError, match=f"{path} has 4 feature entries but the SAE has 64"):
        load_labels(path, d_sae=64)
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="not a labels file"):
        load_labels(path, d_sae=64)
    path.write_text(json.dumps(short))
    monkeypatch.setattr(ModelLoader, "get", lambda self, recorded=None: tiny_model)
    with pytest.raises(SystemExit, match="4 feature entries but the SAE has 64 features.*saewb analyze"):
        cli.main(["monitor", "--sae", str(tmp_path / "sae"), "the cat sat"])


def test_analyze_reads_the_heldout_text_once_atlas_rows_first(setup, tiny_model, text_corpus, tmp_path, monkeypatch, capsys):
    import numpy as np

    import activations.corpus
    from activations.model import ModelLoader
    from analysis import cli
    from analysis.features.cli import split_heldout

    heldout = CorpusConfig(source=str(text_corpus), split="heldout", context_len=32)
    rows = load_contexts(heldout, tiny_model.tokenizer)
    split = split_heldout(heldout, tiny_model.tokenizer, 31 * 10, 16)
    assert split.atlas_tokens == 310 and np.array_equal(split.atlas, rows[:10]) and np.array_equal(split.labels, rows[10:26])
    shared = split_heldout(heldout, tiny_model.tokenizer, 10**6, 2048)  # more than the corpus holds: shared out, labels keep a quarter
    n_labels = max(16, len(rows) // 4)
    assert np.array_equal(shared.labels, rows[len(rows) - n_labels:]) and np.array_equal(shared.atlas, rows[:len(rows) - n_labels])
    assert shared.atlas_tokens == 31 * (len(rows) - n_labels) and "has only" in capsys.readouterr().out

    sae, _, _ = setup
    sae.save(tmp_path / "sae")
    packed = []
    pack = activations.corpus.pack_contexts
    monkeypatch.setattr(activations.corpus, "pack_contexts", lambda *a, **k: packed.append(1) or pack(*a, **k))
    monkeypatch.setattr(ModelLoader, "get", lambda self, recorded=None: tiny_model)
    cli.main(["analyze", "--sae", str(tmp_path / "sae"), "--corpus", str(text_corpus), "--atlas-tokens", "310", "--label-contexts", "16",
              "--device", "cpu", "--out", str(tmp_path / "out")])
    assert len(packed) == 1  # the atlas and the labels share one tokenisation
    labels = json.loads((tmp_path / "sae" / "atlas" / "labels.json").read_text())
    assert labels["scored_on"]["first_context"] == 10 and labels["scored_on"]["n_contexts"] == 16
