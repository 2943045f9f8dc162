"""`python -m runtime --batch requests.jsonl --out answers.jsonl`: answer a file of requests, several rows at a time.

One request per line: {"image": "shapes/0001.png" or null, "prompt": "[vqa] What color is the circle?",
"id": anything (copied to the answer), "draw": "out/0001.png" (optional: draw the answer's boxes there)}. Other keys
(ground truth, say) are ignored. Relative paths are read from the request file's folder. Answers come out in the
same order, one JSON object per line: {"index", "id", "prompt", "text", "tokens", "boxes", "grounded", "stop_reason",
"timings"}, or {"index", "id", "error"} for a request that could not be answered; the others are answered all the
same and the exit status is 2. With --out, each answer is also printed with its timings.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.image import load_image
from runtime.cli import UsageError, draw_answer, sampling_kwargs
from runtime.errors import INPUT_ERRORS, ContextError


@dataclass
class Request:
    index: int
    id: Any = None
    image: str | None = None
    prompt: str = ""
    draw: str | None = None
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
        image, draw = data.get("image"), data.get("draw")
        if image is not None and not isinstance(image, str) or draw is not None and not isinstance(draw, str):
            req.error = f'{path}:{number}: "image" and "draw" must be paths (text) or null'
            continue
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


def run_batch(pipe: Any, args: argparse.Namespace, requests: list[Request]) -> int:
    kwargs = sampling_kwargs(args)
    for req in requests:
        if req.error is None:
            _prepare(pipe, req, args.max_new_tokens)
    good = [r for r in requests if r.error is None]
    results = pipe.generate_batch([(r.loaded, r.prompt) for r in good], **kwargs) if good else []
    by_index = {r.index: res for r, res in zip(good, results)}
    out = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout  # noqa: SIM115 - stdout or a file
    try:
        for req in requests:
            if req.error is not None:
                print(f"error: request {req.index}: {req.error}", file=sys.stderr)
                record = {"index": req.index, "id": req.id, "error": req.error}
            else:
                result = by_index[req.index]
                record = {"index": req.index, "id": req.id, "prompt": req.prompt, **result.to_dict()}
                if req.draw:
                    record["drawn"] = draw_answer(req.loaded, result, req.draw)
                if args.out:
                    t = result.timings
                    print(f"[{req.index}] {req.prompt}\n    -> {result.text}   ({t.ttft_s * 1e3:.0f} ms to first token, "
                          f"{t.decode_tokens_per_s:.0f} tokens/s)")  # fmt: skip
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    failed = sum(r.error is not None for r in requests)
    if failed:
        print(f"error: {failed} of {len(requests)} requests failed (see the lines above)", file=sys.stderr)
    return 2 if failed else 0
