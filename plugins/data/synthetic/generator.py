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
The word lists live in ``lexicon.txt`` next to this file (parsed in lexicon.py); writer.py holds
the writer (text pieces, labels, the nats of every choice) and this module the episode scripts
that drive it. The planted structure is documented in ``README.md`` and, machine-readably, by
:func:`describe_structure`.
"""

from __future__ import annotations

import hashlib
import math
import random
from bisect import bisect_right
from itertools import accumulate, count
from typing import Iterator

from .lexicon import _HABITATS, _article, _lex, _tables, difficulty_parameters, vocabulary
from .writer import LABELS, Span, Story, Writer, _Frame, _hz

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
_ROUTES = ("over", "under", "around", "across", "through", "past")


class StoryScript(Writer):
    """A writer driven through one story: opening, episodes (some nesting a dream or a tale with
    its own frame), ending. Every episode is one method `ep_<name>`."""

    # ---- story structure
    def story(self) -> None:
        self.opening(inner=False)
        self.episodes(self.params.episodes_min, self.params.episodes_max, self.params.p_stop)
        self.ending()
        if self.pending_nats:
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
            self.episode_names.append(self.episode_prefix + name)
            getattr(self, "ep_" + name)()
            prev = name
            n += 1

    def choose_episode(self, prev: str | None) -> str:
        f, p = self.frame, self.params
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
        if self.depth >= p.max_depth or self.nestings >= p.max_nests:
            fail |= _NEST
        key = (fail, prev, f.used)
        cache = self.lex.episode_cache
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
        i = bisect_right(cum, self.uniform())
        n = nls[i]
        self.choice_nats.append(n)
        self.pend(n)
        f.used |= _EPISODE_BIT[names[i]]
        return names[i]

    def hero_items(self) -> list[str]:
        f = self.frame
        out: list[str] = []
        for owner, it in f.items:
            if owner is f.hero and it not in out:
                out.append(it)
        for it in f.packed:
            if it not in out:
                out.append(it)
        return out

    def opening(self, inner: bool) -> None:
        x, fx, fr = self.lex, self.fx, self.fr
        self.episode_names.append(self.episode_prefix + "opening")
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
            self.cp(" " + self.frame.house)
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
            self.frame.fav = food[2]
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
            self.frame.items.append((h, c + " " + cl[0]))

    def ending(self) -> None:
        x, f, fx = self.lex, self.frame, self.fx
        h = f.hero
        self.episode_names.append("ending")
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
            yes, n = self.bern(0.3 + 0.5 * self.params.difficulty)
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
        x, f, fx, fr, p = self.lex, self.frame, self.fx, self.fr, self.params
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
        x, f, fx = self.lex, self.frame, self.fx
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
        x, f, fx = self.lex, self.frame, self.fx
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
        items = self.noun_list(x.thing, 2, self.params.list_max)
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
        f, fx, cp = self.frame, self.fx, self.cp
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
        x, f, fx = self.lex, self.frame, self.fx
        a, na = self.choose(f.chars)
        b, nb = self.choose([c for c in f.chars if c is not a])
        self.when()
        self.nm(a, na)
        fx(" gave")
        self.nm(b, nb)
        thing = self.a_noun(x.toy, x.adj_thing, self.params.p_adj)
        fx(".")
        hi = self.params.gap_max + 1
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
        x, f, fx, fr, p = self.lex, self.frame, self.fx, self.fr, self.params
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
        x, f, fx = self.lex, self.frame, self.fx
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
        x, f, fx = self.lex, self.frame, self.fx
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
        x, f, fx = self.lex, self.frame, self.fx
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
        x, f, fx = self.lex, self.frame, self.fx
        h = f.hero
        self.when()
        self.nm(h)
        fx(" was hungry, so")
        self.pro(h, 0)
        fx(" had")
        foods = self.noun_list(x.food, 2, self.params.list_max)
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
        x, f, fx, fr, cp = self.lex, self.frame, self.fx, self.fr, self.cp
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
        start = len(self.pieces)
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
        refrain = "".join(self.pieces[start:])
        fx('"')
        for k in range(self.params.refrains):
            fx(' Then everyone sang it together: "' if k == 0 else ' And once more: "')
            cp(refrain)
            fx('"')

    def ep_animal(self) -> None:
        x, f, fx = self.lex, self.frame, self.fx
        h = f.hero
        fx(" At")
        self.here()
        fx(",")
        self.nm(h)
        fx(" met")
        an = self.a_noun(x.animals[f.hab], x.adj_person, self.params.p_adj)
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
        x, f, fx = self.lex, self.frame, self.fx
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
        x, f, fx = self.lex, self.frame, self.fx
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
        x, f, fx = self.lex, self.frame, self.fx
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
        x, f, fx = self.lex, self.frame, self.fx
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
        x, f, fx = self.lex, self.frame, self.fx
        h = f.hero
        self.when()
        self.nm(h)
        fx(" went to the market in")
        self.cp(" " + f.town)
        fx(".")
        N, nN = self.length(2, self.params.count_max)
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
        f, fx = self.frame, self.fx
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
        x, f, fx = self.lex, self.frame, self.fx
        h = f.hero
        fx(" That night,")
        self.nm(h)
        fx(" fell asleep and had a dream. In the dream,")
        self.pro(h, 0)
        fx(" could")
        self.phrase(x.ability)
        fx(".")
        self.nestings += 1
        saved = self.episode_prefix
        self.episode_prefix += "dream/"
        self.depth += 1
        self.episodes(1, self.params.sub_max, 0.5)
        self.depth -= 1
        self.episode_prefix = saved
        fx(" Then")
        self.nm(h)
        fx(" woke up. It was only a dream!")

    def ep_tale(self) -> None:
        x, f, fx = self.lex, self.frame, self.fx
        h = f.hero
        fx(" That evening,")
        self.pro(h, 2)
        fam, n = self.pick(x.family)
        self.fr(" " + fam[0], n)
        fx(" told")
        self.nm(h)
        fx(" a story. It began like this:")
        self.nestings += 1
        saved = self.episode_prefix
        self.episode_prefix += "tale/"
        self.depth += 1
        self.frame = _Frame()
        self.opening(inner=True)
        self.episodes(1, self.params.sub_max, 0.5)
        self.frame = f
        self.depth -= 1
        self.episode_prefix = saved
        fx(' And that was the end of the story. "')
        ex, n = self.pick(x.exclaim)
        self.fr(ex, n)
        fx('!"')
        self.tag(h)
        fx(".")


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

    def _writer(self, index: int, spans: bool = True) -> StoryScript:
        if index < 0:
            raise IndexError("story index must be >= 0")
        # a private Random per story: stories are independent and the generator is thread-safe
        w = StoryScript(self._lex, random.Random(_rng_seed(self.seed, index)), spans)
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
