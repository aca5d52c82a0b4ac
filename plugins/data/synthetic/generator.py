"""Procedurally generated children's stories with exact entropy and per-character labels.

`StoryGenerator(seed, difficulty)` yields an infinite, seeded stream of short English children's
stories. Every random choice the generator makes is drawn from an explicit distribution, so each
story comes with ground truth:

* ``Story.entropy_nats`` -- the self-information of the story under the generating process: the sum
  over every random choice of ``-log p(choice)``. The generator is designed so that the text
  determines the sequence of choices (names split back into syllables in one way, list items are
  distinct, place words are unique across habitats, template variants differ in their words, ...),
  in which case this is exactly ``-log P(text)``. Where two choice sequences could spell the same
  text (a handful of rare coincidences, see README.md) it is an upper bound.
* ``Story.spans`` -- labelled character spans tiling the text:
  ``"free"``: text realising fresh random choices, carrying their nats;
  ``"copyable"``: a repeat of something earlier in the story (a name, a recalled list item, the
  "A" in "thank you, A"), carrying the nats of the choice that selected *which* earlier thing is
  repeated when that was itself a random choice, else 0;
  ``"fixed"``: text fully determined by what came before (template words, punctuation, closing
  quotes, the rest of a fixed phrase after its distinguishing first word(s), counting sequences,
  association facts such as an animal's sound), 0 nats.
  A choice that is not spelled out where it is made (which template variant, whether an optional
  sentence comes, when a list or count stops, which episode comes next) is charged to the next
  fixed-or-free span, i.e. the word where the text reveals it; that span is then labelled free
  (only its first word: "One morning, ..." -> "One morning" free, " ..." fixed). Leading spaces
  belong to the following word's span, like GPT-2-style BPE tokens (" upon").
  ``sum(span.nats) == entropy_nats`` (up to float rounding).

Only the standard library is used; output does not depend on PYTHONHASHSEED. Story ``i`` of a seed
is generated alone from a private ``random.Random`` seeded by a BLAKE2 hash of
``(seed, i, GENERATOR_VERSION)``, so any story can be regenerated without its predecessors.
The word lists live in ``lexicon.txt`` next to this file; the planted structure is documented in
``README.md`` and, machine-readably, by :func:`describe_structure`.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from bisect import bisect_right
from dataclasses import dataclass
from functools import lru_cache
from itertools import accumulate, count
from pathlib import Path
from typing import Iterator

__all__ = [
    "GENERATOR_VERSION",
    "LABELS",
    "Span",
    "Story",
    "StoryGenerator",
    "describe_structure",
    "difficulty_parameters",
    "vocabulary",
]

#: Bump whenever the text produced for a (seed, index, difficulty) changes; used as a cache key.
GENERATOR_VERSION = "1.0"

#: The span labels, in a fixed order.
LABELS = ("fixed", "copyable", "free")
_FX, _CP, _FR = 0, 1, 2

_LEXICON_PATH = Path(__file__).with_name("lexicon.txt")


@dataclass(frozen=True, slots=True)
class Span:
    """Characters ``text[start:end]`` of a story, their label and the nats they carry."""

    start: int
    end: int
    label: str  # one of LABELS
    nats: float


@dataclass(frozen=True)
class Story:
    """One generated story with its ground truth.

    ``episodes`` lists the episode types in order of appearance ("opening", "journey", ...,
    "ending"); episodes nested inside a dream or a story-within-the-story are prefixed with
    their container's path ("dream/count", "tale/meet"). ``characters`` lists every made-up
    character name with the subject pronoun the story settled on ("he", "she", "they"; "" if the
    story never used a pronoun for that character). ``choices`` is the number of random choices.
    """

    text: str
    entropy_nats: float
    spans: tuple[Span, ...]
    episodes: tuple[str, ...]
    characters: tuple[tuple[str, str], ...] = ()
    choices: int = 0


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


# episode table: name, weight, requirements. Episodes not in _REPEATABLE happen at most once per
# (sub)story; no episode type follows itself.
_N2, _NEWCHAR, _PACKED, _NOBAG, _ITEMS, _MEMORY, _NEST = 1, 2, 4, 8, 16, 32, 64
_EPISODES = (
    ("journey", 3.0, 0), ("meet", 3.0, _NEWCHAR), ("pack", 2.5, _NOBAG), ("use", 5.0, _PACKED),
    ("gift", 4.0, _N2), ("count", 1.5, 0), ("hide", 2.5, _N2), ("lost", 2.0, _ITEMS),
    ("weather", 1.5, 0), ("meal", 1.5, 0), ("song", 1.5, 0), ("animal", 2.0, 0),
    ("opposite", 1.5, 0), ("job", 1.5, 0), ("fix", 2.5, _N2), ("letter", 2.0, _N2),
    ("market", 1.5, 0), ("remember", 3.0, _MEMORY), ("dream", 1.0, _NEST), ("tale", 1.0, _NEST),
)
_REPEATABLE = ("journey", "meet", "gift", "count", "animal", "use", "remember")
_EPISODE_BIT = {name: (0 if name in _REPEATABLE else 1 << i)
                for i, (name, _, _) in enumerate(_EPISODES)}
_EPISODE_DOC = {
    "opening": "opener phrase ('Once upon a time,'), hero introduced with a made-up name, home, "
               "town (made-up name), trait, favourite food, a worn possession",
    "journey": "hero goes to a new place (unique to one habitat); optional animal on the way; "
               "the place is described; optional find / tree and flower",
    "meet": "a new character with a made-up name is introduced; greetings swap the names "
            "('Hello, A!' said B. 'Hello, B!' said A.); optional game",
    "pack": "the hero packs a bag with a list of 2..list_max distinct things",
    "use": "the hero takes one packed item out of the bag (long-range recall of a list item)",
    "gift": "A gave B a Z; 0..gap_max filler sentences; 'Thank you, A!' said B (skip-trigram)",
    "count": "counting sequence 'one, two, three...' either announced ('saw five ducks') or "
             "open-ended and then copied ('There were five ducks!')",
    "hide": "hide and seek: counting to five/ten in quotes, searches until the hider is found",
    "lost": "the hero loses an earlier item (possession, gift or packed item) and searches",
    "weather": "weather changes; the hero grabs an item associated with that weather",
    "meal": "the hero eats a list of foods and praises one of them (recall); favourite food "
            "from the opening may be recalled",
    "song": "a refrain 'Hop, hop, little frog, over the bridge!' sung, then repeated verbatim",
    "animal": "the hero meets an animal of the current habitat; association facts: its sound, "
              "its baby, its home",
    "opposite": "two things, one ADJ and the other ANTONYM (fixed); one of them is kept",
    "job": "a relative's job; workplace and what they do are fixed by the job",
    "fix": "B's toy is broken, 'Can you help me, A?', A fixes it, 'Thank you, A!'",
    "letter": "'Dear B, ... Love, A.' letter structure",
    "market": "buys N things, eats one, 'Now she had N-1 things left' (arithmetic)",
    "remember": "long-range recall of an earlier gift ('the kite that A had given her') or place",
    "dream": "nesting: a dream containing 1..sub_max sub-episodes, then waking up",
    "tale": "nesting: a relative tells a story-within-the-story with its own opening, "
            "characters and 1..sub_max sub-episodes",
    "ending": "going home (town/house copied), optional recap of the places visited in order, "
              "optional moral, closer ('The end.')",
}

_PR = (
    ("he", "him", "his", "He", "His", "was"),
    ("she", "her", "her", "She", "Her", "was"),
    ("they", "them", "their", "They", "Their", "were"),
)
_KIND_P = (0.25, 0.25, 0.2, 0.3)          # she-kinds, he-kinds, other people, animals
_GENDER_P = (0.45, 0.45, 0.10)            # lazily chosen pronoun of a gender-neutral kind
_ROUTES = ("over", "under", "around", "across", "through", "past")
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


# --------------------------------------------------------------------------------------- writer

class _Char:
    __slots__ = ("name", "kind", "g")

    def __init__(self, name: str, kind: str, g: int):
        self.name, self.kind, self.g = name, kind, g


class _Frame:
    """What a (sub)story knows: its characters and the things that can be recalled."""

    __slots__ = ("hero", "chars", "town", "house", "place", "hab", "visited", "bag", "packed",
                 "gifts", "items", "fav", "used")

    def __init__(self):
        self.hero = None
        self.chars: list[_Char] = []
        self.town = self.house = self.place = self.bag = self.fav = None
        self.hab = -1
        self.used = 0       # bit mask of the one-off episode types already told
        self.visited: list[str] = []
        self.packed: list[str] = []
        self.gifts: list[tuple[_Char, _Char, str]] = []
        self.items: list[tuple[_Char, str]] = []


class _Writer:
    """Writes one story: text pieces, labels of the non-fixed pieces, and every choice's nats."""

    def __init__(self, lex: _Lex, rng: random.Random, spans: bool = True):
        self.x = lex
        self.p = lex.params
        self.r = rng.random
        self.T: list[str] = []                          # text pieces
        self.M: list[tuple[int, int, float]] = []       # (piece index, label, nats), non-fixed
        self.pn = 0.0                                   # nats waiting for the next fixed/free span
        self.ch: list[float] = []                       # nats of every random choice
        self.names: dict[str, float] = {}
        self.towns: dict[str, float] = {}
        self.eps: list[str] = []
        self.all_chars: list[_Char] = []
        self.f = _Frame()
        self.depth = 0
        self.nests = 0
        self.prefix = ""
        if not spans:
            # text only: same random draws, no labels (instance attributes shadow the methods)
            app = self.T.append
            self.fx = app
            self.fr = self.cp = lambda s, n=0.0: app(s)
            self.pend = _ignore

    # ---- emitting text
    def fx(self, s: str) -> None:
        """Template text: fixed, unless a pending choice is revealed here (then its first word
        becomes a free span carrying the pending nats)."""
        if self.pn:
            i = s.find(" ", 1)
            T = self.T
            if i > 0:
                T.append(s[:i])
                self.M.append((len(T) - 1, _FR, self.pn))
                T.append(s[i:])
            else:
                T.append(s)
                self.M.append((len(T) - 1, _FR, self.pn))
            self.pn = 0.0
        else:
            self.T.append(s)

    def fr(self, s: str, n: float) -> None:
        """Text realising a random choice that carries ``n`` nats (+ any pending nats)."""
        T = self.T
        T.append(s)
        n += self.pn
        if n:                       # a one-option "choice" is just fixed text
            self.M.append((len(T) - 1, _FR, n))
            self.pn = 0.0

    def cp(self, s: str, n: float = 0.0) -> None:
        T = self.T
        T.append(s)
        self.M.append((len(T) - 1, _CP, n))

    def pend(self, n: float) -> None:
        self.pn += n

    # ---- random choices (each logs its nats once)
    def pick(self, pool: _Pool):
        if pool.uni:
            i = int(self.r() * pool.n)
        else:
            i = bisect_right(pool.cum, self.r())   # < n as cum[-1] == 1.0 > u
        n = pool.nl[i]
        self.ch.append(n)
        return pool.items[i], n

    def pick_ex(self, pool: _Pool, ex: list[int]):
        """Like pick, excluding the indices in ``ex`` (exact conditional probability)."""
        r, cum, nn = self.r, pool.cum, pool.n
        while True:
            i = int(r() * nn) if pool.uni else bisect_right(cum, r())
            if i not in ex:
                break
        n = pool.nl[i]
        if ex:
            n += math.log1p(-sum(pool.p[j] for j in ex))
        self.ch.append(n)
        return i, n

    def uni(self, k: int):
        if k <= 1:
            return 0, 0.0
        i = int(self.r() * k)
        n = _LOG[k]
        self.ch.append(n)
        return i, n

    def bern(self, p: float):
        if self.r() < p:
            n = -math.log(p)
            self.ch.append(n)
            return True, n
        n = -math.log1p(-p)
        self.ch.append(n)
        return False, n

    def cat(self, probs, nls):
        u = self.r()
        acc = 0.0
        for i, q in enumerate(probs):
            acc += q
            if u < acc:
                break
        n = nls[i]
        self.ch.append(n)
        return i, n

    def length(self, lo: int, hi: int):
        """Uniform length in [lo, hi]; its nats are realised step by step, see _hz."""
        k = hi - lo + 1
        if k <= 1:
            return lo, 0.0
        L = lo + int(self.r() * k)
        self.ch.append(_LOG[k])
        return L, _LOG[k]

    def choose(self, cands: list):
        i, n = self.uni(len(cands))
        return cands[i], n

    # ---- small phrases
    def nm(self, c: _Char, n: float = 0.0) -> None:
        self.cp(" " + c.name, n)

    def pro(self, c: _Char, form: int) -> None:
        """Pronoun of c (form: 0 he, 1 him, 2 his, 3 He, 4 His, 5 was/were). A gender-neutral
        character's pronoun is drawn the first time one is needed (a free span)."""
        if c.g < 0:
            g, n = self.cat(_GENDER_P, self.x.gender_nl)
            c.g = g
            self.fr(" " + _PR[g][form], n)
        else:
            self.fx(" " + _PR[c.g][form])

    def phrase(self, pool: _Pool, lead: str = " ") -> tuple[str, str]:
        (h, t), n = self.pick(pool)
        self.fr(lead + h, n)
        if t:
            self.fx(t)
        return h, t

    def when(self) -> None:
        self.phrase(self.x.when)

    def tag(self, c: _Char, n: float = 0.0) -> None:
        """' said A' with a random speech verb."""
        v, nv = self.pick(self.x.say)
        self.fr(" " + v, nv)
        self.nm(c, n)
        yes, ny = self.bern(self.p.p_tag_adv)
        if yes:
            adv, na = self.pick(self.x.adverb)
            self.fr(" " + adv, ny + na)
        else:
            self.pend(ny)

    def a_noun(self, pool: _Pool, adj_pool: _Pool | None = None, p: float = 0.0):
        """' a [adj] noun' (article agrees with the first word); returns the noun entry."""
        yes, n0 = self.bern(p) if adj_pool is not None else (False, 0.0)
        noun, n2 = self.pick(pool)
        if yes:
            adj, n1 = self.pick(adj_pool)
            self.fr(" " + ("some " + adj[0] if noun[3] else adj[1]), n0 + n1)
            self.fr(" " + noun[0], n2)
        else:
            self.fr(" " + noun[1], n0 + n2)
        return noun

    def noun_list(self, pool: _Pool, lo: int, hi: int) -> list:
        """' a cup, a map and a hat': 2..hi distinct nouns; the length is revealed by the
        separators (',' = more to come, ' and' = one more), each carrying its share of nats."""
        L, _ = self.length(lo, hi)
        ex: list[int] = []
        out = []
        for m in range(1, L + 1):
            if m > 1:
                nh = _hz(m, L, lo, hi)
                sep = " and" if m == L else ","
                if nh:
                    self.fr(sep, nh)
                else:
                    self.fx(sep)
            i, n = self.pick_ex(pool, ex)
            ex.append(i)
            it = pool.items[i]
            self.fr(" " + it[1], n)
            out.append(it)
        return out

    def search(self, seeker: _Char, found_fx, not_found_fx) -> None:
        """Searches 1..search_max places until found; each outcome sentence reveals a step."""
        x = self.x
        L, _ = self.length(1, self.p.search_max)
        ex: list[int] = []
        for m in range(1, L + 1):
            self.fx(" First," if m == 1 else " Then")
            self.pro(seeker, 0)
            self.fx(" looked")
            prep, n = self.pick(x.prep)
            self.fr(" " + prep, n)
            self.fx(" the")
            i, n = self.pick_ex(x.furniture, ex)
            ex.append(i)
            self.fr(" " + x.furniture.items[i][0], n)
            self.fx(".")
            self.pend(_hz(m, L, 1, self.p.search_max))
            (found_fx if m == L else not_found_fx)()

    # ---- made-up names
    def new_name(self) -> str:
        x, r, used = self.x, self.r, self.names
        on, vw, md, cd = x.onset, x.vowel, x.medial, x.coda
        kk = self.p.name_syllables_max - 1
        while True:
            k = 2 + int(r() * kk)
            parts = [on[int(r() * len(on))], vw[int(r() * len(vw))]]
            for _ in range(k - 1):
                parts.append(md[int(r() * len(md))])
                parts.append(vw[int(r() * len(vw))])
            parts.append(cd[int(r() * len(cd))])
            name = "".join(parts)
            if name not in used:
                break
        raw = (_LOG[kk] + _LOG[len(on)] + k * _LOG[len(vw)] + (k - 1) * _LOG[len(md)]
               + _LOG[len(cd)])
        n = raw
        if used:  # rejection of names already in the story: exact conditional probability
            n += math.log1p(-sum(math.exp(-v) for v in used.values()))
        used[name] = raw
        self.ch.append(n)
        self.fr(" " + name, n)
        return name

    def new_town(self) -> str:
        x, r, used = self.x, self.r, self.towns
        on, sf = x.town_onset, x.town_suffix
        while True:
            name = on[int(r() * len(on))] + sf[int(r() * len(sf))]
            if name not in used:
                break
        raw = _LOG[len(on)] + _LOG[len(sf)]
        n = raw + (math.log1p(-sum(math.exp(-v) for v in used.values())) if used else 0.0)
        used[name] = raw
        self.ch.append(n)
        self.fr(" " + name, n)
        return name

    def intro(self) -> _Char:
        """' a [adj] kind named Name'."""
        x = self.x
        yes, n0 = self.bern(self.p.p_adj)
        cls, n1 = self.cat(x.kind_p, x.kind_nl)
        kind, n2 = self.pick(x.kinds[cls])
        if yes:
            adj, n3 = self.pick(x.adj_person)
            self.fr(" " + adj[1], n0 + n3)
            self.fr(" " + kind[0], n1 + n2)
        else:
            self.fr(" " + kind[1], n0 + n1 + n2)
        self.fx(" named")
        name = self.new_name()
        c = _Char(name, kind[0], 1 if cls == 0 else 0 if cls == 1 else -1)
        f = self.f
        f.chars.append(c)
        if f.hero is None:
            f.hero = c
        self.all_chars.append(c)
        return c

    def new_place(self) -> None:
        x, f = self.x, self.f
        h, n1 = self.uni(x.n_hab)
        pl, n2 = self.pick(x.places[h])
        self.fr(" " + pl, n1 + n2)
        f.place, f.hab = pl, h
        f.visited.append(pl)

    def here(self) -> None:
        """' the PLACE': the current place (copied), or a new one if there is none yet."""
        self.fx(" the")
        if self.f.place is None:
            self.new_place()
        else:
            self.cp(" " + self.f.place)

    def town(self) -> None:
        s, n = self.pick(self.x.settlement)
        self.fr(" " + s, n)
        self.fx(" of")
        self.f.town = self.new_town()

    def house(self) -> None:
        self.f.house = self.a_noun(self.x.house)[0]

    # ---- story structure
    def story(self) -> None:
        self.opening(inner=False)
        self.episodes(self.p.episodes_min, self.p.episodes_max, self.p.p_stop)
        self.ending()
        if self.pn:
            raise AssertionError("unrealised choice at the end of a story")

    def episodes(self, lo: int, hi: int, p_stop: float) -> None:
        n, prev = 0, None
        while n < hi:
            if n >= lo:
                stop, ns = self.bern(p_stop)
                self.pend(ns)
                if stop:
                    return
            name = self.choose_episode(prev)
            self.eps.append(self.prefix + name)
            getattr(self, "ep_" + name)()
            prev = name
            n += 1

    def choose_episode(self, prev: str | None) -> str:
        f, p = self.f, self.p
        nc = len(f.chars)
        fail = 0
        if nc < 2:
            fail |= _N2
        if nc >= p.max_chars:
            fail |= _NEWCHAR
        if not f.packed:
            fail |= _PACKED
        else:
            fail |= _NOBAG
        if f.bag is not None:
            fail |= _NOBAG
        if not f.packed and not any(o is f.hero for o, _ in f.items):
            fail |= _ITEMS
        if not f.gifts and len(set(f.visited)) < 2:
            fail |= _MEMORY
        if self.depth >= p.max_depth or self.nests >= p.max_nests:
            fail |= _NEST
        key = (fail, prev, f.used)
        cache = self.x.episode_cache
        table = cache.get(key)
        if table is None:
            if len(cache) > 100_000:
                cache.clear()
            av = [(name, w) for name, w, need in _EPISODES
                  if name != prev and not need & fail and not _EPISODE_BIT[name] & f.used]
            tot = sum(w for _, w in av)
            cum = [c / tot for c in accumulate(w for _, w in av)]
            cum[-1] = 1.0
            table = (tuple(a[0] for a in av), cum, tuple(math.log(tot / w) for _, w in av))
            cache[key] = table
        names, cum, nls = table
        i = bisect_right(cum, self.r())
        n = nls[i]
        self.ch.append(n)
        self.pend(n)
        f.used |= _EPISODE_BIT[names[i]]
        return names[i]

    def hero_items(self) -> list[str]:
        f = self.f
        out: list[str] = []
        for owner, it in f.items:
            if owner is f.hero and it not in out:
                out.append(it)
        for it in f.packed:
            if it not in out:
                out.append(it)
        return out

    def opening(self, inner: bool) -> None:
        x, fx, fr = self.x, self.fx, self.fr
        self.eps.append(self.prefix + "opening")
        self.phrase(x.opener, " " if inner else "")
        v, n = self.uni(3)
        self.pend(n)
        if v == 0:
            fx(" there was")
            h = self.intro()
            fx(".")
            self.pro(h, 3)
            fx(" lived in")
            self.house()
            fx(" in the")
            self.town()
            fx(".")
        elif v == 1:
            fx(" in the")
            self.town()
            fx(", there lived")
            h = self.intro()
            fx(".")
            self.pro(h, 3)
            fx(" lived in")
            self.house()
            fx(" near")
            self.here()
            fx(".")
        else:
            h = self.intro()
            fx(" lived in")
            self.house()
            fx(" near")
            self.here()
            fx(". The")
            self.cp(" " + self.f.house)
            fx(" was in the")
            self.town()
            fx(".")
        self.nm(h)
        fx(" was")
        a, n = self.pick(x.adj_person)
        fr(" " + a[0], n)
        fx(" and loved")
        a, n = self.pick(x.activity)
        fr(" " + a, n)
        fx(".")
        yes, n = self.bern(0.6)
        self.pend(n)
        if yes:
            self.pro(h, 3)
            fx(" loved to eat")
            food, n = self.pick(x.food)
            fr(" " + food[2], n)
            fx(" more than anything.")
            self.f.fav = food[2]
        yes, n = self.bern(0.6)
        self.pend(n)
        if yes:
            fx(" Every day,")
            self.pro(h, 0)
            fx(" wore")
            self.pro(h, 2)
            c, n1 = self.pick(x.colour)
            cl, n2 = self.pick(x.clothing)
            fr(" " + c, n1)
            fr(" " + cl[0], n2)
            fx(".")
            self.f.items.append((h, c + " " + cl[0]))

    def ending(self) -> None:
        x, f, fx = self.x, self.f, self.fx
        h = f.hero
        self.eps.append("ending")
        v, n = self.uni(3)
        self.pend(n)
        if v == 0:
            fx(" At the end of the day,")
            self.nm(h)
            fx(" went back home to")
            self.cp(" " + f.town)
        elif v == 1:
            fx(" When the sun went down,")
            self.nm(h)
            fx(" walked home to")
            self.pro(h, 2)
            self.cp(" " + f.house)
        else:
            fx(" That night,")
            self.nm(h)
            fx(" fell asleep in")
            self.pro(h, 2)
            self.cp(" " + f.house)
            fx(" in")
            self.cp(" " + f.town)
        fx(".")
        vis = list(dict.fromkeys(f.visited))
        if len(vis) >= 2:
            yes, n = self.bern(0.3 + 0.5 * self.p.difficulty)
            self.pend(n)
            if yes:
                fx(" What a day!")
                self.pro(h, 3)
                fx(" thought about the")
                for i, pl in enumerate(vis):
                    if i:
                        fx(" and the" if i == len(vis) - 1 else ", the")
                    self.cp(" " + pl)
                fx(".")
        yes, n = self.bern(0.5)
        self.pend(n)
        if yes:
            self.nm(h)
            fx(" learned that")
            self.phrase(x.moral)
            fx(".")
        self.phrase(x.closer)

    # ---- episodes
    def ep_journey(self) -> None:
        x, f, fx, fr, p = self.x, self.f, self.fx, self.fr, self.p
        h = f.hero
        self.when()
        self.nm(h)
        yes, n = self.bern(0.2)
        if yes:
            self.pend(n)
            fx(" took the")
            v, n = self.pick(x.vehicle)
            fr(" " + v[0], n)
        else:
            mv, n2 = self.pick(x.move)
            fr(" " + mv, n + n2)
            yes, n = self.bern(p.p_adv)
            if yes:
                adv, n2 = self.pick(x.adverb)
                fr(" " + adv, n + n2)
            else:
                self.pend(n)
        fx(" to the")
        self.new_place()
        fx(".")
        yes, n = self.bern(0.5)
        self.pend(n)
        if yes:
            fx(" On the way,")
            self.pro(h, 0)
            fx(" saw")
            self.a_noun(x.animals[f.hab], x.adj_person, p.p_adj)
            fx(".")
        fx(" The")
        self.cp(" " + f.place)
        fx(" was")
        i, n = self.pick_ex(x.adj_place, [])
        fr(" " + x.adj_place.items[i], n)
        fx(" and")
        j, n = self.pick_ex(x.adj_place, [i])
        fr(" " + x.adj_place.items[j], n)
        fx(".")
        v, n = self.uni(3)
        self.pend(n)
        if v == 0:
            fx(" There,")
            self.pro(h, 0)
            fx(" found")
            it = self.a_noun(x.finds[f.hab])
            fx(".")
            f.items.append((h, it[0]))
        elif v == 1:
            self.pro(h, 3)
            fx(" sat under")
            self.a_noun(x.tree, x.adj_thing, p.p_adj)
            fx(" and picked")
            self.a_noun(x.flower)
            fx(".")

    def ep_meet(self) -> None:
        x, f, fx = self.x, self.f, self.fx
        h = f.hero
        fx(" At")
        self.here()
        fx(",")
        self.nm(h)
        fx(" met")
        c = self.intro()
        fx(".")
        fx(' "')
        g = self.phrase(x.greeting, "")
        fx(",")
        self.nm(c)
        fx('!"')
        self.tag(h)
        fx('. "')
        self.cp(g[0] + g[1])
        fx(",")
        self.nm(h)
        fx('!"')
        self.tag(c)
        fx(".")
        yes, n = self.bern(0.5)
        self.pend(n)
        if yes:
            fx(" \"Let's play")
            gm, n = self.pick(x.game)
            self.fr(" " + gm, n)
            fx('!"')
            self.tag(c)
            fx(". So they played")
            self.cp(" " + gm)
            fx(" all afternoon.")

    def ep_pack(self) -> None:
        x, f, fx = self.x, self.f, self.fx
        h = f.hero
        self.when()
        self.nm(h)
        v, n = self.uni(2)
        self.pend(n)
        fx(" was going on a trip, so" if v == 0 else " wanted to go exploring, so")
        self.pro(h, 0)
        fx(" packed")
        self.pro(h, 2)
        bag, n = self.pick(x.bag)
        self.fr(" " + bag[0], n)
        fx(". In it,")
        self.pro(h, 0)
        fx(" put")
        items = self.noun_list(x.thing, 2, self.p.list_max)
        fx(".")
        f.bag = bag[0]
        f.packed = [it[0] for it in items]
        yes, n = self.bern(0.5)
        self.pend(n)
        if yes:
            fx(' "Now I am ready!"')
            self.tag(h)
            fx(".")

    def ep_use(self) -> None:
        f, fx, cp = self.f, self.fx, self.cp
        h = f.hero
        self.when()
        self.nm(h)
        fx(" opened")
        self.pro(h, 2)
        cp(" " + f.bag)
        fx(" and took out the")
        item, n = self.choose(f.packed)
        cp(" " + item, n)
        fx(".")
        v, n = self.uni(3)
        self.pend(n)
        if v == 0:
            fx(' "I am so glad I packed this')
            cp(" " + item)
            fx('!"')
            self.tag(h)
            fx(".")
        elif v == 1:
            fx(" The")
            cp(" " + item)
            fx(" was very useful.")
        else:
            fx(" Smiling,")
            self.pro(h, 0)
            fx(" held up the")
            cp(" " + item)
            fx(".")

    def ep_gift(self) -> None:
        x, f, fx = self.x, self.f, self.fx
        a, na = self.choose(f.chars)
        b, nb = self.choose([c for c in f.chars if c is not a])
        self.when()
        self.nm(a, na)
        fx(" gave")
        self.nm(b, nb)
        thing = self.a_noun(x.toy, x.adj_thing, self.p.p_adj)
        fx(".")
        hi = self.p.gap_max + 1
        L, _ = self.length(1, hi)
        for m in range(1, L + 1):
            self.pend(_hz(m, L, 1, hi))
            if m < L:
                v, n = self.uni(4)
                self.pend(n)
                if v == 0:
                    fx(" For a long time,")
                    self.nm(b)
                    fx(" looked at the")
                    self.cp(" " + thing[0])
                    fx(".")
                elif v == 1:
                    fx(" It was")
                    adj, n = self.pick(x.adj_thing)
                    self.fr(" " + adj[0], n)
                    fx(".")
                elif v == 2:
                    fx(" Slowly,")
                    self.pro(b, 0)
                    fx(" held it up to the light.")
                else:
                    self.nm(b)
                    fx(" could hardly believe it.")
            else:
                fx(' "')
                self.phrase(x.thanks, "")
                fx(",")
                self.nm(a)
                fx('!"')
                self.tag(b)
                fx(".")
        f.gifts.append((a, b, thing[0]))
        f.items.append((b, thing[0]))

    def ep_count(self) -> None:
        x, f, fx, fr, p = self.x, self.f, self.fx, self.fr, self.p
        h = f.hero
        num = x.number
        fx(" At")
        self.here()
        fx(",")
        an, na = self.pick(x.animals[f.hab])
        v, nv = self.uni(2)
        N, nN = self.length(3, p.count_max)
        self.nm(h)
        self.pend(nv)
        if v == 0:
            fx(" saw")
            fr(" " + num[N - 1], nN)
            fr(" " + an[2], na)
            fx(".")
            self.pro(h, 3)
            fx(" counted them: " + ", ".join(num[:N]) + ".")
        else:
            fx(" counted the")
            fr(" " + an[2], na)
            fx(": one")
            for m in range(1, N + 1):
                nh = _hz(m, N, 3, p.count_max)
                sep = "." if m == N else ","
                if nh:
                    fr(sep, nh)
                else:
                    fx(sep)
                if m < N:
                    fx(" " + num[m])
            fx(" There were")
            self.cp(" " + num[N - 1])
            self.cp(" " + an[2])
            fx("!")

    def ep_hide(self) -> None:
        x, f, fx = self.x, self.f, self.fx
        a, na = self.choose(f.chars)
        b, nb = self.choose([c for c in f.chars if c is not a])
        fx(" \"Let's play hide and seek!\"")
        self.tag(a, na)
        fx(".")
        self.nm(b, nb)
        fx(" ran off to hide, and")
        self.nm(a)
        fx(" closed")
        self.pro(a, 2)
        fx(" eyes and counted to")
        v, n = self.uni(2)
        N = 5 if v == 0 else 10
        self.fr(" " + x.number[N - 1], n)
        fx(': "' + ", ".join(x.number[:N]).capitalize() + '! Ready or not, here I come!"')

        def found():
            fx(" There was")
            self.nm(b)
            fx("!")

        def not_found():
            self.nm(b)
            fx(" was not there.")

        self.search(a, found, not_found)
        fx(' "Found you!"')
        self.tag(a)
        fx(".")

    def ep_lost(self) -> None:
        x, f, fx = self.x, self.f, self.fx
        h = f.hero
        item, n = self.choose(self.hero_items())
        fx(" Oh no!")
        self.nm(h)
        fx(" could not find")
        self.pro(h, 2)
        self.cp(" " + item, n)
        fx("!")
        self.search(h, lambda: fx(" There it was!"), lambda: fx(" It was not there."))
        self.pro(h, 3)
        self.pro(h, 5)
        fx(" so")
        fe, n = self.pick(x.feeling)
        self.fr(" " + fe, n)
        fx(".")

    def ep_weather(self) -> None:
        x, f, fx = self.x, self.f, self.fx
        h = f.hero
        v, n = self.uni(3)
        self.pend(n)
        fx((" Suddenly,", " All of a sudden,", " Just then,")[v])
        (wh, wt, items), n = self.pick(x.weather)
        self.fr(" " + wh, n)
        fx(wt + ".")
        it, n = self.choose(items)
        self.nm(h)
        fx(" grabbed")
        self.pro(h, 2)
        self.fr(" " + it, n)
        fx(".")
        yes, n = self.bern(0.5)
        self.pend(n)
        if yes:
            self.pro(h, 3)
            self.pro(h, 5)
            fe, n = self.pick(x.feeling)
            self.fr(" " + fe, n)
            fx(".")

    def ep_meal(self) -> None:
        x, f, fx = self.x, self.f, self.fx
        h = f.hero
        self.when()
        self.nm(h)
        fx(" was hungry, so")
        self.pro(h, 0)
        fx(" had")
        foods = self.noun_list(x.food, 2, self.p.list_max)
        yes, n = self.bern(0.5)
        self.pend(n)
        if yes:
            fx(", and drank some")
            dr, n = self.pick(x.drink)
            self.fr(" " + dr, n)
        fx(". \"This")
        fd, n = self.choose(foods)
        self.cp(" " + fd[0], n)
        fx(" is so")
        ta, n = self.pick(x.taste)
        self.fr(" " + ta, n)
        fx('!"')
        self.tag(h)
        fx(".")
        if f.fav is not None:
            yes, n = self.bern(0.5)
            self.pend(n)
            if yes:
                fx(" But")
                self.pro(h, 2)
                fx(" favourite food was still")
                self.cp(" " + f.fav)
                fx(".")

    def ep_song(self) -> None:
        x, f, fx, fr, cp = self.x, self.f, self.fx, self.fr, self.cp
        h = f.hero
        self.nm(h)
        yes, n = self.bern(0.4)
        self.pend(n)
        if yes:
            fx(" picked up")
            self.pro(h, 2)
            ins, n = self.pick(x.instrument)
            fr(" " + ins[0], n)
            fx(" and")
        fx(' sang a song: "')
        start = len(self.T)
        v, n = self.pick(x.songverb)
        fr(v.capitalize(), n)
        fx(",")
        cp(" " + v)
        fx(", little")
        an, n = self.pick(x.all_animals)
        fr(" " + an[0], n)
        fx(",")
        ro, n = self.uni(len(_ROUTES))
        fr(" " + _ROUTES[ro], n)
        fx(" the")
        pl, n = self.pick(x.all_places)
        fr(" " + pl, n)
        fx("!")
        refrain = "".join(self.T[start:])
        fx('"')
        for k in range(self.p.refrains):
            fx(' Then everyone sang it together: "' if k == 0 else ' And once more: "')
            cp(refrain)
            fx('"')

    def ep_animal(self) -> None:
        x, f, fx = self.x, self.f, self.fx
        h = f.hero
        fx(" At")
        self.here()
        fx(",")
        self.nm(h)
        fx(" met")
        an = self.a_noun(x.animals[f.hab], x.adj_person, self.p.p_adj)
        fx(".")
        s = x.sound.get(an[0])
        if s is not None:
            fx(" The")
            self.cp(" " + an[0])
            fx(' said, "' + s.capitalize() + '!"')
        b = x.baby.get(an[0])
        if b is not None:
            fx(" Next to it was a little " + b + ".")
        hm = x.home.get(an[0])
        if hm is not None:
            fx(" It lived in " + _article(hm) + " " + hm + " nearby.")
        yes, n = self.bern(0.5)
        self.pend(n)
        if yes:
            fx(" It had")
            adj, n = self.pick(x.adj_thing)
            bd, n2 = self.pick(x.body)
            self.fr(" " + adj[0], n)
            self.fr(" " + bd, n2)
            fx(".")
        fx(' "')
        self.phrase(x.greeting, "")
        fx(",")
        self.cp(" " + an[0])
        fx('!"')
        self.tag(h)
        fx(".")

    def ep_opposite(self) -> None:
        x, f, fx = self.x, self.f, self.fx
        h = f.hero
        self.nm(h)
        fx(" found two")
        th, n = self.pick(x.thing)
        self.fr(" " + th[2], n)
        fx(". One was")
        (a, b), n = self.pick(x.opposite)
        o, n2 = self.uni(2)
        if o:
            a, b = b, a
        self.fr(" " + a, n + n2)
        fx(" and the other was " + b + ".")
        self.nm(h)
        fx(" kept the")
        k, n = self.uni(2)
        self.cp(" " + (a, b)[k], n)
        fx(" one.")

    def ep_job(self) -> None:
        x, f, fx = self.x, self.f, self.fx
        h = f.hero
        self.nm(h)
        fx(" visited")
        self.pro(h, 2)
        fam, n = self.pick(x.family)
        self.fr(" " + fam[0], n)
        fx(", who was")
        (job, place, action), n = self.pick(x.job)
        self.fr(" " + _article(job) + " " + job, n)
        fx(". Every day, the")
        self.cp(" " + job)
        fx(" went to the " + place + " and " + action + '. "Can I help?" asked')
        self.nm(h)
        fx('. "Of course!" said the')
        self.cp(" " + job)
        fx(".")

    def ep_fix(self) -> None:
        x, f, fx = self.x, self.f, self.fx
        b, nb = self.choose(f.chars)
        a, na = self.choose([c for c in f.chars if c is not b])
        self.nm(b, nb)
        fx(" was sad because")
        self.pro(b, 2)
        toy, n = self.pick(x.toy)
        self.fr(" " + toy[0], n)
        fx(' was broken. "Can you help me,')
        self.nm(a, na)
        fx('?" asked')
        self.nm(b)
        fx('. "Yes, I can!" said')
        self.nm(a)
        fx(".")
        self.nm(a)
        fx(" fixed the")
        self.cp(" " + toy[0])
        fx(" with")
        tool, n = self.pick(x.tool)
        self.fr(" " + tool[1], n)
        fx('. "')
        self.phrase(x.thanks, "")
        fx(",")
        self.nm(a)
        fx('!"')
        self.tag(b)
        fx(".")

    def ep_letter(self) -> None:
        x, f, fx = self.x, self.f, self.fx
        a, na = self.choose(f.chars)
        b, nb = self.choose([c for c in f.chars if c is not a])
        self.when()
        self.nm(a, na)
        fx(" wrote a letter to")
        self.nm(b, nb)
        fx('. It said: "Dear')
        self.nm(b)
        fx(", today I saw")
        self.a_noun(x.all_animals)
        fx(" at the")
        pl, n = self.pick(x.all_places)
        self.fr(" " + pl, n)
        fx(". I hope you are")
        fe, n = self.pick(x.feeling)
        self.fr(" " + fe, n)
        fx(".")
        v, n = self.uni(3)
        self.pend(n)
        fx((" Love,", " Your friend,", " Best wishes,")[v])
        self.nm(a)
        fx('."')
        self.nm(b)
        fx(" read the letter and smiled.")

    def ep_market(self) -> None:
        x, f, fx = self.x, self.f, self.fx
        h = f.hero
        self.when()
        self.nm(h)
        fx(" went to the market in")
        self.cp(" " + f.town)
        fx(".")
        N, nN = self.length(2, self.p.count_max)
        self.pro(h, 3)
        fx(" bought")
        self.fr(" " + x.number[N - 1], nN)
        fd, n = self.pick(x.food_count)
        self.fr(" " + fd[2], n)
        fx(". On the way home,")
        self.pro(h, 0)
        fx(" ate one")
        self.cp(" " + fd[0])
        fx(". Now")
        self.pro(h, 0)
        fx(" had " + x.number[N - 2])
        self.cp(" " + (fd[2] if N > 2 else fd[0]))
        fx(" left.")

    def ep_remember(self) -> None:
        f, fx = self.f, self.fx
        vis = list(dict.fromkeys(f.visited))
        opts = ([0] if f.gifts else []) + ([1] if len(vis) >= 2 else [])
        v, n = self.choose(opts)
        self.pend(n)
        fx(" Later,")
        if v == 0:
            (a, b, thing), n = self.choose(f.gifts)
            self.nm(b, n)
            fx(" thought about the")
            self.cp(" " + thing)
            fx(" that")
            self.nm(a)
            fx(" had given")
            self.pro(b, 1)
            fx(".")
        else:
            pl, n = self.choose(vis)
            self.nm(f.hero)
            fx(" thought about the")
            self.cp(" " + pl, n)
            fx(" and smiled.")

    def ep_dream(self) -> None:
        x, f, fx = self.x, self.f, self.fx
        h = f.hero
        fx(" That night,")
        self.nm(h)
        fx(" fell asleep and had a dream. In the dream,")
        self.pro(h, 0)
        fx(" could")
        self.phrase(x.ability)
        fx(".")
        self.nests += 1
        saved = self.prefix
        self.prefix += "dream/"
        self.depth += 1
        self.episodes(1, self.p.sub_max, 0.5)
        self.depth -= 1
        self.prefix = saved
        fx(" Then")
        self.nm(h)
        fx(" woke up. It was only a dream!")

    def ep_tale(self) -> None:
        x, f, fx = self.x, self.f, self.fx
        h = f.hero
        fx(" That evening,")
        self.pro(h, 2)
        fam, n = self.pick(x.family)
        self.fr(" " + fam[0], n)
        fx(" told")
        self.nm(h)
        fx(" a story. It began like this:")
        self.nests += 1
        saved = self.prefix
        self.prefix += "tale/"
        self.depth += 1
        self.f = _Frame()
        self.opening(inner=True)
        self.episodes(1, self.p.sub_max, 0.5)
        self.f = f
        self.depth -= 1
        self.prefix = saved
        fx(' And that was the end of the story. "')
        ex, n = self.pick(x.exclaim)
        self.fr(ex, n)
        fx('!"')
        self.tag(h)
        fx(".")

    # ---- result
    def text(self) -> str:
        return "".join(self.T)

    def result(self) -> Story:
        T = self.T
        offs = [0]
        offs += accumulate(map(len, T))
        spans: list[Span] = []
        app = spans.append
        last = 0
        for i, lab, n in self.M:          # non-fixed pieces, in text order
            a, b = offs[i], offs[i + 1]
            if a > last:
                app(_span(last, a, "fixed", 0.0))
            if b <= a:
                raise AssertionError("empty non-fixed span")
            app(_span(a, b, LABELS[lab], n))
            last = b
        if offs[-1] > last:
            app(_span(last, offs[-1], "fixed", 0.0))
        chars = tuple((c.name, _PR[c.g][0] if c.g >= 0 else "") for c in self.all_chars)
        return Story("".join(T), math.fsum(self.ch), tuple(spans), tuple(self.eps), chars,
                     len(self.ch))


_new = object.__new__
_set_start, _set_end, _set_label, _set_nats = (
    Span.__dict__[k].__set__ for k in ("start", "end", "label", "nats"))


def _span(start: int, end: int, label: str, nats: float) -> Span:
    """Span(start, end, label, nats) without the frozen-dataclass __init__ overhead."""
    s = _new(Span)
    _set_start(s, start)
    _set_end(s, end)
    _set_label(s, label)
    _set_nats(s, nats)
    return s


def _ignore(n: float) -> None:
    pass


def _hz(m: int, L: int, lo: int, hi: int) -> float:
    """Nats of step m of a uniform length L in [lo, hi] revealed step by step: at step m the
    text shows whether L == m (probability 1/(hi-m+1) given L >= m). Summed over m = lo..L this
    is log(hi - lo + 1)."""
    if m < lo:
        return 0.0
    if L == m:
        return _LOG[hi - m + 1]
    return _LOG[hi - m + 1] - _LOG[hi - m]


# --------------------------------------------------------------------------------------- public

def _rng_seed(seed: int, index: int) -> int:
    h = hashlib.blake2b(f"qtoy-stories:{GENERATOR_VERSION}:{int(seed)}:{int(index)}".encode(),
                        digest_size=16)
    return int.from_bytes(h.digest(), "little")


class StoryGenerator:
    """Seeded, infinite, random-access stream of stories.

    ``difficulty`` in [0, 1] scales how rich the stories are: vocabulary slice, flatness of word
    frequencies, number of episodes, characters, list and count lengths, gaps before recalls,
    nesting depth, name length, optional adjectives/adverbs. See :func:`difficulty_parameters`.
    """

    def __init__(self, seed: int = 0, difficulty: float = 0.5):
        self.seed = int(seed)
        self.difficulty = float(difficulty)
        self._lex = _lex(self.difficulty)   # validates the difficulty

    def __repr__(self) -> str:
        return f"StoryGenerator(seed={self.seed}, difficulty={self.difficulty})"

    def __reduce__(self):
        # pickles small (e.g. for DataLoader workers); the word pools are rebuilt (and cached)
        return (StoryGenerator, (self.seed, self.difficulty))

    def _writer(self, index: int, spans: bool = True) -> _Writer:
        if index < 0:
            raise IndexError("story index must be >= 0")
        # a private Random per story: stories are independent and the generator is thread-safe
        w = _Writer(self._lex, random.Random(_rng_seed(self.seed, index)), spans)
        w.story()
        return w

    def story(self, index: int) -> Story:
        """The ``index``-th story of this seed (deterministic, independent of other indices)."""
        return self._writer(index).result()

    def text(self, index: int) -> str:
        """Just the text of story ``index`` (== ``story(index).text``, about twice as fast)."""
        return self._writer(index, spans=False).text()

    def __iter__(self) -> Iterator[Story]:
        for i in count():
            yield self.story(i)

    def texts(self, start: int = 0) -> Iterator[str]:
        """Texts of stories start, start + 1, ... forever (no span bookkeeping)."""
        for i in count(start):
            yield self.text(i)


def describe_structure() -> dict:
    """Machine-readable description of the planted structure."""
    t = _tables()
    raw = t["raw"]
    lists = {k: len(v) for k, v in raw.items()}
    return {
        "generator_version": GENERATOR_VERSION,
        "labels": {
            "fixed": "determined by the text before it (template words, punctuation, closing "
                     "quotes, rest of a fixed phrase after its distinguishing first word(s), "
                     "counting sequences, association facts); 0 nats unless it is the word that "
                     "reveals a pending structural choice, which makes it free",
            "copyable": "repeats something earlier in the story (names, recalled items, the "
                        "'A' in 'thank you, A', song refrains); carries the nats of choosing "
                        "which earlier thing is repeated when that was random, else 0",
            "free": "realises fresh random choices and carries their -log p",
        },
        "episode_types": {name: _EPISODE_DOC[name] for name, _, _ in _EPISODES},
        "frame_episodes": {k: _EPISODE_DOC[k] for k in ("opening", "ending")},
        "nesting": ["dream", "tale"],
        "fixed_phrases": {
            "openers": [h + tl for h, tl in t["opener"]],
            "closers": [h + tl for h, tl in t["closer"]],
            "time_phrases": [h + tl for h, tl in t["when"]],
            "greetings": [h + tl for h, tl in t["greeting"]],
            "thanks": [h + tl for h, tl in t["thanks"]],
            "morals": [h + tl for h, tl in t["moral"]],
            "templates": [
                "Oh no! A could not find her X!", "It was not there.", "There it was!",
                '"Let\'s play hide and seek!"', "Ready or not, here I come!", '"Found you!"',
                "And that was the end of the story.", "It was only a dream!",
                '"Can you help me, A?" asked B.', '"Yes, I can!" said A.',
                "read the letter and smiled.", '"Can I help?"', '"Of course!" said the JOB.',
            ],
        },
        "associations": {
            "animal_sound": {**dict(list(t["sound"].items())[:8]),
                             "...": f"{len(t['sound'])} in all"},
            "animal_baby": len(t["baby"]),
            "animal_home": len(t["home"]),
            "job_workplace_action": len(t["job"]),
            "weather_items": len(t["weather"]),
            "opposite_pairs": len(t["opposite"]),
            "place_habitat": {h: len(p) for h, p in zip(_HABITATS, t["places"])},
        },
        "copying": [
            "made-up character names (2..4 syllables, e.g. 'Zorblin', 'Kavetta') introduced once "
            "('a fox named Zorblin') and copied afterwards",
            "made-up town names ('Bramford') from the opening, copied at the market and ending",
            "list items (pack -> use/lost, meal -> praise), gifts (gift -> lost/remember)",
            "greeting swap 'Hello, A!' said B. 'Hello, B!' said A.",
            "skip-trigrams: 'A gave B the Z ... Thank you, A!', 'Can you help me, A? ... Thank "
            "you, A!', 'Dear B, ... Love, A.'",
            "song refrains repeated verbatim; 'Hop, hop' word doubling",
            "counts: 'one, two, ..., five. There were five ducks!'; market 'N' -> 'N-1 left'",
            "ending recap of the places visited, in order",
        ],
        "gendered_kinds": {"she": [k[0] for k in t["kinds"][0]],
                           "he": [k[0] for k in t["kinds"][1]]},
        "agreement": "he/she/they and his/her/their follow the character's kind (girl -> she, "
                     "king -> he); for gender-neutral kinds (fox, child) the first pronoun is "
                     "a free choice (he 0.45, she 0.45, they 0.10), later ones are fixed; "
                     "'they were' vs 'she was'",
        "names": {
            "onsets": len(t["name_onset"]), "vowels": len(t["name_vowel"]),
            "medials": len(t["name_medial"]), "codas": len(t["name_coda"]),
            "town_onsets": len(t["town_onset"]), "town_suffixes": len(t["town_suffix"]),
        },
        "difficulty": {str(d): difficulty_parameters(d) for d in (0.0, 0.5, 1.0)},
        "lexicon_sections": lists,
        "vocabulary_size": len(vocabulary()),
    }
