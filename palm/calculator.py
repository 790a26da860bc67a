"""The external calculator of PaLM's chain-of-thought arithmetic (section 6.3): exact arithmetic
on the expressions a model writes inside GSM8K-style `<<48/2=` annotations.

`calculate("48/2")` returns "24". The parser is our own, a recursive descent over a small
grammar, never Python's `eval`: a model's output is untrusted text, and `eval` would run any of
it. Numbers are exact fractions, so 0.1 + 0.2 gives 0.3, and every operation is bounded:
expression length, nesting depth, digits per number, exponents and the size of every
intermediate result. Anything outside the grammar or the bounds raises `CalculatorError`
naming what was refused.

Grammar (whitespace ignored; `^` is a synonym of `**`; `,` inside digits groups thousands):

    sum     := product (("+" | "-") product)*
    product := unary (("*" | "/") unary)*
    unary   := ("-" | "+") unary | power
    power   := atom (("**" | "^") unary)?      right-associative, binds tighter than unary minus
    atom    := number | "(" sum ")"
    number  := digits ["." digits] | "." digits     digits: 1,234,567 or 1234567
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

# Bounds on what is evaluated: generous for school arithmetic, small enough that no
# expression costs more than microseconds or builds a huge number.
MAX_LENGTH = 200  # characters of expression
MAX_DEPTH = 32  # nested parentheses and unary signs
MAX_DIGITS = 30  # digits in one number literal
MAX_EXPONENT = 64  # |exponent| of a power; exponents must be integers
MAX_MAGNITUDE = Fraction(10) ** 30  # |value| of any intermediate result
MAX_DENOMINATOR = 10**12  # of any intermediate result (keeps fractions small)

# Digits after the decimal point in a result that is not a whole number.
RESULT_DECIMALS = 6

_TOKEN = re.compile(r"\s*(?:(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)|(\*\*|[-+*/^()]))")


class CalculatorError(ValueError):
    """An expression the calculator refuses: outside its grammar or its bounds."""


def calculate(expression: str) -> str:
    """The value of an arithmetic expression, as a decimal string ("24", "2.5", "-0.333333").

    Whole results print as integers; others round to RESULT_DECIMALS decimals, trailing zeros
    dropped.

    Raises:
        CalculatorError: the expression is empty, too long, not arithmetic, divides by zero,
            or exceeds a bound (digits, depth, exponent, magnitude); the message says which.
    """
    return format_number(exact_value(expression))


def exact_value(expression: str) -> Fraction:
    """The exact value of an arithmetic expression (see the module docstring's grammar)."""
    if not isinstance(expression, str):
        raise CalculatorError(f"expression must be a string, got {type(expression).__name__}")
    if len(expression) > MAX_LENGTH:
        raise CalculatorError(f"expression of {len(expression)} characters exceeds {MAX_LENGTH}")
    parser = _Parser(_tokens(expression), expression)
    value = parser.sum(0)
    if parser.peek() is not None:
        raise CalculatorError(f"unexpected {parser.peek()!r} in {expression!r}")
    return value


def format_number(value: Fraction) -> str:
    """"24" for 24, "2.5" for 5/2, "0.333333" for 1/3 (RESULT_DECIMALS places)."""
    if value.denominator == 1:
        return str(value.numerator)
    rounded = round(value, RESULT_DECIMALS)
    text = f"{rounded.numerator / rounded.denominator:.{RESULT_DECIMALS}f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _tokens(expression: str) -> list[str]:
    tokens, position = [], 0
    stripped = expression.rstrip()
    while position < len(stripped):
        match = _TOKEN.match(stripped, position)
        if match is None:
            rest = stripped[position:].lstrip()
            raise CalculatorError(f"not arithmetic: {rest[:20]!r} in {expression!r}")
        tokens.append(match.group(1) or match.group(2))
        position = match.end()
    if not tokens:
        raise CalculatorError("empty expression")
    return tokens


class _Parser:
    def __init__(self, tokens: list[str], expression: str):
        self._tokens, self._expression, self._next = tokens, expression, 0

    def peek(self) -> str | None:
        return self._tokens[self._next] if self._next < len(self._tokens) else None

    def _take(self) -> str:
        token = self.peek()
        if token is None:
            raise CalculatorError(f"expression ends early: {self._expression!r}")
        self._next += 1
        return token

    def sum(self, depth: int) -> Fraction:
        value = self.product(depth)
        while self.peek() in ("+", "-"):
            value = _checked(value + self.product(depth) if self._take() == "+"
                             else value - self.product(depth))
        return value

    def product(self, depth: int) -> Fraction:
        value = self.unary(depth)
        while self.peek() in ("*", "/"):
            op = self._take()
            right = self.unary(depth)
            if op == "/" and right == 0:
                raise CalculatorError(f"division by zero in {self._expression!r}")
            value = _checked(value * right if op == "*" else value / right)
        return value

    def unary(self, depth: int) -> Fraction:
        if depth > MAX_DEPTH:
            raise CalculatorError(f"nesting deeper than {MAX_DEPTH} in {self._expression!r}")
        if self.peek() in ("-", "+"):
            sign = -1 if self._take() == "-" else 1
            return sign * self.unary(depth + 1)
        return self.power(depth)

    def power(self, depth: int) -> Fraction:
        base = self.atom(depth)
        if self.peek() not in ("**", "^"):
            return base
        self._take()
        exponent = self.unary(depth + 1)
        if exponent.denominator != 1:
            raise CalculatorError(f"non-integer exponent {format_number(exponent)} in {self._expression!r}")
        if abs(exponent) > MAX_EXPONENT:
            raise CalculatorError(f"exponent {exponent} beyond +-{MAX_EXPONENT} in {self._expression!r}")
        if base == 0 and exponent < 0:
            raise CalculatorError(f"division by zero (0 to a negative power) in {self._expression!r}")
        # Refuse before computing: |exponent| * log10 of the base's larger part bounds the digits.
        if base != 0 and abs(exponent) * math.log10(max(abs(base.numerator), base.denominator)) > 30:
            raise CalculatorError(f"power too large in {self._expression!r}")
        return _checked(base ** int(exponent))

    def atom(self, depth: int) -> Fraction:
        token = self._take()
        if token == "(":
            value = self.sum(depth + 1)
            if self.peek() != ")":
                raise CalculatorError(f"missing ')' in {self._expression!r}")
            self._take()
            return value
        if token[0].isdigit() or token[0] == ".":
            digits = token.replace(",", "")
            if sum(c.isdigit() for c in digits) > MAX_DIGITS:
                raise CalculatorError(f"number {token[:20]}... has more than {MAX_DIGITS} digits")
            return Fraction(digits)
        raise CalculatorError(f"unexpected {token!r} in {self._expression!r}")


def _checked(value: Fraction) -> Fraction:
    if abs(value) > MAX_MAGNITUDE:
        raise CalculatorError(f"intermediate result beyond 1e30: {float(value):.3g}")
    if value.denominator > MAX_DENOMINATOR:
        raise CalculatorError(f"intermediate result with a denominator beyond 1e12: {value}")
    return value
