"""Synthetic function-writing task: primitives, compositions, splits, and the sandboxed checker."""

from __future__ import annotations

import ast
import random
import re
import time

import pytest

from lmforge.errors import UserError
from lmforge.tasks.synthetic_code import (
    PRIMITIVES,
    START_TYPES,
    Problem,
    Splits,
    check_program,
    checked_program,
    compositions,
    extract_code,
    gen_input,
    is_held_out,
    make_problem,
    make_splits,
    run_checks,
    to_code_items,
)

SMALL = {"n_train": 300, "n_eval": 24}


@pytest.fixture(scope="module")
def splits() -> Splits:
    return make_splits(seed=0, **SMALL)


def _all(s: Splits) -> list[Problem]:
    return [*s.train, *(p for ps in s.heldout.values() for p in ps), *s.unseen]


def value_matches(type_: str, value: object) -> bool:
    """Whether `value` has the declared type exactly (a bool is not an int here)."""
    if type_ in ("ints", "words"):
        inner = int if type_ == "ints" else str
        return type(value) is list and all(type(v) is inner for v in value)
    if type_ == "counts":
        return type(value) is dict and all(
            type(k) is str and type(v) is int for k, v in value.items())
    return type(value) is {"int": int, "str": str, "bool": bool}[type_]


def _run_in_process(p: Problem) -> None:
    exec(checked_program(p.solution, p.tests), {})  # our own reference code, never model output


def test_primitive_catalogue_covers_every_category() -> None:
    assert len(PRIMITIVES) >= 20
    cats = {p.category for p in PRIMITIVES.values()}
    assert {"arithmetic", "comparison", "conditional", "map", "filter", "reorder", "reduce",
            "string", "split", "join", "words", "counts", "loop"} <= cats
    kinds = {(p.in_type, p.out_type) for p in PRIMITIVES.values()}
    assert {("int", "bool"), ("bool", "str"), ("str", "words"), ("words", "str"),
            ("words", "ints"), ("words", "counts"), ("counts", "words"),
            ("counts", "int")} <= kinds
    # Distinct phrases: the prompt must determine the code.
    assert len({p.phrase for p in PRIMITIVES.values()}) == len(PRIMITIVES)


def test_every_primitive_compiles_and_has_its_declared_types() -> None:
    rng = random.Random(1)
    for name, prim in PRIMITIVES.items():
        start = prim.in_type
        comp = (name,) if start in START_TYPES else ("is_even", name)
        p = make_problem(comp, rng, f"t/{name}")
        assert p is not None, name
        compile(p.solution, name, "exec")
        _run_in_process(p)
        ns: dict[str, object] = {}
        exec(p.solution, ns)
        fn = ns[p.entry_point]
        for _ in range(20):  # the output type holds on random inputs, not just the tests
            x = gen_input("int" if start == "bool" else start, rng)
            assert value_matches(prim.out_type, fn(x)), (name, x)  # type: ignore[operator]


def test_compositions_chain_types_and_are_deterministic() -> None:
    assert compositions(1) == sorted(compositions(1))
    for d in (1, 2, 3):
        comps = compositions(d)
        assert comps and all(len(c) == d for c in comps)
        for c in comps:
            assert PRIMITIVES[c[0]].in_type in START_TYPES
            assert all(PRIMITIVES[a].out_type == PRIMITIVES[b].in_type
                       for a, b in zip(c, c[1:]))
    with pytest.raises(UserError):
        compositions(5)
    with pytest.raises(UserError):
        make_problem(("sum", "sum"), random.Random(0), "bad")  # int is not ints


def test_make_splits_is_deterministic_per_seed(splits: Splits) -> None:
    assert make_splits(seed=0, **SMALL) == splits
    other = make_splits(seed=1, **SMALL)
    assert [p.prompt for p in other.train] != [p.prompt for p in splits.train]


def test_split_properties(splits: Splits) -> None:
    train_comps = {p.composition for p in splits.train}
    assert not any(is_held_out(c, 0.2) for c in train_comps)
    assert all(is_held_out(p.composition, 0.2) for p in splits.unseen)
    assert not train_comps & {p.composition for p in splits.unseen}
    assert {p.difficulty for p in splits.train} == {1, 2, 3}
    assert sorted(splits.heldout) == [1, 2, 3, 4]
    assert all(len(ps) == SMALL["n_eval"] and all(p.difficulty == d for p in ps)
               for d, ps in splits.heldout.items())
    assert len(splits.unseen) == SMALL["n_eval"]
    assert {p.difficulty for p in splits.unseen} == {2, 3, 4}
    train_prompts = {p.prompt for p in splits.train}
    assert len(train_prompts) == len(splits.train)
    assert not train_prompts & {p.prompt for p in _all(splits)[len(splits.train):]}
    assert not any(is_held_out(c, 0.2) for c in compositions(1))
    ids = [p.task_id for p in _all(splits)]
    assert len(set(ids)) == len(ids)
    stats = splits.stats()
    assert stats["train"] == {1: 105, 2: 120, 3: 75}  # 300 * (0.35, 0.4, 0.25)
    assert stats["compositions"][4]["in_train"] == 0
    assert 0 < stats["compositions"][3]["held_out"] < stats["compositions"][3]["total"]


def test_held_out_compositions_do_not_depend_on_seed(splits: Splits) -> None:
    other = make_splits(seed=3, n_train=0, n_eval=24)
    assert all(is_held_out(p.composition, 0.2) for p in other.unseen)
    with pytest.raises(UserError):
        make_splits(n_train=-1)
    with pytest.raises(UserError):
        make_splits(train_mix=(1.0, -1.0, 0.5))


def test_problem_structure(splits: Splits) -> None:
    for p in _all(splits):
        arg = re.fullmatch(r"def (\w+)\((\w+)\):", p.solution.splitlines()[0])
        assert arg is not None and arg.group(1) == p.entry_point
        name = arg.group(2)
        lines = p.solution.splitlines()
        assert lines[-1] == f"    return {name}" and p.solution.endswith("\n")
        body = lines[1:-1]
        assert len(body) == p.difficulty == len(p.composition)
        assert all(ln.startswith(f"    {name} = ") for ln in body)
        assert p.prompt.startswith(f"Write a Python function {p.entry_point}({name}) that ")
        assert p.prompt.count(", then ") == (p.difficulty > 1)
        assert p.task_id.startswith(f"synthetic/d{p.difficulty}/")


def test_tests_are_discriminating(splits: Splits) -> None:
    for p in _all(splits):
        assert len(p.tests) >= 3
        expected = []
        for t in p.tests:
            node = ast.parse(t).body[0]
            assert isinstance(node, ast.Assert) and isinstance(node.test, ast.Call)
            assert ast.unparse(node.test.func) == "same" and len(node.test.args) == 2
            call, want = node.test.args
            assert ast.unparse(call).startswith(f"{p.entry_point}(")
            expected.append(repr(ast.literal_eval(want)))
            said = f"{ast.get_source_segment(t, call)} == {ast.get_source_segment(t, want)}"
            assert node.msg is not None and ast.literal_eval(node.msg) == said
        assert len(set(expected)) > 1, p.task_id
    for p in _all(splits)[::17]:
        _run_in_process(p)


def _mutants(p: Problem) -> list[str]:
    """The reference with one drawn int constant moved by -1 or +1, rebuilt from the templates."""
    lines = p.solution.splitlines()
    arg = lines[0][lines[0].index("(") + 1:lines[0].index(")")]
    out = []
    for i, name in enumerate(p.composition):
        pattern = re.escape(f"    {arg} = " + PRIMITIVES[name].code)
        pattern = pattern.replace(re.escape("$arg"), re.escape(arg))
        pattern = pattern.replace(re.escape("$c"), r"(?P<c>\d+)")
        for slot in ("$sep", "$a", "$b"):
            pattern = pattern.replace(re.escape(slot), "'.'")
        m = re.fullmatch(pattern, lines[i + 1])
        assert m is not None, (pattern, lines[i + 1])
        if m.groupdict().get("c") is not None:
            for delta in (-1, 1):
                line = lines[i + 1]
                line = line[:m.start("c")] + str(int(m.group("c")) + delta) + line[m.end("c"):]
                out.append("\n".join([*lines[:i + 1], line, *lines[i + 2:]]) + "\n")
    return out


def _skip_mutants(p: Problem) -> list[str]:
    """The reference with one type-preserving step left out (d >= 2)."""
    lines = p.solution.splitlines(keepends=True)
    return ["".join(lines[:i + 1] + lines[i + 2:]) for i, name in enumerate(p.composition)
            if p.difficulty > 1 and PRIMITIVES[name].in_type == PRIMITIVES[name].out_type]


def _passes_in_process(solution: str, p: Problem) -> bool:
    try:
        _run_in_process(Problem(**{**p.__dict__, "solution": solution}))
    except AssertionError:
        return False
    return True


def test_tests_catch_near_misses(splits: Splits) -> None:
    # Best effort by design (some near misses are equivalent: `> 4` after `> 7`, a sort before
    # a sum), but at d1 the boundary is almost always testable, and most must be caught.
    survived = {d: [0, 0] for d in (1, 2, 3, 4)}
    skipped = [0, 0]
    for p in _all(splits):
        ms = _mutants(p)
        if ms:
            survived[p.difficulty][1] += 1
            survived[p.difficulty][0] += any(_passes_in_process(m, p) for m in ms)
        for m in _skip_mutants(p):
            skipped[0] += _passes_in_process(m, p)
            skipped[1] += 1
    assert survived[1][1] > 20 and survived[1][0] <= 0.05 * survived[1][1], survived
    assert sum(s for s, _ in survived.values()) <= 0.3 * sum(n for _, n in survived.values())
    assert skipped[1] > 100 and skipped[0] <= 0.25 * skipped[1], skipped


def test_references_pass_and_wrong_solutions_fail(splits: Splits) -> None:
    sample = [ps[i] for ps in splits.heldout.values() for i in (0, 1)] + list(splits.unseen[:2])
    assert run_checks([(p.solution, p.tests) for p in sample]) == ["passed"] * len(sample)
    wrong = [(f"def {p.entry_point}(a):\n    return 0\n", p.tests) for p in sample]
    caught = [(m, p.tests) for p in (*splits.heldout[1][:12], *splits.heldout[3][:4])
              for m in _mutants(p) + _skip_mutants(p) if not _passes_in_process(m, p)]
    assert len(caught) >= 4
    statuses = run_checks(wrong + caught[:8])
    assert "passed" not in statuses and set(statuses) <= {"failed", "error"}
    assert statuses[len(wrong):] == ["failed"] * len(caught[:8])


CHEATS = {  # answers (given the reference as `ref`) whose values claim to be the right ones
    "equal to everything": "class A:\n    __eq__ = lambda s, o: True\n    __ne__ = lambda s, o: "
                           "False\n    __hash__ = None\ndef f(x):\n    return A()",
    "a subclass that overrides ==": "class L(list):\n    __eq__ = lambda s, o: True\n"
                                    "class S(str):\n    __eq__ = lambda s, o: True\n"
                                    "def f(x):\n    return L() if isinstance(ref(x), list) else "
                                    "S()",
    "right containers, fake items": "class A:\n    __eq__ = lambda s, o: True\ndef f(x):\n"
                                    "    y = ref(x)\n    return {k: A() for k in y} if "
                                    "isinstance(y, dict) else [A() for _ in y] if "
                                    "isinstance(y, list) else A()",
    "shadowed builtins": "class A:\n    __eq__ = lambda s, o: True\ntype = lambda o: list\n"
                         "isinstance = lambda o, t: True\nsame = lambda *a: True\n"
                         "def f(x):\n    return A()",
    "right once, then rebinding `same`": "class A:\n    __eq__ = lambda s, o: True\ncalls = []\n"
                                         "def f(x):\n    calls.append(1)\n"
                                         "    globals()['same'] = lambda *a: True\n"
                                         "    return ref(x) if len(calls) == 1 else A()",
    "a bool for an int, an int for a bool": "def f(x):\n    y = ref(x)\n    return (y == 1) if "
                                            "type(y) is int and y in (0, 1) else int(y) if "
                                            "type(y) is bool else y",
}


def _cheat(p: Problem, cheat: str) -> str:
    """The cheat with `f` as the problem's function and the reference as `ref`."""
    ref = p.solution.replace(f"def {p.entry_point}(", "def ref(", 1)
    return ref + "\n" + cheat.replace("def f(", f"def {p.entry_point}(")


def _expected(test: str) -> object:
    return ast.literal_eval(ast.parse(test).body[0].test.args[1])  # type: ignore[attr-defined]


def test_values_cannot_claim_to_be_right(splits: Splits) -> None:
    sample = [ps[i] for ps in splits.heldout.values() for i in range(3)]
    by_type = {type(_expected(p.tests[0])): p for p in _all(splits)}
    assert {int, bool, str, list, dict} <= set(by_type)
    for name, cheat in CHEATS.items():
        for p in [*sample, *by_type.values()]:
            if name.startswith("a bool") and not any(
                    _expected(t) in (0, 1) and type(_expected(t)) in (int, bool) for t in p.tests):
                continue  # the cheat returns the right value: it only fools `==` on 0 and 1
            assert not _passes_in_process(_cheat(p, cheat), p), (name, p.task_id)
        assert _passes_in_process(_cheat(sample[0], "def f(x):\n    return ref(x)"), sample[0])
    # and through the sandbox, as a reward sees them (no name refers to the tests' function)
    items = [(_cheat(by_type[bool if name.startswith("a bool") else list], c),
              by_type[bool if name.startswith("a bool") else list].tests)
             for name, c in CHEATS.items()]
    assert run_checks(items) == ["failed"] * len(items)


def test_code_items_run_the_same_tests(splits: Splits) -> None:
    p = splits.heldout[2][0]
    (item,) = to_code_items([p])
    assert item.test_list == p.tests and item.tests.count("assert same(") == len(p.tests)
    assert item.program(item.reference) == checked_program(p.solution, p.tests)
    namespace: dict[str, object] = {}
    exec(item.program(item.reference), namespace)  # our own reference code
    assert namespace["_lmforge_program"] is None  # run by its decorator, then nothing names it
    assert namespace[p.entry_point].__name__ == p.entry_point  # the answer's, a global
    # one test alone: the others are not in its program
    alone = item.program(item.reference, only=1)
    assert p.tests[1].split(",")[0] in alone and p.tests[0].split(",")[0] not in alone
    assert len(item.test_programs(item.reference)) == len(p.tests)


def test_checker_statuses() -> None:
    sol = "def f(x):\n    return x + 1\n"
    assert check_program(sol, ["assert f(1) == 2"])[0] == "passed"
    status, err = check_program(sol, ["assert f(1) == 3"])
    assert status == "failed" and "AssertionError" in err
    assert check_program("import sys\nsys.exit(0)\n" + sol, ["assert f(1) == 2"])[0] == "failed"
    assert check_program("import os\nos._exit(0)\n" + sol, ["assert f(1) == 2"])[0] == "failed"
    status, err = check_program("def f(x:\n    return x\n", ["assert f(1) == 1"])
    assert status == "error" and "SyntaxError" in err
    assert check_program("def f(x):\n    return 1 // 0\n", ["assert f(1) == 1"])[0] == "error"
    t0 = time.monotonic()
    assert check_program("def f(x):\n    while True:\n        pass\n", ["f(1)"],
                         timeout=1.0)[0] == "timeout"
    assert time.monotonic() - t0 < 4.0


def test_checker_is_isolated_from_parent_state(tmp_path: object) -> None:
    # A fresh empty cwd, no inherited environment, and flooding stdout cannot blow memory.
    probe = ("import os, sys\nassert os.listdir('.') == []\n"
             "assert 'PYTHONPATH' not in os.environ and os.environ['HOME'] == os.getcwd()\n")
    assert check_program(probe, [])[0] == "passed"
    flood = "import sys\nfor _ in range(2000):\n    sys.stdout.write('x' * 1000)\n"
    assert check_program(flood, [])[0] == "passed"


def test_extract_code() -> None:
    code = "def f(x):\n    return x\n"
    assert extract_code(code) == code
    assert extract_code(f"Sure:\n```python\n{code}```\nDone.") == code
    assert extract_code(f"```\n{code}```") == code
    assert extract_code(f"```python\n{code}") == code  # an unterminated fence
