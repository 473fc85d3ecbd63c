"""Synthetic reasoning problems: answers, traces and depth checked independently.

The checker here reads only the question text: a tiny parser turns the facts
into expressions and evaluates them recursively, without the generator's DAG.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from archc.training import synthetic
from archc.training.synthetic import (
    check_trace,
    critical_path,
    generate,
    parse_answer,
    parse_trace,
    prompt,
    reasoning_corpus,
    render,
    solve,
)

FACT = re.compile(r"([a-z]) = ([^.]+)\.")


def parse_question(question: str) -> tuple[dict[str, list[str]], str]:
    """facts (var -> tokens of its right-hand side) and the asked variable."""
    facts = {}
    for var, rhs in FACT.findall(question):
        assert var not in facts, f"{var} defined twice"
        facts[var] = rhs.split()
    target = re.search(r"What is ([a-z])\?$", question).group(1)
    return facts, target


def evaluate(facts, var, memo=None) -> int:
    memo = {} if memo is None else memo
    if var not in memo:
        tokens = facts[var]
        terms = [int(t) if t.isdigit() else evaluate(facts, t, memo) for t in tokens[::2]]
        ops = set(tokens[1::2])
        assert len(ops) <= 1, f"mixed operators in {var} = {' '.join(tokens)}"
        value = terms[0]
        for term in terms[1:]:
            value = {"+": value + term, "-": value - term, "*": value * term}[next(iter(ops))]
        memo[var] = value
    return memo[var]


def depth_of(facts, var) -> int:
    tokens = facts[var]
    if len(tokens) == 1:
        return 0
    return 1 + max((depth_of(facts, t) for t in tokens[::2] if not t.isdigit()), default=0)


def used(facts, var, seen=None) -> set[str]:
    seen = set() if seen is None else seen
    seen.add(var)
    for t in facts[var][::2]:
        if not t.isdigit() and t not in seen:
            used(facts, t, seen)
    return seen


problems = st.builds(generate, seed=st.integers(0, 2**40), depth=st.integers(1, 6),
                     breadth=st.integers(1, 4))


@settings(max_examples=300, deadline=None)
@given(problems)
def test_answer_matches_an_independent_evaluation_of_the_question(p):
    facts, target = parse_question(p.question)
    assert target == p.target
    want = evaluate(facts, target)
    assert want == p.answer == solve(p) == parse_answer(render(p))
    assert parse_answer(render(p, with_trace=False)) == want


@settings(max_examples=300, deadline=None)
@given(problems)
def test_shape_depth_breadth_and_value_range(p):
    facts, target = parse_question(p.question)
    assert depth_of(facts, target) == p.depth == critical_path(p)
    leaves = [v for v, rhs in facts.items() if len(rhs) == 1]
    assert len(leaves) == p.breadth
    assert used(facts, target) == set(facts)  # no distractors: every fact is needed
    memo = {}
    assert all(0 <= evaluate(facts, v, memo) <= 99 for v in facts)


@settings(max_examples=300, deadline=None)
@given(problems)
def test_trace_steps_are_right_and_in_dependency_order(p):
    facts, target = parse_question(p.question)
    text = render(p)
    steps = parse_trace(text)
    assert len(steps) == len(p.trace.splitlines()) == sum(len(r) > 1 for r in facts.values())
    known = {v for v, rhs in facts.items() if len(rhs) == 1}
    memo = {}
    for line, step in zip(p.trace.splitlines(), steps):
        var, expr, numbers, result = line.split(" = ")
        assert expr.split() == facts[var]
        assert eval(numbers) == int(result) == evaluate(facts, var, memo)  # plain Python arithmetic
        assert all(t in known for t in expr.split()[::2] if not t.isdigit())
        known.add(var)
        assert (step.var, step.result) == (var, int(result)) and step.arithmetic_ok
    assert steps[-1].var == target
    assert check_trace(p, text)


def test_check_trace_rejects_wrong_derivations():
    p = generate(3, 3, 2)
    good = render(p)
    assert check_trace(p, good)
    lines = good.splitlines(keepends=True)
    first = lines[1]
    wrong_result = first.rsplit(" = ", 1)[0] + f" = {int(first.rsplit(' = ', 1)[1]) + 1}\n"
    assert not check_trace(p, good.replace(first, wrong_result))
    assert not check_trace(p, "".join(lines[:1] + lines[2:]))  # uses a value never computed
    assert not check_trace(p, "".join(lines[:1] + lines[-2:-1] + lines[1:-2] + lines[-1:]))
    assert not check_trace(p, good.replace(f"#### {p.answer}", f"#### {p.answer + 1}"))
    assert not check_trace(p, prompt(p) + f"#### {p.answer}\n")  # no derivation


def test_render_format():
    p = generate(0, 2, 2)
    text = render(p)
    assert text.startswith(prompt(p)) and prompt(p) == p.question + "\n"
    assert text.endswith(f"#### {p.answer}\n")
    assert text == p.question + "\n" + p.trace + f"#### {p.answer}\n"
    assert parse_answer("no answer here") is None
    assert parse_answer("x\n#### 42\n#### 7") == 42


def test_deterministic_by_seed():
    assert generate(11, 4, 3) == generate(11, 4, 3)
    assert len({render(generate(s, 3, 3)) for s in range(50)}) == 50
    assert reasoning_corpus(30, seed=1) == reasoning_corpus(30, seed=1)
    assert reasoning_corpus(30, seed=1) != reasoning_corpus(30, seed=2)


def test_global_rng_untouched():
    import random

    random.seed(123)
    expected = random.random()
    random.seed(123)
    generate(5, 3, 3)
    reasoning_corpus(5)
    assert random.random() == expected


def test_corpus_is_distinct_and_covers_depths_and_breadths():
    docs = reasoning_corpus(400, seed=0, depths=range(1, 5), breadths=(2, 3))
    assert len(set(docs)) == 400
    depths = {depth_of(*parse_question(d.splitlines()[0])) for d in docs}
    assert depths == {1, 2, 3, 4}
    assert all(d.endswith("\n") and parse_answer(d) is not None for d in docs)


def test_bad_arguments():
    with pytest.raises(ValueError):
        generate(0, 0, 2)
    with pytest.raises(ValueError):
        generate(0, 20, 10)
    assert synthetic.apply("-", (9, 2, 3)) == 4
