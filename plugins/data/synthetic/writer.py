"""The story writer: text pieces, their labels, and the nats of every random choice.

A `Writer` appends text as fixed (`fx`), free (`fr`, realising a random choice) or copyable
(`cp`, repeating something earlier) pieces; each random choice (`pick`, `bern`, `uni`, `cat`,
`length`, ...) logs its -log p once, and a choice the text does not spell out where it is made is
held as pending nats until the next fixed-or-free piece reveals it. `result()` turns the pieces
into a `Story` whose spans tile the text. What the story knows so far (its characters, places,
items) is the current `_Frame`. The episode scripts that drive a writer are in generator.py.
"""

from __future__ import annotations

import math
import random
from bisect import bisect_right
from dataclasses import dataclass
from itertools import accumulate

from .lexicon import _GENDER_P, _LOG, _PR, _Lex, _Pool

#: The span labels, in a fixed order.
LABELS = ("fixed", "copyable", "free")
_FX, _CP, _FR = 0, 1, 2

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


class Writer:
    """Writes one story: text pieces, labels of the non-fixed pieces, and every choice's nats."""

    def __init__(self, lex: _Lex, rng: random.Random, spans: bool = True):
        self.lex = lex                                   # the word pools of this difficulty
        self.params = lex.params                         # the numbers the difficulty sets
        self.uniform = rng.random                        # the one source of randomness: u in [0, 1)
        self.pieces: list[str] = []                      # the text, piece by piece
        self.marks: list[tuple[int, int, float]] = []    # (piece index, label, nats) of non-fixed pieces
        self.pending_nats = 0.0                          # nats of choices the text has not revealed yet
        self.choice_nats: list[float] = []               # -log p of every random choice, in order
        self.name_nats: dict[str, float] = {}            # made-up names used -> nats of drawing each
        self.town_nats: dict[str, float] = {}            # made-up town names used -> nats of drawing each
        self.episode_names: list[str] = []               # episodes told, with their nesting prefix
        self.characters: list[_Char] = []                # every character introduced, nested ones too
        self.frame = _Frame()                            # what the current (sub)story knows
        self.depth = 0                                   # nesting depth of dreams / inner tales now
        self.nestings = 0                                # dreams + inner tales told so far
        self.episode_prefix = ""                         # "dream/", "tale/" ... for episode_names
        if not spans:
            # text only: same random draws, no labels (instance attributes shadow the methods)
            app = self.pieces.append
            self.fx = app
            self.fr = self.cp = lambda s, n=0.0: app(s)
            self.pend = _ignore

    # ---- emitting text
    def fx(self, s: str) -> None:
        """Template text: fixed, unless a pending choice is revealed here (then its first word
        becomes a free span carrying the pending nats)."""
        if self.pending_nats:
            i = s.find(" ", 1)
            T = self.pieces
            if i > 0:
                T.append(s[:i])
                self.marks.append((len(T) - 1, _FR, self.pending_nats))
                T.append(s[i:])
            else:
                T.append(s)
                self.marks.append((len(T) - 1, _FR, self.pending_nats))
            self.pending_nats = 0.0
        else:
            self.pieces.append(s)

    def fr(self, s: str, n: float) -> None:
        """Text realising a random choice that carries ``n`` nats (+ any pending nats)."""
        T = self.pieces
        T.append(s)
        n += self.pending_nats
        if n:                       # a one-option "choice" is just fixed text
            self.marks.append((len(T) - 1, _FR, n))
            self.pending_nats = 0.0

    def cp(self, s: str, n: float = 0.0) -> None:
        T = self.pieces
        T.append(s)
        self.marks.append((len(T) - 1, _CP, n))

    def pend(self, n: float) -> None:
        self.pending_nats += n

    # ---- random choices (each logs its nats once)
    def pick(self, pool: _Pool):
        if pool.uni:
            i = int(self.uniform() * pool.n)
        else:
            i = bisect_right(pool.cum, self.uniform())   # < n as cum[-1] == 1.0 > u
        n = pool.nl[i]
        self.choice_nats.append(n)
        return pool.items[i], n

    def pick_ex(self, pool: _Pool, ex: list[int]):
        """Like pick, excluding the indices in ``ex`` (exact conditional probability)."""
        r, cum, nn = self.uniform, pool.cum, pool.n
        while True:
            i = int(r() * nn) if pool.uni else bisect_right(cum, r())
            if i not in ex:
                break
        n = pool.nl[i]
        if ex:
            n += math.log1p(-sum(pool.p[j] for j in ex))
        self.choice_nats.append(n)
        return i, n

    def uni(self, k: int):
        if k <= 1:
            return 0, 0.0
        i = int(self.uniform() * k)
        n = _LOG[k]
        self.choice_nats.append(n)
        return i, n

    def bern(self, p: float):
        if self.uniform() < p:
            n = -math.log(p)
            self.choice_nats.append(n)
            return True, n
        n = -math.log1p(-p)
        self.choice_nats.append(n)
        return False, n

    def cat(self, probs, nls):
        u = self.uniform()
        acc = 0.0
        for i, q in enumerate(probs):
            acc += q
            if u < acc:
                break
        n = nls[i]
        self.choice_nats.append(n)
        return i, n

    def length(self, lo: int, hi: int):
        """Uniform length in [lo, hi]; its nats are realised step by step, see _hz."""
        k = hi - lo + 1
        if k <= 1:
            return lo, 0.0
        L = lo + int(self.uniform() * k)
        self.choice_nats.append(_LOG[k])
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
            g, n = self.cat(_GENDER_P, self.lex.gender_nl)
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
        self.phrase(self.lex.when)

    def tag(self, c: _Char, n: float = 0.0) -> None:
        """' said A' with a random speech verb."""
        v, nv = self.pick(self.lex.say)
        self.fr(" " + v, nv)
        self.nm(c, n)
        yes, ny = self.bern(self.params.p_tag_adv)
        if yes:
            adv, na = self.pick(self.lex.adverb)
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
        x = self.lex
        L, _ = self.length(1, self.params.search_max)
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
            self.pend(_hz(m, L, 1, self.params.search_max))
            (found_fx if m == L else not_found_fx)()

    # ---- made-up names
    def new_name(self) -> str:
        x, r, used = self.lex, self.uniform, self.name_nats
        on, vw, md, cd = x.onset, x.vowel, x.medial, x.coda
        kk = self.params.name_syllables_max - 1
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
        self.choice_nats.append(n)
        self.fr(" " + name, n)
        return name

    def new_town(self) -> str:
        x, r, used = self.lex, self.uniform, self.town_nats
        on, sf = x.town_onset, x.town_suffix
        while True:
            name = on[int(r() * len(on))] + sf[int(r() * len(sf))]
            if name not in used:
                break
        raw = _LOG[len(on)] + _LOG[len(sf)]
        n = raw + (math.log1p(-sum(math.exp(-v) for v in used.values())) if used else 0.0)
        used[name] = raw
        self.choice_nats.append(n)
        self.fr(" " + name, n)
        return name

    def intro(self) -> _Char:
        """' a [adj] kind named Name'."""
        x = self.lex
        yes, n0 = self.bern(self.params.p_adj)
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
        f = self.frame
        f.chars.append(c)
        if f.hero is None:
            f.hero = c
        self.characters.append(c)
        return c

    def new_place(self) -> None:
        x, f = self.lex, self.frame
        h, n1 = self.uni(x.n_hab)
        pl, n2 = self.pick(x.places[h])
        self.fr(" " + pl, n1 + n2)
        f.place, f.hab = pl, h
        f.visited.append(pl)

    def here(self) -> None:
        """' the PLACE': the current place (copied), or a new one if there is none yet."""
        self.fx(" the")
        if self.frame.place is None:
            self.new_place()
        else:
            self.cp(" " + self.frame.place)

    def town(self) -> None:
        s, n = self.pick(self.lex.settlement)
        self.fr(" " + s, n)
        self.fx(" of")
        self.frame.town = self.new_town()

    def house(self) -> None:
        self.frame.house = self.a_noun(self.lex.house)[0]

    # ---- result
    def text(self) -> str:
        return "".join(self.pieces)

    def result(self) -> Story:
        T = self.pieces
        offs = [0]
        offs += accumulate(map(len, T))
        spans: list[Span] = []
        app = spans.append
        last = 0
        for i, lab, n in self.marks:          # non-fixed pieces, in text order
            a, b = offs[i], offs[i + 1]
            if a > last:
                app(_span(last, a, "fixed", 0.0))
            if b <= a:
                raise AssertionError("empty non-fixed span")
            app(_span(a, b, LABELS[lab], n))
            last = b
        if offs[-1] > last:
            app(_span(last, offs[-1], "fixed", 0.0))
        chars = tuple((c.name, _PR[c.g][0] if c.g >= 0 else "") for c in self.characters)
        return Story("".join(T), math.fsum(self.choice_nats), tuple(spans), tuple(self.episode_names), chars,
                     len(self.choice_nats))


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
