"""First-letter absorption on a planted case: letter "a" has a main latent, but on a quarter
of its words a word-specific latent fires instead and writes the letter direction itself;
on a quarter of letter "b"'s words nothing fires (missed, but not absorbed)."""
import torch

from analysis.evaluation.absorption import AbsorptionConfig, main_latents, score_absorption

WORDS_PER_LETTER, REPEATS, D_IN, ABSORBED_WORDS = 40, 10, 64, 10


def planted(absorb: bool):
    g = torch.Generator().manual_seed(0)
    word = torch.arange(26 * WORDS_PER_LETTER).repeat_interleave(REPEATS)
    y = word // WORDS_PER_LETTER
    x = 3 * torch.nn.functional.one_hot(y, D_IN).float() + 0.3 * torch.randn(len(y), D_IN, generator=g)
    w_dec = torch.zeros(26 + ABSORBED_WORDS, D_IN)
    w_dec[:26, :26] = torch.eye(26)  # latent c: "starts with letter c"
    f = torch.zeros(len(y), len(w_dec))
    f[torch.arange(len(y)), y] = 3.0
    absorbed_word = (y == 0) & (word % WORDS_PER_LETTER < ABSORBED_WORDS)
    if absorb:  # " apple", " arm", ...: own latent, decoder mostly the a-direction, the a-latent silent
        for i in range(ABSORBED_WORDS):
            w_dec[26 + i, 0], w_dec[26 + i, 30 + i] = 0.9, 0.44
            rows = absorbed_word & (word % WORDS_PER_LETTER == i)
            f[rows, 0], f[rows, 26 + i] = 0.0, 3.3
        dropped = (y == 1) & (word % WORDS_PER_LETTER < ABSORBED_WORDS)
        f[dropped] = 0.0  # letter "b" is simply lost on these words: a miss, not absorption
    test = (word % 10) >= 7  # 30% of every letter's vocabulary held out
    return x, f, y, test, w_dec, absorbed_word


def test_planted_absorption_is_found_on_its_letter_only():
    x, f, y, test, w_dec, absorbed_word = planted(absorb=True)
    result = score_absorption(x, f, y, test, w_dec, AbsorptionConfig(min_test_tokens=20))
    by_letter = {r.letter: r for r in result.letters}
    assert result.probe_accuracy > 0.99
    expected = float(absorbed_word[test & (y == 0)].float().mean())  # absorbed share of a's test tokens
    assert abs(by_letter["a"].absorption_rate - expected) < 0.02 and expected > 0.2
    assert by_letter["a"].main_latents == [0]  # the word latents each add too little F1 to count as a split
    assert by_letter["b"].miss_rate == expected and by_letter["b"].absorption_rate == 0
    assert all(r.absorption_rate == 0 for r in result.letters if r.letter != "a")


def test_no_absorption_without_the_planted_latents():
    x, f, y, test, w_dec, _ = planted(absorb=False)
    result = score_absorption(x, f, y, test, w_dec, AbsorptionConfig(min_test_tokens=20))
    assert result.mean_absorption_rate == 0 and result.mean_miss_rate == 0 and result.mean_main_f1 == 1


def test_a_letter_split_over_two_latents_is_not_absorption():
    """Two latents share a letter half and half: both become main latents, nothing is absorbed."""
    fires = torch.zeros(100, 3, dtype=torch.bool)
    positive = torch.zeros(100, dtype=torch.bool)
    positive[:60] = True
    fires[:30, 0] = True
    fires[30:60, 1] = True
    fires[70:72, 2] = True  # noise
    latents, f1 = main_latents(fires, positive, AbsorptionConfig())
    assert sorted(latents) == [0, 1] and f1 == 1.0
