"""Corpus filters (distil/generation/filters.py): golden values worked out by hand."""

import pytest

from distil.eval.tasks import verify
from distil.generation import filters as F

FOX = "the quick brown fox jumps over the lazy dog"
CAT = "the quick brown fox jumps over the lazy cat"
LONG = " ".join(f"w{i}" for i in range(20))  # 20 distinct words: 18 word 3-grams


def test_normalize_and_jaccard():
    assert F.normalize("Hello,  World!\n") == "hello world"
    assert F.normalize("ＡＢＣ_def") == "abc def"  # NFKC folds the full-width letters; '_' is punctuation here
    assert F.jaccard({1, 2, 3}, {2, 3, 4}) == 2 / 4
    assert F.jaccard(set(), set()) == 1.0
    assert F.shingles("a b c d", 3) == {("a", "b", "c"), ("b", "c", "d")}
    assert F.shingles("a b", 3) == {("a", "b")}  # shorter than n: its whole word sequence
    # FOX and CAT: 7 word 3-grams each, the first 6 shared -> 6 / 8
    assert F.jaccard(F.shingles(FOX, 3), F.shingles(CAT, 3)) == 6 / 8


def test_exact_dedup_keeps_the_first_of_each_normalised_text():
    kept, removed = F.exact_dedup(["Hello world", "other", "hello, WORLD!", "Other."])
    assert kept == ["Hello world", "other"] and removed == 2
    records = [{"c": "x y"}, {"c": "X, y"}]
    assert F.exact_dedup(records, text=lambda r: r["c"]) == ([records[0]], 1)


def test_near_dedup_exact_jaccard_at_the_threshold():
    kept, removed = F.near_dedup([FOX, CAT, "something else entirely here"], n=3, threshold=0.75, method="exact")
    assert kept == [FOX, "something else entirely here"] and removed == 1  # J = 0.75 >= 0.75
    kept, removed = F.near_dedup([FOX, CAT], n=3, threshold=0.76, method="exact")
    assert kept == [FOX, CAT] and removed == 0


def test_near_dedup_minhash_finds_the_near_copy_and_only_it():
    near = LONG.rsplit(" ", 1)[0] + " other"  # last word changed: 17 of 19 distinct 3-grams shared, J = 0.895
    a, b = F.shingles(LONG, 3), F.shingles(near, 3)
    assert F.jaccard(a, b) == 17 / 19
    sig = F._minhash([a, b, a], num_perm=128, seed=0)
    assert F.minhash_jaccard(sig[0], sig[2]) == 1.0  # same set, same signature
    # the estimate is a mean of 128 Bernoulli(J) draws: sd = sqrt(J (1 - J) / 128) = 0.027; 4 sd allowed
    assert abs(F.minhash_jaccard(sig[0], sig[1]) - 17 / 19) < 4 * (17 / 19 * 2 / 19 / 128) ** 0.5
    unrelated = " ".join(f"v{i}" for i in range(20))
    kept, removed = F.near_dedup([LONG, near, unrelated], n=3, threshold=0.7, method="minhash")
    assert kept == [LONG, unrelated] and removed == 1
    assert F.near_dedup([LONG, near, unrelated], n=3, threshold=0.7, method="minhash") == (kept, removed)  # seeded
    with pytest.raises(ValueError):
        F.near_dedup([LONG], method="lsh")


def test_length_bounds_in_characters_and_in_tokens():
    assert F.length_filter(["ab", "abcd", "abcdef"], min_len=3, max_len=5) == (["abcd"], 2)
    assert F.length_filter(["ab", "abcdef"], min_len=3) == (["abcdef"], 1)  # no upper bound
    kept, removed = F.length_filter(["one two", "one two three"], min_len=3, measure=lambda t: len(t.split()))
    assert kept == ["one two three"] and removed == 1


def test_degenerate_texts():
    reasons = {t: F.degenerate_reason(t) for t in ("", "   \n", "?!... --", "the the THE", "aaaa", "ok fine", "a")}
    assert reasons == {"": "empty", "   \n": "empty", "?!... --": "no letter or digit",
                       "the the THE": "one repeated word", "aaaa": "one repeated character", "ok fine": None,
                       "a": None}
    assert F.degenerate(list(reasons)) == (["ok fine", "a"], 5)


def test_repeated_ngram_fraction():
    # 'a b a b a b', bigrams: ab ba ab ba ab -> 5 in all, 2 distinct -> (5 - 2) / 5
    assert F.repeated_fraction("a b a b a b", 2) == 3 / 5
    assert F.repeated_fraction("a b c d", 2) == 0.0
    assert F.repeated_fraction("a b", 3) == 0.0  # fewer than n words
    kept, removed = F.repetition(["a b a b a b", "a b c d"], n=2, max_fraction=0.5)
    assert kept == ["a b c d"] and removed == 1
    assert F.repetition(["a b a b a b"], n=2, max_fraction=0.6) == (["a b a b a b"], 0)  # 0.6 is not above 0.6


def test_decontamination_by_shared_word_ngrams():
    short_ref = "What does the Python built-in function `eval` do?"  # 9 words < 13: one 9-gram
    long_ref = " ".join(f"r{i}" for i in range(20))
    index = F.Contamination([short_ref, long_ref, "yes"], n=13)
    copied = "Q: what does the python built in function eval do\nA: it evaluates"
    other = "Q: what does the python built in function exec do\nA: it executes"
    thirteen = "prefix " + " ".join(f"r{i}" for i in range(3, 16)) + " suffix"  # r3..r15: 13 shared words
    twelve = "prefix " + " ".join(f"r{i}" for i in range(3, 15)) + " suffix"  # r3..r14: 12 shared words
    assert [index.hits(t) for t in (copied, other, thirteen, twelve, "yes indeed")] == [True, False, True, False,
                                                                                       False]
    kept, removed = F.decontaminate([copied, other, thirteen, twelve], [short_ref, long_ref], n=13)
    assert kept == [other, twelve] and removed == 2
    # n = 8: the 9-word reference contributes its two 8-grams; 'built in function eval do' alone is not enough
    assert F.decontaminate(["the python built in function eval do"], [short_ref], n=8) == (
        ["the python built in function eval do"], 0)
    assert F.decontaminate(["does the python built in function eval do"], [short_ref], n=8)[1] == 1


def test_verifier_keeps_answers_that_check():
    samples = [{"completion": "12-3=9\n9*4=36\n#### 36", "gold": 36}, {"completion": "#### 35", "gold": 36},
               {"completion": "no number", "gold": 36}]
    kept, removed = F.verified(samples, lambda s: verify(s["completion"], s["gold"]))
    assert kept == samples[:1] and removed == 2


def test_filter_report_counts_in_order():
    report = F.FilterReport(6)
    items = ["a b", "a b", "", "a b c d e f", "x y", "x, y!"]
    items = report.apply("degenerate", items, F.degenerate)
    items = report.apply("exact duplicates", items, F.exact_dedup)
    items = report.apply("length", items, F.length_filter, min_len=1, max_len=5)
    assert items == ["a b", "x y"]
    assert list(report.removed.items()) == [("degenerate", 1), ("exact duplicates", 2), ("length", 1)]
    assert report.kept == 2
    assert report.line() == "6 samples: degenerate -1, exact duplicates -2, length -1 -> 2 kept"
    assert report.record() == {"total": 6, "removed": {"degenerate": 1, "exact duplicates": 2, "length": 1},
                               "kept": 2}
