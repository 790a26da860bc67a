"""palm.calculator: exact arithmetic from our own parser, and a clear refusal of the rest."""

from __future__ import annotations

import re
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from palm.calculator import CalculatorError, calculate, exact_value, format_number


def _expressions():
    """(text, value) pairs of random expression trees: the value computed on the tree, not by
    parsing, so the parser is checked against an independent evaluation."""
    numbers = st.integers(0, 999).map(lambda n: (str(n), Fraction(n)))

    def combine(children):
        def make(left, op, right):
            (lt, lv), (rt, rv) = left, right
            if op == "/" and rv == 0:
                return ("(" + lt + ")", lv)
            value = {"+": lv + rv, "-": lv - rv, "*": lv * rv, "/": lv / rv if rv else lv}[op]
            return (f"({lt}) {op} ({rt})", value)
        negate = children.map(lambda c: (f"-({c[0]})", -c[1]))
        return st.one_of(st.builds(make, children, st.sampled_from("+-*/"), children), negate)

    return st.recursive(numbers, combine, max_leaves=8)


@given(_expressions())
def test_matches_the_expression_tree(expression):
    text, value = expression
    if abs(value) > 10**30 or value.denominator > 10**12:
        with pytest.raises(CalculatorError):
            exact_value(text)
    else:
        assert exact_value(text) == value


@pytest.mark.parametrize("text, result", [
    ("48/2", "24"), ("10/4", "2.5"), ("0.1 + 0.2", "0.3"), ("1/3", "0.333333"), ("-(1/3)", "-0.333333"),
    ("2**10", "1024"), ("2^3^2", "512"), ("-3**2", "-9"), ("2**-2", "0.25"), ("1,234 * 2", "2468"),
    ("(3 + 4) * 2", "14"), ("7 - 2 - 1", "4"), ("8 / 4 / 2", "1"), (".5 * 4", "2"), ("1**64", "1"),
    ("1e-7", None), ("0.0000001", "0"),
])
def test_values(text, result):
    if result is None:
        with pytest.raises(CalculatorError, match="not arithmetic"):
            calculate(text)
    else:
        assert calculate(text) == result


@pytest.mark.parametrize("text, message", [
    ("", "empty expression"),
    ("   ", "empty expression"),
    ("__import__('os').system('x')", "not arithmetic"),
    ("x + 1", "not arithmetic"),
    ("1,2", "not arithmetic"),  # not a thousands grouping
    ("3 4", "unexpected '4'"),
    ("(1 + 2", "missing ')'"),
    ("1 +", "ends early"),
    ("1/0", "division by zero"),
    ("0**-1", "division by zero"),
    ("2**0.5", "non-integer exponent"),
    ("2**1000", "exponent 1000 beyond"),
    ("9**64", "power too large"),
    ("(" * 40 + "1" + ")" * 40, "nesting deeper"),
    ("1" * 31, "more than 30 digits"),
    ("10**20 * 10**20", "beyond 1e30"),
    ("1/7**15", "denominator beyond"),
    ("1+" * 150 + "1", "exceeds 200"),
])
def test_refusals_name_the_problem(text, message):
    with pytest.raises(CalculatorError, match=re.escape(message)):
        calculate(text)


def test_refuses_non_strings():
    with pytest.raises(CalculatorError, match="must be a string"):
        calculate(12)


def test_format_number():
    assert [format_number(Fraction(n, d)) for n, d in [(5, 1), (-5, 2), (2, 3), (-1, 10**9)]] == \
        ["5", "-2.5", "0.666667", "0"]
