"""Steering semantics on the tiny random model (fast), and on SmolLM2 (slow): the clamp /
ablate / add formulas with the error term kept, strengths in max-activation units, every
position but 0 steered (generated tokens included, KV cache or not), scoped hooks, clear
errors, and the measurements (feature readout, fluency, KL, sweep, causal check)."""
import json
import math

import pytest
import torch

from activations.model import ModelLoader
from analysis.evaluation.metrics import cross_entropy
from analysis.steering import (
    GenerationConfig,
    Intervention,
    Steering,
    SweepConfig,
    causal_check,
    compare,
    encode_prompts,
    feature_readout,
    format_side_by_side,
    generate_tokens,
    generation_nll,
    kl_on_text,
    steer,
    sweep,
    write_sweep,
)
from sae import ARCHITECTURES, SAEConfig

HOOK = "blocks.0.hook_resid_post"


def make_sae(d_in=32, d_sae=64, k=4, hook=HOOK, seed=0):
    return ARCHITECTURES["topk"](SAEConfig(d_in=d_in, d_sae=d_sae, k=k, hook_name=hook), generator=torch.Generator().manual_seed(seed))


def constant_feature_sae(feature=5, value=3.0, **kw):
    """An SAE whose `feature` reads `value` on every token, so 'its current value' is one number."""
    sae = make_sae(**kw)
    with torch.no_grad():
        sae.W_enc[:, feature] = 0
        sae.b_enc[feature] = value
    return sae


def prompts(n=3, length=6, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.cat([torch.tensor([256]), torch.randint(97, 123, (length,), generator=gen)]) for _ in range(n)]


def hooks_attached(model) -> int:
    return sum(len(hp.fwd_hooks) for hp in model.hook_dict.values()) + len(model._forward_pre_hooks) + len(model._forward_hooks)


# ----------------------------------------------------------------------------- the edit itself
def test_clamp_is_decode_of_edited_features_plus_error_term():
    sae = make_sae()
    x = torch.randn(2, 5, 32) * 3
    out = Steering(sae, Intervention(7, "clamp", 2.5, unit="absolute"))(x)
    f = sae.encode(x)
    f_edit = f.clone()
    f_edit[..., 7] = 2.5
    expected = sae.decode(f_edit) + (x - sae.decode(f))
    assert torch.allclose(out[:, 1:], expected[:, 1:], atol=1e-5)
    assert torch.equal(out[:, 0], x[:, 0])  # position 0 (BOS / attention sink) is never steered
    assert not torch.allclose(out[:, 1:], x[:, 1:])


def test_several_features_at_once_ablate_and_add():
    sae = make_sae()
    x = torch.randn(2, 6, 32) * 3
    f = sae.encode(x)
    firing = int((f[:, 1:] > 0).float().sum((0, 1)).argmax())  # a feature that fires, so ablation does something
    others = [i for i in range(64) if i != firing][:2]
    steering = Steering(sae, [Intervention(firing, "ablate"), Intervention(others[0], "clamp", 1.0, "absolute"),
                              Intervention(others[1], "add", 0.5, "absolute")])
    w = sae.W_dec.detach()
    expected = x - f[..., firing, None] * w[firing] + (1.0 - f[..., others[0], None]) * w[others[0]] + 0.5 * w[others[1]]
    out = steering(x)
    assert torch.allclose(out[:, 1:], expected[:, 1:], atol=1e-5)
    assert torch.equal(out[:, 0], x[:, 0])


def test_strengths_in_units_of_max_activation():
    sae = make_sae()
    max_act = torch.rand(64) + 0.5
    steering = Steering(sae, [Intervention(3, "clamp", 2.0), Intervention(4, "add", -0.5), Intervention(9, "ablate")], max_act)
    assert steering.values == pytest.approx({3: 2.0 * float(max_act[3]), 4: -0.5 * float(max_act[4]), 9: 0.0})
    x = torch.randn(1, 3, 32)
    absolute = Steering(sae, [Intervention(3, "clamp", 2.0 * float(max_act[3]), "absolute"),
                              Intervention(4, "add", -0.5 * float(max_act[4]), "absolute"), Intervention(9, "ablate")])
    assert torch.allclose(steering(x), absolute(x), atol=1e-6)


def test_clamp_at_least_raises_a_feature_to_the_target_and_never_lowers_it():
    sae = make_sae()
    x = torch.randn(2, 7, 32) * 3
    f = sae.encode(x)
    feature = int((f[:, 1:] > 0).float().sum((0, 1)).argmax())
    firing = f[:, 1:, feature][f[:, 1:, feature] > 0]
    target = float(firing.detach().median())  # some positions above it, some below
    out = Steering(sae, Intervention(feature, "clamp_at_least", target, unit="absolute"))(x)
    by_hand = x + (target - f[..., feature, None]).clamp_min(0) * sae.W_dec.detach()[feature]
    assert torch.allclose(out[:, 1:], by_hand[:, 1:], atol=1e-5) and torch.equal(out[:, 0], x[:, 0])
    above = f[..., feature] >= target
    assert above[:, 1:].any() and torch.equal(out[above], x[above])  # where it already fires above the target: untouched
    clamped = Steering(sae, Intervention(feature, "clamp", target, unit="absolute"))(x)
    assert not torch.allclose(clamped[:, 1:][above[:, 1:]], x[:, 1:][above[:, 1:]])  # a plain clamp pulls those down


def test_strengths_in_units_of_the_residual_norm():
    sae = make_sae()
    with torch.no_grad():
        sae.W_dec[4] *= 3.0  # not unit norm: the unit must divide it out
    x = torch.randn(1, 4, 32)
    steering = Steering(sae, [Intervention(4, "add", 0.5, "norm")], residual_norm=10.0)
    delta = steering(x)[:, 1:] - x[:, 1:]
    assert torch.allclose(delta.norm(dim=-1), torch.full((3,), 5.0), atol=1e-4)  # 0.5 x the residual norm
    assert steering.values[4] == pytest.approx(5.0 / float(sae.W_dec[4].norm()))
    with pytest.raises(ValueError, match="needs residual_norm"):
        Steering(sae, Intervention(4, "add", 0.5, "norm"))


def test_residual_norm_is_the_median_norm_past_position_0(tiny_model):
    from activations.model import run_to_hooks
    from analysis.steering.measure import residual_norm

    batch = prompts(2, 6) + prompts(1, 3, seed=5)
    norms = torch.cat([run_to_hooks(tiny_model, p[None], [HOOK])[HOOK][0, 1:].norm(dim=-1) for p in batch])
    assert residual_norm(tiny_model, HOOK, batch, batch_size=2) == pytest.approx(float(norms.median()), rel=1e-5)


@pytest.mark.parametrize("positions", ["prompt", "generated", "opening", "fading"])
def test_positions_prompt_or_generated_match_a_hand_computation(tiny_model, positions):
    """Greedy generation steered at prompt (or generated, opening, fading) positions only is the argmax, step
    by step, of a full forward pass whose hook edits exactly those positions, by exactly that much."""
    from analysis.steering.interventions import FADING_HALF_LIFE, OPENING_TOKENS

    sae = make_sae()
    direction = sae.W_dec[2].detach() * 6.0
    steering = Steering(sae, Intervention(2, "add", 6.0, "absolute"), positions=positions)
    batch = prompts(2, 5)
    cfg = dict(max_new_tokens=OPENING_TOKENS + 4, stop_at_eos=False)
    cached = generate_tokens(tiny_model, batch, GenerationConfig(**cfg), steering)
    assert [t.tolist() for t in cached] == [t.tolist() for t in generate_tokens(tiny_model, batch, GenerationConfig(**cfg, use_cache=False),
                                                                                  steering)]
    for prompt, new in zip(batch, cached):
        n = len(prompt)

        def by_hand(act, hook, n=n):
            act = act.clone()
            if positions == "prompt":
                act[:, 1:n] += direction
            elif positions == "opening":  # the prompt and the first answer tokens, then no more
                act[:, 1:n + OPENING_TOKENS] += direction
            elif positions == "fading":  # the prompt in full, answer token t at 0.5 ** (t / half-life)
                act[:, 1:n] += direction
                for t in range(act.shape[1] - n):
                    act[:, n + t] += 0.5 ** (t / FADING_HALF_LIFE) * direction
            else:
                act[:, n:] += direction
            return act

        full = torch.cat([prompt, new])[None]
        logits = tiny_model.run_with_hooks(full, fwd_hooks=[(HOOK, by_hand)])
        assert logits[0, n - 1:-1].argmax(-1).tolist() == new.tolist()
    unsteered = generate_tokens(tiny_model, batch, GenerationConfig(**cfg))
    if positions == "generated":  # the first answer token is predicted unsteered
        assert all(a[0] == b[0] for a, b in zip(cached, unsteered))
    assert any(a.tolist() != b.tolist() for a, b in zip(cached, unsteered))
    assert steering.prompt_lengths is None  # only set while generating


def test_each_positions_option_edits_each_position_by_its_weight():
    """The edit at each position of a generation pass, by hand: nothing at position 0; "opening" the prompt and the
    first OPENING_TOKENS answer tokens in full; "fading" the prompt in full and answer token t at 0.5 ** (t / half-life);
    clamp_at_least scaled the same way, and never lowering a feature at any weight."""
    from analysis.steering.interventions import FADING_HALF_LIFE, OPENING_TOKENS

    sae = make_sae()
    x = torch.randn(2, 30, 32, generator=torch.Generator().manual_seed(3))
    lengths = [4, 7]
    push = 2.0 * sae.W_dec[2].detach()
    for positions in ("all", "prompt", "generated", "opening", "fading"):
        steering = Steering(sae, Intervention(2, "add", 2.0, "absolute"), positions=positions)
        with steering.generating(lengths):
            moved = steering(x) - x
        for row, n in enumerate(lengths):
            for pos in range(30):
                t = pos - n  # the answer token's index (negative in the prompt)
                weight = {"all": 1.0, "prompt": float(t < 0), "generated": float(t >= 0), "opening": float(t < OPENING_TOKENS),
                          "fading": 0.5 ** (max(t, 0) / FADING_HALF_LIFE)}[positions] * (pos > 0)
                torch.testing.assert_close(moved[row, pos], weight * push, atol=1e-5, rtol=1e-5)
    floor = Steering(sae, Intervention(2, "clamp_at_least", 50.0, "absolute"), positions="fading")
    with floor.generating(lengths):
        y = floor(x)
    assert (sae.encode(y)[..., 2] >= sae.encode(x)[..., 2] - 1e-4).all()


def test_bad_requests_get_clear_errors(tiny_model):
    sae = make_sae()
    with pytest.raises(ValueError, match="out of range.*64 features"):
        Steering(sae, Intervention(64, "clamp", 1.0, "absolute"))
    with pytest.raises(ValueError, match="out of range"):
        Steering(sae, Intervention(-1, "clamp", 1.0, "absolute"))
    with pytest.raises(ValueError, match="needs max_activation"):
        Steering(sae, Intervention(3, "clamp", 1.0))  # unit="max" without max activations
    with pytest.raises(ValueError, match="never fired"):
        Steering(sae, Intervention(3, "add", 1.0), torch.zeros(64))
    with pytest.raises(ValueError, match="more than one"):
        Steering(sae, [Intervention(3, "ablate"), Intervention(3, "add", 1.0, "absolute")])
    with pytest.raises(ValueError, match="unknown steering mode"):
        Intervention(3, "boost", 1.0)
    with pytest.raises(ValueError, match="unknown steering positions"):
        Steering(sae, Intervention(3, "ablate"), positions="answer")
    with pytest.raises(KeyError, match="no hook point"):
        with steer(tiny_model, Steering(make_sae(hook="blocks.7.hook_resid_post"), Intervention(3, "ablate"))):
            pass
    with pytest.raises(ValueError, match="d_in=48"):
        generate_tokens(tiny_model, prompts(1), GenerationConfig(max_new_tokens=2), Steering(make_sae(d_in=48), Intervention(3, "ablate")))
    assert hooks_attached(tiny_model) == 0


# ----------------------------------------------------------------------------- on a model
def test_clamping_a_feature_to_its_current_value_leaves_logits_unchanged(tiny_model):
    sae = constant_feature_sae(feature=5, value=3.0)
    tokens = torch.stack(prompts(2, 12))
    clean = tiny_model(tokens)
    with steer(tiny_model, Steering(sae, Intervention(5, "clamp", 3.0, "absolute"))):
        same = tiny_model(tokens)
    with steer(tiny_model, Steering(sae, Intervention(5, "clamp", 4.0, "absolute"))):
        moved = tiny_model(tokens)
    assert torch.allclose(same, clean, atol=1e-5)
    assert (moved - clean).abs().max() > 1e-2  # the hook was live: another value changes the logits


def test_steer_edits_every_position_but_the_first(tiny_model):
    sae = make_sae()
    steering = Steering(sae, Intervention(2, "add", 4.0, "absolute"))
    tokens = torch.stack(prompts(2, 9))
    direction = sae.W_dec[2].detach() * 4.0

    def by_hand(act, hook):
        act = act.clone()
        act[:, 1:] += direction
        return act

    with steer(tiny_model, steering):
        steered = tiny_model(tokens)
    assert torch.allclose(steered, tiny_model.run_with_hooks(tokens, fwd_hooks=[(HOOK, by_hand)]), atol=1e-5)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generation_is_the_same_with_and_without_the_kv_cache(tiny_model, temperature):
    steering = Steering(make_sae(), [Intervention(2, "add", 6.0, "absolute"), Intervention(11, "clamp", 5.0, "absolute")])
    batch = prompts(3, 5) + prompts(1, 8, seed=4)  # two lengths: batched by length on this path
    cfg = dict(max_new_tokens=12, temperature=temperature, top_p=0.9, seed=3, stop_at_eos=False)
    cached = generate_tokens(tiny_model, batch, GenerationConfig(**cfg), steering)
    recomputed = generate_tokens(tiny_model, batch, GenerationConfig(**cfg, use_cache=False), steering)
    unsteered = generate_tokens(tiny_model, batch, GenerationConfig(**cfg))
    assert [t.tolist() for t in cached] == [t.tolist() for t in recomputed]
    assert all(len(t) == 12 for t in cached)
    assert sum(a.tolist() != b.tolist() for a, b in zip(cached, unsteered)) >= 2  # the steering changes the text
    assert hooks_attached(tiny_model) == 0


def test_seeded_sampling_is_reproducible_and_seed_dependent(tiny_model):
    cfg = dict(max_new_tokens=10, temperature=1.0, stop_at_eos=False)
    a = generate_tokens(tiny_model, prompts(2), GenerationConfig(**cfg, seed=1))
    b = generate_tokens(tiny_model, prompts(2), GenerationConfig(**cfg, seed=1))
    c = generate_tokens(tiny_model, prompts(2), GenerationConfig(**cfg, seed=2))
    assert [t.tolist() for t in a] == [t.tolist() for t in b] != [t.tolist() for t in c]


def test_hooks_are_removed_even_when_an_exception_is_raised(tiny_model):
    tokens = torch.stack(prompts(1, 8))
    clean = tiny_model(tokens)
    steering = Steering(make_sae(), Intervention(2, "add", 6.0, "absolute"))
    with pytest.raises(RuntimeError, match="boom"):
        with steer(tiny_model, steering):
            assert hooks_attached(tiny_model) > 0
            raise RuntimeError("boom")
    assert hooks_attached(tiny_model) == 0 and steering.pass_positions is None

    class FailsOnThirdCall(Steering):
        calls = 0

        def __call__(self, x):
            self.calls += 1
            if self.calls == 3:
                raise RuntimeError("boom in a hook")
            return super().__call__(x)

    with pytest.raises(RuntimeError, match="boom in a hook"):
        generate_tokens(tiny_model, prompts(1), GenerationConfig(max_new_tokens=5), FailsOnThirdCall(make_sae(), Intervention(2, "ablate")))
    assert hooks_attached(tiny_model) == 0
    assert torch.equal(tiny_model(tokens), clean)


# ----------------------------------------------------------------------------- measurement
def test_feature_readout_rereads_the_text_alone(tiny_model):
    sae = make_sae()
    generated = [torch.tensor([104, 105, 106, 107]), torch.tensor([120, 121]), torch.tensor([], dtype=torch.long)]
    x = tiny_model.run_with_cache(torch.tensor([[256, 104, 105, 106, 107]]), names_filter=HOOK)[1][HOOK]
    f = sae.encode(x)[0, 1:].detach()  # BOS excluded
    feature = int(f.sum(0).argmax())
    max_act = torch.full((64,), 2.0)
    scores = feature_readout(tiny_model, sae, [feature], generated, max_act, threshold=0.0,
                            predicate=lambda t: t == 105)
    assert scores.activation[0] == pytest.approx(float(f[:, feature].mean() / 2.0), rel=1e-4)
    assert bool(scores.present[0])
    assert math.isnan(float(scores.activation[2])) and not bool(scores.present[2])
    assert scores.predicate_rate.tolist()[:2] == pytest.approx([0.25, 0.0])
    high = feature_readout(tiny_model, sae, [feature], generated, max_act, threshold=1e6)
    assert not high.present.any()


def test_generation_nll_is_the_ce_of_the_new_tokens_given_the_prompt(tiny_model):
    p, g = prompts(2, 4), [torch.tensor([100, 101, 102]), torch.tensor([103])]
    nll, n = generation_nll(tiny_model, p, g)
    assert n.tolist() == [3, 1]
    full = torch.cat([p[0], g[0]])[None]
    ce = cross_entropy(tiny_model(full).detach(), full)[0]
    assert float(nll[0]) == pytest.approx(float(ce[-3:].sum()), rel=1e-4)


def test_generation_fluency_is_the_one_fluency_of_sweeps_and_concept_steering(tiny_model):
    from analysis.evaluation.metrics import repetition_rate
    from analysis.steering import Fluency, generation_fluency, score_condition
    from analysis.steering.concept import Fluency as ConceptFluency

    p, g = prompts(2, 4), [torch.tensor([100, 101, 102, 100, 101, 102]), torch.tensor([103])]
    fluency = generation_fluency(tiny_model, p, g)
    nll, n = generation_nll(tiny_model, p, g)
    assert fluency.perplexity == pytest.approx(math.exp(float(nll.sum()) / int(n.sum())))
    # (1, 2, 3, 1, 2, 3): 1 of its 4 trigrams repeats an earlier one; the 1-token answer is too short to judge and counts as 1
    assert repetition_rate(g[0].tolist()) == pytest.approx(0.25)
    assert fluency.repetition == pytest.approx((0.25 + 1.0) / 2)
    point = score_condition(tiny_model, make_sae(), "add", 1.0, p, g, [2], None, 0.0, None)
    assert (point.perplexity, point.repetition) == (fluency.perplexity, fluency.repetition)
    assert ConceptFluency is Fluency
    nothing = generation_fluency(tiny_model, p[:1], [torch.tensor([], dtype=torch.long)])
    assert math.isnan(nothing.perplexity)


def test_modes_and_units_are_their_literals():
    from typing import get_args

    from analysis.steering import MODES, UNITS, Mode, Unit

    assert MODES == get_args(Mode) == ("clamp", "clamp_at_least", "add", "ablate")
    assert UNITS == get_args(Unit) == ("max", "absolute", "norm")


def test_kl_on_neutral_text(tiny_model):
    tokens = torch.stack(prompts(3, 16))
    same = Steering(constant_feature_sae(5, 3.0), Intervention(5, "clamp", 3.0, "absolute"))
    strong = Steering(make_sae(), Intervention(2, "add", 8.0, "absolute"))
    assert kl_on_text(tiny_model, same, tokens) == pytest.approx(0.0, abs=1e-6)
    assert kl_on_text(tiny_model, strong, tokens) > 1e-3


def test_causal_check_ablation_lowers_the_promoted_tokens(tiny_model):
    # at the last layer only the final norm and W_U follow, so the direct effect decides
    sae = make_sae(hook="blocks.1.hook_resid_post")
    tokens = torch.stack(prompts(4, 30))
    x = tiny_model.run_with_cache(tokens, names_filter="blocks.1.hook_resid_post")[1]["blocks.1.hook_resid_post"]
    feature = int((sae.encode(x)[:, 1:] > 0).float().sum((0, 1)).argmax())
    check = causal_check(tiny_model, sae, feature, tokens, top_k=5)
    assert check.n_positions > 0 and len(check.promoted_tokens) == 5
    assert check.delta < 0 and check.delta < check.control_delta
    assert check.fraction_lowered > 0.5


def test_sweep_writes_json_and_standalone_html(tiny_model, tmp_path):
    sae = make_sae()
    cfg = SweepConfig(features=[2], mode="add", strengths=[2.0, 8.0], unit="absolute",
                      generation=GenerationConfig(max_new_tokens=6, stop_at_eos=False), threshold=0.0)
    result = sweep(tiny_model, sae, ["<b>bold</b> prompt", "another prompt"], torch.stack(prompts(2, 10)), cfg)
    assert [p.series for p in result.points] == ["unsteered", "add", "add"]
    assert [p.strength for p in result.points] == [None, 2.0, 8.0]
    assert result.points[0].kl == 0.0 and result.points[2].kl > result.points[1].kl > 0
    assert all(p.perplexity > 1 for p in result.points)
    json_path, html_path = write_sweep(result, tmp_path)
    assert json.loads(json_path.read_text())["points"][1]["strength"] == 2.0
    page = html_path.read_text()
    assert "plotly" in page and "&lt;b&gt;bold&lt;/b&gt;" in page and "<b>bold</b>" not in page


def test_compare_and_format_side_by_side(tiny_model):
    steering = Steering(make_sae(), Intervention(2, "add", 6.0, "absolute"))
    rows = compare(tiny_model, ["abc", "xyz"], steering, GenerationConfig(max_new_tokens=8, stop_at_eos=False))
    assert [r.prompt for r in rows] == ["abc", "xyz"]
    text = format_side_by_side(rows, width=60)
    assert row_bodies(text, rows, width=60, col=28, labels=("unsteered", "steered"))
    # narrow columns wrap each continuation over several lines, none of them lost
    narrow = row_bodies(format_side_by_side(rows, width=15, labels=("base", "steer")), rows, width=15, col=6, labels=("base", "steer"))
    assert max(len(body) for body in narrow) > 1


def row_bodies(text, rows, width, col, labels):
    """Check the exact layout: per prompt a rule, the prompt, a rule, the column header, then
    the two continuations in columns of `col` = (width - 3) // 2 characters split by " | ".
    Returns the body lines of each prompt."""
    lines = text.split("\n")
    assert all(len(line) <= width for line in lines)
    starts = [i for i, line in enumerate(lines) if line == "=" * width]
    assert len(starts) == len(rows) and starts[0] == 0
    bodies = []
    for row, start, end in zip(rows, starts, starts[1:] + [len(lines)]):
        block = lines[start:end]
        assert block[1] == f"prompt: {row.prompt}"
        assert block[2] == "-" * width
        assert block[3] == labels[0].ljust(col) + " | " + labels[1]
        body = block[4:]
        assert body and all(line[col:col + 3] == " | " for line in body)
        left, right = "".join(line[:col] for line in body), "".join(line[col + 3:] for line in body)
        squash = lambda s: "".join(s.split())  # noqa: E731  (wrapping only moves whitespace)
        assert row.unsteered != row.steered  # so a swap of the columns would show
        assert squash(left) == squash(row.unsteered) and squash(right) == squash(row.steered)
        bodies.append(body)
    return bodies


def test_plain_prompts_start_with_the_context_start_token(tiny_model):
    [ids] = encode_prompts(tiny_model.tokenizer, ["hi"])
    assert ids.tolist() == [256, ord("h"), ord("i")]
    with pytest.raises(ValueError, match="no chat template"):
        encode_prompts(tiny_model.tokenizer, ["hi"], chat=True)


# --------------------------------------------- Hugging Face models: KV cache, padding, HF generate
def check_hf_generation(model, sae, tokens, hf_prompt, strength):
    """On a TransformerBridge: clamping a feature to its own value changes nothing; cached,
    recomputed and one-by-one generation agree, steered and unsteered; HF's own `generate`
    sees the same steering; and every hook is gone afterwards."""
    batch = torch.stack([tokens[0], tokens[0]])
    clean = model(batch)
    module_hooks = lambda: sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.original_model.modules())  # noqa: E731
    before = module_hooks()  # after a first forward pass: the bridge adds hooks of its own then
    with steer(model, Steering(sae, Intervention(5, "clamp", 1000.0, "absolute"))):
        assert torch.allclose(model(batch), clean, atol=1e-4)  # clamped to its own value: unchanged

    steering = Steering(sae, Intervention(7, "add", strength, "absolute"))
    prompts = tokens + [hf_prompt]
    cfg = dict(max_new_tokens=6, stop_at_eos=False)
    as_lists = lambda runs: [t.tolist() for t in runs]  # noqa: E731
    batched = as_lists(generate_tokens(model, prompts, GenerationConfig(**cfg), steering))  # left padding
    recomputed = as_lists(generate_tokens(model, prompts, GenerationConfig(**cfg, use_cache=False), steering))
    one_by_one = [generate_tokens(model, [p], GenerationConfig(**cfg), steering)[0].tolist() for p in prompts]
    unsteered = as_lists(generate_tokens(model, prompts, GenerationConfig(**cfg)))
    unsteered_recomputed = as_lists(generate_tokens(model, prompts, GenerationConfig(**cfg, use_cache=False)))
    assert batched == recomputed == one_by_one
    assert unsteered == unsteered_recomputed
    for positions in ("prompt", "generated", "opening", "fading"):  # each row's own prompt length, under left padding
        only = Steering(sae, Intervention(7, "add", strength, "absolute"), positions=positions)
        rows = as_lists(generate_tokens(model, prompts, GenerationConfig(**cfg), only))
        assert rows == [generate_tokens(model, [p], GenerationConfig(**cfg), only)[0].tolist() for p in prompts]
        assert rows == as_lists(generate_tokens(model, prompts, GenerationConfig(**cfg, use_cache=False), only))
    assert batched != unsteered
    with steer(model, steering):  # Hugging Face's own generate sees the same steering
        hf = model.original_model.generate(hf_prompt[None], max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                           attention_mask=torch.ones_like(hf_prompt[None]))
    assert hf[0, len(hf_prompt):].tolist() == batched[-1]
    assert module_hooks() == before
    assert torch.allclose(model(batch), clean, atol=1e-5)


def test_steering_hf_model_cache_padding_generate_and_scoped_hooks(tiny_bridge):
    """The same checks on a tiny random Llama, so they run on every install (a transformers
    release once renamed the cache argument and cached generation silently broke)."""
    hook = "blocks.1.hook_resid_post"
    sae = constant_feature_sae(feature=5, value=1000.0, d_in=32, d_sae=64, k=4, hook=hook)
    tokens = encode_prompts(tiny_bridge.tokenizer, ["The weather today is", "Once upon a time, in a small village"])
    check_hf_generation(tiny_bridge, sae, tokens, encode_prompts(tiny_bridge.tokenizer, ["Name a colour."])[0], strength=20.0)


@pytest.mark.slow
def test_steering_smollm2_cache_padding_chat_and_scoped_hooks(smollm2):
    hook = "blocks.8.hook_resid_post"
    sae = constant_feature_sae(feature=5, value=1000.0, d_in=576, d_sae=1152, k=16, hook=hook)  # above every other pre-activation
    tokens = encode_prompts(smollm2.tokenizer, ["The weather today is", "Once upon a time, in a small village by the sea,"])
    chat = encode_prompts(smollm2.tokenizer, ["Name a colour."], chat=True)
    assert smollm2.tokenizer.decode(chat[0].tolist()).rstrip().endswith("<|im_start|>assistant")
    check_hf_generation(smollm2, sae, tokens, chat[0], strength=60.0)


def test_cli_steer_prints_side_by_side_and_writes_the_sweep(tiny_model, tmp_path, monkeypatch, capsys):
    from analysis import cli

    sae = constant_feature_sae(5, 3.0)  # fires everywhere, so its max activation is known: 3.0
    sae.cfg.context_size = 32  # the tiny model's contexts
    sae.save(tmp_path / "sae")
    monkeypatch.setattr(ModelLoader, "get", lambda self, recorded=None: tiny_model)
    config = tmp_path / "steer.json"
    config.write_text(json.dumps({"features": [5], "mode": "clamp", "strengths": [2.0], "prompts": ["abc", "<xyz>"]}))
    cli.main(["steer", "--config", str(config), "--sae", str(tmp_path / "sae"), "--max-new-tokens", "4",
              "--max-contexts", "2", "--kl-contexts", "2", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert "max activations: f5 3" in out and "clamp features [5] = 2 x max activation" in out
    assert "prompt: abc" in out and "prompt: <xyz>" in out and "perplexity" in out
    assert (tmp_path / "out" / "steer" / "sweep.html").exists()
    assert json.loads((tmp_path / "out" / "steer" / "sweep.json").read_text())["features"] == [5]


def test_cli_steer_reads_the_saes_atlas_and_scores_with_its_label(tiny_model, text_corpus, tmp_path, monkeypatch, capsys):
    from activations import CorpusConfig
    from analysis import cli
    from analysis.features.atlas import AtlasConfig, build_atlas

    sae = constant_feature_sae(5, 3.0)
    sae.cfg.context_size = 32
    sae.save(tmp_path / "sae")
    atlas_cfg = AtlasConfig(corpus=CorpusConfig(source=str(text_corpus), context_len=32), n_tokens=31 * 8, autocast="none", device="cpu")
    build_atlas(sae, tiny_model, atlas_cfg).save(tmp_path / "sae" / "atlas")
    features = [None] * sae.cfg.d_sae
    features[5] = {"feature": 5, "kind": "token-set", "label": 'tokens "a"', "tokens": [ord("a")], "f1": 0.9}
    (tmp_path / "sae" / "atlas" / "labels.json").write_text(json.dumps({"features": features}))
    monkeypatch.setattr(ModelLoader, "get", lambda self, recorded=None: tiny_model)
    prompts = ["abc", "xyz", "hello"]
    cli.main(["steer", "--sae", str(tmp_path / "sae"), "--features", "5", "--strengths", "2", "--prompts", *prompts,
              "--max-new-tokens", "6", "--kl-contexts", "2", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert "max activations: f5 3" in out  # from the atlas: the feature reads 3.0 everywhere
    assert 'f5 label: tokens "a"' in out and "label freq" in out
    sweep = json.loads((tmp_path / "out" / "steer" / "sweep.json").read_text())
    for point in sweep["points"]:  # the label predicate ("the token is 'a'") scored each generation
        assert point["predicate_frequency"] == pytest.approx(sum("a" in e for e in point["examples"]) / len(prompts))
    with pytest.raises(SystemExit, match="out of range"):
        cli.main(["steer", "--sae", str(tmp_path / "sae"), "--features", str(sae.cfg.d_sae), "--prompts", "abc", "--out", str(tmp_path / "out")])
    # labels.json of another SAE (fewer entries) is refused, not read at the wrong features
    (tmp_path / "sae" / "atlas" / "labels.json").write_text(json.dumps({"features": features[:10]}))
    with pytest.raises(SystemExit, match="10 feature entries but the SAE has 64 features"):
        cli.main(["steer", "--sae", str(tmp_path / "sae"), "--features", "5", "--strengths", "2", "--prompts", "abc",
                  "--max-new-tokens", "2", "--kl-contexts", "1", "--out", str(tmp_path / "out")])


def test_cli_steer_without_an_atlas_rejects_out_of_range_features_before_any_work(tiny_model, tmp_path, monkeypatch):
    from analysis import cli

    sae = constant_feature_sae(5, 3.0)
    sae.cfg.context_size = 32
    sae.save(tmp_path / "sae")
    loads = []
    monkeypatch.setattr(ModelLoader, "get", lambda self, recorded=None: loads.append(1) or tiny_model)
    for bad in (["64"], ["5", "70"], ["-1"]):
        for unit in ("max", "absolute"):
            with pytest.raises(SystemExit, match=r"--features: feature\(s\) \[[-0-9, ]+\] out of range: this SAE has 64 features \(ids 0..63\)"):
                cli.main(["steer", "--sae", str(tmp_path / "sae"), "--features", *bad, "--unit", unit, "--prompts", "abc",
                          "--max-new-tokens", "2", "--max-contexts", "2", "--kl-contexts", "1", "--out", str(tmp_path / "out")])
    assert not loads  # refused before the model (or any text) was loaded


def test_feature_ids_are_checked_against_the_sae_before_any_work(tiny_model, monkeypatch):
    import importlib

    sweep_module = importlib.import_module("analysis.steering.sweep")  # the package re-exports a function of the same name

    sae = make_sae()
    with pytest.raises(ValueError, match="out of range"):
        Intervention(-1, "ablate")  # negative ids never wrap around to the last features
    with pytest.raises(ValueError, match="must be an integer"):
        Intervention(2.5, "ablate")
    assert Intervention(torch.tensor(3), "ablate").feature == 3
    generated = []
    monkeypatch.setattr(sweep_module, "generate_tokens", lambda *a, **k: generated.append(1) or [])
    with pytest.raises(ValueError, match=r"feature\(s\) \[64\] out of range: this SAE has 64 features"):
        sweep(tiny_model, sae, ["abc"], torch.zeros(1, 4, dtype=torch.long), SweepConfig(features=[64], unit="absolute"))
    assert not generated  # refused before generating the unsteered baseline
    with pytest.raises(ValueError, match=r"feature\(s\) \[64\] out of range"):
        feature_readout(tiny_model, sae, [1, 64], prompts(1))


def test_causal_check_refuses_negative_and_out_of_range_feature_ids(tiny_model, monkeypatch):
    from analysis import encoding

    sae = make_sae(hook="blocks.1.hook_resid_post")
    tokens = torch.stack(prompts(2, 12))
    reads = []
    original = encoding.run_to_hooks
    monkeypatch.setattr(encoding, "run_to_hooks", lambda *a, **k: reads.append(1) or original(*a, **k))
    for bad in (-1, -64, 64):  # -1 would read W_dec[-1], feature 63's direction
        with pytest.raises(ValueError, match=r"out of range: this SAE has 64 features \(ids 0..63\)") as error:
            causal_check(tiny_model, sae, bad, tokens)
        assert not reads, "the text was read before the feature id was checked"
        assert f"[{bad}]" in str(error.value)
