"""`python -m runtime --batch requests.jsonl --out answers.jsonl`: answer a file of requests, several rows at a time.

One request per line: {"image": "shapes/0001.png" or null, "prompt": "[vqa] What color is the circle?",
"id": anything (copied to the answer), "draw": "out/0001.png" (optional: draw the answer's boxes there),
"expected": "red" (optional: the answer wanted)}. Other keys are ignored. Relative paths are read from the request
file's folder. Answers come out in the same order, one JSON object per line: {"index", "id", "prompt", "text",
"tokens", "boxes", "grounded", "stop_reason", "timings"} (+ "expected", "match", and "iou" when the expected answer is
a box), or {"index", "id", "error"} for a request that could not be answered; the others are answered all the same
and the exit status is 2. With --out, a table of question, answer, expected answer, match and timings is printed.

An answer matches when it is the expected text (case, surrounding spaces and a final period aside) or, when the
expected answer is a box, when its first box overlaps it with IoU >= 0.5 (the RefCOCO criterion).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.boxes import iou, parse_boxes
from core.image import load_image
from runtime.cli import UsageError, draw_answer, sampling_kwargs
from runtime.errors import INPUT_ERRORS, ContextError
from runtime.generate import GenerationResult

IOU_HIT = 0.5  # a box answer matches at IoU >= 0.5
WIDTHS = {"question": 46, "answer": 30, "expected": 30}  # table columns are cut to these many characters


@dataclass
class Request:
    index: int
    id: Any = None
    image: str | None = None
    prompt: str = ""
    draw: str | None = None
    expected: str | None = None
    error: str | None = None
    loaded: Any = None  # the decoded image


def _resolve(path: str, folder: Path) -> str:
    p = Path(path)
    return str(p if p.is_absolute() else folder / p)


def read_requests(path: str | Path) -> list[Request]:
    """Parse the request file; a line that is not a request becomes a Request with `error` set."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--batch {path}: no such file")
    folder = path.parent
    requests = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        req = Request(index=len(requests))
        requests.append(req)
        try:
            data = json.loads(line)
        except json.JSONDecodeError as err:
            req.error = f"{path}:{number}: not valid JSON ({err})"
            continue
        if not isinstance(data, dict) or not isinstance(data.get("prompt"), str):
            req.error = f'{path}:{number}: a request needs "prompt" (text), got {line[:80]}'
            continue
        req.id, req.prompt = data.get("id"), data["prompt"]
        image, draw, expected = data.get("image"), data.get("draw"), data.get("expected")
        if image is not None and not isinstance(image, str) or draw is not None and not isinstance(draw, str):
            req.error = f'{path}:{number}: "image" and "draw" must be paths (text) or null'
            continue
        if expected is not None and not isinstance(expected, str):
            req.error = f'{path}:{number}: "expected" must be text or null, got {json.dumps(expected)[:40]}'
            continue
        req.expected = expected
        req.image = _resolve(image, folder) if image else None
        req.draw = _resolve(draw, folder) if draw else None
    if not requests:
        raise UsageError(f"--batch {path}: no requests in the file")
    return requests


def _prepare(pipe: Any, req: Request, max_new_tokens: int) -> None:
    """Decode the image and check the prompt fits the context; sets `error` instead of raising."""
    try:
        if req.image:
            req.loaded = load_image(req.image, max_pixels=pipe.manifest.image.max_pixels)
        ids = pipe.prompt_ids(req.prompt, req.loaded is not None)
        if len(ids) + max_new_tokens > pipe.cache.context:
            images = ids.count(pipe.manifest.image_token_id)
            raise ContextError(
                f"prompt {len(ids) - images:,} text tokens + {images:,} image tokens + max_new_tokens "
                f"{max_new_tokens:,} = {len(ids) + max_new_tokens:,} > context {pipe.cache.context:,}"
            )
        if req.draw and not Path(req.draw).parent.is_dir():
            raise UsageError(f"draw {req.draw}: the folder {Path(req.draw).parent} does not exist")
    except INPUT_ERRORS as err:
        req.error = " ".join(str(err).split())


def match_answer(answer: str, expected: str) -> tuple[bool, float | None]:
    """(matches, IoU or None): IoU of the first boxes when `expected` holds a box, else the same text."""
    want = parse_boxes(expected)
    if want:
        got = parse_boxes(answer)
        overlap = iou(got[0], want[0]) if got else 0.0
        return overlap >= IOU_HIT, overlap

    def norm(text: str) -> str:
        return " ".join(text.lower().split()).rstrip(".").strip()

    return norm(answer) == norm(expected), None


def _cell(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "\u2026"


def answer_table(answered: list[tuple[Request, GenerationResult]]) -> str:
    """The answers as a table: question, answer, expected answer and whether it matches, then the timings."""
    rows = []
    for req, result in answered:
        t = result.timings
        match = ""
        if req.expected is not None:
            hit, overlap = match_answer(result.text, req.expected)
            match = ("yes" if hit else "no") + (f" (IoU {overlap:.2f})" if overlap is not None else "")
        rows.append([str(req.index), _cell(req.prompt, WIDTHS["question"]), _cell(result.text, WIDTHS["answer"]),
                     _cell(req.expected or "", WIDTHS["expected"]), match, f"{t.ttft_s * 1e3:.0f} ms",
                     str(len(result.tokens)), f"{t.decode_tokens_per_s:.0f}", f"{t.total_s * 1e3:.0f} ms"])  # fmt: skip
    head = ["#", "question", "answer", "expected", "match", "first token", "new", "tokens/s", "total"]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    right = {0, 5, 6, 7, 8}  # numbers
    lines = ["  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in [head, *rows]]  # fmt: skip
    lines.insert(1, "  ".join("-" * w for w in widths))
    checked = [match_answer(res.text, req.expected)[0] for req, res in answered if req.expected is not None]
    summary = [f"{len(answered)} answered"]
    if checked:
        summary.append(f"{sum(checked)} of {len(checked)} match the expected answer")
    if answered:
        ttft = statistics.median(res.timings.ttft_s for _, res in answered)
        speed = statistics.median(res.timings.decode_tokens_per_s for _, res in answered)
        summary.append(f"median first token {ttft * 1e3:.0f} ms, median decode {speed:.0f} tokens/s")
    return "\n".join([*lines, " | ".join(summary)])


def run_batch(pipe: Any, args: argparse.Namespace, requests: list[Request]) -> int:
    kwargs = sampling_kwargs(args)
    for req in requests:
        if req.error is None:
            _prepare(pipe, req, args.max_new_tokens)
    good = [r for r in requests if r.error is None]
    results = pipe.generate_batch([(r.loaded, r.prompt) for r in good], **kwargs) if good else []
    by_index = {r.index: res for r, res in zip(good, results)}
    drawn: list[str] = []
    out = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout  # noqa: SIM115 - stdout or a file
    try:
        for req in requests:
            if req.error is not None:
                print(f"error: request {req.index}: {req.error}", file=sys.stderr)
                record = {"index": req.index, "id": req.id, "error": req.error}
            else:
                result = by_index[req.index]
                record = {"index": req.index, "id": req.id, "prompt": req.prompt, **result.to_dict()}
                if req.expected is not None:
                    hit, overlap = match_answer(result.text, req.expected)
                    record |= {"expected": req.expected, "match": hit}
                    if overlap is not None:
                        record["iou"] = overlap
                if req.draw:
                    record["drawn"] = n = draw_answer(req.loaded, result, req.draw)
                    drawn.append(f"[{req.index}] drew {n} box{'es' if n != 1 else ''} to {req.draw}" if n else
                                 f"[{req.index}] no box in the answer; nothing drawn")  # fmt: skip
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    if args.out:
        print(answer_table([(r, by_index[r.index]) for r in good]))
        for line in drawn:
            print(line)
        print(f"answers written to {args.out}")
    failed = sum(r.error is not None for r in requests)
    if failed:
        print(f"error: {failed} of {len(requests)} requests failed (see the lines above)", file=sys.stderr)
    return 2 if failed else 0
