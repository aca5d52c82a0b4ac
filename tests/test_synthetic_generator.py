"""Tests of the procedurally generated children's-story corpus (pure Python, no torch)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import subprocess
import sys
from collections import Counter, defaultdict
from functools import lru_cache

import pytest

from qtoy_plugins.data.synthetic import generator as G
from qtoy_plugins.data.synthetic import lexicon as L
from qtoy_plugins.data.synthetic import writer as W
from qtoy_plugins.data.synthetic.generator import (
    GENERATOR_VERSION,
    LABELS,
    Span,
    Story,
    StoryGenerator,
    describe_structure,
    vocabulary,
)

POSSESSIVE = {"he": "his", "she": "her", "they": "their"}


@lru_cache(maxsize=None)
def stories(seed: int, difficulty: float, n: int) -> tuple[Story, ...]:
    g = StoryGenerator(seed=seed, difficulty=difficulty)
    return tuple(g.story(i) for i in range(n))


def span_at(story: Story, pos: int) -> Span:
    for s in story.spans:
        if s.start <= pos < s.end:
            return s
    raise AssertionError(f"no span covers position {pos}")


def span_text(story: Story, s: Span) -> str:
    return story.text[s.start:s.end]


# ----------------------------------------------------------------------------- determinism

def test_same_seed_and_index_give_the_same_story():
    a = StoryGenerator(seed=3, difficulty=0.5)
    b = StoryGenerator(seed=3, difficulty=0.5)
    for i in (0, 1, 17, 12345):
        assert a.story(i) == b.story(i)
    # random access does not depend on what was generated before
    c = StoryGenerator(seed=3, difficulty=0.5)
    assert c.story(17) == a.story(17)


def test_different_seeds_and_indices_differ():
    t0 = [StoryGenerator(seed=0).story(i).text for i in range(20)]
    t1 = [StoryGenerator(seed=1).story(i).text for i in range(20)]
    assert len(set(t0)) == 20
    assert all(x != y for x, y in zip(t0, t1))


def test_iteration_text_and_texts_agree_with_random_access():
    g = StoryGenerator(seed=5, difficulty=0.7)
    it = iter(g)
    for i in range(8):
        assert next(it) == g.story(i)
    texts = g.texts(start=4)
    for i in range(4, 12):
        t = next(texts)
        assert t == g.story(i).text == g.text(i)


def test_generator_pickles_small_and_equal():
    import pickle
    g = StoryGenerator(seed=9, difficulty=0.25)
    blob = pickle.dumps(g)
    assert len(blob) < 200
    h = pickle.loads(blob)
    assert (h.seed, h.difficulty) == (9, 0.25) and h.story(3) == g.story(3)


def test_output_does_not_depend_on_pythonhashseed():
    code = ("from qtoy_plugins.data.synthetic.generator import StoryGenerator;"
            "import hashlib;g=StoryGenerator(seed=2, difficulty=1.0);"
            "print(hashlib.sha256(''.join(g.text(i) for i in range(30)).encode()).hexdigest())")
    outs = set()
    for hs in ("0", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=hs)
        outs.add(subprocess.run([sys.executable, "-c", code], env=env, check=True,
                                capture_output=True, text=True).stdout.strip())
    g = StoryGenerator(seed=2, difficulty=1.0)
    outs.add(hashlib.sha256("".join(g.text(i) for i in range(30)).encode()).hexdigest())
    assert len(outs) == 1


# Output for a seed is a cache key together with GENERATOR_VERSION: changing the generator's output
# without bumping the version must fail here (then bump GENERATOR_VERSION and add its hash).
GOLDEN = {"1.0": "d941ef11b13cba1b424bf0937ecbc467b67caa18aa84d0c5586367c37546c935"}


def test_generator_version_is_bumped_when_output_changes():
    assert isinstance(GENERATOR_VERSION, str) and GENERATOR_VERSION
    g = StoryGenerator(seed=0, difficulty=0.5)
    digest = hashlib.sha256("\x00".join(g.text(i) for i in range(10)).encode()).hexdigest()
    assert GENERATOR_VERSION in GOLDEN, "new GENERATOR_VERSION: record its golden hash"
    if GOLDEN[GENERATOR_VERSION] is not None:
        assert digest == GOLDEN[GENERATOR_VERSION], "output changed: bump GENERATOR_VERSION"


def test_invalid_arguments():
    with pytest.raises(ValueError):
        StoryGenerator(difficulty=1.5)
    with pytest.raises(IndexError):
        StoryGenerator().story(-1)


# ----------------------------------------------------------------------------- spans

@pytest.mark.parametrize("difficulty", [0.0, 0.5, 1.0])
def test_spans_tile_the_text_and_carry_the_entropy(difficulty):
    for st in stories(11, difficulty, 150):
        assert st.spans[0].start == 0 and st.spans[-1].end == len(st.text)
        for a, b in zip(st.spans, st.spans[1:]):
            assert a.end == b.start
        for s in st.spans:
            assert s.end > s.start
            assert s.label in LABELS
            assert s.nats >= 0.0
            if s.label == "fixed":
                assert s.nats == 0.0
            if s.label == "free":
                assert s.nats > 0.0
        assert abs(math.fsum(s.nats for s in st.spans) - st.entropy_nats) < 1e-9
        assert st.entropy_nats > 0 and st.choices > 0
        assert st.episodes[0] == "opening" and st.episodes[-1] == "ending"


def test_entropy_is_the_sum_of_the_logged_choices():
    g = StoryGenerator(seed=4, difficulty=0.8)
    for i in range(50):
        w = g._writer(i)
        st = w.result()
        assert len(w.choice_nats) == st.choices
        assert all(n >= 0 for n in w.choice_nats)
        assert st.entropy_nats == math.fsum(w.choice_nats)
        # the span bookkeeping (where each choice is charged) is independent of the log
        assert abs(math.fsum(n for _, _, n in w.marks) - st.entropy_nats) < 1e-9


# ----------------------------------------------------------------------------- planted structure

def test_names_are_introduced_free_then_copied():
    copies = 0
    for st in stories(21, 0.6, 200):
        assert st.characters
        for name, _ in st.characters:
            assert re.fullmatch(r"[A-Z][a-z]+", name)
            hits = [m.start() for m in re.finditer(rf"\b{name}\b", st.text)]
            first = span_at(st, hits[0])
            assert first.label == "free" and span_text(st, first) == " " + name
            assert first.nats > 0
            for pos in hits[1:]:
                s = span_at(st, pos)
                assert s.label == "copyable" and span_text(st, s) == " " + name
                copies += 1
    assert copies > 1000


def test_recalled_list_item_appeared_in_the_packed_list():
    recalls = 0
    for st in stories(22, 0.8, 300):
        # hero -> (bag, items) of the pack episode (a nested tale has its own hero and bag)
        packs = {}
        for m in re.finditer(r"([A-Z][a-z]+) (?:was going on a trip|wanted to go exploring), so "
                             r"(?:he|she|they) packed (?:his|her|their) ([a-z ]+)\. "
                             r"In it, (?:he|she|they) put (.+?)\.", st.text):
            items = [re.sub(r"^(a|an|some) ", "", x) for x in re.split(r", | and ", m.group(3))]
            packs[m.group(1)] = (m.start(), m.group(2), items)
        for m in re.finditer(r"([A-Z][a-z]+) opened (?:his|her|their) ([a-z ]+) and took out the "
                             r"([^.]+)\.", st.text):
            start, bag, items = packs[m.group(1)]
            assert start < m.start() and bag == m.group(2)
            assert m.group(3) in items
            s = span_at(st, m.start(3))
            assert s.label == "copyable" and span_text(st, s) == " " + m.group(3)
            assert s.nats == pytest.approx(math.log(len(items)))
            assert span_at(st, m.start(2)).label == "copyable"   # the bag is copied too
            recalls += 1
    assert recalls > 20


def test_thank_you_copies_the_giver():
    thanks = tuple(describe_structure()["fixed_phrases"]["thanks"])
    alt = "|".join(re.escape(t) for t in sorted(thanks, key=len, reverse=True))
    n = 0
    for st in stories(23, 1.0, 250):
        for m in re.finditer(r"\b([A-Z][a-z]+) gave ([A-Z][a-z]+) (?:a|an|some) ", st.text):
            giver = m.group(1)
            t = re.compile(rf'"(?:{alt}), ([A-Z][a-z]+)!"').search(st.text, m.end())
            assert t is not None and t.group(1) == giver
            s = span_at(st, t.start(1))
            assert s.label == "copyable" and s.nats == 0.0
            n += 1
    assert n > 20


def test_quotes_are_balanced_and_well_formed():
    for st in stories(24, 1.0, 200):
        qs = [i for i, c in enumerate(st.text) if c == '"']
        assert len(qs) % 2 == 0
        for k, i in enumerate(qs):
            if k % 2 == 0:   # opening quote
                assert st.text[i - 1] == " " and st.text[i + 1].isupper(), st.text[i - 20:i + 20]
            else:            # closing quote, right after the quoted sentence's punctuation
                assert st.text[i - 1] in ".!?" and (i + 1 == len(st.text) or st.text[i + 1] == " ")
                assert span_at(st, i).label in ("fixed", "free")


def test_pronouns_agree_with_the_character():
    kinds = describe_structure()["gendered_kinds"]
    checked = 0
    for st in stories(25, 0.7, 300):
        pron = {name: p for name, p in st.characters}
        for m in re.finditer(r"\b([A-Z][a-z]+) (?:was sad because|closed|could not find|opened|"
                             r"visited|grabbed|walked home to|fell asleep in) (his|her|their)\b",
                             st.text):
            assert POSSESSIVE[pron[m.group(1)]] == m.group(2)
            checked += 1
        for m in re.finditer(r"\ba (?:[a-z-]+ )?([a-z]+(?: [a-z]+)?) named ([A-Z][a-z]+)", st.text):
            kind, name = m.groups()
            for g in ("she", "he"):
                if kind in kinds[g]:
                    assert pron[name] in (g, "")
        assert not re.search(r"\b(He|She) were\b|\bThey was\b", st.text)
    assert checked > 300


def test_fixed_phrases_are_fixed_after_their_first_word():
    seen = 0
    for st in stories(26, 0.3, 300):
        if st.text.startswith("Once upon a time,"):
            first, second = st.spans[0], st.spans[1]
            assert (first.start, first.end, first.label) == (0, 4, "free")
            assert second.label == "fixed" and span_text(st, second).startswith(" upon a time,")
            seen += 1
        for m in re.finditer(r"Ready or not, here I come!", st.text):
            s = span_at(st, m.start())
            assert s.label == "fixed" and s.end >= m.end()
    assert seen > 20


def test_counting_sequences():
    words = L._tables()["number"]
    n = 0
    for st in stories(27, 1.0, 300):
        for m in re.finditer(r"saw (\w+) [a-z ]+\. (?:He|She|They) counted them: ([a-z, ]+)\.",
                             st.text):
            k = words.index(m.group(1)) + 1
            assert m.group(2) == ", ".join(words[:k])
            assert span_at(st, m.start(2)).label == "fixed"
            n += 1
        for m in re.finditer(r"counted the [a-z ]+: ([a-z, ]+)\. There were (\w+) ", st.text):
            seq = m.group(1).split(", ")
            assert seq == list(words[:len(seq)]) and m.group(2) == seq[-1]
            assert span_at(st, m.start(2)).label == "copyable"
            n += 1
    assert n > 30


def test_texts_look_like_ordinary_english():
    for st in stories(28, 1.0, 200):
        t = st.text
        assert t.isascii() and "  " not in t and "\n" not in t
        assert not re.search(r" [.,!?:]", t)
        assert re.fullmatch(r"[A-Z].*[.!\"]", t)
        for sent in re.split(r"(?<=[.!?]) (?=[A-Z\"])", t):
            assert sent[0].isupper() or sent[0] == '"'


def test_nesting_happens():
    eps = [e for st in stories(29, 1.0, 300) for e in st.episodes]
    assert any(e.startswith("dream/") for e in eps)
    assert any(e.startswith("tale/") for e in eps)
    kinds = {e.split("/")[-1] for e in eps} - {"opening", "ending"}
    assert len(kinds) >= 18


# ------------------------------------------------------------------------- vocabulary, difficulty

def test_vocabulary_has_thousands_of_real_words():
    vocab = vocabulary()
    assert len(vocab) > 3500
    g = StoryGenerator(seed=30, difficulty=1.0)
    seen = set()
    for t in (g.text(i) for i in range(2000)):
        seen.update(w for w in (x.lower() for x in re.findall(r"[A-Za-z][A-Za-z'-]*", t))
                    if w in vocab)
    assert len(seen) > 3000


def test_difficulty_makes_stories_longer_and_less_predictable():
    stats = []
    for d in (0.0, 0.5, 1.0):
        sts = stories(31, d, 300)
        chars = sum(len(s.text) for s in sts)
        words = [len(s.text.split()) for s in sts]
        stats.append((math.fsum(s.entropy_nats for s in sts) / chars, sum(words) / len(words)))
        assert 70 <= sum(words) / len(words) <= 400
    (e0, w0), (e5, w5), (e1, w1) = stats
    assert e0 < e5 < e1
    assert w0 < w5 < w1
    assert e1 > e0 * 1.1


# ----------------------------------------------------------------------------- entropy is right

def _writer(difficulty: float, seed: int) -> "W.Writer":
    return W.Writer(L._lex(difficulty), random.Random(seed))


def test_hazard_steps_sum_to_the_length_choice():
    for lo, hi in ((1, 1), (2, 3), (2, 7), (3, 9), (1, 4)):
        total = 0.0
        for L in range(lo, hi + 1):
            nats = math.fsum(W._hz(m, L, lo, hi) for m in range(1, L + 1))
            assert nats == pytest.approx(math.log(hi - lo + 1))
            total += math.exp(-nats)
        assert total == pytest.approx(1.0)


def test_pool_probabilities():
    for d in (0.0, 1.0):
        lex = L._lex(d)
        for pool in (lex.thing, lex.food, lex.opener, lex.places[0], lex.adverb):
            assert math.fsum(pool.p) == pytest.approx(1.0)
            assert all(abs(math.exp(-n) - p) < 1e-12 for n, p in zip(pool.nl, pool.p))


def _check_enumerated(outcomes: dict[str, list[float]], n: int) -> None:
    """Every distinct text got one -log p; these p sum to 1 (so the choices are a proper
    distribution that the text identifies) and match the empirical frequencies."""
    total = 0.0
    for text, nats in outcomes.items():
        assert max(nats) - min(nats) < 1e-9, text
        p = math.exp(-nats[0])
        total += p
        assert abs(len(nats) / n - p) < 5 * math.sqrt(p * (1 - p) / n) + 1e-3, text
    assert total == pytest.approx(1.0, abs=1e-9)


def test_lexicon_keeps_choices_identifiable_from_the_text():
    """Guards of exactness: an optional adjective followed by a noun must not spell another noun
    of the same slot, list items must not contain ' and ', places must tell their habitat."""
    t = L._tables()
    pairs = [(t["adj_person"], [k for ks in t["kinds"] for k in ks])]
    pairs += [(t["adj_person"], an) for an in t["animals"]]
    pairs += [(t["adj_thing"], t["toy"]), (t["adj_thing"], t["tree"])]
    for adjs, nouns in pairs:
        names = {n[0] for n in nouns}
        assert not [(a[0], n[0]) for a in adjs for n in nouns if f"{a[0]} {n[0]}" in names]
    for sec in ("thing", "food", "toy", "furniture"):
        assert not [n[0] for n in t[sec] if " and " in n[0] or "," in n[0]]
    places = [p for ps in t["places"] for p in ps]
    assert len(places) == len(set(places))
    # no two entries of one pool read the same (the text must tell which one was drawn)
    lex = L._lex(1.0)
    pools = [v for v in vars(lex).values() if isinstance(v, L._Pool)]
    pools += [p for k in ("kinds", "places", "animals", "finds") for p in getattr(lex, k)]
    for pool in pools:
        surface = [x[0] if isinstance(x, tuple) else x for x in pool.items]
        assert len(surface) == len(set(surface)), surface
    for sec in ("opener", "when", "closer", "moral", "greeting", "thanks", "ability"):
        heads = [h for h, _ in t[sec]]
        assert len(heads) == len(set(heads))


def test_list_choice_matches_empirical_frequencies():
    lex = L._lex(0.5)
    pool = L._Pool([L._noun(w) for w in ("cup", "map", "~honey", "apple")], s=1.0)
    outcomes: dict[str, list[float]] = defaultdict(list)
    n = 30000
    for k in range(n):
        w = W.Writer(lex, random.Random(k))
        w.noun_list(pool, 2, 3)
        nats = math.fsum(w.choice_nats)
        assert abs(math.fsum(x for _, _, x in w.marks) - nats) < 1e-12
        outcomes[w.text()].append(nats)
    assert len(outcomes) == 4 * 3 + 4 * 3 * 2     # ordered lists of 2 or 3 distinct items
    _check_enumerated(outcomes, n)


def test_made_up_names_match_empirical_frequencies_including_exclusion():
    lex = L._lex(0.5)        # names of 2..3 syllables
    tiny = L._Lex.__new__(L._Lex)
    tiny.__dict__.update(lex.__dict__)
    tiny.onset, tiny.vowel = ("B", "Kr"), ("a", "oo")
    tiny.medial, tiny.coda = ("l", "nd"), ("", "x")
    # "Bala" = B-a-l-a + no coda, 2 syllables: p = 1/2 (syllables) * 1/2**5 (parts)
    for taken in ({}, {"Bala": 6 * math.log(2)}):
        outcomes: dict[str, list[float]] = defaultdict(list)
        n = 25000
        for k in range(n):
            w = W.Writer(tiny, random.Random(k))
            w.name_nats = dict(taken)     # a name already in the story is never drawn again
            name = w.new_name()
            assert name not in taken
            outcomes[name].append(math.fsum(w.choice_nats))
        assert len(outcomes) == 2 * 2 * 2 * 2 * 2 + 2 * 2 * 4 * 4 * 2 - len(taken)
        _check_enumerated(outcomes, n)


def test_opener_nats_match_the_empirical_frequency():
    counts: Counter = Counter()
    nats: dict[str, set] = defaultdict(set)
    sts = stories(32, 0.0, 2000)
    for st in sts:
        first = st.spans[0]
        t = span_text(st, first)
        counts[t] += 1
        nats[t].add(round(first.nats, 12))
    assert len(counts) == len(describe_structure()["fixed_phrases"]["openers"])
    for t, c in counts.items():
        (n,) = nats[t]
        p = math.exp(-n)
        assert abs(c / len(sts) - p) < 5 * math.sqrt(p * (1 - p) / len(sts)), t
    assert math.fsum(math.exp(-next(iter(v))) for v in nats.values()) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- description

def test_describe_structure_is_json_and_complete():
    d = describe_structure()
    json.dumps(d)
    assert d["generator_version"] == GENERATOR_VERSION
    assert set(d["labels"]) == set(LABELS)
    assert len(d["episode_types"]) >= 10 and set(d["nesting"]) <= set(d["episode_types"])
    assert "Once upon a time," in d["fixed_phrases"]["openers"]
    assert d["vocabulary_size"] == len(vocabulary())
    for key in ("0.0", "0.5", "1.0"):
        assert 0 <= d["difficulty"][key]["vocab_fraction"] <= 1
    # every episode type that can be drawn is documented and actually occurs
    eps = {e.split("/")[-1] for st in stories(29, 1.0, 300) for e in st.episodes}
    assert set(d["episode_types"]) <= eps
