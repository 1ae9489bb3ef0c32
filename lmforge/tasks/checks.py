"""Tests that compare real values: the one comparator every code task's tests use, and the
program layout that keeps an answer from tampering with the tests that judge it.

A code task's program is an answer followed by tests, and the answer runs first: it can return
an object equal to everything, subclass the expected type to be so, rebind or patch builtins
(`isinstance`, `type`, `sorted`, `set`), patch modules (`math.isclose`, `operator.eq`) or put
impostors in `sys.modules`. So the program runs the answer inside the tests' own function,
after everything the tests use has been bound:

    @lambda program: program()
    def _lmforge_program():
        <bind>    # builtins, module snapshots, helper copies, the comparator: all locals
        exec(compile(ANSWER, "answer.py", "exec"), globals())   # the answer, as module code
        <setup>   # MBPP's test setup, as written
        <tests>   # rewritten (_Rewrite): comparisons through the comparator

The function is called by its decorator before any name is bound to it, so no name refers to
it; its locals are reachable only through frames, tracers or the garbage collector, all of
which the sandbox refuses (sandbox_runner's seal). The answer's definitions are globals, where
the tests find them as before. MBPP asserts and the synthetic task's are one test each;
HumanEval's `check` is split at its top-level statements that assert something.

Covered:
- `==` and `!=` go through `same`: both sides must be made of builtin types all the way down
  (int, bool, float, complex, str, bytes, None, list, tuple, dict, set, frozenset; and for
  MBPP/HumanEval the standard library's Counter, defaultdict and OrderedDict, read through
  dict's own methods), then equal. Types are compared by identity and containers walked with
  the builtin types' own methods, so no method of the answer's objects runs during the check:
  an object equal to everything, a subclass of int/float/str/list with its own __eq__, a
  metaclass that claims equality, a __class__ property that lies, or any of them inside a
  container, fails. Numbers: MBPP and HumanEval compare bool, int, float and complex by value
  as Python does (their references answer 6.0 for 6 and 0 for False); the synthetic task
  tells them apart (a bool is not an int).
- Every other comparison (<, <=, in, ...) takes only such values (`exact`), and so does each
  value a call to the answer returns inside a test, so no __sub__, __lt__ or __contains__ of
  the answer's sees an expected value (`abs(f(x) - 0.33) < 1e-6`). Left as they are: a call
  whose value a test only asks for its truth (`assert f(x)`: any truthy value, True included,
  passes that), calls that build the answer's arguments (`f([Pair(1, 2)])`), and a call a
  converter builtin alone consumes (`set(f(x))`: the converter's result is what `same`
  checks, and a converter shows the answer no expected value).
- The names the tests use are bound before the answer runs: builtins from a copy of the
  builtins taken then; modules the tests import, or that the reference solution imports
  when the tests use them unimported (MBPP's `sys.getsizeof`), as snapshots of their
  attributes then, so `math.isclose = ...` or `sys.modules["math"] = ...` later changes
  nothing the tests see (a test's own `import` statements are replaced by those bindings);
  helper functions HumanEval's prompts define before the entry point (`poly`,
  `encode_cyclic`), as copies compiled then with those builtins and snapshots, since the
  answer continues that prompt and could redefine them.
- Leaving early (sys.exit, os._exit, a thread that exits) or hiding a failure (excepthook,
  stderr, atexit) is the sandbox's to catch: a pass means the program ran to its end.

Not covered:
- Snapshots are shallow: a module attribute that is itself mutable (a pure-Python class whose
  methods the answer patches, `random`'s hidden generator, which it can reseed, a submodule
  such as `os.path`) is the live object. The datasets' tests call C functions there (math,
  sys.getsizeof), or ones whose results are then compared by value (copy.deepcopy, random).
- Tests that are weak stay weak: truth tests pass with any truthy value, a test that compares
  the answer with itself (HumanEval/33 calls `sort_third` on both sides) with any answer.
- A name the reference defines is the answer's, even when it is also a builtin (MBPP's task
  `sum`): the tests call whatever the answer defines under it, as they are meant to.
- Outside the sandbox (an in-process `exec`), frames and `gc` still reach the tests' locals.
- A CPython bug or crafted bytecode that corrupts the interpreter's memory gets past any
  in-process guard (as for the sandbox's pass token).
"""

from __future__ import annotations

import ast
import builtins
import copy
from collections.abc import Sequence
from dataclasses import dataclass

# The comparator, defined in the program before the answer runs, from the builtins of that
# moment (B). `key` turns a value made of builtin types into one of tuples and frozensets that
# compare by the builtin types' own __eq__ and __hash__, the types themselves by identity;
# anything else fails the test (an AssertionError: the answer's value is wrong, not the test).
# `numeric`: bool, int, float and complex compare by value among themselves, as Python's ==
# does (MBPP's references answer 6.0 for 6 and 0 for False); else each is a type of its own.
# `dicts`: the standard library's dict subclasses (Counter, defaultdict, OrderedDict) that a
# reference may return for a dict; their contents are read with dict's own methods.
COMPARATOR = '''\
def _lmforge_checks(B, numeric, dicts):
    T, L, U, D, S, F = B["type"], B["list"], B["tuple"], B["dict"], B["set"], B["frozenset"]
    numbers = (B["int"], B["float"], B["bool"], B["complex"])
    scalars = (B["str"], B["bytes"], T(None))
    dicts = (D, *dicts)
    fail = B["AssertionError"]
    number = numbers[0]

    def key(v):
        t = T(v)
        for s in numbers:
            if t is s:
                return (number, v) if numeric else (t, v)
        for s in scalars:
            if t is s:
                return (t, v)
        if t is L or t is U:
            return (t, U([key(x) for x in v]))
        if t is S or t is F:
            return (F, F([key(x) for x in v]))  # set == frozenset, as Python has it
        for d in dicts:
            if t is d:
                return (D, F([(key(k), key(x)) for k, x in D.items(v)]))
        raise fail("a value that is not made of builtin types (int, float, str, list, ...)")

    def same(got, want):
        return key(got) == key(want)

    def exact(value):
        key(value)
        return value

    return same, exact
'''


@dataclass(frozen=True)
class Harness:
    """An item's tests, rewritten, and what they need bound before the answer runs.

    `bind`: the statements that bind the tests' names (comparator included); `setup`: test
    code that prepares inputs after the answer ran (MBPP builds trees from the answer's own
    `Node` class), kept as written but for its imports; `bodies[0]`: all tests, `bodies[i+1]`:
    test i alone (with the code around it that it needs, e.g. HumanEval's `check`); `units`:
    each test's source as written."""

    bind: str
    setup: str
    bodies: tuple[str, ...]
    units: tuple[str, ...]

    def program(self, answer: str, only: int | None = None) -> str:
        body = self.bodies[0 if only is None else only + 1]
        lines = [*self.bind.splitlines(),
                 f'_lmforge_B["exec"](_lmforge_B["compile"]({answer!r}, "answer.py", "exec"),'
                 ' _lmforge_B["globals"]())',
                 *self.setup.splitlines(), *body.splitlines()]
        inside = "".join(f"    {line}\n" if line.strip() else "\n" for line in lines)
        return f"@lambda program: program()\ndef _lmforge_program():\n{inside}"


def _bind(builtins: Sequence[str], imports: Sequence[str], modules: Sequence[str],
          helpers: str, helper_names: Sequence[str], numeric: bool) -> str:
    """The statements before the answer: a copy of the builtins, the comparator, the builtins
    the tests use, the imports they need (modules replaced by snapshots), helper copies."""
    out = ['_lmforge_B = {**(__builtins__ if ().__class__.__class__(__builtins__) is {}.__class__'
           ' else __builtins__.__dict__)}',
           *COMPARATOR.splitlines()]
    if numeric:
        out += ['_lmforge_C = _lmforge_B["__import__"]("collections")',
                "same, exact = _lmforge_checks(_lmforge_B, True, (_lmforge_C.Counter,"
                " _lmforge_C.defaultdict, _lmforge_C.OrderedDict))"]
    else:
        out += ["same, exact = _lmforge_checks(_lmforge_B, False, ())"]
    out += ["def _lmforge_snapshot(module):  # its attributes as they are now",
            "    copy = module.__class__(module.__name__)",
            "    copy.__dict__.update(module.__dict__)",
            "    return copy"]
    out += [f'{name} = _lmforge_B["{name}"]' for name in builtins]
    out += list(imports)
    out += [f"{name} = _lmforge_snapshot({name})" for name in modules]
    if helpers:
        out += ['_lmforge_H = {"__name__": "helpers", "__builtins__": _lmforge_B}',
                f'_lmforge_B["exec"](_lmforge_B["compile"]({helpers!r}, "helpers.py", "exec"),'
                " _lmforge_H)",
                "for _lmforge_k, _lmforge_v in [*_lmforge_H.items()]:",
                "    if _lmforge_v.__class__ is _lmforge_B['__import__']('sys').__class__:",
                "        _lmforge_H[_lmforge_k] = _lmforge_snapshot(_lmforge_v)"]
        out += [f'{name} = _lmforge_H["{name}"]' for name in helper_names]
    return "\n".join(out)


# -- the rewrite ----------------------------------------------------------------------------

_BUILTINS = frozenset(dir(builtins))
# builtins that, given one value, only iterate, measure or convert it: an answer's object
# handed to them sees no expected value (their result is what the comparison checks)
_CONVERTERS = frozenset("set frozenset list tuple sorted dict len str int float bool abs sum "
                        "min max any all".split())


def _parse(source: str, what: str) -> ast.Module:
    try:
        return ast.parse(source)
    except SyntaxError as e:
        raise ValueError(f"{what} does not parse: {e.msg} (line {e.lineno})") from None


def _call(name: str, *args: ast.expr) -> ast.Call:
    return ast.Call(ast.Name(name, ast.Load()), list(args), [])


def _exact(node: ast.expr) -> ast.expr:
    return node if isinstance(node, ast.Constant) else _call("exact", node)


def _unchecked(node: ast.expr) -> ast.expr:
    """`exact(x)` -> `x`, where `same` checks x itself."""
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id == "exact" and len(node.args) == 1):
        return node.args[0]
    return node


class _Rewrite(ast.NodeTransformer):
    """`==`/`!=` through `same`; other comparisons, and what a call to anything but a trusted
    name returns, through `exact`; imports out (bound before the answer); each assert's text
    as its message. A call whose value is only asked for its truth (`assert f(x)`), that
    builds an argument for the answer (MBPP's `f([Pair(1, 2)])`) or that a converter alone
    consumes (`set(f(x))`, whose result `same` then checks) is left as it is."""

    def __init__(self, trusted: frozenset[str]) -> None:
        self.trusted = trusted
        self.free: set[int] = set()  # ids of the calls left as they are

    def _truth(self, node: ast.expr) -> None:
        if isinstance(node, ast.BoolOp):
            for value in node.values:
                self._truth(value)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            self._truth(node.operand)
        elif isinstance(node, ast.Call):
            self.free.add(id(node))

    def visit_Assert(self, node: ast.Assert) -> ast.Assert:
        text = ast.unparse(node.test)
        self._truth(node.test)
        self.generic_visit(node)
        if node.msg is None:
            node.msg = ast.Constant(text)
        return node

    def visit_If(self, node: ast.If) -> ast.If:
        self._truth(node.test)
        self.generic_visit(node)
        return node

    def visit_Compare(self, node: ast.Compare) -> ast.expr:
        self.generic_visit(node)
        op = node.ops[0]
        if len(node.ops) == 1 and isinstance(op, ast.Eq | ast.NotEq):
            same = _call("same", _unchecked(node.left), _unchecked(node.comparators[0]))
            return same if isinstance(op, ast.Eq) else ast.UnaryOp(ast.Not(), same)
        if len(node.ops) == 1 and isinstance(op, ast.Is | ast.IsNot):
            return node  # identity: nothing of the answer's runs
        node.left = _exact(_unchecked(node.left))
        node.comparators = [_exact(_unchecked(c)) for c in node.comparators]
        return node

    def visit_Call(self, node: ast.Call) -> ast.expr:
        func: ast.expr = node.func
        while isinstance(func, ast.Attribute):
            func = func.value
        trusted = isinstance(func, ast.Constant) or (isinstance(func, ast.Name)
                                                     and func.id in self.trusted)
        if not trusted:  # its arguments are the answer's inputs, whatever builds them
            self.free |= {id(n) for a in (*node.args, *node.keywords) for n in ast.walk(a)}
        elif (isinstance(node.func, ast.Name) and node.func.id in _CONVERTERS
              and len(node.args) == 1 and not node.keywords):
            self.free.add(id(node.args[0]))  # `set(f(x))`: f may return a generator
        self.generic_visit(node)
        if isinstance(node.func, ast.Name) and node.func.id == "same":  # the synthetic task's
            node.args = [_unchecked(a) for a in node.args]
        return node if trusted or id(node) in self.free else _call("exact", node)

    def visit_Import(self, node: ast.Import) -> ast.stmt:
        return ast.Pass()

    def visit_ImportFrom(self, node: ast.ImportFrom) -> ast.stmt:
        return ast.Pass()


def _imports(tree: ast.Module, top_level: bool) -> dict[str, tuple[str, bool]]:
    """name -> (the import statement that binds it alone, whether it binds a module)."""
    nodes = tree.body if top_level else list(ast.walk(tree))
    out: dict[str, tuple[str, bool]] = {}
    for node in nodes:
        if isinstance(node, ast.Import):
            for a in node.names:
                name = a.asname or a.name.split(".")[0]
                out[name] = (ast.unparse(ast.Import([a])), True)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                if a.name != "*":
                    out[a.asname or a.name] = (
                        ast.unparse(ast.ImportFrom(node.module, [a], 0)), False)
    return out


def _top_level_names(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        for sub in ast.walk(node) if isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign
                                                | ast.For | ast.With | ast.If | ast.Try) else ():
            if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
                names.add(sub.id)
    return names | set(_imports(tree, top_level=True))


@dataclass(frozen=True)
class _Scope:
    """What the tests' names refer to: `bind` binds the trusted ones before the answer runs;
    `trusted` are the names a test may call without its result being checked."""

    bind: str
    trusted: frozenset[str]


def _scope(trees: Sequence[ast.Module], program: str, numeric: bool, head: str = "",
           entry: str = "") -> _Scope:
    """The tests' names: builtins they use (unless the reference defines the name: MBPP's
    task `sum`), the imports they make, the reference's imports of names they use unimported,
    and (HumanEval) the helpers the prompt defines before the entry point."""
    loaded, stored, params = set(), set(), set()
    for tree in trees:
        for n in ast.walk(tree):
            if isinstance(n, ast.Name):
                (loaded if isinstance(n.ctx, ast.Load) else stored).add(n.id)
            elif isinstance(n, ast.FunctionDef | ast.ClassDef):
                stored.add(n.name)
            elif isinstance(n, ast.ExceptHandler) and n.name:
                stored.add(n.name)
            elif isinstance(n, ast.arg):
                params.add(n.arg)
    try:
        ref = ast.parse(program)
    except SyntaxError:
        ref = ast.Module([], [])
    defined = _top_level_names(ref)
    imports = {k: v for tree in trees for k, v in _imports(tree, top_level=False).items()}
    for name, imp in _imports(ref, top_level=True).items():
        if name in loaded and name not in imports and name not in stored:
            imports[name] = imp
    names = sorted((loaded & _BUILTINS) - defined - set(imports))
    helpers, helper_names = _helpers(ref, program, head, entry, loaded)
    bind = _bind(names, list(dict.fromkeys(s for s, _ in imports.values())),
                 [k for k, (_, module) in imports.items() if module], helpers, helper_names,
                 numeric)
    trusted = frozenset(names) | set(imports) | set(helper_names) | (stored - params)
    return _Scope(bind, trusted | {"same", "exact"})


def _helpers(ref: ast.Module, program: str, head: str, entry: str,
             loaded: set[str]) -> tuple[str, list[str]]:
    """The prompt's own code before the entry point (imports and helper functions), and the
    names of those helpers the tests use."""
    if not head or not entry:
        return "", []
    before = []
    for node in ref.body:
        if isinstance(node, ast.FunctionDef) and node.name == entry:
            break
        before.append(node)
    used = sorted({n.name for n in before if isinstance(n, ast.FunctionDef | ast.ClassDef)}
                  & loaded - {entry})
    if not used:
        return "", []
    return "\n\n".join(ast.get_source_segment(program, n) or "" for n in before), used


# -- the builders ----------------------------------------------------------------------------


def _source(tree: ast.AST, scope: _Scope) -> str:
    return ast.unparse(ast.fix_missing_locations(_Rewrite(scope.trusted).visit(tree)))


def for_asserts(asserts: Sequence[str], *, setup: str = "", reference: str = "",
                numeric: bool = True) -> Harness:
    """MBPP's (and the synthetic task's) form: setup code, then independent assert statements,
    each a test of its own. `reference` is a known-good answer: the names it defines are the
    answer's, not builtins, and its imports bind the modules the tests use unimported.
    `numeric`: see COMPARATOR (the synthetic task tells bool, int and float apart)."""
    setup_tree = _parse(setup, "the test setup")
    trees = [_parse(a, f"test {i}") for i, a in enumerate(asserts)]
    scope = _scope([setup_tree, *trees], reference, numeric)
    # the setup is trusted test code that builds inputs from the answer's own classes: only its
    # imports go (bound before the answer like the tests')
    for i, node in enumerate(setup_tree.body):
        if isinstance(node, ast.Import | ast.ImportFrom):
            setup_tree.body[i] = ast.Pass()
    bodies = [_source(t, scope) for t in trees]
    return Harness(scope.bind, ast.unparse(setup_tree), ("\n".join(bodies), *bodies),
                   tuple(asserts))


def for_check(test: str, *, head: str, reference: str, entry: str) -> Harness:
    """HumanEval's form: a `check(candidate)` function called on the entry point. Each
    top-level statement of `check` that asserts something is a test of its own; alone, it
    keeps the statements around it that assert nothing (they prepare its inputs)."""
    tree = _parse(test, "the test")
    scope = _scope([tree], head + reference, True, head, entry)
    check = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "check"),
                 None)
    units = [] if check is None else [
        i for i, s in enumerate(check.body) if any(isinstance(n, ast.Assert) for n in ast.walk(s))]
    singles = []
    for unit in units if len(units) > 1 else []:
        alone = copy.deepcopy(tree)
        fn = next(n for n in alone.body if isinstance(n, ast.FunctionDef) and n.name == "check")
        fn.body = [s for i, s in enumerate(fn.body) if i == unit or i not in units]
        singles.append(_source(alone, scope))
    texts = (tuple(ast.unparse(check.body[i]) for i in units)  # type: ignore[union-attr]
             if len(units) > 1 else (test,))
    whole = _source(tree, scope)
    return Harness(scope.bind, "", (whole, *(singles or [whole])), texts)
