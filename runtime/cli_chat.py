"""`python -m runtime --chat`: an interactive, multi-turn conversation about an image, streamed to the terminal.

    python -m runtime --model exports/demo-int4 --image photo.jpg --chat
    > [vqa] What color is the circle?
    red
    > /image other.jpg          a new conversation about another image
    > /reset                    forget the conversation, keep the image
    > /quit                     (or Ctrl-D)

Ctrl-C while an answer streams stops that answer; the conversation keeps what was said so far. Ctrl-C at an empty
prompt shows how to leave; a second one in a row leaves. Errors (a bad image path, a conversation longer than the
context) print one line and the chat goes on.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from core.image import load_image
from runtime.cli import print_timings, sampling_kwargs, write_stream
from runtime.errors import INPUT_ERRORS

HELP = "/image PATH: talk about another image | /reset: forget the conversation | /quit or Ctrl-D: leave"


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def answer(chat: Any, prompt: str, args: argparse.Namespace) -> None:
    """Stream one answer to stdout; Ctrl-C stops it and keeps what was said."""
    kwargs = sampling_kwargs(args)
    stream = chat.stream(prompt, **kwargs)
    if not write_stream(stream, quiet=args.json):
        sys.stdout.write(" [stopped]")
    if args.json and stream.result is not None:
        sys.stdout.write(json.dumps(stream.result.to_dict(), ensure_ascii=False))
    sys.stdout.write("\n")
    sys.stdout.flush()
    if args.timings and stream.result is not None:
        print_timings(stream.result)


def run_chat(pipe: Any, args: argparse.Namespace, image: Any) -> int:
    chat = pipe.chat(image)
    max_pixels = pipe.manifest.image.max_pixels
    _say(f"chat with {args.model} ({'image ' + args.image if args.image else 'no image'}). {HELP}")
    first = args.prompt
    interrupted = False
    while True:
        if first is not None:
            line, first = first, None
        else:
            try:
                line = input("> ")
            except EOFError:
                sys.stdout.write("\n")
                return 0
            except KeyboardInterrupt:
                if interrupted:
                    sys.stdout.write("\n")
                    return 0
                interrupted = True
                _say("\n(Ctrl-C again, Ctrl-D or /quit to leave)")
                continue
        interrupted = False
        line = line.strip()
        if not line:
            continue
        command, _, rest = line.partition(" ")
        try:
            if command in ("/quit", "/exit"):
                return 0
            if command == "/help":
                _say(HELP)
            elif command == "/reset":
                chat.reset()
                _say("(conversation forgotten)")
            elif command == "/image":
                if not rest.strip():
                    _say("error: /image needs a path: /image photo.jpg")
                    continue
                chat.set_image(load_image(rest.strip(), max_pixels=max_pixels))
                _say(f"(new conversation about {rest.strip()})")
            elif command.startswith("/") and " " not in command and command[1:].isalpha():
                _say(f"error: unknown command {command}; {HELP}")
            else:
                answer(chat, line, args)
        except INPUT_ERRORS as err:
            _say(f"error: {' '.join(str(err).split())}")
