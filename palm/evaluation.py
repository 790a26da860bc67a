"""Evaluation as the PaLM paper reports it, and `python -m palm eval` (`run`).

- `perplexity`: per-token loss, perplexity and bits per byte of held-out text. The tokenizer is
  lossless, so the byte count is exact and bits per byte compares models across vocabularies.
- `evaluate`: few-shot tasks (section 6.1). A k-shot prompt is k solved exemplars, then the
  question. Multiple-choice tasks are scored by the log-likelihood of each choice after the
  prompt, raw and normalised by the choice's length in bytes, in one batched forward pass per
  question. Generative tasks decode greedily and score the answer by exact match.
- Chain-of-thought (section 6.3): exemplars carry a written rationale before their answer
  ("... The answer is 24."), and the answer is extracted from the rationale the model writes.
  With `calculator=True`, decoding that produces a GSM8K-style annotation `<<48/2=` is paused,
  the expression is evaluated by `palm.calculator` (our own parser, never Python's `eval`) and
  its result and `>>` are inserted before decoding goes on.

Task files are JSONL, one example per line (README "Evaluating" shows them):

    {"input": "Q: What is 7 + 5?\\nA:", "target": "12"}                      generative
    {"input": "Q: ... A:", "target": "12", "rationale": "7 + 5 = <<7+5=12>>12."}   CoT exemplar
    {"input": "2 + 2 =", "choices": ["3", "4", "5"], "answer": 1}            multiple choice

Every example of a file has the same kind. `Template` turns examples into text: by default the
prompt is the example's "input" and the answer follows it after a space (" {target}"), examples
are separated by a blank line; a first line {"template": {...}} changes any of its fields, and
any field of the examples may appear in them ("Q: {question}\\nA:"). The first `shots` examples of the file are the exemplars; the rest are
evaluated. Every text the model reads starts with the end-of-document token, as each document
does in training (palm.data puts EOS between documents).

Dimension key: B batch (windows or choices), T positions.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import re
import sys
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import kernels
from palm import calculator as calculator_lib
from palm import tokenizer as tokenizer_lib
from palm.checkpoint import CheckpointError
from palm.config import Config
from palm.decoding import generate, length_bucket, load_run
from palm.model import _logits, check_params
from palm.settings import TrainError
from palm.tokenizer import Tokenizer

# Calculator decoding runs this many tokens at a time, then looks for an annotation to complete.
_CALCULATOR_CHUNK = 16
# Default new tokens of generative tasks: a short answer, or a rationale and its answer.
_ANSWER_TOKENS, _RATIONALE_TOKENS = 32, 128
# An open GSM8K-style annotation: "<<" then an expression (no "<", ">" or "=") then "=".
_ANNOTATION = re.compile(r"<<([^<>=]*)=")


class TaskError(ValueError):
    """A task file or task setting that cannot be evaluated; the message says where and why."""


@dataclasses.dataclass(frozen=True)
class Template:
    """How examples become text (str.format fields are the example's keys).

    prompt: the question part of every example.
    target: appended to an exemplar's prompt when it is solved directly, and to the prompt as
      each candidate of a multiple-choice question ({target} is the choice).
    rationale: appended instead of `target` to chain-of-thought exemplars.
    answer_prefix: in chain-of-thought, the answer is what follows its last occurrence in the
      model's text, up to the end of that line (a final "." dropped).
    separator: between exemplars and before the question; decoding stops where the model
      writes it.
    """
    prompt: str = "{input}"
    target: str = " {target}"
    rationale: str = " {rationale} The answer is {target}."
    answer_prefix: str = "The answer is"
    separator: str = "\n\n"


@dataclasses.dataclass(frozen=True)
class Task:
    """Examples of one kind read from a task file; `lines[i]` is example i's line number."""
    name: str
    kind: str  # "choice" (multiple choice) or "generate"
    examples: tuple[dict, ...]
    lines: tuple[int, ...]
    template: Template = Template()


def load_task(path: str | Path) -> Task:
    """Reads and checks a JSONL task file (see the module docstring). Its first line may be
    {"template": {...}}: the fields of `Template` that differ from the defaults.

    Raises:
        FileNotFoundError: no such file.
        TaskError: a line that is not a JSON object, lacks a field its kind or the template
            needs, has a field of the wrong type, an answer index outside its choices, or is of
            another kind than the first example; a template line with unknown fields; the
            message names the file and the line.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"task file not found: {str(path)!r}") from None
    except UnicodeDecodeError as e:
        raise TaskError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    examples, lines, kind, template = [], [], None, Template()
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            example = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskError(f"{where}: not JSON ({e.msg} at column {e.colno})") from None
        if isinstance(example, dict) and "template" in example and not examples:
            template = _read_template(example, where)
            continue
        line_kind = _check_example(example, where, template)
        if kind is None:
            kind = line_kind
        elif line_kind != kind:
            raise TaskError(f"{where}: a {_KIND_NAMES[line_kind]} example in a file of "
                            f"{_KIND_NAMES[kind]} examples (line {lines[0]})")
        examples.append(example)
        lines.append(number)
    if not examples:
        raise TaskError(f"{path}: no examples (one JSON object per line)")
    return Task(path.stem, kind, tuple(examples), tuple(lines), template)


def _read_template(line: dict, where: str) -> Template:
    fields = line["template"]
    known = {f.name for f in dataclasses.fields(Template)}
    if set(line) != {"template"} or not isinstance(fields, dict):
        raise TaskError(f'{where}: a template line is {{"template": {{...}}}} and nothing else')
    unknown = sorted(set(fields) - known)
    if unknown or not all(isinstance(v, str) for v in fields.values()):
        raise TaskError(f"{where}: template fields must be strings among {sorted(known)}, got {fields}")
    return Template(**fields)


_KIND_NAMES = {"choice": "multiple-choice", "generate": "generative"}


def _check_example(example, where: str, template: Template) -> str:
    """The example's kind, or TaskError naming what is wrong at `where`."""
    if not isinstance(example, dict):
        raise TaskError(f"{where}: an example must be a JSON object, got {type(example).__name__}")
    if "choices" in example:
        choices, answer = example["choices"], example.get("answer")
        if (not isinstance(choices, list) or len(choices) < 2
                or not all(isinstance(c, str) and c for c in choices)):
            raise TaskError(f"{where}: 'choices' must be a list of at least 2 non-empty strings")
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise TaskError(f"{where}: 'answer' must be the index of the right choice, an int in "
                            f"[0, {len(choices)}), got {answer!r}")
        kind = "choice"
    elif isinstance(example.get("target"), str):
        kind = "generate"
    else:
        raise TaskError(f"{where}: an example needs 'target' (a string) or 'choices' and 'answer'")
    if not isinstance(example.get("rationale", ""), str):
        raise TaskError(f"{where}: 'rationale' must be a string")
    for field in ("prompt", "target"):
        try:
            _render(getattr(template, field), example, target="x")
        except KeyError as e:
            raise TaskError(f"{where}: no field {e} that the template's {field} "
                            f"{getattr(template, field)!r} uses") from None
    return kind


def _render(pattern: str, example: dict, **extra) -> str:
    return pattern.format_map({**example, **extra})


def _answer(example: dict) -> str:
    """The right answer's text: the target, or the right choice."""
    if "choices" in example:
        return example["choices"][example["answer"]]
    return example["target"]


def few_shot_prompt(exemplars: Sequence[dict], query: dict, template: Template = Template(), *,
                    cot: bool = False) -> str:
    """The exemplars, each solved (with its rationale under `cot`), then the query's prompt."""
    solved = template.rationale if cot else template.target
    parts = [_render(template.prompt, e) + _render(solved, e, target=_answer(e)) for e in exemplars]
    return template.separator.join([*parts, _render(template.prompt, query)])


# --- Scoring text: log-likelihoods of given tokens ------------------------------------------


@functools.partial(jax.jit, static_argnames=("config", "impl"))
def _token_scores(params, tokens, config, impl):
    """tokens int32 [B, T + 1] -> log p(tokens[:, 1:] | the tokens before) float32 [B, T], and
    whether each was the model's argmax, bool [B, T]."""
    logits = _logits(params, tokens[:, :-1], config, impl)  # [B, T, V] float32
    targets = tokens[:, 1:, None]
    logp = jax.nn.log_softmax(logits, axis=-1)
    scores = jnp.take_along_axis(logp, targets, axis=-1)[..., 0]
    return scores, jnp.argmax(logits, axis=-1) == targets[..., 0]


def _bucket(length: int, cap: int) -> int:
    """Scored sequences share compiles as prompts do (`length_bucket`), up to the model's cap."""
    return min(cap, length_bucket(length))


def _pad_rows(rows: Sequence[Sequence[int]], width: int, n_rows: int | None = None) -> jax.Array:
    out = np.zeros((n_rows or len(rows), width), np.int32)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return jnp.asarray(out)


def perplexity(params: dict, config: Config, tokenizer: Tokenizer, texts: Sequence[str], *,
               batch_size: int = 8, impl: str = "auto", progress: bool = False) -> dict:
    """Loss, perplexity and bits per byte of documents, as the training stream holds them.

    The documents are joined as in training (each followed by EOS, the first preceded by one)
    and cut into windows of config.max_seq_len predicted tokens; each token is predicted once,
    from the tokens before it in its window. The EOS after each document is predicted too: it
    is part of the text's code length, the number of bits that identify the text.

    Returns:
      {"documents", "bytes" (UTF-8 bytes of the texts), "tokens" (predicted), "nll" (nats,
      summed), "loss" (nats per token), "perplexity" (exp of loss), "bits_per_byte"}.

    Raises:
      ValueError: no text, batch_size < 1, or params that don't match config.
    """
    impl = kernels.resolve_impl(impl)
    check_params(params, config)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    texts = list(texts)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    if n_bytes == 0:
        raise ValueError("no text to score: every document is empty")
    stream = [tokenizer.eos_id]
    for ids in tokenizer.encode_batch(texts):
        stream += ids + [tokenizer.eos_id]
    window = config.max_seq_len
    starts = range(0, len(stream) - 1, window)
    nll, n_tokens = 0.0, len(stream) - 1
    width = _bucket(min(window, n_tokens) + 1, window + 1)
    for first in tqdm(range(0, len(starts), batch_size), desc="perplexity", unit="batch",
                      disable=not progress, leave=False):
        rows = [stream[s:s + window + 1] for s in starts[first:first + batch_size]]
        scores, _ = _token_scores(params, _pad_rows(rows, width, batch_size), config, impl)
        mask = np.zeros((batch_size, width - 1), bool)
        for i, row in enumerate(rows):
            mask[i, :len(row) - 1] = True
        nll -= float(np.sum(np.asarray(scores, np.float64), where=mask))
    loss = nll / n_tokens
    return {"documents": len(texts), "bytes": n_bytes, "tokens": n_tokens, "nll": nll,
            "loss": loss, "perplexity": math.exp(loss),
            "bits_per_byte": nll / math.log(2) / n_bytes}


def choice_scores(params: dict, config: Config, tokenizer: Tokenizer, context: str,
                  continuations: Sequence[str], *, impl: str = "auto") -> dict:
    """Log-likelihood of each continuation after context: one forward pass of [C, T].

    When context and the longest continuation exceed the model's max_seq_len, the context
    loses its oldest tokens (its first exemplars), never the question's end.

    Returns:
      {"logprob": [C] summed log-likelihoods, "per_byte": [C] the same divided by each
      continuation's UTF-8 bytes, "greedy": [C] whether greedy decoding would write the
      continuation's tokens, "truncated": context tokens dropped}.
    """
    context_ids = [tokenizer.eos_id] + tokenizer.encode(context)
    continuation_ids = [tokenizer.encode(c) for c in continuations]
    longest = max(len(c) for c in continuation_ids)
    room = config.max_seq_len + 1 - longest  # rows hold T + 1 tokens
    if room < 1:
        raise TaskError(f"a choice of {longest} tokens does not fit max_seq_len={config.max_seq_len}")
    truncated = max(0, len(context_ids) - room)
    context_ids = context_ids[truncated:]
    rows = [context_ids + c for c in continuation_ids]
    width = _bucket(max(len(r) for r in rows), config.max_seq_len + 1)
    scores, greedy = _token_scores(params, _pad_rows(rows, width), config, impl)
    scores, greedy = np.asarray(scores, np.float64), np.asarray(greedy)
    start = len(context_ids) - 1  # scores[:, t] is the log-likelihood of token t + 1
    logprob = [float(scores[i, start:start + len(c)].sum()) for i, c in enumerate(continuation_ids)]
    return {"logprob": logprob,
            "per_byte": [lp / len(text.encode("utf-8")) for lp, text in zip(logprob, continuations)],
            "greedy": [bool(greedy[i, start:start + len(c)].all()) for i, c in enumerate(continuation_ids)],
            "truncated": truncated}


# --- Generating answers ---------------------------------------------------------------------


@dataclasses.dataclass
class _Completion:
    """One prompt's decoding state: its ids, the text generated so far, the calculator's use."""
    prompt: list[int]
    generated: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    done: bool = False
    checked: int = 0  # text before this offset holds no annotation left to complete
    calls: list[dict] = dataclasses.field(default_factory=list)


def complete(params: dict, config: Config, tokenizer: Tokenizer, prompts: Sequence[list[int]], *,
             max_new_tokens: int, stops: Sequence[str] = (), calculator: bool = False,
             impl: str = "auto") -> list[_Completion]:
    """Greedy continuations of token prompts, decoded together, each ending at the first of
    `stops` in its text (cut there), at EOS, or after max_new_tokens.

    With `calculator`, decoding runs _CALCULATOR_CHUNK tokens at a time; after each chunk a row
    whose new text opens an annotation `<<expr=` is cut right after the "=", the calculator's
    result and ">>" are appended, and the row goes on from that text. Each chunk prefills its
    rows again (the KV cache does not outlive a `generate` call): the price of editing the text
    mid-decoding, paid only with the calculator. An expression the calculator refuses is left
    for the model to complete, and recorded in the row's `calls` with the reason.
    """
    rows = [_Completion(list(p)) for p in prompts]
    chunk = _CALCULATOR_CHUNK if calculator else max_new_tokens
    while not all(r.done for r in rows):
        contexts = [r.prompt + r.generated for r in rows]
        longest = max(len(c) for c in contexts)
        steps = min(chunk, config.max_seq_len - longest)
        if steps < 1:
            break
        out = np.asarray(generate(params, _pad_rows(contexts, longest), config,
                                  max_new_tokens=steps, prompt_lengths=np.array([len(c) for c in contexts]),
                                  eos_id=tokenizer.eos_id, impl=impl))
        for i, (row, context) in enumerate(zip(rows, contexts)):
            if row.done:
                continue
            new = out[i, len(context):len(context) + steps].tolist()
            ended = tokenizer.eos_id in new
            row.generated += new[:new.index(tokenizer.eos_id)] if ended else new
            row.text = tokenizer.decode(row.generated)
            stop = min((row.text.find(s) for s in stops if s in row.text), default=len(row.text))
            if calculator and _complete_annotation(row, tokenizer, stop):
                row.done = len(row.generated) >= max_new_tokens  # the text goes on from the result
                continue
            stopped = stop < len(row.text)
            row.text = row.text[:stop]
            row.done = ended or stopped or len(row.generated) >= max_new_tokens
    for row in rows:
        row.done = True
    return rows


def _complete_annotation(row: _Completion, tokenizer: Tokenizer, end: int) -> bool:
    """Completes the first open annotation in row.text[row.checked:end] with the calculator's
    result; False when there is none (refused ones are recorded and skipped)."""
    while match := _ANNOTATION.search(row.text, row.checked, end):
        call = {"expression": match.group(1)}
        row.calls.append(call)
        try:
            call["result"] = calculator_lib.calculate(match.group(1))
        except calculator_lib.CalculatorError as e:
            call["refused"] = str(e)
            row.checked = match.end()
            continue
        row.text = row.text[:match.end()] + call["result"] + ">>"
        row.generated = tokenizer.encode(row.text)
        row.checked = len(row.text)
        return True
    return False


# --- Few-shot tasks -------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """The form answers are compared in: whitespace collapsed, a final "." dropped, lower case;
    a number (commas, a leading "$" allowed) as its exact value, so "1,000.0" equals "1000"."""
    text = " ".join(text.split()).rstrip(".").strip()
    number = text.replace(",", "").removeprefix("$")
    try:
        return str(Fraction(number))
    except (ValueError, ZeroDivisionError):
        return text.lower()


def extract_answer(text: str, template: Template = Template(), *, cot: bool = False) -> str | None:
    """The answer in a generated text: its first line, or under `cot` what follows the last
    template.answer_prefix up to the end of its line (None when the rationale never says it)."""
    if not cot:
        return text.strip().split("\n", 1)[0].strip()
    at = text.rfind(template.answer_prefix)
    if at < 0:
        return None
    return text[at + len(template.answer_prefix):].split("\n", 1)[0].strip().rstrip(".").strip()


def evaluate(params: dict, config: Config, tokenizer: Tokenizer, task: Task | str | Path, *,
             shots: int = 0, cot: bool = False, calculator: bool = False, limit: int | None = None,
             max_new_tokens: int | None = None, batch_size: int = 8, impl: str = "auto", progress: bool = False) -> dict:
    """Accuracy of the model on a few-shot task (a `Task` or the path of a task file).

    The first `shots` examples are the exemplars of every prompt; the next `limit` (default:
    all the rest) are evaluated. Multiple-choice questions are scored by `choice_scores`: the
    prediction is the most likely choice, raw ("accuracy") and per byte ("accuracy_norm").
    Generative questions decode greedily (`complete`, `batch_size` at a time) up to
    max_new_tokens (default 32, or 128 under `cot`), stopping at a newline (at the template's
    separator under `cot`); the extracted answer (`extract_answer`) must equal the target after
    `normalize_answer`.

    Returns:
      {"task", "kind", "shots", "cot", "calculator", "examples", "accuracy", "accuracy_norm"
      (multiple choice), "chance" (multiple choice), "truncated" (prompts that lost their
      oldest tokens to fit max_seq_len), "calculator_calls", "records" (one per question: its
      line, the prediction, whether it was right, and the generated text or choice scores)}.

    Raises:
      TaskError: a bad task file, too few examples for `shots`, `cot` on a multiple-choice task
        or with exemplars lacking a rationale, `calculator` without `cot`, a max_new_tokens
        that leaves no room for a prompt.
      FileNotFoundError: no task file at the path.
      ValueError: params that don't match config, batch_size < 1.
    """
    impl = kernels.resolve_impl(impl)
    check_params(params, config)
    if not isinstance(task, Task):
        task = load_task(task)
    template = task.template
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not isinstance(shots, int) or shots < 0:
        raise TaskError(f"shots must be an int >= 0, got {shots!r}")
    if shots >= len(task.examples):
        raise TaskError(f"task {task.name} has {len(task.examples)} examples: {shots} exemplars "
                        "leave none to evaluate")
    if cot and task.kind == "choice":
        raise TaskError(f"task {task.name} is multiple choice: chain-of-thought needs a generative task")
    if calculator and not cot:
        raise TaskError("the calculator completes annotations in rationales: it needs cot=True")
    exemplars = task.examples[:shots]
    if cot:
        for example, line in zip(exemplars, task.lines):
            if not example.get("rationale"):
                raise TaskError(f"task {task.name} line {line}: a chain-of-thought exemplar needs a 'rationale'")
    end = len(task.examples) if limit is None else min(len(task.examples), shots + limit)
    if end <= shots:
        raise TaskError(f"limit must be >= 1, got {limit!r}")
    queries = list(zip(task.examples[shots:end], task.lines[shots:end]))
    prompts = [few_shot_prompt(exemplars, q, template, cot=cot) for q, _ in queries]

    result = {"task": task.name, "kind": task.kind, "shots": shots, "cot": cot,
              "calculator": calculator, "examples": len(queries)}
    bar = tqdm(total=len(queries), desc=f"eval {task.name}", unit="question", disable=not progress,
               leave=False)
    if task.kind == "choice":
        records = []
        for (query, line), prompt in zip(queries, prompts):
            choices = [_render(template.target, query, target=c) for c in query["choices"]]
            scores = choice_scores(params, config, tokenizer, prompt, choices, impl=impl)
            records.append({"line": line, "answer": query["answer"],
                            "prediction": int(np.argmax(scores["logprob"])),
                            "prediction_norm": int(np.argmax(scores["per_byte"])), **scores})
            bar.update()
        result["accuracy"] = float(np.mean([r["prediction"] == r["answer"] for r in records]))
        result["accuracy_norm"] = float(np.mean([r["prediction_norm"] == r["answer"] for r in records]))
        result["chance"] = float(np.mean([1 / len(q["choices"]) for q, _ in queries]))
        result["truncated"] = sum(r["truncated"] > 0 for r in records)
        result["calculator_calls"] = 0
    else:
        if max_new_tokens is None:
            max_new_tokens = _RATIONALE_TOKENS if cot else _ANSWER_TOKENS
        room = config.max_seq_len - max_new_tokens
        if max_new_tokens < 1 or room < 1:
            raise TaskError(f"max_new_tokens must be in [1, {config.max_seq_len - 1}] (the model's "
                            f"max_seq_len {config.max_seq_len} less a prompt), got {max_new_tokens}")
        stops = (template.separator,) if cot else ("\n",)
        records, truncated = [], 0
        for first in range(0, len(queries), batch_size):
            batch = [[tokenizer.eos_id] + tokenizer.encode(p) for p in prompts[first:first + batch_size]]
            truncated += sum(len(ids) > room for ids in batch)
            rows = complete(params, config, tokenizer, [ids[-room:] for ids in batch],
                            max_new_tokens=max_new_tokens, stops=stops, calculator=calculator,
                            impl=impl)
            for (query, line), row in zip(queries[first:first + batch_size], rows):
                answer = extract_answer(row.text, template, cot=cot)
                correct = answer is not None and normalize_answer(answer) == normalize_answer(query["target"])
                records.append({"line": line, "target": query["target"], "prediction": answer,
                                "correct": correct, "text": row.text, "calculator": row.calls})
            bar.update(len(rows))
        result["accuracy"] = float(np.mean([r["correct"] for r in records]))
        result["truncated"] = truncated
        result["calculator_calls"] = sum(len(r["calculator"]) for r in records)
    bar.close()
    result["records"] = records
    return result


def summary(result: dict) -> str:
    """One line: what was evaluated and its accuracy."""
    what = f"{result['shots']}-shot " + ("chain-of-thought " if result["cot"] else "")
    what += "multiple choice" if result["kind"] == "choice" else "generative"
    line = f"{result['task']}: {what}, {result['examples']} questions: accuracy {result['accuracy']:.3f}"
    if result["kind"] == "choice":
        line += f" (per byte {result['accuracy_norm']:.3f}; chance {result['chance']:.3f})"
    if result["calculator"]:
        line += f"; {result['calculator_calls']} calculator calls"
    if result["truncated"]:
        line += f"; {result['truncated']} prompts cut to fit max_seq_len"
    return line


def run(args: argparse.Namespace) -> int:
    """`python -m palm eval`: a run's model on a task file (--task) or on text (--text); prints
    one summary line (and writes every record as JSON with --out); bad input exits with code 2
    and a one-line message."""
    try:
        impl = kernels.resolve_impl(args.impl)
        if (args.task is None) == (args.text is None):
            raise ValueError("give one of --task FILE (a few-shot task) or --text GLOB (perplexity)")
        task = load_task(args.task) if args.task is not None else None
        texts = None
        if args.text is not None:
            texts = [t for t in map(tokenizer_lib.read_text, tokenizer_lib.resolve_paths(args.text)) if t]
        params, config, tokenizer = load_run(args.run_dir)
        if task is not None:
            result = evaluate(params, config, tokenizer, task, shots=args.shots, cot=args.cot,
                              calculator=args.calculator, limit=args.limit,
                              max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                              impl=impl, progress=not args.no_progress)
            line = summary(result)
        else:
            result = perplexity(params, config, tokenizer, texts, batch_size=args.batch_size,
                                impl=impl, progress=not args.no_progress)
            line = (f"{result['documents']} documents, {result['bytes']:,} bytes, "
                    f"{result['tokens']:,} tokens: loss {result['loss']:.4f} nats/token, "
                    f"perplexity {result['perplexity']:.2f}, {result['bits_per_byte']:.4f} bits/byte")
    except (TrainError, CheckpointError, ValueError, FileNotFoundError, UnicodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.out is not None:
        tokenizer_lib.write_atomically(args.out, json.dumps(result, indent=1).encode())
    print(line)
    return 0
