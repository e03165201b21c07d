"""``aa chat MODEL``: the interactive loop (read a line, run a command or send a message, stream the reply).

aa chat runs/sft/hf_model                 # a trained run's export (or the run folder itself)
aa chat smollm2-135m-instruct --system "You are terse." --max_new_tokens 64
aa chat tiny-qwen2-vl                    # then: /image configs/data/media/image/pizza.jpg  What is this?
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from aa_lightning.chat.session import ChatError, ChatSession, GenerationSettings

__all__ = ["build_parser", "main", "run_loop"]

PROMPT = "you> "
REPLY = "assistant> "

HELP = """commands:
  /image PATH     attach an image to your next message (also /audio PATH, /video PATH; repeat for more)
  /system TEXT    set the system prompt (no TEXT: remove it); the conversation so far is kept
  /reset          start a new conversation (the system prompt stays)
  /help           this list
  /exit           leave (also /quit or Ctrl-D)
anything else is sent to the model as your message"""


def _bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aa chat",
        description="Chat with a trained or exported model (streamed replies, the model's chat template, media).",
        epilog=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "model", help="a run folder (its hf_model export), a model folder, a hub name or an alias"
    )
    parser.add_argument("--system", default=None, help="system prompt")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument(
        "--do_sample", type=_bool, nargs="?", const=True, default=False, help="sample (default: greedy)"
    )
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--top_k", type=int, default=50, help="0: no top-k")
    parser.add_argument("--seed", type=int, default=0, help="seed of sampling (set once, at start)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1 ...")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--num_frames", type=int, default=8, help="frames sampled from a /video")
    parser.add_argument(
        "--transcript", default=None, help="write each turn's templated prompt and reply here (JSON)"
    )
    parser.add_argument("--trust_remote_code", action="store_true")
    return parser


def handle(session: ChatSession, line: str, out: TextIO) -> bool:
    """Run one input line; False when the user asked to leave."""
    if not line.strip():
        return True
    if line.startswith("/"):
        command, _, argument = line[1:].partition(" ")
        command, argument = command.strip().lower(), argument.strip()
        if command in ("exit", "quit"):
            return False
        if command == "help":
            print(HELP, file=out)
        elif command == "reset":
            session.reset()
            print("(new conversation)", file=out)
        elif command == "system":
            session.system = argument or None
            print(f"(system prompt {'set' if argument else 'removed'})", file=out)
        elif command in ("image", "audio", "video"):
            path = session.attach(command, argument)
            print(f"({command} {path} attached to your next message)", file=out)
        else:
            raise ChatError(f"unknown command /{command}; type /help for the list")
        return True
    out.write(REPLY)
    out.flush()
    session.send(line, out)
    return True


def run_loop(session: ChatSession, out: TextIO = sys.stdout) -> None:
    """Read lines until ``/exit`` or end of input; a user mistake is printed and the loop goes on."""
    while True:
        try:
            line = input(PROMPT)
        except EOFError:
            print(file=out)
            return
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh line, as in a shell
            print(file=out)
            continue
        try:
            if not handle(session, line, out):
                return
        except ChatError as err:
            print(f"error: {err}", file=out)
        except KeyboardInterrupt:  # Ctrl-C while a reply streams: stop that reply
            print("\n(interrupted)", file=out)


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``aa chat``."""
    args = build_parser().parse_args(argv)
    try:
        settings = GenerationSettings(
            max_new_tokens=args.max_new_tokens,
            do_sample=args.do_sample,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
        )
    except ChatError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        import readline  # noqa: F401  (line editing and history for input(), where the platform has it)
    except ImportError:  # pragma: no cover - Windows
        pass
    from transformers import set_seed
    from transformers.utils import logging as hf_logging

    from aa_lightning.chat.loading import load_chat_model

    hf_logging.disable_progress_bar()  # "Loading weights" bars would land between the prompts
    set_seed(args.seed)
    try:
        loaded = load_chat_model(args.model, args.device, args.dtype, args.trust_remote_code)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    session = ChatSession(
        loaded, settings, system=args.system, transcript=args.transcript, num_frames=args.num_frames
    )
    kinds = ", ".join(f"/{kind}" for kind in session.media_kinds())
    print(
        f"Chatting with {loaded.path} on {loaded.device} (chat template from the {session.renderer.source})."
    )
    print(f"Type /help for commands{f'; attach media with {kinds}' if kinds else ''}; /exit to leave.")
    run_loop(session)
