"""A synthetic fact corpus with real structure, for attribution-quality evaluation (LDS).

Everything derives deterministically from one seed (``numpy.random.default_rng``):

- people with made-up one-word names, each holding one fact per *relation* (topic): where they
  live, their job, their pet, their favourite colour;
- every fact is stated 1..``max_copies`` times in the training set, with a random template and
  a random prefix ("note that", "people say", ...): near-duplicates and exact duplicates;
- objects follow a skewed (Zipf-like) distribution, and jobs correlate with cities, so facts
  interact beyond their own statements;
- some training examples state two facts of one person at once, and a few generic sentences
  ("a pilot is a job .") carry no fact about anyone;
- a query is a held-out statement of a fact (a template/prefix pair not used for that fact in
  training); only its answer token is a target, so the query loss is the answer's NLL.

Words are tokens: a word-level vocabulary (``<pad>``, ``<bos>``, then the sorted words) keeps
the model tiny. Shapes: N examples, T tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

IGNORE = -100
PAD, BOS = "<pad>", "<bos>"

#: relation -> (objects, statement templates); ``{s}`` is the person, ``{o}`` the answer, and
#: the answer is always the second-to-last word (before ".") so it can be the query's target.
RELATIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "city": (("paris", "tokyo", "lima", "oslo", "cairo", "delhi", "rome", "quito", "seoul",
              "dakar"),
             ("{s} lives in {o} .", "{s} has a home in {o} .", "the home of {s} is in {o} .")),
    "job": (("baker", "nurse", "pilot", "farmer", "judge", "tailor", "miner", "singer"),
            ("{s} works as a {o} .", "{s} is employed as a {o} .", "the job of {s} is {o} .")),
    "pet": (("cat", "dog", "horse", "parrot", "rabbit", "turtle", "goat", "snake"),
            ("{s} owns a {o} .", "the pet of {s} is a {o} .", "{s} takes care of a {o} .")),
    "color": (("red", "blue", "green", "yellow", "purple", "orange", "black", "white"),
              ("{s} likes the color {o} .", "the favorite color of {s} is {o} .",
               "{s} always wears {o} .")),
}
PREFIXES = ("", "note that", "it is known that", "people say", "we heard that", "in fact ,")
GENERIC = {"city": "{o} is a city .", "job": "a {o} is a job .", "pet": "a {o} is an animal .",
           "color": "{o} is a color ."}
_SYLLABLES = ("ba", "ko", "mi", "ru", "te", "sa", "lo", "ne", "vi", "da", "fu", "ga", "ho",
              "ji", "pe", "zo")


@dataclass(kw_only=True)
class CorpusConfig:
    """Sizes of the generated corpus."""

    n_people: int = 200
    """People; each holds one fact per relation."""
    relations: tuple[str, ...] = tuple(RELATIONS)
    """Which topics to use (keys of ``RELATIONS``)."""
    max_copies: int = 3
    """Each fact is stated 1..max_copies times in training (uniform)."""
    pair_fraction: float = 0.25
    """Fraction of people with one extra example stating two of their facts at once."""
    n_queries: int | None = None
    """Held-out query statements (distinct facts, round-robin over the relations); ``None``:
    one per fact."""
    seed: int = 0
    """Everything random in the corpus derives from this."""

    def __post_init__(self):
        bad = [r for r in self.relations if r not in RELATIONS]
        if bad or not self.relations:
            raise ValueError(f"relations must be a non-empty subset of {list(RELATIONS)}, "
                             f"got {list(self.relations)}")
        if not 2 <= self.n_people <= len(_SYLLABLES) ** 2:
            raise ValueError(f"n_people must be in [2, {len(_SYLLABLES) ** 2}], got "
                             f"{self.n_people}")
        if self.max_copies < 1:
            raise ValueError(f"max_copies must be >= 1, got {self.max_copies}")
        if not 0 <= self.pair_fraction <= 1:
            raise ValueError(f"pair_fraction must be in [0, 1], got {self.pair_fraction}")
        n_facts = self.n_people * len(self.relations)
        if self.n_queries is not None and not 1 <= self.n_queries <= n_facts:
            raise ValueError(f"n_queries must be in [1, {n_facts}] (one per fact), got "
                             f"{self.n_queries}")


@dataclass
class Corpus:
    """Training texts, query texts, and which facts each one states.

    Attributes:
        vocab: the word list; token id = index.
        train: training texts (space-separated words).
        train_facts: the facts ``(person, relation)`` each training text states.
        queries: query texts; their last word before "." is the answer.
        query_facts: the fact each query asks about.
    """

    vocab: list[str]
    train: list[str]
    train_facts: list[tuple[tuple[str, str], ...]]
    queries: list[str]
    query_facts: list[tuple[str, str]]
    index: dict[str, int] = field(init=False)

    def __post_init__(self):
        self.index = {w: i for i, w in enumerate(self.vocab)}

    def encode(self, text: str) -> list[int]:
        """``<bos>`` then one id per word."""
        return [self.index[BOS]] + [self.index[w] for w in text.split()]

    def train_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(input_ids [N, T], attention_mask [N, T], labels [N, T])``: every word is a target."""
        return pad([self.encode(t) for t in self.train], self.index[PAD])

    def query_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Like ``train_batch`` for the queries, with only the answer word as a target."""
        return answer_only(*pad([self.encode(t) for t in self.queries], self.index[PAD]))


def answer_only(ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batch with only each row's answer (the word before the final ".") as a target: the
    query form of a statement."""
    answer = mask.sum(1) - 2
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[torch.arange(len(ids)), answer] = True
    return ids, mask, labels.masked_fill(~keep, IGNORE)


def pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad token lists: ``(input_ids, attention_mask, labels)``, each ``[N, T]``."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return ids, mask, ids.masked_fill(mask == 0, IGNORE)


def _names(rng: np.random.Generator, n: int) -> list[str]:
    pairs = [a + b for a in _SYLLABLES for b in _SYLLABLES if a != b]
    return [str(x) for x in rng.choice(pairs, size=n, replace=False)]


def _objects(rng, cfg: CorpusConfig, names: list[str]) -> dict[tuple[str, str], str]:
    """Each person's answer per relation: Zipf-skewed, and jobs follow cities half the time."""
    facts = {}
    job_of_city = {}
    if "job" in cfg.relations and "city" in cfg.relations:
        jobs = RELATIONS["job"][0]
        job_of_city = {c: jobs[i % len(jobs)] for i, c in enumerate(RELATIONS["city"][0])}
    for person in names:
        for rel in cfg.relations:
            objs = RELATIONS[rel][0]
            weights = 1.0 / np.arange(1, len(objs) + 1)
            facts[person, rel] = str(rng.choice(objs, p=weights / weights.sum()))
        if job_of_city and rng.random() < 0.5:
            facts[person, "job"] = job_of_city[facts[person, "city"]]
    return facts


def _statement(rng, rel: str, person: str, obj: str) -> tuple[int, int, str]:
    t, p = int(rng.integers(len(RELATIONS[rel][1]))), int(rng.integers(len(PREFIXES)))
    body = RELATIONS[rel][1][t].format(s=person, o=obj)
    return t, p, f"{PREFIXES[p]} {body}".strip()


def make_corpus(cfg: CorpusConfig) -> Corpus:
    """Generate the corpus of ``cfg`` (identical for identical configs)."""
    rng = np.random.default_rng(cfg.seed)
    names = _names(rng, cfg.n_people)
    facts = _objects(rng, cfg, names)
    train, train_facts, used = [], [], {}
    for (person, rel), obj in facts.items():
        for _ in range(int(rng.integers(1, cfg.max_copies + 1))):
            t, p, text = _statement(rng, rel, person, obj)
            used.setdefault((person, rel), set()).add((t, p))
            train.append(text)
            train_facts.append(((person, rel),))
    for person in names:
        if len(cfg.relations) > 1 and rng.random() < cfg.pair_fraction:
            r1, r2 = (str(r) for r in rng.choice(cfg.relations, size=2, replace=False))
            first = _statement(rng, r1, person, facts[person, r1])[2].rstrip(" .")
            second = RELATIONS[r2][1][0].format(s="and", o=facts[person, r2])
            train.append(f"{first} {second}")  # "... lives in rome and works as a baker ."
            train_facts.append(((person, r1), (person, r2)))
    for rel in cfg.relations:
        for obj in RELATIONS[rel][0]:
            train.append(GENERIC[rel].format(o=obj))
            train_facts.append(())
    queries, query_facts = _queries(rng, cfg, facts, used)
    order = rng.permutation(len(train))  # interleave topics; the order is part of the seed
    train = [train[i] for i in order]
    train_facts = [train_facts[i] for i in order]
    words = {w for text in train + queries for w in text.split()}
    return Corpus(vocab=[PAD, BOS] + sorted(words), train=train, train_facts=train_facts,
                  queries=queries, query_facts=query_facts)


def _queries(rng, cfg, facts, used) -> tuple[list[str], list[tuple[str, str]]]:
    """One held-out statement for each of ``n_queries`` facts, round-robin over relations."""
    by_rel = {}
    for r in cfg.relations:
        group = [f for f in facts if f[1] == r]
        by_rel[r] = [group[i] for i in rng.permutation(len(group))]
    picked = [f for group in zip(*by_rel.values()) for f in group][:cfg.n_queries]
    queries = []
    for person, rel in picked:
        free = [(t, p) for t in range(len(RELATIONS[rel][1])) for p in range(len(PREFIXES))
                if (t, p) not in used[person, rel]]
        t, p = free[int(rng.integers(len(free)))]
        body = RELATIONS[rel][1][t].format(s=person, o=facts[person, rel])
        queries.append(f"{PREFIXES[p]} {body}".strip())
    return queries, picked
