"""Pipeline options the benchmark asked for (notes/requests_bench.md): exactly N new tokens (`min_new_tokens`, EOS
forced early by a stub), per-token times, and prompts given as token ids; on the tiny fp32 export."""

from __future__ import annotations

import numpy as np
import pytest

from runtime import Pipeline
from runtime.cli import main
from runtime.errors import RuntimeInputError
from runtime.generate import TextStream

QUESTION, TEXT_ONLY = "[vqa] What color is the circle?", "How many shapes are there?"


@pytest.fixture(scope="module")
def pipe(tiny_export_dir):
    return Pipeline.load(tiny_export_dir, threads=1, batch_size=2)


@pytest.fixture(scope="module")
def image():
    return (np.random.default_rng(5).random((36, 40, 3)) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def plain(pipe, image):
    """The unforced greedy answer: a random model runs to the limit without EOS."""
    result = pipe.generate(image, QUESTION, max_new_tokens=12)
    assert len(result.tokens) == 12 and pipe.manifest.eos_token_id not in result.tokens
    return result


@pytest.fixture
def eos_first(pipe, monkeypatch):
    """Every decode step's logits put EOS first by a wide margin (the prefill's first token is left alone)."""
    step, eos = pipe.loop.step, pipe.manifest.eos_token_id

    def forced(next_ids):
        logits = step(next_ids)  # [rows, V], a view of the loop's fixed buffer
        logits[:, eos] += 1e4
        return logits

    monkeypatch.setattr(pipe.loop, "step", forced)


def test_min_new_tokens_gives_exactly_n_tokens_past_an_early_eos(pipe, image, plain, eos_first):
    early = pipe.generate(image, QUESTION, max_new_tokens=12)
    assert early.tokens == plain.tokens[:1] and early.stop_reason == "eos"
    # EOS is masked until 12 tokens: the runner-up of each step is the unforced argmax, so the answer is `plain`
    exact = pipe.generate(image, QUESTION, max_new_tokens=12, min_new_tokens=12)
    assert exact.tokens == plain.tokens and exact.text == plain.text and exact.stop_reason == "length"
    some = pipe.generate(image, QUESTION, max_new_tokens=12, min_new_tokens=5)
    assert some.tokens == plain.tokens[:5] and some.stop_reason == "eos"
    streamed = pipe.stream(image, QUESTION, max_new_tokens=12, min_new_tokens=12)
    assert "".join(streamed) == plain.text and streamed.result.tokens == plain.tokens
    batch = pipe.generate_batch([(image, QUESTION), (None, TEXT_ONLY)], max_new_tokens=9, min_new_tokens=9)
    assert [len(r.tokens) for r in batch] == [9, 9] and batch[0].tokens == plain.tokens[:9]
    assert all(r.stop_reason == "length" and pipe.manifest.eos_token_id not in r.tokens for r in batch)


def test_stop_strings_wait_for_min_new_tokens(pipe, image, plain):
    stop = plain.text[1:3]
    cut = pipe.generate(image, QUESTION, max_new_tokens=12, stop=stop)
    assert cut.stop_reason == "stop_string" and cut.text == plain.text[: plain.text.index(stop)]
    assert len(cut.tokens) < 12
    exact = pipe.generate(image, QUESTION, max_new_tokens=12, stop=stop, min_new_tokens=12)
    assert exact.tokens == plain.tokens and exact.text == plain.text and exact.stop_reason == "length"


def test_text_stream_looks_for_stop_strings_after_min_tokens_only(pipe):
    tok = pipe.tokenizer
    text = "a red and a red circle"
    ids = tok.encode(text)
    assert tok.decode(ids) == text

    def run(min_tokens):
        stream = TextStream(tok, ("red",), min_tokens)
        pieces = [stream.push(i) for i in ids]
        return "".join(pieces) + stream.finish(), stream.stopped, stream.final_text()

    assert run(0) == ("a ", True, "a ")
    first_end = next(k for k in range(len(ids) + 1) if tok.decode(ids[:k]).startswith("a red"))
    # stop strings count only in the text after the first min_tokens tokens: the first "red" is skipped, not the second
    assert run(first_end) == ("a red and a ", True, "a red and a ")
    assert run(len(ids)) == (text, False, text)


def test_token_times_one_per_token_from_the_call(pipe, image, eos_first):
    result = pipe.generate(image, QUESTION, max_new_tokens=10, min_new_tokens=10)
    t = result.timings
    assert len(t.token_times) == len(result.tokens) == 10
    assert all(b >= a for a, b in zip(t.token_times, t.token_times[1:]))
    assert t.token_times[0] == pytest.approx(t.ttft_s, abs=1e-9) and t.token_times[-1] <= t.total_s
    assert t.token_times[-1] - t.token_times[0] == pytest.approx(t.decode_s, abs=1e-9)
    assert result.to_dict()["timings"]["token_times"] == t.token_times
    early = pipe.generate(image, QUESTION, max_new_tokens=10)  # EOS at step 2: one token, one time
    assert len(early.tokens) == len(early.timings.token_times) == 1


def test_prompt_ids_give_the_same_answer_as_the_text(pipe, image, plain):
    ids = pipe.prompt_ids(QUESTION, image=True)
    by_ids = pipe.generate(image, prompt_ids=ids, max_new_tokens=12)
    assert by_ids.tokens == plain.tokens and by_ids.text == plain.text and by_ids.prompt_tokens == len(ids)
    assert pipe.generate(image, prompt_ids=np.array(ids), max_new_tokens=12).tokens == plain.tokens
    assert "".join(pipe.stream(image, prompt_ids=ids, max_new_tokens=12)) == plain.text
    text_ids = pipe.prompt_ids(TEXT_ONLY, image=False)
    mixed = pipe.generate_batch([(image, ids), (None, text_ids)], max_new_tokens=6)
    as_text = pipe.generate_batch([(image, QUESTION), (None, TEXT_ONLY)], max_new_tokens=6)
    assert [r.tokens for r in mixed] == [r.tokens for r in as_text]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda p, im: p.generate(im, QUESTION, prompt_ids=[0, 5]), "give either a prompt"),
        (lambda p, im: p.generate(im), "give either a prompt"),
        (lambda p, im: p.generate(im, prompt_ids=[0, 5, 6]), r"hold 0 image token ids \(127\); with an image they must hold exactly 8"),
        (lambda p, im: p.generate(None, prompt_ids=p.prompt_ids("hi", True)), r"hold 8 image token ids \(127\); with no image they must hold exactly 0"),
        (lambda p, im: p.generate(None, prompt_ids=[0, 128, 5]), r"ids in 0\.\.127, got 3 ids with 1 outside \(first 128\)"),
        (lambda p, im: p.generate(None, prompt_ids=[]), r"non-empty list of ids in 0\.\.127, got 0 ids"),
        (lambda p, im: p.generate(None, prompt_ids="hello"), "prompt_ids must be a sequence of token ids, got str"),
        (lambda p, im: p.generate(None, "hi", max_new_tokens=4, min_new_tokens=5), "min_new_tokens 5 > max_new_tokens 4"),
        (lambda p, im: p.generate(None, "hi", min_new_tokens=-1), "min_new_tokens must be an integer >= 0, got -1"),
    ],
)  # fmt: skip
def test_bad_ids_and_counts_are_refused_with_the_numbers(pipe, image, call, message):
    with pytest.raises(RuntimeInputError, match=message):
        call(pipe, image)


def test_cli_min_new_tokens(tiny_export_dir, capsys):
    code = main(["--model", str(tiny_export_dir), "--prompt", "hi", "--max-new-tokens", "4", "--min-new-tokens", "5"])
    err = capsys.readouterr().err
    assert code == 2 and err == "error: --min-new-tokens must be in 0..--max-new-tokens 4, got 5\n"
