"""Concept steering (analysis.steering.concept): the lexicon score against a brute force, the
automatic dose search on known cost curves, matched control tokens, and the output score and
logit-lens side on the tiny model, where a feature written to push one token must win."""
import json
import math
import re
from dataclasses import replace

import pytest
import torch

from activations import CorpusConfig
from activations.model import ModelLoader
from analysis.features.atlas import AtlasConfig, build_atlas
from analysis.steering.concept import (
    SCORES,
    CandidateScore,
    ConceptConfig,
    ConceptFeature,
    DosePoint,
    DoseSearch,
    Fluency,
    Lexicon,
    best_dose,
    choose_dose,
    choose_way,
    concept_steering,
    lexicon_logit_z,
    lexicon_scores,
    matched_controls,
    output_scores,
    parse_way,
    ranking_table,
    register,
    search_concept,
    search_dose,
    way_name,
    within_budget,
)

from .test_steering import make_sae

LAST = "blocks.1.hook_resid_post"  # only the final norm and W_U follow: the direct effect decides


# ---------------------------------------------------------------------------- lexicon
def brute_force_hits(text: str, words: list[str]) -> int:
    """Count words of `text` equal to a lexicon word plus one of a few listed endings."""
    endings = ["", "s", "es", "ed", "d", "ing", "er", "ers", "ly"]
    count = 0
    for w in re.findall(r"[A-Za-z][A-Za-z']*", text):
        w = w.lower().strip("'")
        if any(w == word + e or (word.endswith("e") and w == word[:-1] + e) for word in words for e in endings):
            count += 1
    return count


def test_lexicon_matches_whole_words_and_inflections():
    lex = Lexicon("love", ("Love", "ship", "sea"))
    assert lex.words == ("love", "ship", "sea")  # lower-cased, order kept
    text = "She LOVED the ships; loving lovers sailed the seas. Clover, seashell, lovage and hardship do not count."
    assert lex.matches(text) == ["love", "ship", "love", "love", "sea"]
    texts = [text, "", "no concept words here", "love love LOVE", "a ship's log"]
    scores = lexicon_scores(texts, lex)
    for t, present, rate in zip(texts, scores.present.tolist(), scores.rate.tolist()):
        hits = brute_force_hits(t, list(lex.words))
        n_words = len(re.findall(r"[A-Za-z][A-Za-z']*", t))
        assert present == (hits > 0)
        assert rate == pytest.approx(hits / n_words if n_words else 0.0)


def test_the_echo_rule_an_answer_that_only_repeats_the_request_scores_zero():
    from analysis.steering.concept import PROMPTING, REQUEST

    lex = Lexicon("sea", ("sea", "ocean", "wave", "answer"))
    request = REQUEST.format(concept="sea")
    assert PROMPTING.format(prompt="Describe your day.", concept="sea").endswith(request)
    echo_free = lex.without_request(request)
    assert echo_free.words == ("ocean", "wave")  # the request's own words ("sea", "answer") are never counted
    echoes = ["Sure! In my answer I will talk about the sea.", "Let's talk about seas.", "The sea, the sea."]
    assert not lexicon_scores(echoes, echo_free).present.any()
    assert lexicon_scores(echoes, lex).present.all()  # the plain lexicon would have counted every echo
    assert lexicon_scores(["The waves broke on the shore."], echo_free).present.all()
    with pytest.raises(ValueError, match="every word of the lexicon"):
        Lexicon("sea", ("sea", "seas")).without_request(request)


def test_a_frequency_ratio_counts_a_zero_unsteered_share_as_one_answer():
    """Both echo rules' ratios use one rule: over the unsteered share, a zero counted as one answer in n (a lower
    bound), rounded so that 5 answers in 24 over none is exactly 5x."""
    from analysis.steering.concept import concept_ratio as _ratio

    assert _ratio(5 / 24, 0.0, 24) == 5.0
    assert _ratio(0.42, 0.04, 24) == pytest.approx(0.42 / (1 / 24))  # 0.04 < 1/24: still the one-answer floor
    assert _ratio(0.5, 0.25, 24) == 2.0
    assert _ratio(0.0, 0.0, 24) == 0.0
    # the paired bootstrap's resamples go through the same rule, as tensors
    resampled = _ratio(torch.tensor([5 / 24, 0.42, 0.5, 0.0], dtype=torch.float64), torch.tensor([0.0, 0.04, 0.25, 0.0], dtype=torch.float64), 24)
    assert resampled.tolist() == [_ratio(5 / 24, 0.0, 24), _ratio(0.42, 0.04, 24), 2.0, 0.0]


def test_lexicon_refuses_empty_and_multi_word_entries():
    with pytest.raises(ValueError, match="has no words"):
        Lexicon("x", ("", "  "))
    with pytest.raises(ValueError, match="single words"):
        Lexicon("x", ("ice cream",))


def test_the_default_lexicon_is_the_concept_words_embedding_neighbours_whole_words_only():
    from analysis.steering.concept import neighbour_lexicon

    vocab = [" sea", " the", "sea", " xx1", " ocean", " waves", " road", " at"]
    directions = torch.tensor([[1.0, 0.0], [1.0, 0.01], [1.0, 0.02], [1.0, 0.03], [0.9, 0.1], [0.8, 0.3], [0.0, 1.0], [-1.0, 0.0]])

    class Words:  # one token per vocabulary entry
        def encode(self, text, add_special_tokens=False):
            return [vocab.index(text)]

        def decode(self, ids):
            return "".join(vocab[i] for i in ids)

    class Model:
        W_E = directions
        tokenizer = Words()

    lexicon = neighbour_lexicon("Sea", Model(), max_words=3)
    # a stop word, a word piece without its space and a non-word are passed over, however near
    assert lexicon.words == ("sea", "ocean", "waves") and lexicon.source == "neighbours"
    assert neighbour_lexicon("sea", Model(), max_words=4).words[-1] == "road"
    with pytest.raises(ValueError, match="no word"):
        neighbour_lexicon("42", Model())


def test_lexicon_token_ids_are_first_pieces_of_each_spelling(tiny_model):
    ids = Lexicon("c", ("cat",)).token_ids(tiny_model.tokenizer)
    assert ids == sorted({ord(" "), ord("c"), ord("C")})  # " cat", " Cat", "cat", "Cat" on the byte tokenizer


# ---------------------------------------------------------------------------- dose search
BASE = Fluency(perplexity=2.0, repetition=0.05)


def curve(threshold: float, calls: list[float]):
    """Perplexity rising with the dose: within the 2x budget exactly up to `threshold`."""
    def measure(dose: float) -> Fluency:
        calls.append(dose)
        return Fluency(BASE.perplexity * (1 + dose / threshold), BASE.repetition)
    return measure


@pytest.mark.parametrize("threshold", [0.7, 1.0, 2.5, 5.9, 100.0])
def test_dose_search_finds_the_largest_dose_within_budget(threshold):
    doses = [0.5, 1.0, 2.0, 4.0, 8.0]
    calls = []
    result = search_dose(curve(threshold, calls), BASE, doses, budget=2.0, refine=3)
    assert result.dose is not None and result.dose <= threshold + 1e-9
    # it passes every ladder dose at or below the threshold, and bisection only gets closer
    assert result.dose >= max(d for d in doses if d <= threshold)
    if threshold < max(doses):
        first_fail = min(d for d in doses if d > threshold)
        assert first_fail in calls and all(d <= first_fail for d in calls), "doses above the first failure were tried"
        assert len(calls) == doses.index(first_fail) + 1 + 3
        assert result.dose > max(d for d in doses if d <= threshold) or threshold == max(d for d in doses if d <= threshold)
    else:
        assert calls == doses and result.dose == 8.0
    assert [p.dose for p in result.points] == calls
    assert all(p.within_budget == (p.dose <= threshold + 1e-9) for p in result.points)


def test_dose_search_when_even_the_smallest_dose_is_too_much():
    calls = []
    result = search_dose(curve(0.1, calls), BASE, [0.5, 1.0], budget=2.0, refine=2)
    assert calls[0] == 0.5 and 1.0 not in calls  # stops at the first failure, then bisects below it
    assert result.dose is None or result.dose <= 0.1


def test_the_dose_steered_shows_the_concept_best_within_budget_not_the_edge():
    point = lambda dose, frequency, ok: DosePoint(dose, BASE, ok, frequency)  # noqa: E731
    points = [point(0.1, 0.2, True), point(0.2, 0.5, True), point(0.3, 0.5, True), point(0.5, 0.3, True), point(0.75, 0.8, False)]
    assert best_dose(points) == 0.2  # the best showing within budget, the smaller of the two equals; 0.75 shows more but fails
    assert best_dose([point(0.1, 0.0, False)]) is None
    assert best_dose([point(0.1, 0.0, True), point(0.2, 0.0, True)]) == 0.2  # nothing shows it: the edge, as before


def test_choose_way_keeps_the_way_that_shows_the_concept_most_and_never_one_without_a_dose(monkeypatch):
    from analysis.steering.concept import dose as dose_module

    def canned(frequency: float | None, perplexity: float = 3.0) -> DoseSearch:
        points = [] if frequency is None else [DosePoint(0.2, Fluency(perplexity, 0.0), True, frequency)]
        return DoseSearch(None if frequency is None else 0.2, BASE, points, 2.0, 0.02)

    results = {("add", "all"): canned(0.25), ("add", "generated"): canned(0.5, 3.5), ("clamp_at_least", "generated"): canned(0.5, 3.2),
               ("clamp", "all"): canned(None)}
    seen = []

    def fake_choose_dose(model, sae, search, max_activation, prompts=None, cfg=None, features=None, base=None):
        seen.append((cfg.mode, cfg.positions, base))
        return results[(cfg.mode, cfg.positions)]

    monkeypatch.setattr(dose_module, "choose_dose", fake_choose_dose)
    choice = choose_way(None, None, None, torch.zeros(4), list(results), cfg=ConceptConfig())
    assert choice.way == ("clamp_at_least", "generated")  # ties on the concept go to the lower perplexity
    assert set(choice.tried) == {way_name(w) for w in results} and choice.dose is results[choice.way]
    assert seen[0][2] is None and all(b is BASE for _, _, b in seen[1:])  # the unsteered answers are scored once
    assert choice.config(ConceptConfig(n_features=3)) == ConceptConfig(n_features=3, mode="clamp_at_least", positions="generated")
    nothing = {("add", "all"): canned(None), ("clamp", "all"): canned(None)}
    results.update(nothing)
    assert choose_way(None, None, None, torch.zeros(4), list(nothing), cfg=ConceptConfig()).way == ("add", "all")  # the first when none passed
    assert parse_way("add:generated") == ("add", "generated") and parse_way("clamp") == ("clamp", "all")
    with pytest.raises(ValueError, match="positions"):
        parse_way("add:everywhere")


def test_a_saved_search_loads_back_as_it_was():
    import json

    from analysis.steering.concept import ConceptFeature, ConceptSearch, Lexicon

    search = ConceptSearch("sea", Lexicon("sea", ("sea", "ocean"), "neighbours"),
                           [ConceptFeature(7, {"input_score": 2.5, "trial": float("nan")}, 0.75, weight=0.5, label="tokens \" sea\"", density=0.01),
                            ConceptFeature(3, {"input_score": 1.0, "trial": 0.0}, 0.25)], residual_norm=12.5)
    saved = json.loads(json.dumps(search.to_dict()))  # as a bench summary stores it
    again = ConceptSearch.from_dict(saved)
    assert json.dumps(again.to_dict()) == json.dumps(search.to_dict())
    assert [c.feature for c in again.steered] == [7] and again.steered[0].input_score == 2.5 and again.lexicon.source == "neighbours"


def test_paired_confidence_resamples_prompts_for_both_conditions_alike():
    from analysis.steering.concept import paired_confidence
    from analysis.steering.measure import AnswerFluency

    def answers(repetition: list[float], nll_per_token: float = 1.0) -> AnswerFluency:
        n = len(repetition)
        return AnswerFluency(torch.full((n,), 20 * nll_per_token), torch.full((n,), 20), torch.tensor(repetition, dtype=torch.float64))

    base = answers([0.05] * 12)
    none_present, half_present = torch.zeros(12, dtype=torch.bool), torch.arange(12) % 2 == 0
    same = paired_confidence(base, base, 2.0, 0.02, none_present, none_present)
    assert same.within_budget == 1.0 and same.meets_ratio == 0.0
    # One new loop (0.6 where the unsteered answer had 0.05): within 2x as measured (mean 0.0958 <= 0.1), over whenever that
    # prompt is drawn twice or more: P(at most once in 12 draws of 1/12) = (11/12)^12 + (11/12)^11 = 0.736.
    one_loop = answers([0.6] + [0.05] * 11)
    sure = paired_confidence(one_loop, base, 2.0, 0.02, half_present, none_present)
    assert abs(sure.within_budget - 0.736) < 0.05 and sure.meets_ratio <= sure.within_budget
    # Paired: the unsteered answers' own loop on the same prompt is no change at all, however often that prompt is drawn.
    looping_base = answers([0.6] + [0.0] * 11)
    assert paired_confidence(looping_base, looping_base, 2.0, 0.02).within_budget == 1.0
    # The ratio: 6 of 12 answers show the concept against none (a zero counted as one answer), 6x as measured; a resample
    # reaches 5x when it draws 5 or more of the 6: P = 1 - P(Binomial(12, 1/2) <= 4) = 0.806.
    ratio = paired_confidence(base, base, 2.0, 0.02, half_present, none_present)
    assert ratio.within_budget == 1.0 and abs(ratio.meets_ratio - 0.806) < 0.05
    assert paired_confidence(answers([0.05] * 12, nll_per_token=1.0 + math.log(3)), base, 2.0).within_budget == 0.0  # perplexity 3x
    with pytest.raises(ValueError, match="paired"):
        paired_confidence(answers([0.05] * 11), base, 2.0)


def test_budget_confidence_catches_a_dose_that_passes_only_by_luck_of_the_prompts():
    from analysis.steering.concept import budget_confidence
    from analysis.steering.measure import AnswerFluency

    def answers(repetition: list[float], nll_per_token: float = 1.0) -> AnswerFluency:
        n = len(repetition)
        return AnswerFluency(torch.full((n,), 20 * nll_per_token), torch.full((n,), 20), torch.tensor(repetition, dtype=torch.float64))

    base = answers([0.05] * 12).aggregate()
    assert budget_confidence(answers([0.05] * 12), base, 2.0) == 1.0
    assert budget_confidence(answers([0.05] * 12, nll_per_token=1.0 + math.log(3)), base, 2.0) == 0.0  # perplexity 3x
    one_loop = answers([0.05] * 11 + [0.6])  # mean 0.0958: within 2 x 0.05 as measured, but over whenever the loop is drawn twice
    assert one_loop.aggregate().repetition <= 0.1 and within_budget(one_loop.aggregate(), base, 2.0)
    sure = budget_confidence(one_loop, base, 2.0)
    assert 0.6 < sure < 0.8  # P(drawn at most once in 12) = 0.74
    assert sure == budget_confidence(one_loop, base, 2.0)  # seeded
    no_change = answers([0.0] * 10 + [0.3, 0.3])  # the unsteered answers' own mix (two loops in 12): no doubt at all
    assert budget_confidence(no_change, no_change.aggregate(), 2.0, repetition_floor=0.02) > 0.95
    with pytest.raises(ValueError, match="no steered answers"):
        budget_confidence(answers([]), base, 2.0)


def test_dose_search_keeps_only_doses_the_prompts_are_sure_of():
    calls = []
    sure = {0.5: 0.95, 1.0: 0.7, 2.0: 0.9}
    result = search_dose(curve(100.0, calls), BASE, [0.5, 1.0, 2.0], budget=2.0, refine=0, confidence=sure.get, min_confidence=0.8)
    assert result.dose == 0.5 and calls == [0.5, 1.0]  # 1.0 is within budget as measured, but the bootstrap is not sure of it
    assert [p.confidence for p in result.points] == [0.95, 0.7] and [p.within_budget for p in result.points] == [True, False]
    with pytest.raises(ValueError, match="confidence"):
        ConceptConfig(confidence=1.0)


def test_five_answers_in_24_against_none_is_five_times():
    from analysis.steering.measure import share

    five = torch.tensor([True] * 5 + [False] * 19)
    assert share(five) == 5 / 24 and share(five) / (1 / 24) >= 5  # a float32 mean read 4.9999999 and failed the 5x verdict
    assert float(five.float().mean()) / (1 / 24) < 5  # the rounding this replaces
    assert share(torch.zeros(0, dtype=torch.bool)) == 0.0


def test_repetition_counts_in_the_budget_from_a_floor():
    assert within_budget(Fluency(3.9, 0.09), BASE, 2.0)
    assert not within_budget(Fluency(4.1, 0.0), BASE, 2.0)  # perplexity over
    assert not within_budget(Fluency(2.0, 0.11), BASE, 2.0)  # repetition over
    no_repeats = Fluency(2.0, 0.0)
    assert not within_budget(Fluency(2.0, 0.01), no_repeats, 2.0)
    assert within_budget(Fluency(2.0, 0.01), no_repeats, 2.0, repetition_floor=0.02)


def test_concept_config_checks_its_ladder():
    with pytest.raises(ValueError, match="rising"):
        ConceptConfig(doses=[2.0, 1.0])
    with pytest.raises(ValueError, match="ratio above 1"):
        ConceptConfig(budget=1.0)
    with pytest.raises(ValueError, match="margin"):
        ConceptConfig(budget=2.0, margin=0.4)


# ---------------------------------------------------------------------------- output side
def test_matched_controls_start_as_likely_and_avoid_the_lexicon():
    logprobs = torch.linspace(0, -10, 50)[torch.randperm(50, generator=torch.Generator().manual_seed(0))]
    lexicon = torch.tensor([3, 7, 11])
    controls = matched_controls(logprobs, lexicon)
    assert len(controls) == 3 and not set(controls.tolist()) & set(lexicon.tolist()) and len(set(controls.tolist())) == 3
    order = logprobs.argsort(descending=True).tolist()
    for lex, ctl in zip(sorted(lexicon.tolist(), key=order.index), controls.tolist()):
        assert order.index(ctl) > order.index(lex)  # just below it
        assert order.index(ctl) - order.index(lex) <= 3


def pushing_sae(tiny_model, token: int, feature: int = 7):
    """An SAE at the last layer whose `feature` writes along token `token`'s unembedding (minus the mean)."""
    sae = make_sae(hook=LAST)
    direction = tiny_model.W_U[:, token] - tiny_model.W_U.mean(1)
    scale = tiny_model.ln_final.w
    with torch.no_grad():
        sae.W_dec[feature] = direction / scale / (direction / scale).norm()
    return sae


def test_output_score_and_logit_lens_find_the_feature_that_pushes_the_concept(tiny_model):
    token, feature = ord("q"), 7
    sae = pushing_sae(tiny_model, token, feature)
    z = lexicon_logit_z(sae, tiny_model, [token])
    assert int(z.argmax()) == feature
    prompts = [torch.tensor([256] + list(b"the cat sat")), torch.tensor([256] + list(b"on a mat"))]
    max_activation = torch.full((64,), 20.0)
    out = output_scores(tiny_model, sae, [feature, 3, 11], prompts, max_activation, [token], amplify=1.0, top_k=5)
    assert out.concept_gain[0] > 1.0 and out.concept_gain[0] > out.concept_gain[1:].max() + 1.0
    assert out.output_score[0] > out.output_score[1:].max()  # its own logit-lens token (q) becomes likely
    # the gain is measured against control tokens: no edit at all gains nothing
    unamplified = output_scores(tiny_model, sae, [feature], prompts, max_activation, [token], amplify=0.0)
    assert abs(float(unamplified.concept_gain[0])) < 0.5


def test_arad_output_score_is_rank_weighted_probability_of_the_best_promoted_token():
    from analysis.steering.concept.scores.output import arad_output_score

    probs = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05], [0.05, 0.1, 0.15, 0.2, 0.5]])
    promoted = torch.tensor([2, 3])
    # row 0: token 2 is the best promoted one, p 0.15 at rank 2 of 5; row 1: token 3, p 0.2 at rank 1
    expected = torch.tensor([(1 - 2 / 5) * 0.15, (1 - 1 / 5) * 0.2])
    assert torch.allclose(arad_output_score(probs.log(), promoted), expected)


def test_delta_token_confidence_is_the_gain_of_the_steered_top_token():
    from analysis.steering.concept.scores.output import delta_token_confidence

    clean = torch.tensor([[0.6, 0.3, 0.1]]).log()
    steered = torch.tensor([[0.2, 0.7, 0.1]]).log()
    assert torch.allclose(delta_token_confidence(clean, steered), torch.tensor([0.4]))  # token 1: 0.3 -> 0.7
    assert torch.allclose(delta_token_confidence(clean, clean), torch.tensor([0.0]))


def test_search_concept_ranks_the_pushing_feature_and_steers_it(tiny_model, text_corpus):
    token, feature = ord("q"), 7
    sae = pushing_sae(tiny_model, token, feature)
    with torch.no_grad():  # it fires everywhere (so it is live), reading nothing in particular
        sae.W_enc[:, feature] = 0
        sae.b_enc[feature] = 50.0
    atlas = build_atlas(sae, tiny_model, AtlasConfig(corpus=CorpusConfig(source=str(text_corpus), context_len=32), n_tokens=31 * 30,
                                                     batch_contexts=8, autocast="none", device="cpu"))
    cfg = ConceptConfig(n_features=20, n_candidates=4, amplify=4.0, max_density=1.0, doses=[0.5, 1.0, 2.0], refine=1,
                        generation={"max_new_tokens": 6, "stop_at_eos": False})
    search = search_concept("cat", tiny_model, sae, atlas, lexicon=Lexicon("q", ("q",)), prompts=["the cat", "a mat"], cfg=cfg)
    by_id = {c.feature: c for c in search.ranked}
    assert by_id[feature].concept_gain == max(c.concept_gain for c in search.ranked)  # found by the logit lens, best by output
    assert by_id[feature].weight == 1.0
    steered = search.steered
    assert 1 <= len(steered) <= 20 and max(c.weight for c in steered) == 1.0
    assert all(c.concept_gain > 0 for c in steered)
    assert [c.combined for c in search.ranked] == sorted((c.combined for c in search.ranked), reverse=True)
    steering = concept_steering(sae, steered, 2.0, atlas.max_activation, ConceptConfig(mode="clamp"))
    for c in steered:
        assert steering.values[c.feature] == pytest.approx(2.0 * c.weight * float(atlas.max_activation[c.feature]))
    result = choose_dose(tiny_model, sae, search, atlas.max_activation, prompts=["the cat", "a mat"], cfg=cfg)
    assert result.points and (result.dose is None or result.dose in [p.dose for p in result.points if p.within_budget])
    assert result.dose == best_dose(result.points) and (result.dose is None or result.dose <= result.edge)
    assert result.budget == cfg.budget
    tight = choose_dose(tiny_model, sae, search, atlas.max_activation, prompts=["the cat", "a mat"], cfg=replace(cfg, margin=0.75))
    assert tight.budget == pytest.approx(1.5)  # the search holds the tuning answers to budget x margin
    again = choose_dose(tiny_model, sae, search, atlas.max_activation, prompts=["the cat", "a mat"], cfg=cfg, base=result.base)
    assert again.base == result.base and [p.dose for p in again.points] == [p.dose for p in result.points]
    assert all(math.isfinite(p.fluency.perplexity) for p in result.points)


def test_concept_steering_by_adding_scales_the_sum_to_the_residual_norm():
    sae = make_sae()
    features = [ConceptFeature(3, {}, 1.0, weight=1.0), ConceptFeature(8, {}, 0.5, weight=0.5)]
    x = torch.randn(1, 3, 32)
    later = concept_steering(sae, features, 0.4, torch.ones(64), ConceptConfig(mode="add", positions="generated"), residual_norm=10.0)
    assert later.positions == "generated" and torch.equal(later(x), x)  # outside a generation every position is prompt
    steering = concept_steering(sae, features, 0.4, torch.ones(64), ConceptConfig(mode="add"), residual_norm=10.0)
    added = steering(x)[0, 1:] - x[0, 1:]
    assert torch.allclose(added.norm(dim=-1), torch.full((2,), 4.0), atol=1e-4)  # dose x residual norm, whatever the weights
    unit = sae.W_dec.detach()[[3, 8]] / sae.W_dec.detach()[[3, 8]].norm(dim=-1, keepdim=True)
    direction = torch.tensor([1.0, 0.5]) @ unit
    assert torch.allclose(added[0] / added[0].norm(), direction / direction.norm(), atol=1e-5)
    at_least = concept_steering(sae, features, 0.4, torch.full((64,), 5.0), ConceptConfig(mode="clamp_at_least"))
    assert {iv.mode for iv in at_least.interventions} == {"clamp_at_least"} and at_least.values == {3: pytest.approx(2.0), 8: pytest.approx(1.0)}


def test_concept_steering_needs_a_feature():
    with pytest.raises(ValueError, match="no feature to steer"):
        concept_steering(make_sae(), [], 1.0, torch.ones(64))
    f = ConceptFeature(3, {"input_score": 1.0, "fire_rate": 1.0, "contrast": 0.0, "logit_z": 0.0, "output_score": 0.0, "concept_gain": 1.0},
                       combined=1.0, weight=0.5)
    assert concept_steering(make_sae(), [f], 2.0, torch.full((64,), 4.0), ConceptConfig(mode="clamp")).values == {3: pytest.approx(4.0)}


# ---------------------------------------------------------------------------- pluggable scores
def test_the_registered_scores_and_their_roles():
    assert list(SCORES) == ["input_score", "fire_rate", "contrast", "logit_z", "output_score", "delta_confidence", "concept_gain", "trial"]
    assert [n for n, s in SCORES.items() if s.proposes] == ["input_score", "contrast", "logit_z"]
    assert [n for n, s in SCORES.items() if s.in_ranking] == ["input_score", "contrast", "concept_gain"]
    with pytest.raises(ValueError, match="new, non-empty `name`"):
        register(type("Again", (CandidateScore,), {"name": "contrast", "rank": 999, "header": "x", "score": lambda *a: None}))
    with pytest.raises(ValueError, match="no other score has"):
        register(type("SameRank", (CandidateScore,), {"name": "same_rank", "rank": 30, "header": "x", "score": lambda *a: None}))
    assert "same_rank" not in SCORES


def test_concept_feature_reads_its_scores_by_name_and_saves_them_flat():
    f = ConceptFeature(3, {"input_score": 2.0, "concept_gain": 0.5}, combined=0.75, weight=1.0, label="cats")
    assert f.input_score == 2.0 and f.concept_gain == 0.5
    with pytest.raises(AttributeError, match="no_such_score"):
        f.no_such_score  # noqa: B018
    assert f.to_dict() == {"feature": 3, "input_score": 2.0, "concept_gain": 0.5, "combined": 0.75, "weight": 1.0, "label": "cats",
                           "density": 0.0}
    assert replace(f, weight=0.0).scores == f.scores


@pytest.fixture
def planted_score():
    """A score registered for one test only: it proposes feature 11 and counts in the ranking."""
    saved = dict(SCORES)

    class Planted(CandidateScore):
        name, rank, header, spec = "planted", 45, "planted", ".1f"
        proposes = in_ranking = True

        def score(self, inputs, features):
            values = torch.zeros(inputs.sae.cfg.d_sae)
            values[11] = 5.0
            return values if features is None else values[list(features)]

    register(Planted)
    yield
    SCORES.clear()
    SCORES.update(saved)


def test_a_registered_score_proposes_ranks_and_shows(tiny_model, text_corpus, planted_score):
    sae = pushing_sae(tiny_model, ord("q"))
    atlas = build_atlas(sae, tiny_model, AtlasConfig(corpus=CorpusConfig(source=str(text_corpus), context_len=32), n_tokens=31 * 8,
                                                     batch_contexts=8, autocast="none", device="cpu"))
    atlas.max_activation[11] = max(float(atlas.max_activation[11]), 1.0)  # live, so usable
    cfg = ConceptConfig(n_candidates=2, max_density=1.0, generation={"max_new_tokens": 2, "stop_at_eos": False})
    search = search_concept("cat", tiny_model, sae, atlas, lexicon=Lexicon("q", ("q",)), prompts=["the cat"], cfg=cfg)
    by_id = {c.feature: c for c in search.ranked}
    assert 11 in by_id and by_id[11].planted == 5.0 and all(set(c.scores) == set(SCORES) for c in search.ranked)
    ranking = [n for n, s in SCORES.items() if s.in_ranking]
    assert ranking == ["input_score", "contrast", "planted", "concept_gain"]
    for c in search.ranked:  # combined: the mean of the ranking scores, each over its best candidate, negatives as 0
        best = {n: max(max(d.scores[n], 0.0) for d in search.ranked) for n in ranking}
        expected = sum(max(c.scores[n], 0.0) / max(best[n], 1e-12) for n in ranking) / len(ranking)
        assert c.combined == pytest.approx(expected, rel=1e-5, abs=1e-7)
    table = ranking_table(search.ranked).splitlines()
    assert table[0].split()[:len(SCORES) + 3] == ["feature", "input", "fires", "contrast", "logit", "z", "planted", "output", "dconf", "gain", "trial", "weight"]
    assert len(table) == len(search.ranked) + 1 and any(line.split()[0] == "11" and " 5.0 " in line for line in table[1:])


def test_cli_steer_concept_prints_the_table_and_saves_it(tiny_model, text_corpus, tmp_path, monkeypatch, capsys):
    from analysis import cli

    sae = pushing_sae(tiny_model, ord("q"))
    sae.cfg.context_size = 32
    atlas = build_atlas(sae, tiny_model, AtlasConfig(corpus=CorpusConfig(source=str(text_corpus), context_len=32), n_tokens=31 * 30,
                                                     batch_contexts=8, autocast="none", device="cpu"))
    sae.save(tmp_path / "sae")
    atlas.save(tmp_path / "sae" / "atlas")
    monkeypatch.setattr(ModelLoader, "get", lambda self, recorded=None: tiny_model)
    argv = ["steer", "--sae", str(tmp_path / "sae"), "--concept", "cat", "--lexicon", "q", "--n-candidates", "4", "--doses", "0.5", "1",
            "--max-new-tokens", "4", "--no-chat", "--prompts", "the cat", "a <b>mat</b>",
            "--tuning-prompts", "a dog", "the sun", "--out", str(tmp_path / "out")]
    cli.main(argv)
    printed = capsys.readouterr().out
    assert "lexicon (given): q" in printed and "dose search:" in printed and "prompting" in printed
    saved = json.loads((tmp_path / "out" / "steer" / "concept_cat.json").read_text())
    assert [p["condition"] for p in saved["points"]][:2] == ["unsteered", "prompting"]
    assert {"perplexity", "perplexity_given_own_prompt", "within_budget", "within_budget_own_prompt", "lexicon_frequency_any_word",
            "budget_confidence", "confidence_5x"} <= set(saved["points"][0])
    assert saved["points"][0]["budget_confidence"] == 1.0 and saved["points"][0]["confidence_5x"] == 0.0  # unsteered against itself
    assert [p["dose"] for p in saved["dose_search"]["points"]] and saved["dose_search"]["prompting"]["dose"] == 0.0
    figure = (tmp_path / "out" / "steer" / "concept_cat.html").read_text()
    assert "dose-response" in figure and "plotly" in figure.lower() and "<script src=" not in figure  # standalone
    assert saved["search"]["lexicon"]["words"] == ["q"]
    assert "mean_difference_dose_search" not in saved
    cli.main(argv + ["--mean-difference"])  # the baseline without a dictionary, its dose chosen on the same tuning prompts
    printed = capsys.readouterr().out
    assert "mean-difference dose search:" in printed
    saved = json.loads((tmp_path / "out" / "steer" / "concept_cat.json").read_text())
    baseline = saved["mean_difference_dose_search"]
    assert [p["dose"] for p in baseline["points"]] and baseline["base"] == saved["dose_search"]["base"]
    conditions = [p["condition"] for p in saved["points"]]
    assert ("mean difference" in conditions) == (baseline["dose"] is not None)
    with pytest.raises(SystemExit, match="not both"):
        cli.main(argv + ["--features", "3"])
    with pytest.raises(SystemExit, match="single words"):
        cli.main(["steer", "--sae", str(tmp_path / "sae"), "--concept", "cat", "--lexicon", "ice cream", "--out", str(tmp_path / "out")])


@pytest.mark.slow
def test_the_fair_fluency_charges_no_answer_for_its_topic_and_catches_a_loop(smollm2):
    """Every answer is scored given the prompt that asks for the concept: the model's own fluent
    answers about the sea pass the budget against its (off-topic) answers to the neutral prompts;
    a looping answer fails on repetition. (Text written by hand is far from the model's own:
    perplexity 13.5 against 2.8, so a planted answer must be the model's.)"""
    from activations.generation import GenerationConfig, encode_prompts, generate_tokens
    from analysis.steering import generation_fluency
    from analysis.steering.concept import PROMPTING

    tok = smollm2.tokenizer
    prompts = ["Tell me about your weekend.", "What should I do this afternoon?", "Describe your ideal day."]
    neutral = encode_prompts(tok, prompts, chat=True)
    asked = encode_prompts(tok, [PROMPTING.format(prompt=p, concept="sea") for p in prompts], chat=True)
    cfg = GenerationConfig(max_new_tokens=40, chat=True)
    base = generation_fluency(smollm2, asked, generate_tokens(smollm2, neutral, cfg))
    on_topic = generate_tokens(smollm2, asked, cfg)
    assert within_budget(generation_fluency(smollm2, asked, on_topic), base, 2.0, repetition_floor=0.02)
    ids = lambda text: torch.tensor(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    looping = [ids("The sea is the sea and the sea is the sea and the sea is the sea and the sea is the sea.")] * 3
    assert not within_budget(generation_fluency(smollm2, asked, looping), base, 2.0, repetition_floor=0.02)


def test_the_trial_score_decides_the_steered_features_and_the_concept_gain_is_the_fallback(tiny_model, text_corpus):
    from analysis.steering.concept.scores.trial import trial_order
    from analysis.steering.concept.search import Candidates, _rank

    assert trial_order(torch.tensor([0.1, 0.9, 0.5, -1.0]), torch.tensor([3.0, 0.0, 2.0, 5.0]), 3) == [1, 3, 0]
    sae = make_sae()
    atlas = build_atlas(sae, tiny_model, AtlasConfig(corpus=CorpusConfig(source=str(text_corpus), context_len=32), n_tokens=31 * 10,
                                                     batch_contexts=8, autocast="none", device="cpu"))
    nan = float("nan")
    scores = {name: torch.zeros(4) for name in SCORES}
    scores["concept_gain"] = torch.tensor([2.0, 1.0, 0.5, -1.0])
    scores["trial"] = torch.tensor([nan, 0.5, 0.0, 1.0])
    ranked = _rank(Candidates([10, 11, 12, 13], scores), atlas, None, n_features=8)
    assert {c.feature: c.weight for c in ranked if c.weight > 0} == {13: 1.0, 11: 0.5}  # measured where used, not the gain
    scores["trial"] = torch.tensor([nan, 0.0, 0.0, nan])
    ranked = _rank(Candidates([10, 11, 12, 13], scores), atlas, None, n_features=8)
    assert {c.feature: c.weight for c in ranked if c.weight > 0} == {10: 1.0, 11: 0.5, 12: 0.25}  # no trial shows it: the gain decides
