"""palm.evaluation: perplexity, few-shot scoring and chain-of-thought decoding against the same
quantities computed the plain way (one unpadded forward pass per sequence), and `palm eval`."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import palm
from palm import evaluation
from palm.cli import main
from palm.decoding import load_run
from palm.evaluation import (Task, TaskError, Template, choice_scores, complete, evaluate,
                             extract_answer, few_shot_prompt, load_task, normalize_answer, perplexity)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model(run_dir):
    """(params, config, tokenizer) of conftest's run: the tiny preset (max_seq_len 64) with
    weights doubled so that its predictions depend on the context."""
    params, config, tokenizer = load_run(run_dir)
    blocks = {k: w if k == "norm_scale" else 2 * w for k, w in params["blocks"].items()}
    return {**params, "blocks": blocks}, config, tokenizer


def sequence_logprobs(params, config, ids) -> np.ndarray:
    """log p(ids[t] | ids[:t]) for t >= 1, from one forward pass over ids alone (float64)."""
    logits = palm.forward(params, jnp.asarray([ids[:-1]], jnp.int32), config, impl="xla")[0]
    logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), np.float64)
    return logp[np.arange(len(ids) - 1), ids[1:]]


# --- Perplexity and bits per byte -----------------------------------------------------------

def test_perplexity_is_the_windows_summed_loss(model):
    params, config, tokenizer = model
    texts = ["def f(x):\n    return x + 1\n" * 8, "import os\n", "class A:\n    pass\n" * 6]
    # A batch of 2 windows of 64: the stream (~150 tokens) fills a batch and part of another.
    result = perplexity(params, config, tokenizer, texts, batch_size=2, impl="xla")
    stream = [tokenizer.eos_id]
    for text in texts:
        stream += tokenizer.encode(text) + [tokenizer.eos_id]
    window = config.max_seq_len
    assert len(stream) > 2 * window + 1
    nll = -sum(sequence_logprobs(params, config, stream[s:s + window + 1]).sum()
               for s in range(0, len(stream) - 1, window))
    n_bytes = sum(len(t.encode()) for t in texts)
    assert result["tokens"] == len(stream) - 1 and result["bytes"] == n_bytes
    assert result["nll"] == pytest.approx(nll, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(nll / (len(stream) - 1)), rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-5)


def test_perplexity_bad_input(model):
    params, config, tokenizer = model
    with pytest.raises(ValueError, match="no text to score"):
        perplexity(params, config, tokenizer, ["", ""], impl="xla")
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        perplexity(params, config, tokenizer, ["a"], batch_size=0, impl="xla")


# --- Multiple choice ------------------------------------------------------------------------

def test_choice_scores_match_one_sequence_at_a_time(model):
    params, config, tokenizer = model
    context, choices = "for i in range(10):\n   ", [" print(i)", " pass", " x = i * 2 + 1"]
    scores = choice_scores(params, config, tokenizer, context, choices, impl="xla")
    context_ids = [tokenizer.eos_id] + tokenizer.encode(context)
    for i, choice in enumerate(choices):
        ids = tokenizer.encode(choice)
        expected = sequence_logprobs(params, config, context_ids + ids)[-len(ids):].sum()
        assert scores["logprob"][i] == pytest.approx(expected, rel=1e-5, abs=1e-5)
        assert scores["per_byte"][i] == pytest.approx(expected / len(choice.encode()), rel=1e-5)
    assert scores["truncated"] == 0


def test_choice_scores_cut_the_oldest_context_to_fit(model):
    params, config, tokenizer = model
    context = " ".join(str(i) for i in range(200))  # far beyond max_seq_len = 64 tokens
    scores = choice_scores(params, config, tokenizer, context, [" 200", " 7"], impl="xla")
    ids = [tokenizer.eos_id] + tokenizer.encode(context)
    kept = config.max_seq_len + 1 - max(len(tokenizer.encode(c)) for c in [" 200", " 7"])
    assert scores["truncated"] == len(ids) - kept
    expected = sequence_logprobs(params, config, ids[-kept:] + tokenizer.encode(" 7"))
    assert scores["logprob"][1] == pytest.approx(expected[-len(tokenizer.encode(" 7")):].sum(), rel=1e-5)


def _choice_task(model, n=6) -> Task:
    """A multiple-choice task whose answers are the model's own most likely choices, found
    with one forward pass per choice, except the last question, whose answer is its least
    likely choice."""
    params, config, tokenizer = model
    examples = []
    for i in range(n):
        example = {"input": f"x = {i} +", "choices": ["1", "y", "(", "x"]}
        prompt = few_shot_prompt([], example)
        # The context and each choice (after the template's space) are tokenised apart, as
        # choice_scores does.
        context = [tokenizer.eos_id] + tokenizer.encode(prompt)
        choices = [tokenizer.encode(" " + c) for c in example["choices"]]
        scores = [sequence_logprobs(params, config, context + c)[-len(c):].sum() for c in choices]
        examples.append({**example, "answer": int(np.argmin(scores) if i == n - 1 else np.argmax(scores))})
    return Task("choices", "choice", tuple(examples), tuple(range(1, n + 1)))


def test_multiple_choice_accuracy(model):
    params, config, tokenizer = model
    task = _choice_task(model)
    result = evaluate(params, config, tokenizer, task, impl="xla")
    assert result["examples"] == 6 and result["kind"] == "choice"
    assert result["accuracy"] == pytest.approx(5 / 6)
    assert result["chance"] == 0.25 and result["truncated"] == 0
    assert [r["prediction"] == r["answer"] for r in result["records"]] == [True] * 5 + [False]
    # Exemplars come first in the prompt and are not evaluated.
    shot = evaluate(params, config, tokenizer, task, shots=2, limit=3, impl="xla")
    assert shot["examples"] == 3 and [r["line"] for r in shot["records"]] == [3, 4, 5]


# --- Generative and chain-of-thought --------------------------------------------------------

def test_generative_exact_match_on_the_models_own_greedy_answers(model):
    params, config, tokenizer = model
    inputs = [f"Q: {w}?\nA:" for w in ("cat", "dog", "sun", "tree", "sea")]
    examples = [{"input": q, "target": ""} for q in inputs]
    # Targets: what greedy decoding writes after each 1-shot prompt, up to the first newline.
    targets = []
    for example in examples:
        prompt = few_shot_prompt([{"input": "Q: one?\nA:", "target": "1"}], example)
        out = palm.generate(params, jnp.asarray([[tokenizer.eos_id] + tokenizer.encode(prompt)]),
                            config, max_new_tokens=8, eos_id=tokenizer.eos_id, impl="xla")
        text = tokenizer.decode(out[0].tolist()[1 + len(tokenizer.encode(prompt)):])
        targets.append(text.split("\n")[0].strip())
    task_examples = [{"input": "Q: one?\nA:", "target": "1"}]
    task_examples += [{"input": q, "target": t if i else t + " wrong"} for i, (q, t) in enumerate(zip(inputs, targets))]
    task = Task("greedy", "generate", tuple(task_examples), tuple(range(1, 7)))
    result = evaluate(params, config, tokenizer, task, shots=1, max_new_tokens=8, batch_size=2, impl="xla")
    assert [r["correct"] for r in result["records"]] == [False, True, True, True, True]
    assert [r["prediction"] for r in result["records"]] == targets


class _ScriptedModel:
    """Stands in for palm.generate: each row continues its text after the prompt along a
    script, and the script depends on what the row's text says so far (as a model's output
    depends on its input): once the calculator has written 3+4=7 the row follows the right
    rationale, otherwise the one that claims 3+4=9."""
    WRONG = "So 3 + 4 = <<3+4=9>>9. The answer is 9.\n\nQ: next"
    RIGHT = "So 3 + 4 = <<3+4=7>>7. The answer is 7.\n\nQ: next"

    def __init__(self, tokenizer, prompt_length):
        self.tokenizer, self.prompt_length, self.calls = tokenizer, prompt_length, 0

    def __call__(self, params, prompts, config, *, max_new_tokens, prompt_lengths, eos_id, impl):
        self.calls += 1
        prompts = np.asarray(prompts)
        out = np.full((len(prompts), prompts.shape[1] + max_new_tokens), eos_id, np.int32)
        for row, length in enumerate(prompt_lengths):
            out[row, :length] = prompts[row, :length]
            written = self.tokenizer.decode(prompts[row, self.prompt_length:length].tolist())
            script = self.RIGHT if "=7>>" in written else self.WRONG
            assert script.startswith(written), written
            new = self.tokenizer.encode(script[len(written):])[:max_new_tokens]
            out[row, length:length + len(new)] = new
        return jnp.asarray(out)


@pytest.mark.parametrize("calculator", [False, True])
def test_calculator_completes_annotations(model, monkeypatch, calculator):
    params, config, tokenizer = model
    prompt = [tokenizer.eos_id] + tokenizer.encode("Q: What is 3 + 4?\nA:")
    scripted = _ScriptedModel(tokenizer, len(prompt))
    monkeypatch.setattr(evaluation, "generate", scripted)
    [row] = complete(params, config, tokenizer, [prompt], max_new_tokens=40, stops=("\n\n",),
                     calculator=calculator, impl="xla")
    if calculator:
        assert row.text == "So 3 + 4 = <<3+4=7>>7. The answer is 7."
        assert row.calls == [{"expression": "3+4", "result": "7"}]
        assert scripted.calls >= 2  # paused at the annotation, then went on from the result
    else:
        assert row.text == "So 3 + 4 = <<3+4=9>>9. The answer is 9."
        assert row.calls == [] and scripted.calls == 1
    assert extract_answer(row.text, cot=True) == ("7" if calculator else "9")


def test_refused_expressions_are_recorded_and_left_to_the_model(model, monkeypatch):
    params, config, tokenizer = model
    prompt = [tokenizer.eos_id] + tokenizer.encode("Q:")
    scripted = _ScriptedModel(tokenizer, len(prompt))
    scripted.WRONG = "<<2**99=big>> then <<3+4=9>>9.\n\n"
    scripted.RIGHT = "<<2**99=big>> then <<3+4=7>>7.\n\n"
    monkeypatch.setattr(evaluation, "generate", scripted)
    [row] = complete(params, config, tokenizer, [prompt], max_new_tokens=40, stops=("\n\n",),
                     calculator=True, impl="xla")
    assert row.text == "<<2**99=big>> then <<3+4=7>>7."
    assert row.calls[0]["expression"] == "2**99" and "exponent 99" in row.calls[0]["refused"]
    assert row.calls[1] == {"expression": "3+4", "result": "7"}


def test_chain_of_thought_prompt_and_answers():
    exemplar = {"input": "Q: 1 + 1?\nA:", "target": "2", "rationale": "1 + 1 = <<1+1=2>>2."}
    query = {"input": "Q: 2 + 3?\nA:", "target": "5"}
    assert few_shot_prompt([exemplar], query, cot=True) == (
        "Q: 1 + 1?\nA: 1 + 1 = <<1+1=2>>2. The answer is 2.\n\nQ: 2 + 3?\nA:")
    assert few_shot_prompt([exemplar], query) == "Q: 1 + 1?\nA: 2\n\nQ: 2 + 3?\nA:"
    assert extract_answer("3 + 2 = 5. The answer is 5.", cot=True) == "5"
    assert extract_answer("The answer is 4.\nNo. The answer is 5.\nmore", cot=True) == "5"
    assert extract_answer("no conclusion", cot=True) is None
    assert extract_answer(" 12\nQ: next") == "12"
    assert normalize_answer("1,000.0") == normalize_answer("$1000") == "1000"
    assert normalize_answer(" Paris. ") == normalize_answer("paris")
    assert normalize_answer("5") != normalize_answer("6")


# --- Task files -----------------------------------------------------------------------------

def _write(tmp_path, *lines) -> Path:
    path = tmp_path / "task.jsonl"
    path.write_text("\n".join(json.dumps(x) if not isinstance(x, str) else x for x in lines) + "\n")
    return path


def test_load_task_reads_kinds_and_template(tmp_path):
    path = _write(tmp_path, {"template": {"prompt": "Q: {question}\nA:", "separator": "\n"}},
                  {"question": "a?", "target": "b"}, "", {"question": "c?", "target": "d", "rationale": "r"})
    task = load_task(path)
    assert task.kind == "generate" and task.lines == (2, 4) and task.name == "task"
    assert task.template == Template(prompt="Q: {question}\nA:", separator="\n")
    assert few_shot_prompt(task.examples[:1], task.examples[1], task.template) == "Q: a?\nA: b\nQ: c?\nA:"
    for name in ("arithmetic", "python_next_line", "python_word_order"):  # the project's own task files
        assert len(load_task(ROOT / "tasks" / f"{name}.jsonl").examples) >= 50


@pytest.mark.parametrize("lines, message", [
    (["{not json"], "task.jsonl:1: not JSON"),
    ([{"input": "a"}], "task.jsonl:1: an example needs 'target'"),
    ([{"input": "a", "target": "b"}, {"input": "c", "choices": ["x", "y"], "answer": 0}],
     "task.jsonl:2: a multiple-choice example in a file of generative examples (line 1)"),
    ([{"input": "a", "choices": ["x"], "answer": 0}], "at least 2 non-empty strings"),
    ([{"input": "a", "choices": ["x", "y"], "answer": 2}], "task.jsonl:1: 'answer' must be the index"),
    ([{"input": "a", "choices": ["x", "y"], "answer": True}], "'answer' must be the index"),
    ([{"target": "b"}], "task.jsonl:1: no field 'input' that the template's prompt"),
    ([{"template": {"promt": "{input}"}}, {"input": "a", "target": "b"}], "task.jsonl:1: template fields"),
    ([["a list"]], "must be a JSON object"),
    ([{"input": "a", "target": "b", "rationale": 3}], "'rationale' must be a string"),
    ([""], "no examples"),
])
def test_malformed_task_files_name_the_line(tmp_path, lines, message):
    with pytest.raises(TaskError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_task(_write(tmp_path, *lines))


def test_evaluate_bad_settings(model, tmp_path):
    params, config, tokenizer = model
    generative = _write(tmp_path, {"input": "a", "target": "b"}, {"input": "c", "target": "d"})
    choice = Task("c", "choice", ({"input": "a", "choices": ["x", "y"], "answer": 0},) * 2, (1, 2))
    for task, kwargs, message in [
        (generative, dict(shots=2), "has 2 examples: 2 exemplars leave none"),
        (generative, dict(shots=-1), "shots must be an int >= 0"),
        (generative, dict(shots=1, cot=True), "line 1: a chain-of-thought exemplar needs a 'rationale'"),
        (generative, dict(calculator=True), "needs cot=True"),
        (generative, dict(max_new_tokens=64), "max_new_tokens must be in [1, 63]"),
        (generative, dict(limit=0), "limit must be >= 1"),
        (choice, dict(cot=True), "chain-of-thought needs a generative task"),
        (tmp_path / "missing.jsonl", {}, "task file not found"),
    ]:
        with pytest.raises((TaskError, FileNotFoundError), match=message.replace("[", r"\[")):
            evaluate(params, config, tokenizer, task, impl="xla", **kwargs)


# --- `python -m palm eval` -------------------------------------------------------------------

def test_eval_command(run_dir, tmp_path):
    out = tmp_path / "result.json"
    command = [sys.executable, "-m", "palm", "eval", "--run", str(run_dir), "--task",
               str(ROOT / "tasks" / "arithmetic.jsonl"), "--shots", "2", "--cot", "--calculator",
               "--limit", "3", "--max-new-tokens", "24", "--no-progress", "--out", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert result.stdout.startswith("arithmetic: 2-shot chain-of-thought generative, 3 questions: accuracy ")
    record = json.loads(out.read_text())
    assert record["examples"] == 3 and len(record["records"]) == 3 and record["calculator"]
    assert f"accuracy {record['accuracy']:.3f}" in result.stdout


def test_eval_command_perplexity(run_dir, capsys, tmp_path):
    (tmp_path / "a.txt").write_text("def f(x):\n    return x\n")
    assert main(["eval", "--run", str(run_dir), "--text", str(tmp_path / "*.txt"), "--no-progress"]) == 0
    params, config, tokenizer = load_run(run_dir)
    expected = perplexity(params, config, tokenizer, ["def f(x):\n    return x\n"])
    assert capsys.readouterr().out == (
        f"1 documents, 23 bytes, {expected['tokens']} tokens: loss {expected['loss']:.4f} nats/token, "
        f"perplexity {expected['perplexity']:.2f}, {expected['bits_per_byte']:.4f} bits/byte\n")


@pytest.mark.parametrize("args, message", [
    ([], "give one of --task FILE"),
    (["--task", "t.jsonl", "--text", "a.txt"], "give one of --task FILE"),
    (["--task", "missing.jsonl"], "task file not found"),
    (["--task", "bad.jsonl"], "bad.jsonl:2: not JSON"),
    (["--text", "nothing*.txt"], "nothing*.txt"),
    (["--task", "ok.jsonl", "--shots", "5"], "2 examples: 5 exemplars leave none"),
])
def test_eval_command_bad_input_is_one_line(run_dir, tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    Path("bad.jsonl").write_text('{"input": "a", "target": "b"}\n{oops\n')
    Path("ok.jsonl").write_text('{"input": "a", "target": "b"}\n{"input": "c", "target": "d"}\n')
    assert main(["eval", "--run", str(run_dir), *args, "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.err.count("\n") == 1, captured.err
    assert captured.out == ""
