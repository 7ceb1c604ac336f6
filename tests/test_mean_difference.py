"""The mean-difference baseline of concept steering and the answer reads it shares with the
answer-contrast score, checked against hand computations on the tiny model."""
import pytest
import torch

from activations.generation import GenerationConfig, decode, encode_prompts, generate_tokens
from analysis.steering.concept import (
    PROMPTING,
    ConceptConfig,
    ConceptFeature,
    ExtraCondition,
    Fluency,
    Lexicon,
    answer_contrast,
    choose_dose,
    compare_concept,
    concept_steering,
    direction_dictionary,
    mean_difference,
    mean_difference_search,
    within_budget,
)
from analysis.steering.measure import answer_activations

from .test_steering import make_sae

HOOK = "blocks.1.hook_resid_post"
PROMPTS = ["the cat", "a mat by the river"]
GEN = GenerationConfig(max_new_tokens=5, stop_at_eos=False)


def by_hand(model, texts: list[str]) -> list[torch.Tensor]:
    """Each answer's activations at HOOK, from a full pass over prompt + answer ([n_new, d])."""
    prompts = encode_prompts(model.tokenizer, texts)
    out = []
    for prompt, answer in zip(prompts, generate_tokens(model, prompts, GEN)):
        _, cache = model.run_with_cache(torch.cat([prompt, answer])[None], names_filter=HOOK)
        out.append(cache[HOOK][0, len(prompt):])
    return out


def test_answer_activations_are_the_answer_tokens_read_after_their_prompt(tiny_model):
    got = answer_activations(tiny_model, HOOK, PROMPTS, GEN)
    want = by_hand(tiny_model, PROMPTS)
    assert [tuple(g.shape) for g in got] == [(5, 32), (5, 32)]
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-5)


def test_mean_difference_is_the_asked_answers_mean_less_the_unprompted_answers_mean(tiny_model):
    difference = mean_difference(tiny_model, HOOK, "rivers", PROMPTS, GEN)
    asked = torch.cat(by_hand(tiny_model, [PROMPTING.format(prompt=p, concept="rivers") for p in PROMPTS]))
    unprompted = torch.cat(by_hand(tiny_model, PROMPTS))
    assert torch.allclose(difference.direction, asked.mean(0) - unprompted.mean(0), atol=1e-5)
    unit = difference.direction / difference.direction.norm()
    assert difference.max_projection == pytest.approx(float(((asked - unprompted.mean(0)) @ unit).max()), abs=1e-4)


def test_the_direction_dictionary_adds_dose_times_the_residual_norm_along_the_direction_and_reads_the_projection(tiny_model):
    difference = mean_difference(tiny_model, HOOK, "rivers", PROMPTS, GEN)
    sae = direction_dictionary(difference, HOOK)
    unit = difference.direction / difference.direction.norm()
    x = torch.randn(1, 4, 32)
    steering = concept_steering(sae, [ConceptFeature(0, {}, 1.0, weight=1.0)], 0.3, torch.ones(1), ConceptConfig(mode="add"), residual_norm=10.0)
    added = steering(x) - x
    assert torch.allclose(added[0, 0], torch.zeros(32))  # position 0, the sink, is never edited
    assert torch.allclose(added[0, 1:], (3.0 * unit).expand(3, 32), atol=1e-5)
    assert torch.allclose(sae.encode(x)[..., 0], ((x - difference.unprompted) @ unit).relu(), atol=1e-5)
    with pytest.raises(ValueError, match="mean difference is zero"):
        direction_dictionary(difference._replace(asked=difference.unprompted), HOOK)


def test_the_mean_difference_goes_through_the_same_dose_search_and_report(tiny_model):
    cfg = ConceptConfig(doses=[0.5, 1.0], refine=0, confidence=0.0, generation={"max_new_tokens": 5, "stop_at_eos": False})
    lexicon = Lexicon("q", ("q",))
    sae, search, max_activation = mean_difference_search(tiny_model, HOOK, "rivers", lexicon, PROMPTS, cfg)
    assert sae.cfg.d_sae == 1 and [c.weight for c in search.steered] == [1.0] and search.residual_norm > 0
    found = choose_dose(tiny_model, sae, search, max_activation, PROMPTS, cfg)
    assert [p.dose for p in found.points][:1] == [0.5]
    dose = 0.5
    main = make_sae(hook=HOOK)
    points = compare_concept(tiny_model, main, search, PROMPTS, torch.ones(64), None, cfg,
                             {"mean difference": ExtraCondition(search.steered, dose, sae, search.residual_norm, max_activation)})
    names = [p.condition for p in points]
    assert names == ["unsteered", "prompting", "mean difference"]
    steered = generate_tokens(tiny_model, encode_prompts(tiny_model.tokenizer, PROMPTS), cfg.generation,
                              concept_steering(sae, search.steered, dose, max_activation, cfg, search.residual_norm))
    assert points[2].texts == [decode(tiny_model.tokenizer, g) for g in steered]
    assert points[2].texts != points[0].texts  # the push changed the answers
    assert all(p.within_budget_pooled is None for p in points)  # no reference: no second verdict
    for reference in [(1.0, 1000), (0.0, 10**6), (0.05, 12)]:  # the unsteered answers to other prompts, pooled with these
        pooled = compare_concept(tiny_model, main, search, PROMPTS, torch.ones(64), None, cfg, reference=reference)
        base = pooled[0]
        repetition = (base.repetition * len(PROMPTS) + reference[0] * reference[1]) / (len(PROMPTS) + reference[1])
        assert [p.within_budget_pooled for p in pooled] == [
            within_budget(Fluency(p.perplexity, p.repetition), Fluency(base.perplexity, repetition), cfg.budget, cfg.repetition_floor)
            for p in pooled]
        assert [p.within_budget for p in pooled] == [p.within_budget for p in points[:2]]  # the first verdict is unchanged


def test_answer_contrast_reads_the_answers_through_the_sae(tiny_model):
    sae = make_sae(hook=HOOK)
    max_activation = torch.full((64,), 2.0)
    got = answer_contrast(tiny_model, sae, "rivers", PROMPTS, max_activation, GEN)
    asked = torch.cat(by_hand(tiny_model, [PROMPTING.format(prompt=p, concept="rivers") for p in PROMPTS]))
    unprompted = torch.cat(by_hand(tiny_model, PROMPTS))
    want = (sae.encode(asked) / 2.0).mean(0) - (sae.encode(unprompted) / 2.0).mean(0)
    assert torch.allclose(got, want, atol=1e-5)
