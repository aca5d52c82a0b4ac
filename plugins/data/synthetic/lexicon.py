"""The word lists of the synthetic stories and the distributions drawn from them.

`lexicon.txt` (next to this file) is parsed once into difficulty-independent tables (`_tables`:
nouns with their articles and plurals, phrases split at the word that tells them apart, the
association facts, the parts of made-up names); `_Lex(difficulty)` cuts every list to the
difficulty's vocabulary prefix and gives it Zipf weights (`_Pool`). The numbers a difficulty sets
are `_Params` (`difficulty_parameters` for docs). Only the standard library is used.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache
from itertools import accumulate
from pathlib import Path

_LEXICON_PATH = Path(__file__).with_name("lexicon.txt")


# --------------------------------------------------------------------------------------- lexicon

_AN_PREFIXES = ("hour", "honest", "honour", "heir")
_A_PREFIXES = ("uni", "use", "usu", "eu", "one", "once", "ewe", "uk", "ut")


def _article(word: str) -> str:
    w = word.lower()
    if w.startswith(_AN_PREFIXES):
        return "an"
    if w.startswith(_A_PREFIXES):
        return "a"
    return "an" if w[0] in "aeiou" else "a"


def _plural_word(w: str) -> str:
    if w.endswith(("s", "x", "z", "ch", "sh")):
        return w + "es"
    if w.endswith("y") and len(w) > 1 and w[-2] not in "aeiou":
        return w[:-1] + "ies"
    return w + "s"


def _plural(phrase: str) -> str:
    for sep in (" of ", " in ", " and "):
        if sep in phrase:
            head, tail = phrase.split(sep, 1)
            return _plural(head) + sep + tail
    if " " in phrase:
        head, last = phrase.rsplit(" ", 1)
        return head + " " + _plural_word(last)
    return _plural_word(phrase)


@lru_cache(maxsize=1)
def _raw_lexicon() -> dict[str, tuple[str, ...]]:
    """Sections of lexicon.txt -> entries in file order, duplicates dropped."""
    sections: dict[str, list[str]] = {}
    seen: dict[str, set[str]] = {}
    cur = None
    lines_mode = False
    for line in _LEXICON_PATH.read_text(encoding="utf-8").splitlines():
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        if s.startswith("@"):
            head = s[1:].split()
            cur = head[0]
            lines_mode = len(head) > 1 and head[1] == "lines"
            sections.setdefault(cur, [])
            seen.setdefault(cur, set())
            continue
        if cur is None:
            raise ValueError(f"lexicon.txt: entry before the first section: {s!r}")
        for e in [s] if lines_mode else s.split():
            if e not in seen[cur]:
                seen[cur].add(e)
                sections[cur].append(e)
    return {k: tuple(v) for k, v in sections.items()}


def _noun(raw: str) -> tuple[str, str, str, bool]:
    """'~honey' / 'mouse|mice' / 'teddy_bear' -> (singular, 'a singular', plural, is_mass)."""
    mass = raw.startswith("~")
    raw = raw.lstrip("~")
    sg, _, pl = raw.partition("|")
    sg = sg.replace("_", " ")
    if mass:
        return (sg, "some " + sg, sg, True)
    pl = pl.replace("_", " ") if pl else _plural(sg)
    return (sg, _article(sg) + " " + sg, pl, False)


def _adj(raw: str) -> tuple[str, str]:
    w = raw.replace("_", " ")
    return (w, _article(w) + " " + w)


def _phrases(lines) -> tuple[tuple[str, str], ...]:
    """Split each phrase into (shortest word prefix telling it apart from the others, rest)."""
    words = [ln.replace("_", " ").split(" ") for ln in lines]
    out = []
    for w in words:
        for k in range(1, len(w) + 1):
            if sum(1 for o in words if o[:k] == w[:k]) == 1:
                break
        out.append((" ".join(w[:k]), "".join(" " + t for t in w[k:])))
    return tuple(out)


_HABITATS = ("farm", "forest", "beach", "river", "mountain", "jungle", "desert", "arctic",
             "garden", "town", "castle")


@lru_cache(maxsize=1)
def _tables() -> dict:
    """Difficulty-independent parsed tables."""
    raw = _raw_lexicon()
    t: dict = {"raw": raw}
    nouns = lambda sec: tuple(_noun(e) for e in raw[sec])  # noqa: E731
    # places are unique across habitats, so a place word tells its habitat
    seen_places: set[str] = set()
    places, animals, finds = [], [], []
    for h in _HABITATS:
        ps = []
        for e in raw["place." + h]:
            p = e.replace("_", " ")
            if p not in seen_places:
                seen_places.add(p)
                ps.append(p)
        places.append(tuple(ps))
        animals.append(nouns("animal." + h))
        finds.append(nouns("find." + h))
    t["places"], t["animals"], t["finds"] = tuple(places), tuple(animals), tuple(finds)
    kinds_she, kinds_he, kinds_any = nouns("kind_she"), nouns("kind_he"), nouns("kind_any")
    taken = {k[0] for k in kinds_she + kinds_he + kinds_any}
    if len(taken) != len(kinds_she) + len(kinds_he) + len(kinds_any):
        raise ValueError("lexicon.txt: a character kind is listed in two kind sections")
    kinds_animal, seen_a = [], set(taken)
    for hab in animals:
        for a in hab:
            if a[0] not in seen_a:
                seen_a.add(a[0])
                kinds_animal.append(a)
    t["kinds"] = (kinds_she, kinds_he, kinds_any, tuple(kinds_animal))
    for sec in ("thing", "toy", "clothing", "bag", "house", "furniture", "tool", "instrument",
                "vehicle", "flower", "tree", "food_count"):
        t[sec] = nouns(sec)
    # interleave count and mass foods so that both occur among the frequent ranks
    fc, fm = nouns("food_count"), nouns("food_mass")
    food, seen_f = [], set()
    for i in range(max(len(fc), len(fm))):
        for f in ([fc[i]] if i < len(fc) else []) + ([fm[i]] if i < len(fm) else []):
            if f[0] not in seen_f:
                seen_f.add(f[0])
                food.append(f)
    t["food"] = tuple(food)
    for sec in ("adj_person", "adj_thing"):
        t[sec] = tuple(_adj(e) for e in raw[sec])
    for sec in ("adj_place", "colour", "feeling", "taste", "adverb", "say", "songverb", "body",
                "activity", "game", "prep", "settlement", "exclaim", "drink"):
        t[sec] = tuple(e.replace("_", " ") for e in raw[sec])
    t["move"] = tuple(e.split("|")[0] for e in raw["move"])
    for sec in ("opener", "when", "closer", "moral", "greeting", "thanks", "ability"):
        t[sec] = _phrases(raw[sec])
    t["family"] = tuple((e.split(":")[0].replace("_", " "), e.split(":")[1]) for e in raw["family"])
    assoc = lambda sec: {a.replace("_", " "): b.replace("_", " ")  # noqa: E731
                         for a, b in (e.split(":", 1) for e in raw[sec])}
    t["sound"], t["baby"], t["home"] = assoc("sound"), assoc("baby"), assoc("home")
    t["job"] = tuple(tuple(f.replace("_", " ") for f in e.split(":")) for e in raw["job"])
    wsent = _phrases([e.split(":")[1] for e in raw["weather"]])
    t["weather"] = tuple((h, tl, tuple(f.replace("_", " ") for f in e.split(":")[2:]))
                         for (h, tl), e in zip(wsent, raw["weather"]))
    opp = tuple(tuple(e.split(":")) for e in raw["opposite"])
    flat = [w for pair in opp for w in pair]
    if len(flat) != len(set(flat)):
        raise ValueError("lexicon.txt: a word appears in two opposite pairs")
    t["opposite"] = opp
    t["number"] = raw["number"]
    # made-up names: consonant runs and vowel runs alternate, so the parse is unique
    t["name_onset"], t["name_vowel"] = raw["name_onset"], raw["name_vowel"]
    t["name_medial"] = raw["name_medial"]
    t["name_coda"] = tuple(c.replace("_", "") for c in raw["name_coda"])
    vow = set("aeiou")
    for c in t["name_onset"] + t["name_medial"] + t["name_coda"]:
        if vow & set(c.lower()):
            raise ValueError(f"lexicon.txt: name consonant cluster with a vowel: {c!r}")
    for v in t["name_vowel"]:
        if not set(v) <= vow:
            raise ValueError(f"lexicon.txt: name vowel with a consonant: {v!r}")
    t["town_onset"], t["town_suffix"] = raw["town_onset"], raw["town_suffix"]
    towns = [a + b for a in t["town_onset"] for b in t["town_suffix"]]
    if len(towns) != len(set(towns)):
        raise ValueError("lexicon.txt: two (onset, suffix) pairs spell the same town name")
    return t


@lru_cache(maxsize=1)
def vocabulary() -> frozenset[str]:
    """Every real (lower-case) word the lexicon can put into a story, excluding made-up names."""
    raw = _raw_lexicon()
    words: set[str] = set()
    skip = ("name_onset", "name_vowel", "name_medial", "name_coda", "town_onset", "town_suffix")
    for sec, entries in raw.items():
        if sec in skip:
            continue
        for e in entries:
            if sec == "move":       # "ran|run": only the past tense is ever written
                e = e.split("|")[0]
            for field in re.split(r"[:|]", e.lstrip("~")):
                for w in re.findall(r"[A-Za-z][A-Za-z'-]*", field.replace("_", " ")):
                    words.add(w.lower())
    t = _tables()
    for pool in (t["kinds"] + t["animals"] + t["finds"] + (t["thing"], t["toy"], t["food"])):
        for n in pool:
            words.update(w.lower() for w in n[2].split())
    return frozenset(words)


# --------------------------------------------------------------------------------------- pools

class _Pool:
    """A categorical distribution over a prefix of a list, Zipf weights ``(rank + 1) ** -s``."""

    __slots__ = ("items", "n", "cum", "tot", "nl", "p", "uni")

    def __init__(self, items, s: float = 0.0, frac: float = 1.0, min_n: int = 12):
        items = tuple(items)
        n = len(items)
        if frac < 1.0:
            n = max(min(min_n, n), int(math.ceil(frac * n)))
        self.items = items[:n]
        self.n = n
        w = [(k + 1.0) ** -s for k in range(n)]
        self.uni = s == 0.0
        cum = list(accumulate(w))
        self.tot = tot = cum[-1]
        self.cum = [c / tot for c in cum]     # normalised: bisect a uniform u in [0, 1)
        self.cum[-1] = 1.0
        self.p = [x / tot for x in w]
        self.nl = [-math.log(p) for p in self.p]


@dataclass(frozen=True)
class _Params:
    difficulty: float
    vocab_fraction: float   # prefix of each word list in use
    zipf: float             # exponent of the rank weights
    episodes_min: int
    episodes_max: int
    p_stop: float           # chance to end after each episode beyond episodes_min
    list_max: int           # packed/eaten lists have 2..list_max items
    count_max: int          # counting sequences run 3..count_max
    search_max: int         # hide-and-seek / lost-and-found searches 1..search_max places
    gap_max: int            # sentences between "A gave B the Z" and "Thank you, A" 0..gap_max
    max_chars: int          # characters per (sub)story, hero included
    max_depth: int          # nesting depth of dreams / stories within the story
    sub_max: int            # episodes inside a dream or inner story 1..sub_max
    name_syllables_max: int  # made-up names have 2..name_syllables_max syllables
    p_adj: float            # chance of an optional adjective
    p_adv: float            # chance of an optional adverb after a movement verb
    p_tag_adv: float        # chance of an optional adverb after 'said A'
    refrains: int           # times a song's refrain is repeated
    max_nests: int          # dreams + inner stories per story


def difficulty_parameters(difficulty: float) -> dict:
    """The knobs a difficulty in [0, 1] sets (for docs and `qtoy data preview`)."""
    return dict(_params(float(difficulty)).__dict__)


def _params(d: float) -> _Params:
    if not 0.0 <= d <= 1.0:
        raise ValueError(f"difficulty must be within [0, 1], got {d}")

    def up(lo: int, span: int) -> int:       # lo + span * d, rounded half up
        return lo + int(span * d + 0.5)

    def lin(a: float, b: float) -> float:    # a + (b - a) * d
        return round(a + (b - a) * d, 9)

    return _Params(
        difficulty=d,
        vocab_fraction=lin(0.25, 1.0),
        zipf=lin(1.0, 0.5),
        episodes_min=up(2, 2),
        episodes_max=up(4, 5),
        p_stop=lin(0.4, 0.25),
        list_max=up(3, 4),
        count_max=up(5, 4),
        search_max=up(2, 2),
        gap_max=up(0, 3),
        max_chars=up(2, 3),
        max_depth=up(1, 1),
        sub_max=up(1, 1),
        name_syllables_max=up(2, 2),
        p_adj=lin(0.3, 0.85),
        p_adv=lin(0.2, 0.7),
        p_tag_adv=lin(0.1, 0.5),
        refrains=up(1, 1),
        max_nests=up(1, 1),
    )


_PR = (
    ("he", "him", "his", "He", "His", "was"),
    ("she", "her", "her", "She", "Her", "was"),
    ("they", "them", "their", "They", "Their", "were"),
)
_KIND_P = (0.25, 0.25, 0.2, 0.3)          # she-kinds, he-kinds, other people, animals
_GENDER_P = (0.45, 0.45, 0.10)            # lazily chosen pronoun of a gender-neutral kind
_LOG = [0.0] + [math.log(k) for k in range(1, 1025)]


class _Lex:
    """Pools and parameters for one difficulty."""

    def __init__(self, d: float):
        t = _tables()
        p = self.params = _params(d)
        s, frac = p.zipf, p.vocab_fraction

        def pool(items, full=False, zipf=None):
            return _Pool(items, s if zipf is None else zipf, 1.0 if full else frac)

        self.kinds = tuple(pool(k) for k in t["kinds"])
        self.kind_p = _KIND_P
        self.kind_nl = tuple(-math.log(x) for x in _KIND_P)
        self.gender_nl = tuple(-math.log(x) for x in _GENDER_P)
        self.places = tuple(pool(x) for x in t["places"])
        self.animals = tuple(pool(x) for x in t["animals"])
        self.finds = tuple(pool(x) for x in t["finds"])
        self.n_hab = len(_HABITATS)
        self.all_animals = pool(t["kinds"][3])
        self.all_places = pool([pl for ps in t["places"] for pl in ps])
        for sec in ("thing", "toy", "clothing", "bag", "house", "furniture", "tool", "instrument",
                    "vehicle", "flower", "tree", "food", "food_count", "adj_person", "adj_thing",
                    "adj_place", "colour", "feeling", "taste", "adverb", "say", "songverb",
                    "body", "activity", "game", "move", "family", "job", "opposite", "drink"):
            setattr(self, sec, pool(t[sec]))
        for sec in ("opener", "when", "closer", "moral", "greeting", "thanks", "ability",
                    "weather", "exclaim", "settlement"):
            setattr(self, sec, pool(t[sec], full=True, zipf=0.5 * s))
        self.prep = pool(t["prep"], full=True, zipf=0.0)
        self.sound, self.baby, self.home = t["sound"], t["baby"], t["home"]
        self.number = t["number"]
        self.onset, self.vowel = t["name_onset"], t["name_vowel"]
        self.medial, self.coda = t["name_medial"], t["name_coda"]
        self.town_onset, self.town_suffix = t["town_onset"], t["town_suffix"]
        self.episode_cache: dict = {}


@lru_cache(maxsize=16)
def _lex(d: float) -> _Lex:
    return _Lex(d)
