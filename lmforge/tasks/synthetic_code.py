"""A procedurally generated Python function-writing task with a difficulty ladder.

Difficulty = the number of composed steps. A small model can learn to compose because of
regularity: one step = one phrase in the prompt = one line `ARG = <expr>` of code, in order.
Expected values come from running the reference in process (our generated code, trusted); model
output is untrusted and only ever runs in the sandbox, through `check_program`. Functions never
take a bool: two inputs cannot make three distinct tests, so bool-input steps are only taught
inside compositions.
"""

from __future__ import annotations

import ast
import hashlib
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache, partial
from string import Template
from typing import Any

from lmforge import sandbox
from lmforge.errors import UserError
from lmforge.sandbox import Limits
from lmforge.tasks import checks
from lmforge.tasks.base import CodeItem
from lmforge.train.progress import Ticker

TYPES = ("ints", "int", "str", "words", "bool", "counts")
START_TYPES = ("ints", "int", "str", "words", "counts")
MAX_DIFFICULTY = 4
VERBS = tuple("tally mix sort fold scan pick build shape clean sift crunch twist merge trim spin "
              "pack tune blend forge brew".split())
NOUNS = tuple("gems beans stars coins notes leaves shells stones cards seeds bolts pearls tiles "
              "rings dots bricks waves marks chips keys".split())
# None may be `x`, `w` or `i`: those are the comprehension variables in the code templates.
ARG_NAMES: dict[str, tuple[str, ...]] = {
    "ints": ("nums", "values", "xs", "items", "data"), "int": ("n", "num", "value", "k"),
    "str": ("s", "text", "word", "line"), "words": ("words", "tokens", "names", "parts"),
    "bool": ("flag", "ok", "cond"), "counts": ("counts", "freq", "tally", "table")}
VOCAB = tuple("ant apple bee bird button cat cow dog egg elk fig fish fox frog garden hat ice ink "
              "jam kite leaf lemon log map moon net oak orange owl pen pepper rabbit rain rat red "
              "rock sea silver sky snow star sun tea tomato toy tree van web wind window yak "
              "zoo".split())
# Letters that occur in VOCAB, so that count/replace/startswith steps are rarely no-ops.
COMMON_LETTERS = "aeiorstnl"
FIRST_LETTERS = "".join(sorted({w[0] for w in VOCAB}))
ALPHABET = "abcdefghijklmnopqrstuvwxyz"
# Two words that start with (else contain) each letter: inputs that exercise that letter.
_LETTER_WORDS = {ch: ([w for w in VOCAB if w.startswith(ch)] + [w for w in VOCAB if ch in w])[:2]
                 for ch in ALPHABET}
SEPARATORS = ("-", "_", "+", "/", " ", ".")
INT_LO, INT_HI, MAX_INT = -9, 20, 10**6


@dataclass(frozen=True)
class Primitive:
    """One step: a phrase and a one-line expression over `$arg` sharing constants `$slot`.

    consts: (slot, spec), spec "lo..hi" (an int) or a _POOLS key. Letters and separators are
    rendered with repr() in phrase and code alike, so the prompt quotes the code's literal.
    """

    name: str
    category: str
    in_type: str
    out_type: str
    phrase: str
    code: str
    consts: tuple[tuple[str, str], ...] = ()


# One primitive per row: name, category, types, constants ("c=1..9" an int range, "a=common"
# a letter pool, "-" none) | phrase | code. Indented lines continue the row above.
_TABLE = """
add arithmetic int->int c=1..9 | adds $c to the number | $arg + $c
sub arithmetic int->int c=1..9 | subtracts $c from the number | $arg - $c
mul arithmetic int->int c=2..5 | multiplies the number by $c | $arg * $c
mod arithmetic int->int c=2..7 | takes the number modulo $c | $arg % $c
floordiv arithmetic int->int c=2..5 | floor-divides the number by $c | $arg // $c
square arithmetic int->int - | squares the number | $arg * $arg
abs arithmetic int->int - | takes the absolute value of the number | abs($arg)
double_or_negate conditional int->int c=0..9
    | doubles the number if it is greater than $c and otherwise negates it
    | $arg * 2 if $arg > $c else -$arg
is_gt comparison int->bool c=0..9 | checks whether the number is greater than $c | $arg > $c
is_even comparison int->bool - | checks whether the number is even | $arg % 2 == 0
yes_no conditional bool->str - | answers 'yes' if that is true and 'no' otherwise
    | 'yes' if $arg else 'no'
map_add map ints->ints c=1..9 | adds $c to each number | [x + $c for x in $arg]
map_mul map ints->ints c=2..5 | multiplies each number by $c | [x * $c for x in $arg]
map_square map ints->ints - | squares each number | [x * x for x in $arg]
map_abs map ints->ints - | takes the absolute value of each number | [abs(x) for x in $arg]
filter_gt filter ints->ints c=0..9 | keeps the numbers greater than $c | [x for x in $arg if x > $c]
filter_lt filter ints->ints c=0..9 | keeps the numbers less than $c | [x for x in $arg if x < $c]
filter_even filter ints->ints - | keeps the even numbers | [x for x in $arg if x % 2 == 0]
filter_odd filter ints->ints - | keeps the odd numbers | [x for x in $arg if x % 2 == 1]
filter_ne filter ints->ints c=0..9 | removes the numbers equal to $c | [x for x in $arg if x != $c]
sort_asc reorder ints->ints - | sorts the numbers in ascending order | sorted($arg)
sort_desc reorder ints->ints - | sorts the numbers in descending order | sorted($arg, reverse=True)
reverse reorder ints->ints - | reverses the order of the numbers | $arg[::-1]
take_first reorder ints->ints c=1..4 | keeps the first $c numbers | $arg[:$c]
dedup reorder ints->ints - | removes repeated numbers keeping the first of each
    | list(dict.fromkeys($arg))
running_total loop ints->ints - | replaces each number by the running total up to it
    | [sum($arg[:i + 1]) for i in range(len($arg))]
pair_diff loop ints->ints - | subtracts each number from the next one
    | [$arg[i + 1] - $arg[i] for i in range(len($arg) - 1)]
sum reduce ints->int - | adds up the numbers | sum($arg)
max reduce ints->int - | takes the largest number or 0 if there are none | max($arg, default=0)
min reduce ints->int - | takes the smallest number or 0 if there are none | min($arg, default=0)
len reduce ints->int - | counts the numbers | len($arg)
count_eq reduce ints->int c=0..9 | counts how many numbers equal $c | $arg.count($c)
upper string str->str - | converts the text to uppercase | $arg.upper()
lower string str->str - | converts the text to lowercase | $arg.lower()
reverse_text string str->str - | reverses the text | $arg[::-1]
replace_char string str->str a=common,b=any | replaces every $a with $b | $arg.replace($a, $b)
take_chars string str->str c=2..6 | keeps the first $c characters | $arg[:$c]
strip string str->str - | removes the spaces at both ends | $arg.strip()
count_char string str->int a=common | counts how many times $a appears | $arg.count($a)
text_len string str->int - | counts the characters | len($arg)
split split str->words - | splits the text into words | $arg.split()
join join words->str sep=sep | joins the words with $sep | $sep.join($arg)
starts_with words words->words a=initial | keeps the words that start with $a
    | [w for w in $arg if w.startswith($a)]
longer_than words words->words c=3..5 | keeps the words longer than $c letters
    | [w for w in $arg if len(w) > $c]
upper_each words words->words - | uppercases each word | [w.upper() for w in $arg]
word_lengths words words->ints - | takes the length of each word | [len(w) for w in $arg]
word_counts counts words->counts - | counts how many times each word appears
    | {w: $arg.count(w) for w in $arg}
sorted_keys counts counts->words - | lists the distinct words in alphabetical order | sorted($arg)
total_count counts counts->int - | adds up the counts | sum($arg.values())
distinct_count counts counts->int - | counts the distinct words | len($arg)
"""
_POOLS = {"common": COMMON_LETTERS, "initial": FIRST_LETTERS, "any": ALPHABET, "sep": SEPARATORS}


def _parse_table(table: str) -> list[Primitive]:
    out: list[Primitive] = []
    for row in re.sub(r"\n\s+", " ", table).strip().splitlines():
        head, phrase, code = (part.strip() for part in row.split(" | "))
        name, category, types, consts = head.split()
        spec = tuple((slot, pool) for slot, _, pool in (c.partition("=") for c in consts.split(","))
                     if pool)
        in_type, out_type = types.split("->")
        out.append(Primitive(name, category, in_type, out_type, phrase, code, spec))
    return out


_PRIMITIVE_LIST = tuple(_parse_table(_TABLE))
PRIMITIVES: dict[str, Primitive] = {p.name: p for p in _PRIMITIVE_LIST}
Case = tuple[Any, Any]


@dataclass(frozen=True)
class Problem:
    """One function-writing problem: the prompt is the user turn, the solution the answer, and
    the tests asserts that call `same`, run after an answer as `checked_program` lays them out."""

    task_id: str
    difficulty: int
    composition: tuple[str, ...]
    prompt: str
    entry_point: str
    solution: str
    tests: tuple[str, ...]


@cache
def _compositions(difficulty: int) -> tuple[tuple[str, ...], ...]:
    by_in: dict[str, list[str]] = {t: [] for t in TYPES}
    for p in _PRIMITIVE_LIST:
        by_in[p.in_type].append(p.name)
    frontier = [(p.name,) for p in _PRIMITIVE_LIST if p.in_type in START_TYPES]
    for _ in range(difficulty - 1):
        frontier = [c + (n,) for c in frontier for n in by_in[PRIMITIVES[c[-1]].out_type]]
    return tuple(sorted(frontier))


def compositions(difficulty: int) -> list[tuple[str, ...]]:
    """All type-valid compositions of `difficulty` steps (not starting on bool), sorted."""
    if not 1 <= difficulty <= MAX_DIFFICULTY:
        raise UserError(f"difficulty must be in 1..{MAX_DIFFICULTY}, got {difficulty}")
    return list(_compositions(difficulty))


def _unit_hash(composition: Sequence[str]) -> float:
    """A stable value in [0, 1): hashlib, since str hash() is salted per process."""
    digest = hashlib.sha256("|".join(composition).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def is_held_out(composition: Sequence[str], unseen_fraction: float) -> bool:
    """Whether a composition is reserved for the unseen split (d1 never is; seed-independent)."""
    return len(composition) >= 2 and _unit_hash(composition) < unseen_fraction


@cache
def _hashes(difficulty: int) -> tuple[float, ...]:
    return tuple(_unit_hash(c) for c in _compositions(difficulty))


def _partition(difficulty: int, unseen_fraction: float
               ) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]]]:
    """(seen, held out) compositions of `difficulty`, by the rule of `is_held_out`."""
    pairs = list(zip(_compositions(difficulty), _hashes(difficulty)))
    return ([c for c, h in pairs if difficulty == 1 or h >= unseen_fraction],
            [c for c, h in pairs if difficulty > 1 and h < unseen_fraction])


def _draw_consts(p: Primitive, rng: random.Random) -> dict[str, str]:
    """Rendered constants (ints as digits, letters/separators as repr) for one step."""
    out: dict[str, str] = {}
    for slot, spec in p.consts:
        if ".." in spec:
            lo, hi = spec.split("..")
            out[slot] = str(rng.randint(int(lo), int(hi)))
        else:  # letters distinct within a step: replace 'a' with 'a' would be a no-op
            out[slot] = repr(rng.choice([c for c in _POOLS[spec] if repr(c) not in out.values()]))
    return out


def _gen_int(rng: random.Random, ints: Sequence[int], bias: float = 0.4) -> int:
    # rng.random() arithmetic rather than randint: this is the hot loop of make_splits.
    if ints and rng.random() < bias:
        near = ints[int(rng.random() * len(ints))] + int(rng.random() * 3) - 1
        return min(INT_HI, max(INT_LO, near))
    return INT_LO + int(rng.random() * (INT_HI - INT_LO + 1))


def _gen_words(rng: random.Random, letters: Sequence[str], lo: int, hi: int) -> list[str]:
    # A small pool per input makes repeated words (what word_counts needs) common.
    pool = rng.sample(VOCAB, 4) + [w for ch in letters for w in _LETTER_WORDS[ch]]
    return [rng.choice(pool) for _ in range(rng.randint(lo, hi))]


def gen_input(type_: str, rng: random.Random, ints: Sequence[int] = (),
              letters: Sequence[str] = ()) -> Any:
    """A random input of `type_`, biased towards the given constants."""
    if type_ == "ints":
        return [_gen_int(rng, ints) for _ in range(rng.randint(0, 8))]
    if type_ == "int":  # one value per test: the boundary (c or c + 1) must come up often
        return _gen_int(rng, ints, 0.7)
    if type_ == "words":
        return _gen_words(rng, letters, 0, 7)
    if type_ == "counts":
        return {w: rng.randint(1, 5) for w in _gen_words(rng, letters, 0, 5)}
    if type_ == "bool":
        return rng.random() < 0.5
    if type_ == "str":
        words = _gen_words(rng, letters, 1, 5) if rng.random() > 0.05 else []
        # Some capitals and padding, so that lower() and strip() are not no-ops.
        words = [w.capitalize() if rng.random() < 0.2 else w for w in words]
        pad = " " if rng.random() < 0.25 else ""
        return pad + " ".join(words) + pad
    raise UserError(f"unknown type {type_!r}; expected one of {', '.join(TYPES)}")


def _small(value: Any) -> bool:
    """Small enough for a 2M model to write down: no huge ints, short reprs."""
    if isinstance(value, (int, str)):
        return len(value) <= 90 if isinstance(value, str) else -MAX_INT <= value <= MAX_INT
    items = value.values() if isinstance(value, dict) else value
    return (all(not isinstance(v, int) or -MAX_INT <= v <= MAX_INT for v in items)
            and len(repr(value)) <= 100)


def _fresh(value: Any) -> Any:
    """A copy deep enough for our types (containers of immutables), much cheaper than eval."""
    return list(value) if isinstance(value, list) else (
        dict(value) if isinstance(value, dict) else value)


def _round_trips(cases: Sequence[Case]) -> bool:
    """Whether every repr() reads back as an equal value of the same type (one parse for all)."""
    try:
        back = ast.literal_eval("[" + ", ".join(f"({x!r}, {y!r})" for x, y in cases) + "]")
    except (ValueError, SyntaxError):
        return False
    return all(bx == x and by == y and type(bx) is type(x) and type(by) is type(y)
               for (bx, by), (x, y) in zip(back, cases))


def _validate(composition: Sequence[str]) -> None:
    if not 1 <= len(composition) <= MAX_DIFFICULTY:
        raise UserError(f"a composition has 1..{MAX_DIFFICULTY} steps, got {len(composition)}")
    for name in (n for n in composition if n not in PRIMITIVES):
        raise UserError(f"unknown primitive {name!r}")
    types = [(PRIMITIVES[n].in_type, PRIMITIVES[n].out_type) for n in composition]
    if types[0][0] not in START_TYPES or any(a[1] != b[0] for a, b in zip(types, types[1:])):
        raise UserError(f"types do not chain (or start on bool) in {tuple(composition)}")


def _solution(composition: Sequence[str], entry: str, arg: str,
              rendered: Sequence[dict[str, str]]) -> str:
    lines = [f"    {arg} = " + Template(PRIMITIVES[n].code).substitute(c, arg=arg)
             for n, c in zip(composition, rendered)]
    return f"def {entry}({arg}):\n" + "\n".join(lines) + f"\n    return {arg}\n"


def _compile(solution: str, entry: str, label: str) -> Any:
    namespace: dict[str, Any] = {}
    exec(compile(solution, f"<reference {label}>", "exec"), namespace)  # our code, trusted
    return namespace[entry]


def _mutants(composition: Sequence[str], entry: str, arg: str,
             rendered: Sequence[dict[str, str]]) -> list[Any]:
    """Near misses the tests should reject: one drawn int constant off by one (`> 4` as `> 3`
    or `> 5`), or one type-preserving step skipped. Compiled once, with keyword parameters for
    the constants and the skipped step, since a compile per mutant dominated the time."""
    params = [{slot: f"_k{i}{slot}" if v.isdigit() else v for slot, v in c.items()}
              for i, c in enumerate(rendered)]
    consts = {params[i][slot]: int(v) for i, c in enumerate(rendered)
              for slot, v in c.items() if v.isdigit()}
    skips = [i for i, n in enumerate(composition)
             if len(composition) > 1 and PRIMITIVES[n].in_type == PRIMITIVES[n].out_type]
    if not consts and not skips:
        return []
    lines = _solution(composition, entry, arg, params).splitlines()
    body = [ln.replace(" = ", f" = {arg} if _skip == {i} else (", 1) + ")"
            for i, ln in enumerate(lines[1:-1])]
    kw = "".join(f", {k}={v}" for k, v in consts.items())
    source = "\n".join([f"def {entry}({arg}, *, _skip=-1{kw}):", *body, lines[-1]]) + "\n"
    fn = _compile(source, entry, "mutant")
    return [partial(fn, **{name: value + delta}) for name, value in consts.items()
            for delta in (-1, 1)] + [partial(fn, _skip=i) for i in skips]


def _select(killers: list[Case], others: list[Case], n_tests: int,
            same_type: bool) -> list[Case] | None:
    """n_tests cases, killers first, whose outputs differ and are not all the input itself."""
    cases, pool = killers[:n_tests], list(others)
    wants = (lambda c: len({repr(y) for _, y in cases}) == 1 and repr(c[1]) != repr(cases[0][1]),
             lambda c: same_type and all(repr(x) == repr(y) for x, y in cases)
             and repr(c[0]) != repr(c[1]))
    for want in wants if cases else ():
        pick = next((c for c in pool if want(c)), None)
        if pick is not None and len(cases) < n_tests:
            cases.append(pick)
            pool.remove(pick)
    cases += pool[: n_tests - len(cases)]
    if len(cases) < n_tests or len({repr(y) for _, y in cases}) == 1:
        return None
    if same_type and all(repr(x) == repr(y) for x, y in cases):
        return None  # an identity function would pass
    # Asserts spell values with repr(): they must read back as equal values of the same types.
    return cases if _round_trips(cases) else None


def _draw_cases(fn: Any, mutants: Sequence[Any], in_type: str, out_type: str,
                rng: random.Random, n_tests: int, hints: tuple[list[int], list[str]]
                ) -> list[Case] | None:
    """Tests for the reference, preferring inputs that kill a mutant (see `_mutants`)."""
    killers: list[Case] = []
    others: list[Case] = []
    alive = list(mutants)
    seen: set[str] = set()
    last_kill = 0
    for i in range(8 * n_tests):
        x = gen_input(in_type, rng, *hints)
        key = repr(x)
        if key in seen:  # inputs are small by construction; only outputs can blow up
            continue
        seen.add(key)
        y = fn(_fresh(x))  # a fresh copy, so the reference cannot alias x
        if not _small(y):
            continue
        still = [m for m in alive if m(_fresh(x)) == y]
        if len(still) < len(alive) and len(killers) < n_tests:
            killers.append((x, y))
            alive, last_kill = still, i
        else:
            others.append((x, y))
        # Equivalent mutants never die: stop once the rest have had a fair chance.
        if len(killers) + len(others) > n_tests and (not alive or i - last_kill > 5 * n_tests):
            break
    cases = _select(killers, others, n_tests, in_type == out_type)
    if cases is not None:
        rng.shuffle(cases)  # the boundary cases need not come first
    return cases


def make_problem(composition: Sequence[str], rng: random.Random, task_id: str,
                 n_tests: int = 4, attempts: int = 10) -> Problem | None:
    """Instantiate a composition with random names, constants and tests.

    The tests always tell the reference from a constant (and an identity) function; None when
    no draw of inputs could (`filter_even` then `filter_odd` always returns []). They also tell
    it from the near misses of `_mutants` where a draw of inputs manages: best effort, as some
    make no difference at all (`> 4` after `> 7`, sorting before a sum).
    """
    _validate(composition)
    if n_tests < 3:
        raise UserError(f"n_tests must be at least 3, got {n_tests}")
    entry = f"{rng.choice(VERBS)}_{rng.choice(NOUNS)}"
    first, last = PRIMITIVES[composition[0]], PRIMITIVES[composition[-1]]
    arg = rng.choice(ARG_NAMES[first.in_type])
    rendered = [_draw_consts(PRIMITIVES[n], rng) for n in composition]
    phrases = [Template(PRIMITIVES[n].phrase).substitute(c) for n, c in zip(composition, rendered)]
    steps = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + ", then " + phrases[-1]
    solution = _solution(composition, entry, arg, rendered)
    fn, mutants = _compile(solution, entry, task_id), _mutants(composition, entry, arg, rendered)
    values = [v for consts in rendered for v in consts.values()]
    # Inputs are biased towards the constants, so that each step does something.
    hints = ([int(v) for v in values if v.isdigit()], [v[1] for v in values if v[1:2].isalpha()])
    for _ in range(attempts):
        cases = _draw_cases(fn, mutants, first.in_type, last.out_type, rng, n_tests, hints)
        if cases is not None:
            return Problem(task_id, len(composition), tuple(composition),
                           # no backticks: " name" tokenizes as in "def name("
                           f"Write a Python function {entry}({arg}) that {steps}.", entry,
                           solution, tuple(_test(entry, x, y) for x, y in cases))
    return None


def _test(entry: str, x: Any, y: Any) -> str:
    call = f"{entry}({x!r})"
    return f"assert same({call}, {y!r}), {f'{call} == {y!r}'!r}"


def checked_program(code: str, tests: Sequence[str], only: int | None = None) -> str:
    """The program that runs `code`, then `tests` (all, or only test `only`): the asserts call
    the comparator every code task shares (tasks/checks.py), which wants exact builtin types
    (here a bool is not an int), bound with all the tests use before the answer runs."""
    return _harness(tests).program(code, only)


def _harness(tests: Sequence[str]) -> checks.Harness:
    return checks.for_asserts(tests, numeric=False)


@dataclass(frozen=True)
class Splits:
    """train: d1-d3 problems from seen compositions only, shuffled.
    heldout: difficulty 1..4 -> problems from seen compositions, drawn with other RNGs than
        train and never sharing a prompt with it. "Seen" at d4 only means "not reserved for
        unseen": no d4 composition is ever trained on; heldout[4] measures composing four deep.
    unseen: problems from held-out compositions (d2-d4 evenly); no train problem has them.
    """

    train: tuple[Problem, ...]
    heldout: dict[int, tuple[Problem, ...]]
    unseen: tuple[Problem, ...]
    unseen_fraction: float = 0.2

    def stats(self) -> dict[str, Any]:
        """Problems per difficulty per split, and compositions per difficulty: all, held out,
        and how many distinct ones train and unseen actually use."""
        def per_d(ps: Sequence[Problem]) -> dict[int, int]:
            return dict(sorted(Counter(p.difficulty for p in ps).items()))

        def used(ps: Sequence[Problem], d: int) -> int:
            return len({p.composition for p in ps if p.difficulty == d})

        comps = {d: {"total": len(_compositions(d)), "held_out": len(_partition(
                     d, self.unseen_fraction)[1]), "in_train": used(self.train, d),
                     "in_unseen": used(self.unseen, d)} for d in range(1, MAX_DIFFICULTY + 1)}
        return {"train": per_d(self.train), "unseen": per_d(self.unseen),
                "heldout": {d: len(ps) for d, ps in self.heldout.items()}, "compositions": comps}


def _seeded(seed: int, *parts: object) -> random.Random:
    """An RNG per (seed, purpose), so changing one split's size never shifts another's draws."""
    key = "/".join(str(x) for x in (seed, *parts))
    return random.Random(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big"))


def _apportion(n: int, weights: Sequence[float]) -> list[int]:
    """Split n into integer parts proportional to weights; the remainder goes round-robin."""
    out = [int(n * w / sum(weights)) for w in weights]
    for i in range(n - sum(out)):
        out[i % len(out)] += 1
    return out


def _draw(pool: Sequence[tuple[str, ...]], k: int, rng: random.Random, prefix: str,
          taken: set[str]) -> list[Problem]:
    """k problems with prompts not in `taken` (which grows): composition first, uniformly."""
    if k and not pool:
        raise UserError(f"no compositions to draw {prefix} problems from; check unseen_fraction")
    out: list[Problem] = []
    for _ in range(50 * k + 100):
        if len(out) == k:
            return out
        p = make_problem(rng.choice(pool), rng, f"{prefix}/{len(out):05d}")
        if p is not None and p.prompt not in taken:
            taken.add(p.prompt)
            out.append(p)
    raise RuntimeError(f"could only make {len(out)} of {k} {prefix} problems")


def make_splits(seed: int = 0, n_train: int = 4000, n_eval: int = 200,
                train_mix: tuple[float, float, float] = (0.35, 0.4, 0.25),
                unseen_fraction: float = 0.2) -> Splits:
    """Train problems at d1-d3 and evaluation sets at d1-d4 plus unseen compositions.

    `train_mix` weights d1/d2/d3 in train. `unseen_fraction` of the d2-d4 compositions (chosen
    by a hash of the composition, so the same for every seed) never appear in train.
    """
    if n_train < 0 or n_eval < 0:
        raise UserError(f"n_train and n_eval must be >= 0, got {n_train} and {n_eval}")
    if len(train_mix) != 3 or min(train_mix) < 0 or sum(train_mix) <= 0:
        raise UserError(f"train_mix must be 3 non-negative weights for d1/d2/d3, got {train_mix}")
    if not 0.0 <= unseen_fraction < 1.0:
        raise UserError(f"unseen_fraction must be in [0, 1), got {unseen_fraction}")
    parts = {d: _partition(d, unseen_fraction) for d in range(1, MAX_DIFFICULTY + 1)}
    train_prompts: set[str] = set()
    train: list[Problem] = []
    for d, k in zip((1, 2, 3), _apportion(n_train, train_mix)):
        train += _draw(parts[d][0], k, _seeded(seed, "train", d), f"synthetic/d{d}/train",
                       train_prompts)
    _seeded(seed, "shuffle").shuffle(train)  # a consumer that does not shuffle still mixes

    heldout = {d: tuple(_draw(parts[d][0], n_eval, _seeded(seed, "heldout", d),
                              f"synthetic/d{d}/heldout", set(train_prompts)))
               for d in range(1, MAX_DIFFICULTY + 1)}
    unseen: list[Problem] = []
    for d, k in zip((2, 3, 4), _apportion(n_eval, (1, 1, 1))):
        unseen += _draw(parts[d][1], k, _seeded(seed, "unseen", d), f"synthetic/d{d}/unseen",
                        set(train_prompts))
    return Splits(tuple(train), heldout, tuple(unseen), unseen_fraction)


def _limits(timeout: float) -> Limits:
    if timeout <= 0:
        raise UserError(f"timeout must be > 0, got {timeout}")
    return Limits(timeout_s=timeout)


def check_program(solution_code: str, tests: Sequence[str],
                  timeout: float = 5.0) -> tuple[str, str]:
    """Run untrusted code and its asserts in the sandbox: (status, stderr tail).

    status: "passed" (ran to its end), "failed" (an assert failed, or the program exited
    before its end), "timeout", or "error" (any other exception, syntax errors included)."""
    r = sandbox.run(checked_program(solution_code, tests), _limits(timeout))
    return r.status, r.stderr


def run_checks(items: Sequence[tuple[str, Sequence[str]]], timeout: float = 5.0,
               workers: int = 2) -> list[str]:
    """Statuses of `check_program` for (solution, tests) pairs, in order, `workers` at a time."""
    programs = [checked_program(code, tests) for code, tests in items]
    tick = Ticker("sandbox checks", len(programs))
    return [r.status for r in sandbox.run_many(programs, _limits(timeout), workers=workers,
                                               progress=tick.advance)]


def to_code_items(problems: Sequence[Problem], signature_prefill: bool = True,
                  group: str | None = None) -> list[CodeItem]:
    """Problems as evaluation items. With `signature_prefill` the answer starts at
    `def name(arg):` (without its newline: in training that newline merges with the next
    line's indent into one token, so a prefill ending in a bare newline would be off-grid)."""
    return [CodeItem(task_id=p.task_id, prompt=p.prompt, tests="\n".join(p.tests) + "\n",
                     reference=p.solution[len(p.solution.splitlines()[0]):] if signature_prefill
                     else p.solution, entry_point=p.entry_point,
                     head=p.solution.splitlines()[0] if signature_prefill else "",
                     meta={"difficulty": p.difficulty, "composition": list(p.composition),
                           **({"group": group} if group else {})}, harness=_harness(p.tests))
            for p in problems]


_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)(?:```|\Z)", re.S | re.I)


def extract_code(completion: str) -> str:
    """The first fenced block's contents if there is a ``` fence, else the completion as is."""
    m = _FENCE.search(completion)
    return m.group(1) if m else completion
