"""The embedded task: a seeded grammar of short movie reviews and its exact oracle reward.

It plays the part of IMDB in the DPO, EXO and TDPO papers, with no download: reviews are
built from sentence templates whose slots draw words from a lexicon of positive, negative and
neutral words; negators ("not", "never") flip the next sentiment word and intensifiers scale it.
A review has a latent mood (the chance that each slot expresses a positive opinion), so the
corpus covers the whole range from raving to scathing and an SFT model on it has mean reward
near zero. The oracle reward is the exact log-odds of the linear sentiment model that the
lexicon defines, read over prompt and completion together (as a classifier reads a review).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# Word polarities. Adjectives and verbs carry sentiment; everything else is neutral.
POSITIVE_ADJ = {
    "great": 2.0, "wonderful": 2.0, "brilliant": 2.0, "superb": 2.0, "excellent": 2.0,
    "amazing": 2.0, "perfect": 2.0, "good": 1.0, "fun": 1.0, "charming": 1.0, "moving": 1.0,
    "enjoyable": 1.0, "beautiful": 1.0, "clever": 1.0, "funny": 1.0, "solid": 1.0, "fresh": 1.0,
    "gripping": 1.0, "touching": 1.0, "nice": 1.0,
}
NEGATIVE_ADJ = {
    "terrible": -2.0, "awful": -2.0, "horrible": -2.0, "painful": -2.0, "dreadful": -2.0,
    "awkward": -1.0, "bad": -1.0, "boring": -1.0, "dull": -1.0, "weak": -1.0, "messy": -1.0,
    "predictable": -1.0, "silly": -1.0, "flat": -1.0, "bland": -1.0, "forgettable": -1.0,
    "clumsy": -1.0, "tedious": -1.0, "stale": -1.0, "poor": -1.0,
}
NEUTRAL_ADJ = ["long", "short", "loud", "quiet", "old", "new", "dark", "simple", "strange", "french"]
POSITIVE_VERB = {"loved": 2.0, "adored": 2.0, "enjoyed": 1.0, "liked": 1.0, "admired": 1.0}
NEGATIVE_VERB = {"hated": -2.0, "loathed": -2.0, "disliked": -1.0, "regretted": -1.0, "resented": -1.0}
POSITIVE_BASE = {"love": 2.0, "enjoy": 1.0, "like": 1.0, "recommend": 1.0}
NEGATIVE_BASE = {"hate": -2.0, "avoid": -1.0}
NEUTRAL_VERB = ["watched", "saw", "rented", "remember"]
NOUNS = [
    "plot", "acting", "script", "story", "cast", "ending", "music", "soundtrack", "dialogue",
    "pacing", "director", "camera", "villain", "hero", "humor", "effects", "costumes", "scenery",
    "editing", "lead",
]
FILMS = ["movie", "film", "drama", "comedy", "thriller"]
INTENSIFIERS = {"very": 1.5, "really": 1.5, "truly": 1.5, "somewhat": 0.5}
NEGATORS = {"not", "never"}
# Words that end a negation or intensifier scope.
BOUNDARIES = {".", ",", "but", "and"}
FUNCTION_WORDS = [
    "the", "was", "were", "i", "did", "it", "a", "and", "but", "would", "overall", "this",
    "is", "one", "of", "year", "again", "watch", "to", "me", "felt", ".", ",",
]

POLARITY: dict[str, float] = {
    **POSITIVE_ADJ, **NEGATIVE_ADJ, **POSITIVE_VERB, **NEGATIVE_VERB, **POSITIVE_BASE, **NEGATIVE_BASE,
}


def lexicon() -> list[str]:
    """Every word the grammar can emit, in a fixed order (the tokenizer's vocabulary)."""
    words: list[str] = []
    for group in (
        FUNCTION_WORDS, list(NEGATORS), list(INTENSIFIERS), NOUNS, FILMS, NEUTRAL_ADJ, NEUTRAL_VERB,
        list(POSITIVE_ADJ), list(NEGATIVE_ADJ), list(POSITIVE_VERB), list(NEGATIVE_VERB),
        list(POSITIVE_BASE), list(NEGATIVE_BASE),
    ):
        for word in sorted(group):
            if word not in words:
                words.append(word)
    return words


def oracle_reward(text: str) -> float:
    """Exact sentiment log-odds of a review: the sum of its words' polarities, where a negator
    flips the next sentiment word and an intensifier scales it, both within the clause."""
    score = 0.0
    negate = False
    scale = 1.0
    for word in text.split():
        if word in BOUNDARIES:
            negate, scale = False, 1.0
        elif word in NEGATORS:
            negate = True
        elif word in INTENSIFIERS:
            scale = INTENSIFIERS[word]
        elif word in POLARITY:
            score += POLARITY[word] * scale * (-1.0 if negate else 1.0)
            negate, scale = False, 1.0
    return score


# --- the grammar ---------------------------------------------------------------------------
# A template is a list of slots. A slot is a fixed word or a word class; "+" classes express the
# sentence's intended opinion, "-" classes its opposite (used under a negator, or before "but").
TEMPLATES: list[list[str]] = [
    ["the", "NOUN", "was", "ADJ+", "."],
    ["the", "NOUN", "was", "INT", "ADJ+", "."],
    ["the", "NOUN", "was", "not", "ADJ-", "."],
    ["the", "NOUN", "was", "never", "ADJ-", "."],
    ["the", "NOUN", "was", "NADJ", "and", "ADJ+", "."],
    ["i", "VERB+", "the", "NOUN", "."],
    ["i", "VERB+", "this", "FILM", "."],
    ["i", "did", "not", "BASE-", "the", "NOUN", "."],
    ["i", "NVERB", "it", "and", "VERB+", "it", "."],
    ["it", "was", "a", "ADJ+", "FILM", "."],
    ["it", "was", "a", "INT", "ADJ+", "FILM", "."],
    ["it", "was", "a", "NADJ", "FILM", "."],
    ["the", "NOUN", "and", "the", "NOUN", "were", "ADJ+", "."],
    ["the", "NOUN", "was", "ADJ-", "but", "the", "NOUN", "was", "ADJ+", "."],
    ["the", "NOUN", "felt", "ADJ+", "to", "me", "."],
    ["overall", ",", "a", "ADJ+", "FILM", "."],
    ["one", "of", "the", "ADJ+", "FILM", "of", "the", "year", "."],
    ["i", "would", "BASE+", "it", "."],
    ["i", "would", "not", "BASE-", "it", "."],
    ["i", "would", "watch", "it", "again", "."],
]

_CLASSES: dict[str, list[str]] = {
    "NOUN": NOUNS, "FILM": FILMS, "NADJ": NEUTRAL_ADJ, "NVERB": NEUTRAL_VERB, "INT": list(INTENSIFIERS),
}
_POLAR: dict[str, tuple[list[str], list[str]]] = {  # class -> (positive words, negative words)
    "ADJ": (list(POSITIVE_ADJ), list(NEGATIVE_ADJ)),
    "VERB": (list(POSITIVE_VERB), list(NEGATIVE_VERB)),
    "BASE": (list(POSITIVE_BASE), list(NEGATIVE_BASE)),
}


def _options(slot: str, positive: bool) -> list[str]:
    """The words a slot may take when the sentence means to be positive (or negative)."""
    if slot in _CLASSES:
        return _CLASSES[slot]
    if slot[:-1] in _POLAR:
        pos, neg = _POLAR[slot[:-1]]
        wants_positive = positive if slot.endswith("+") else not positive
        return pos if wants_positive else neg
    return [slot]


def _all_options(slot: str) -> list[str]:
    return sorted(set(_options(slot, True)) | set(_options(slot, False)))


@dataclass(frozen=True)
class Review:
    prompt: str
    completion: str

    @property
    def text(self) -> str:
        return f"{self.prompt} {self.completion}"


class ReviewGrammar:
    """Seeded generator of reviews, and of completions of a given prompt."""

    def __init__(self, min_sentences: int = 2, max_sentences: int = 4,
                 min_prompt_words: int = 2, max_prompt_words: int = 4):
        self.min_sentences, self.max_sentences = min_sentences, max_sentences
        self.min_prompt_words, self.max_prompt_words = min_prompt_words, max_prompt_words

    def _sentence(self, rng: random.Random, mood: float, forced: list[str]) -> list[str]:
        """One sentence whose first words are `forced` (a prefix it must start with)."""
        templates = [t for t in TEMPLATES if len(t) >= len(forced)
                     and all(w in _all_options(s) for s, w in zip(t, forced, strict=False))]
        template = rng.choice(templates)
        positive = rng.random() < mood  # the opinion this sentence expresses
        words = list(forced)
        for slot in template[len(forced):]:
            words.append(rng.choice(_options(slot, positive)))
        return words

    def review(self, rng: random.Random, prefix: list[str] | None = None) -> list[str]:
        """A whole review as words; with `prefix`, one that starts with those words."""
        mood = rng.random()
        n = rng.randint(self.min_sentences, self.max_sentences)
        words = self._sentence(rng, mood, prefix or [])
        for _ in range(n - 1):
            words += self._sentence(rng, mood, [])
        return words

    def sample(self, rng: random.Random) -> Review:
        words = self.review(rng)
        k = rng.randint(self.min_prompt_words, self.max_prompt_words)
        return Review(" ".join(words[:k]), " ".join(words[k:]))

    def complete(self, rng: random.Random, prompt: str) -> str:
        """A fresh completion of `prompt`, from an independently drawn mood."""
        prefix = prompt.split()
        return " ".join(self.review(rng, prefix)[len(prefix):])


def _rng(seed: int, split: str) -> random.Random:
    # Splits come from disjoint seeds so test prompts never leak into training.
    return random.Random(f"prefkit-synthetic/{split}/{seed}")


def sft_examples(n: int, seed: int, split: str, grammar: ReviewGrammar | None = None) -> list[dict]:
    grammar = grammar or ReviewGrammar()
    rng = _rng(seed, f"sft-{split}")
    return [{"prompt": r.prompt, "completion": r.completion} for r in (grammar.sample(rng) for _ in range(n))]


def prompts(n: int, seed: int, split: str, grammar: ReviewGrammar | None = None) -> list[dict]:
    grammar = grammar or ReviewGrammar()
    rng = _rng(seed, f"prompts-{split}")
    return [{"prompt": grammar.sample(rng).prompt} for _ in range(n)]


def preference_examples(n: int, seed: int, split: str, grammar: ReviewGrammar | None = None,
                        group_size: int = 2) -> list[dict]:
    """Groups of `group_size` completions per prompt from the grammar, sorted best first by the
    oracle and carrying its rewards; groups whose rewards all tie carry no preference and are
    drawn again."""
    grammar = grammar or ReviewGrammar()
    rng = _rng(seed, f"pref-{split}")
    out: list[dict] = []
    while len(out) < n:
        prompt = grammar.sample(rng).prompt
        completions = [grammar.complete(rng, prompt) for _ in range(group_size)]
        rewards = [oracle_reward(f"{prompt} {c}") for c in completions]
        if max(rewards) == min(rewards):
            continue
        order = sorted(range(group_size), key=lambda i: -rewards[i])
        out.append({"prompt": prompt, "completions": [completions[i] for i in order],
                    "rewards": [rewards[i] for i in order]})
    return out
