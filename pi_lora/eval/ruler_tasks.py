"""RULER's synthetic tasks (Hsieh et al. 2024), generated from a seed, and their scorers.

Each task is what RULER's scripts/data/synthetic define: the needle sentence, the question and
the answer prefix, the counts (multi-key 4 keys, multi-value 4 values, multi-query 4 keys,
variable tracking 1 chain of 4 hops, common words 10 words repeated 30x against 3x, frequent
words a Zipf(2) sample), and `string_match_all` as the score. What differs, and why, is in
docs/certify.md: keys come from a built-in adjective-noun list (not `wonderwords`), common words
from the shipped public-domain plays, there are no in-context examples and no QA task (QA needs
SQuAD / HotpotQA, a download), and the single-needle instruction is worded in the plural so
tasks can share one context.

A `Sample` is the task's part of a context: lines to hide in the haystack (`needles`), or a
block of text built to a size (`block`: cwe's word list, fwe's coded text), plus the question
asked after the context and the references the answer must contain.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

TASK_NAMES = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe",
              "fwe")
# RULER's tokens_to_generate per task: the cap of each answer's budget
TOKENS_TO_GENERATE = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50}

NEEDLE = "One of the special magic numbers for {key} is: {value}."
NIAH_INSTRUCTION = ("Some special magic numbers are hidden within the following text. Make sure "
                    "to memorize it. I will quiz you about the numbers afterwards.")
VT_INSTRUCTION = "Memorize and track the chain(s) of variable assignment hidden in the following text."
CWE_HEADER = ("Below is a numbered list of words. In these words, some appear more often than "
              "others. Memorize the ones that appear most often.")
FWE_HEADER = ("Read the following coded text and track the frequency of each coded word. Find "
              "the three most frequently appeared coded words.")
COMMON_WORDS = 10
CODED_WORD_LETTERS = 6
ZIPF_ALPHA = 2.0
_ZETA_2 = math.pi**2 / 6  # zeta(ZIPF_ALPHA), the Zipf normaliser

# keys are RULER's "adjective-noun" words; 48 x 48 distinct keys
_ADJECTIVES = (
    "amber ancient bitter brave bright calm clever cold crimson curious dark eager early "
    "fancy fierce gentle golden grand happy hidden humble icy jolly kind lazy little lively "
    "lonely loud lucky mellow misty noble odd pale proud quiet rapid rough royal rusty sharp "
    "shiny silent silver sleepy smooth solid swift").split()
_NOUNS = (
    "anchor apple arrow badger basket beacon bell blossom bridge candle canyon castle cloud "
    "comet compass crystal desert dragon eagle falcon feather forest fountain garden glacier "
    "hammer harbor island jungle kettle ladder lantern meadow mirror mountain needle ocean "
    "orchard pebble pillow planet river saddle shadow signal thunder tiger tower").split()


@dataclass(frozen=True)
class Sample:
    """One task's part of a context and the question asked after it."""

    task: str
    question: str  # the question and RULER's answer prefix, appended after the context
    references: tuple[str, ...]
    instruction: str = ""  # the task's line at the top of the context
    needles: tuple[str, ...] = ()  # lines hidden in the haystack
    chained: bool = False  # the needles keep their order (a variable chain)
    # cwe / fwe: their text with n entries; the sizes between which it defines the task
    block: Callable[[int], str] | None = field(default=None, compare=False, repr=False)
    block_sizes: tuple[int, int] = (0, 0)

    @property
    def generation_cap(self) -> int:
        return TOKENS_TO_GENERATE[self.task.split("_")[0]]


class Draws:
    """Keys, values and variable names for one context, never the same twice in it: in a
    shared context one task's needle must not answer another task's question."""

    def __init__(self) -> None:
        self.taken: set[str] = set()

    def _unique(self, make: Callable[[], str]) -> str:
        while (value := make()) in self.taken:
            pass
        self.taken.add(value)
        return value

    def key(self, rng: random.Random) -> str:
        return self._unique(lambda: f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}")

    def number(self, rng: random.Random, digits: int = 7) -> str:
        return self._unique(lambda: str(rng.randint(10 ** (digits - 1), 10**digits - 1)))

    def variable(self, rng: random.Random) -> str:
        return self._unique(lambda: "".join(rng.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZ", k=5)))


def task_rng(seed: int, task: str, length: int, trial: int) -> random.Random:
    """A task's draws depend only on (seed, task, length, trial), not on which others run."""
    return random.Random(f"{seed}:{task}:{length}:{trial}")


def _joined(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + ", and " + items[-1]


def niah(task: str, rng: random.Random, draws: Draws, keys: int = 1, values: int = 1,
         queries: int = 1) -> Sample:
    """Needles "One of the special magic numbers for KEY is: VALUE."; the question asks the
    values of `queries` of the keys (the others are distractors)."""
    keys = max(keys, queries)
    names = [draws.key(rng) for _ in range(keys)]
    found = {name: [draws.number(rng) for _ in range(values)] for name in names}
    needles = [NEEDLE.format(key=name, value=value) for name in names for value in found[name]]
    rng.shuffle(needles)
    asked = [names[i] for i in rng.sample(range(keys), queries)]
    query = _joined(asked)
    if queries * values == 1:
        question = (f"What is the special magic number for {query} mentioned in the provided "
                    f"text? The special magic number for {query} mentioned in the provided text is")
    else:
        question = (f"What are all the special magic numbers for {query} mentioned in the "
                    f"provided text? The special magic numbers for {query} mentioned in the "
                    "provided text are")
    return Sample(task, question, tuple(v for name in asked for v in found[name]),
                  NIAH_INSTRUCTION, tuple(needles))


def variable_tracking(rng: random.Random, draws: Draws, hops: int = 4) -> Sample:
    """One chain "VAR A = 12345", "VAR B = VAR A", ...: every name holds the value."""
    names = [draws.variable(rng) for _ in range(hops + 1)]
    value = draws.number(rng, digits=5)
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]}"
                                             for j in range(hops)]
    question = (f"Question: Find all variables that are assigned the value {value} in the text "
                f"above. Answer: According to the chain(s) of variable assignment in the text "
                f"above, {hops + 1} variables are assigned the value {value}, they are:")
    return Sample("vt", question, tuple(names), VT_INSTRUCTION, tuple(chain), chained=True)


def common_words(rng: random.Random, words: Sequence[str], repeats: tuple[int, int]) -> Sample:
    """A numbered list where 10 words occur `repeats[0]` times and n others `repeats[1]` times
    (RULER: 30 / 3, or 6 / 1 below 4096 tokens); n is the block's size."""
    order = rng.sample(list(words), len(words))
    common, shuffle_seed = order[:COMMON_WORDS], rng.random()

    def render(n: int) -> str:
        entries = common * repeats[0] + order[COMMON_WORDS:COMMON_WORDS + n] * repeats[1]
        random.Random(shuffle_seed).shuffle(entries)
        listed = " ".join(f"{i + 1}. {word}" for i, word in enumerate(entries))
        return f"{CWE_HEADER}\n{listed}"

    question = ("Question: What are the 10 most common words in the above list? Answer: The top "
                "10 words that appear most often in the list are:")
    return Sample("cwe", question, tuple(common), block=render,
                  block_sizes=(0, len(order) - COMMON_WORDS))


def zipf_counts(total_words: int, vocabulary: int) -> list[int]:
    """Occurrences of the k-th ranked coded word among `total_words` (RULER's fwe)."""
    return [int(total_words * k**-ZIPF_ALPHA / _ZETA_2) for k in range(1, vocabulary + 1)]


def _fwe_defined(total_words: int) -> bool:
    """Ranks 2-4 (the answer; rank 1 is the dots) occur a distinct number of times, each
    more often than rank 5: otherwise "the three most frequent" has no single answer."""
    c = zipf_counts(total_words, 5)
    return c[1] > c[2] > c[3] > c[4]


def frequent_words(rng: random.Random, length: int) -> Sample:
    """Coded 6-letter words with Zipf(2) counts over a vocabulary of length // 50 (RULER); the
    top-ranked word is the noise '....', the answer the next three."""
    size = max(length // 50, 8)
    vocab: set[str] = set()
    while len(vocab) < size:
        vocab.add("".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=CODED_WORD_LETTERS)))
    ranked = rng.sample(sorted(vocab), size)
    ranked[0] = "...."
    shuffle_seed = rng.random()

    def render(n: int) -> str:
        words = [w for w, c in zip(ranked, zipf_counts(n, size), strict=True) for _ in range(c)]
        random.Random(shuffle_seed).shuffle(words)
        return f"{FWE_HEADER}\n{' '.join(words)}"

    smallest = next(n for n in range(8, 10_000) if _fwe_defined(n))
    question = ("Question: Do not provide any explanation. Please ignore the dots '....'. What "
                "are the three most frequently appeared words in the above coded text? Answer: "
                "According to the coded text above, the three most frequently appeared words are:")
    return Sample("fwe", question, tuple(ranked[1:4]), block=render,
                  block_sizes=(smallest, 10**9))


def generate(task: str, seed: int, length: int, trial: int, draws: Draws,
             words: Sequence[str], block_tokens: int) -> Sample:
    """The sample of `task` for one (length, trial); `block_tokens` (the room cwe's list gets)
    picks RULER's repeat counts."""
    rng = task_rng(seed, task, length, trial)
    if task == "niah_single":
        return niah(task, rng, draws)
    if task == "niah_multikey":
        return niah(task, rng, draws, keys=4)
    if task == "niah_multivalue":
        return niah(task, rng, draws, values=4)
    if task == "niah_multiquery":
        return niah(task, rng, draws, queries=4)
    if task == "vt":
        return variable_tracking(rng, draws)
    if task == "cwe":
        return common_words(rng, words, (30, 3) if block_tokens >= 4096 else (6, 1))
    if task == "fwe":
        return frequent_words(rng, length)
    raise ValueError(f"unknown task {task!r}")


def word_list(texts: Sequence[str]) -> list[str]:
    """Distinct lowercase words (3-12 letters) of the texts, sorted: cwe's vocabulary."""
    found: set[str] = set()
    for text in texts:
        found.update(w for w in re.findall(r"[a-z]+", text.lower()) if 3 <= len(w) <= 12)
    return sorted(found)


# ---------------------------------------------------------------------------- scoring


def postprocess(prediction: str) -> str:
    """RULER's clean-up: strip, control characters become newlines."""
    return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """RULER's score: the fraction of references found (case-insensitive) in the answer."""
    answer = postprocess(prediction).lower()
    return sum(ref.lower() in answer for ref in references) / len(references)


def task_parameters() -> dict[str, dict[str, object]]:
    """What each task is, for the certificate's protocol."""
    return {
        "niah_single": {"keys": 1, "values": 1, "queries": 1},
        "niah_multikey": {"keys": 4, "values": 1, "queries": 1},
        "niah_multivalue": {"keys": 1, "values": 4, "queries": 1},
        "niah_multiquery": {"keys": 4, "values": 1, "queries": 4},
        "vt": {"chains": 1, "hops": 4, "value_digits": 5},
        "cwe": {"common_words": COMMON_WORDS,
                "repeats": "30 common / 3 others, or 6 / 1 when the list has under 4096 tokens"},
        "fwe": {"alpha": ZIPF_ALPHA, "coded_word_letters": CODED_WORD_LETTERS,
                "vocabulary": "length // 50", "answer": "ranks 2-4 (rank 1 is '....')"},
    }
