"""Synthetic multi-step reasoning problems from random dependency DAGs.

In the spirit of GSM-Infinite: every problem is a small DAG of integer
arithmetic. The question lists the facts as assignments in shuffled order,
the trace computes the needed variables in dependency order, one per line,
and the answer follows ``####``::

    k = 7. f = q * 3. q = k + m. m = 4. What is f?
    q = k + m = 7 + 4 = 11
    f = q * 3 = 11 * 3 = 33
    #### 33

Design choices:

- ``depth`` is the number of operation layers on the critical path: the
  target sits at layer ``depth`` (leaves are layer 0, an operation is one
  layer above its deepest operand). A chain ``c_1 .. c_depth`` with
  ``c_k = c_{k-1} op x`` guarantees it; the other operands are at lower layers.
- ``breadth`` is the number of leaf variables; every leaf is used. Leaves are
  spread over the chain: as a direct operand, as a layer-1 side node over two
  leaves (branching), or, when there are more leaves than chain steps, as an
  extra operand (``d = a + b + c``). Operands that get no leaf reuse an earlier
  variable (a diamond in the DAG) or a literal 2..9.
- Every variable is needed: the DAG is built backwards from its leaves into
  the target, so the trace lists every operation node, no distractors.
- Values stay in 0..99 so byte-level models can learn: leaves are 1..20 and
  each node picks an operator among those that keep the result in range
  (``+``/``*`` at most 99; ``-`` with the largest operand first, never below
  0; ``-`` on two operands always fits). When none fits, generation retries.
- Trace order: by layer, then variable name (a topological order).
- Everything comes from ``random.Random(seed)``, never the global RNG: the
  same seed, depth and breadth give the same problem on every machine.
"""

from __future__ import annotations

import graphlib
import math
import random
import re
import string

import attrs

OPS = "+-*"
MAX_VALUE = 99
Node = int | tuple[str, tuple[str | int, ...]]  # leaf value, or (op, operands)


@attrs.frozen
class Problem:
    question: str
    trace: str  # one step per line, each ending in "\n"
    answer: int
    depth: int
    breadth: int
    seed: int
    target: str
    nodes: dict[str, Node]  # name -> leaf value | (op, operands: names or literals)


@attrs.frozen
class Step:
    """One parsed trace line ``var = x op y = 3 op 7 = result``."""

    var: str
    op: str
    operands: tuple[str, ...]  # names or literals, as written
    values: tuple[int, ...]
    result: int

    @property
    def arithmetic_ok(self) -> bool:
        return apply(self.op, self.values) == self.result


def apply(op: str, values) -> int:
    """Left-to-right application of one operator to the operand values."""
    if op == "+":
        return sum(values)
    if op == "*":
        return math.prod(values)
    if op == "-":
        return values[0] - sum(values[1:])
    raise ValueError(f"unknown operator {op!r}")


def _fits(op: str, values: list[int]) -> bool:
    if op == "-":
        values = sorted(values, reverse=True)
    return 0 <= apply(op, values) <= MAX_VALUE


def generate(seed: int, depth: int, breadth: int) -> Problem:
    """A problem whose target is ``depth`` operation layers above its ``breadth`` leaves."""
    if depth < 1 or breadth < 1:
        raise ValueError(f"depth and breadth must be >= 1, got depth={depth} breadth={breadth}")
    if depth + breadth + breadth // 2 > len(string.ascii_lowercase):
        raise ValueError(f"depth={depth} breadth={breadth} needs more than 26 variable names")
    rng = random.Random(seed)
    for _ in range(1000):  # retry until every node finds an operator that keeps values in range
        built = _build(rng, depth, breadth)
        if built is not None:
            break
    else:
        raise ValueError(f"no problem with depth={depth} breadth={breadth} keeps values in 0..99")
    nodes, layer, values, target = built
    names = dict(zip(nodes, rng.sample(string.ascii_lowercase, len(nodes))))
    named: dict[str, Node] = {}
    for key, node in nodes.items():
        named[names[key]] = (
            node if isinstance(node, int)
            else (node[0], tuple(names[a] if isinstance(a, str) else a for a in node[1]))
        )
    facts = [f"{n} = {_expr(v)}." for n, v in named.items()]
    rng.shuffle(facts)
    question = " ".join(facts) + f" What is {names[target]}?"
    value = {names[k]: v for k, v in values.items()}
    steps = sorted((k for k in nodes if layer[k] > 0), key=lambda k: (layer[k], names[k]))
    trace = "".join(_step_line(names[k], named[names[k]], value) for k in steps)
    return Problem(question=question, trace=trace, answer=values[target], depth=depth,
                   breadth=breadth, seed=seed, target=names[target], nodes=named)


def _build(rng: random.Random, depth: int, breadth: int):
    """(nodes, layers, values, target) keyed by internal ids in creation
    (topological) order; None to retry."""
    nodes: dict[str, Node] = {}
    layer: dict[str, int] = {}
    values: dict[str, int] = {}

    def add(key, node, lay):
        if not isinstance(node, int):
            vals = [values[a] if isinstance(a, str) else a for a in node[1]]
            fits = [op for op in OPS if _fits(op, vals)]
            if not fits:
                return None
            op = rng.choice(fits)
            args = list(node[1])
            if op == "-":  # largest operand first so the result is >= 0
                args.sort(key=lambda a: values[a] if isinstance(a, str) else a, reverse=True)
            else:
                rng.shuffle(args)
            node = (op, tuple(args))
            vals = [values[a] if isinstance(a, str) else a for a in args]
        nodes[key], layer[key] = node, lay
        values[key] = node if isinstance(node, int) else apply(node[0], vals)
        return key

    leaves = [add(f"L{i}", rng.randint(1, 20), 0) for i in range(breadth)]
    spare = {k: [] for k in range(1, depth + 1)}  # chain step -> leaves it must absorb
    for leaf in leaves[1:]:
        spare[rng.randint(1, depth)].append(leaf)
    prev = leaves[0]
    for k in range(1, depth + 1):
        mine, extra = spare[k], []
        while len(mine) >= 2 and k >= 2 and rng.random() < 0.7:  # branch: a layer-1 side node
            side = add(f"S{k}.{len(extra)}", ("+", (mine.pop(), mine.pop())), 1)
            if side is None:
                return None
            extra.append(side)
        extra += mine
        if not extra:  # reuse an earlier variable (a diamond) or use a literal
            earlier = [n for n in nodes if layer[n] < k and n != prev]
            extra = [rng.choice(earlier) if earlier and rng.random() < 0.5 else rng.randint(2, 9)]
        prev = add(f"C{k}", ("+", (prev, *extra)), k)
        if prev is None:
            return None
    return nodes, layer, values, prev


def _expr(node: Node) -> str:
    if isinstance(node, int):
        return str(node)
    op, args = node
    return f" {op} ".join(str(a) for a in args)


def _step_line(name: str, node, values: dict[str, int]) -> str:
    op, args = node
    nums = [values[a] if isinstance(a, str) else a for a in args]
    return f"{name} = {_expr(node)} = {f' {op} '.join(map(str, nums))} = {values[name]}\n"


def _layers(nodes: dict[str, Node]) -> dict[str, int]:
    layer: dict[str, int] = {}
    for name in graphlib.TopologicalSorter(_deps(nodes)).static_order():
        node = nodes[name]
        layer[name] = 0 if isinstance(node, int) else 1 + max(
            (layer[a] for a in node[1] if isinstance(a, str)), default=0)
    return layer


def _deps(nodes: dict[str, Node]) -> dict[str, set[str]]:
    return {n: set() if isinstance(v, int) else {a for a in v[1] if isinstance(a, str)}
            for n, v in nodes.items()}


def _evaluate(nodes: dict[str, Node]) -> dict[str, int]:
    """Value of every variable, evaluating the DAG in topological order."""
    values: dict[str, int] = {}
    for name in graphlib.TopologicalSorter(_deps(nodes)).static_order():
        node = nodes[name]
        values[name] = node if isinstance(node, int) else apply(
            node[0], [values[a] if isinstance(a, str) else a for a in node[1]])
    return values


def solve(problem: Problem) -> int:
    """The answer from the DAG alone (topological evaluation), not from the trace text."""
    return _evaluate(problem.nodes)[problem.target]


def critical_path(problem: Problem) -> int:
    """Operation layers between the leaves and the target (equals ``problem.depth``)."""
    return _layers(problem.nodes)[problem.target]


def prompt(problem: Problem) -> str:
    """The question line; a model continues from here with the trace and answer."""
    return problem.question + "\n"


def render(problem: Problem, with_trace: bool = True) -> str:
    """``question\\n`` + trace lines (optional) + ``#### answer\\n``."""
    return prompt(problem) + (problem.trace if with_trace else "") + f"#### {problem.answer}\n"


_ANSWER = re.compile(r"####\s*(-?\d+)")
_STEP = re.compile(r"^\s*([a-z]+) = ((?:[a-z]+|\d+)(?: [-+*] (?:[a-z]+|\d+))+)"
                   r" = (\d+(?: [-+*] \d+)+) = (-?\d+)\s*$")


def parse_answer(text: str) -> int | None:
    """The integer after the first ``####``, or None."""
    m = _ANSWER.search(text)
    return int(m.group(1)) if m else None


def parse_trace(text: str) -> list[Step]:
    """The well-formed step lines before ``####``; other lines are ignored."""
    steps = []
    for line in text.split("####")[0].splitlines():
        m = _STEP.match(line)
        if not m:
            continue
        ops = set(re.findall(r" ([-+*]) ", m.group(2)))
        if len(ops) != 1 or set(re.findall(r" ([-+*]) ", m.group(3))) != ops:
            continue
        op = ops.pop()
        operands = tuple(m.group(2).split(f" {op} "))
        values = tuple(int(v) for v in m.group(3).split(f" {op} "))
        if len(values) != len(operands):
            continue
        steps.append(Step(m.group(1), op, operands, values, int(m.group(4))))
    return steps


def check_trace(problem: Problem, text: str) -> bool:
    """True when the text's steps are a correct derivation and its answer is right.

    Every step must compute an operation node of the problem with its operator
    and operands (any order for ``+``/``*``), use only given or already computed
    variables, substitute their true values, and do the arithmetic right; the
    target must be computed and ``####`` must give the answer.
    """
    values = _evaluate(problem.nodes)
    known = {n for n, v in problem.nodes.items() if isinstance(v, int)}
    for step in parse_trace(text):
        node = problem.nodes.get(step.var)
        if node is None or isinstance(node, int) or step.var in known or step.op != node[0]:
            return False
        want = tuple(str(a) for a in node[1])
        if (step.operands != want) if step.op == "-" else (sorted(step.operands) != sorted(want)):
            return False
        names = [a for a in step.operands if not a.isdigit()]
        if any(a not in known for a in names):
            return False
        truth = tuple(values[a] if not a.isdigit() else int(a) for a in step.operands)
        if step.values != truth or not step.arithmetic_ok:
            return False
        known.add(step.var)
    return problem.target in known and parse_answer(text) == problem.answer


def reasoning_corpus(n: int, seed: int = 0, depths=range(1, 5), breadths=(2, 3)) -> list[str]:
    """``n`` distinct rendered problems (with traces), depth and breadth drawn per problem."""
    rng = random.Random(seed)
    depths, breadths = list(depths), list(breadths)
    docs: list[str] = []
    seen: set[str] = set()
    for _ in range(100 * n + 1000):
        if len(docs) >= n:
            break
        problem = generate(rng.getrandbits(63), rng.choice(depths), rng.choice(breadths))
        text = render(problem)
        if text not in seen:  # duplicates would leak between train and val
            seen.add(text)
            docs.append(text)
    if len(docs) < n:
        raise ValueError(f"only {len(docs)} distinct problems for depths={depths} breadths={breadths}")
    return docs
