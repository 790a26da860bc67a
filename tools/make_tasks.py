"""Writes the project's own few-shot task files (tasks/*.jsonl) for `python -m palm eval`.

    python tools/make_tasks.py            # rewrites tasks/*.jsonl

Both are deterministic for a given seed and source tree, and small: they exist to exercise
the evaluation paths end to end and to give the demo model a real score, not to rank models.

- arithmetic: grade-school word problems of one or two steps (add, subtract, multiply, share
  out), generative, each with a chain-of-thought rationale whose calculations carry GSM8K-style
  `<<expr=value>>` annotations, so the calculator path has something to do.
- python_next_line: multiple choice. Six lines of this project's own Python source (not part of
  the demo's training text, the standard library), then which of four lines comes next: the
  real one and three lines of the same indentation and similar length from other files. A model that has learnt Python
  scores above the chance level of 0.25.
- python_word_order: multiple choice, the same contexts, but the three wrong choices are the
  real next line's words shuffled (same indentation and bytes): a test of syntax rather than
  of knowing this code base, which a small model trained on the standard library can pass.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_NAMES = ["Ada", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jia"]
_ITEMS = ["apple", "marble", "pencil", "sticker", "book", "shell", "card", "coin"]


def arithmetic(rng: random.Random, n: int) -> list[dict]:
    """n word problems: input "Q: ...\\nA:", target the number, rationale with annotations."""
    def add(name, item):
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        return (f"{name} has {a} {item}s and gets {b} more. How many {item}s does {name} have now?",
                f"{name} starts with {a} {item}s and gets {b} more, so {name} has "
                f"{a} + {b} = <<{a}+{b}={a + b}>>{a + b} {item}s.", a + b)

    def subtract(name, item):
        a = rng.randint(10, 90)
        b = rng.randint(1, a - 1)
        return (f"{name} had {a} {item}s and gave {b} of them away. How many {item}s are left?",
                f"{name} had {a} {item}s and gave away {b}, so {a} - {b} = <<{a}-{b}={a - b}>>{a - b} "
                f"{item}s are left.", a - b)

    def multiply(name, item):
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return (f"{name} has {a} bags with {b} {item}s in each bag. How many {item}s are there in all?",
                f"There are {a} bags of {b} {item}s, so there are {a} * {b} = <<{a}*{b}={a * b}>>{a * b} "
                f"{item}s.", a * b)

    def share(name, item):
        each, people = rng.randint(2, 12), rng.randint(2, 9)
        total = each * people
        return (f"{name} shares {total} {item}s equally among {people} friends. How many {item}s does "
                "each friend get?",
                f"{total} {item}s shared by {people} friends is {total} / {people} = "
                f"<<{total}/{people}={each}>>{each} {item}s each.", each)

    def two_steps(name, item):
        packs, size = rng.randint(2, 9), rng.randint(3, 12)
        used = rng.randint(1, packs * size - 1)
        total = packs * size
        return (f"{name} buys {packs} packs of {size} {item}s and uses {used} of them. How many "
                f"{item}s does {name} have left?",
                f"{packs} packs of {size} {item}s is {packs} * {size} = <<{packs}*{size}={total}>>{total} "
                f"{item}s. After using {used}, {name} has {total} - {used} = "
                f"<<{total}-{used}={total - used}>>{total - used} {item}s left.", total - used)

    kinds = [add, subtract, multiply, share, two_steps]
    examples = []
    for i in range(n):
        question, rationale, answer = kinds[i % len(kinds)](rng.choice(_NAMES), rng.choice(_ITEMS))
        examples.append({"input": f"Q: {question}\nA:", "target": str(answer), "rationale": rationale})
    return examples


def python_next_line(rng: random.Random, n: int, context_lines: int = 6) -> list[dict]:
    """n questions from the project's own .py files: context_lines lines, then the next line
    among itself and three lines of the same indentation and similar length from other files."""
    files = sorted(p for d in ("palm", "kernels", "tools") for p in (ROOT / d).rglob("*.py"))
    texts = {p: lines for p in files if len(lines := p.read_text().splitlines()) > context_lines}
    pool = [(p, line) for p, lines in texts.items() for line in lines if 20 <= len(line.strip()) <= 90]
    examples = []
    while len(examples) < n:
        path = rng.choice(list(texts))
        lines = texts[path]
        at = rng.randrange(context_lines, len(lines))
        answer = lines[at]
        context = lines[at - context_lines:at]
        if not 20 <= len(answer.strip()) <= 90 or not all(line.strip() for line in context[-2:]):
            continue
        # Same indentation and about the same length: the choice turns on what the line says,
        # not on whitespace, which is cheap to predict (per-byte scores would favour it).
        indent = len(answer) - len(answer.lstrip())
        others = [line for p, line in pool if p != path and abs(len(line) - len(answer)) <= 10
                  and len(line) - len(line.lstrip()) == indent and line.strip() != answer.strip()]
        if len(others) < 3:
            continue
        choices = rng.sample(others, 3)
        right = rng.randrange(4)
        choices.insert(right, answer)
        examples.append({"input": "\n".join(context) + "\n", "choices": choices, "answer": right})
    return examples


def python_word_order(rng: random.Random, n: int, context_lines: int = 6) -> list[dict]:
    """n questions from the project's own .py files: context_lines lines, then which of four
    versions of the next line is the real one; the other three hold the same words in another
    order (same indentation, same bytes), so only knowing how Python reads can tell them apart."""
    files = sorted(p for d in ("palm", "kernels", "tools") for p in (ROOT / d).rglob("*.py"))
    texts = {p: lines for p in files if len(lines := p.read_text().splitlines()) > context_lines}
    examples = []
    while len(examples) < n:
        lines = texts[rng.choice(list(texts))]
        at = rng.randrange(context_lines, len(lines))
        answer = lines[at]
        words = answer.split()
        if not 4 <= len(words) <= 12:
            continue
        indent = answer[:len(answer) - len(answer.lstrip())]
        versions = {answer}
        for _ in range(50):
            if len(versions) == 4:
                break
            versions.add(indent + " ".join(rng.sample(words, len(words))))
        if len(versions) < 4:
            continue
        choices = sorted(versions - {answer})
        right = rng.randrange(4)
        choices.insert(right, answer)
        examples.append({"input": "\n".join(lines[at - context_lines:at]) + "\n", "choices": choices,
                         "answer": right})
    return examples


def write(path: Path, examples: list[dict], template: dict | None = None) -> None:
    lines = ([json.dumps({"template": template})] if template else []) + [json.dumps(e) for e in examples]
    path.write_text("\n".join(lines) + "\n")
    print(f"{path}: {len(examples)} examples")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "tasks")
    args = parser.parse_args()
    args.out.mkdir(exist_ok=True)
    write(args.out / "arithmetic.jsonl", arithmetic(random.Random(args.seed), 60))
    # Code continues on the next line: the choice follows the context with no space.
    write(args.out / "python_next_line.jsonl", python_next_line(random.Random(args.seed), 100),
          {"target": "{target}"})
    write(args.out / "python_word_order.jsonl", python_word_order(random.Random(args.seed), 100),
          {"target": "{target}"})


if __name__ == "__main__":
    main()
