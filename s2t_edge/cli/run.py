"""`s2t-edge generate` and `s2t-edge chat`: thin click commands over the decode loop."""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import click

from s2t_edge import store
from s2t_edge.chat import ChatSession
from s2t_edge.cli import options as cli_options
from s2t_edge.cli import vote as cli_vote
from s2t_edge.decode import DecodeStats, Token, decode
from s2t_edge.errors import S2TError
from s2t_edge.policy import Policy
from s2t_edge.prompt import ChatTemplate, Message, chat_tokens
from s2t_edge.runtime import POLICIES, TRIGGERS, Models, build_policy, open_models

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C

# ---- options shared by `generate` and `chat` ----------------------------------------------

_ENGINE_OPTIONS = {
    "model": click.option(
        "--model",
        metavar="NAME|PATH",
        default=None,
        help="Registry model name or GGUF file (default: the default SLM; `models pull` or --pull fetches it).",
    ),
    "threads": cli_options.threads,
    "gpu_layers": cli_options.gpu_layers,
    "pull": cli_options.pull,
    "ctx": click.option(
        "--ctx",
        type=click.IntRange(min=0),
        default=4096,
        show_default=True,
        help="Context size in tokens (capped at the model's; 0 = the model's).",
    ),
    "bundle": click.option(
        "--bundle",
        metavar="PATH|none",
        default=None,
        help="S2T-LOCAL bundle (folder or .tar; default: the shipped one; 'none' for plain decoding).",
    ),
    "adapter_scale": cli_options.adapter_scale,
    "teacher": click.option(
        "--teacher",
        metavar="NAME|PATH",
        default=None,
        help="Teacher model for --policy s2t / takeover.",
    ),
    "max_tokens": click.option(
        "--max-tokens",
        type=click.IntRange(min=1),
        default=512,
        show_default=True,
        help="Maximum tokens per answer.",
    ),
}

# Decoding-policy options: each one is passed as a keyword to `policy.build_policy()`.
# A new policy option (--bundle PATH, --teacher MODEL, --policy NAME) is one entry here plus
# its keyword in build_policy().
_POLICY_OPTIONS = {
    "k": click.option(
        "--k",
        type=click.IntRange(1, 32),
        default=8,
        show_default=True,
        help="Top-K candidates per step.",
    ),
    "temperature": click.option(
        "--temperature",
        type=click.FloatRange(min=0),
        default=0.0,
        show_default=True,
        help="Sampling temperature over the top-K (0 = greedy); under s2t-local, the bundle's adapted SLM.",
    ),
    "seed": click.option("--seed", type=click.IntRange(min=0), default=None, help="Sampling seed (reproducible runs)."),
    "policy": click.option(
        "--policy",
        type=click.Choice(POLICIES),
        default=None,
        help="Decoding policy (default: s2t-local with the bundle, else greedy).",
    ),
    "trigger": click.option(
        "--trigger",
        type=click.Choice(TRIGGERS),
        default="always",
        show_default=True,
        help="Where a teacher selects (s2t / takeover).",
    ),
    "threshold": click.option("--threshold", type=float, default=None, help="Threshold of the kl / entropy trigger."),
}


@dataclass
class RunOptions:
    """The shared options of one command, turned into an engine and a policy by `load()`."""

    model: str | None
    threads: int | None
    gpu_layers: int
    pull: bool
    ctx: int
    bundle: str | None
    adapter_scale: float | None
    teacher: str | None
    max_tokens: int
    policy_opts: dict[str, Any]

    @property
    def model_name(self) -> str:
        return self.model or store.default_model("slm")

    def load(self, n_seq: int = 1) -> tuple[Models, Policy]:
        """The models and policy; `n_seq` > 1 shares one KV cache among that many sequences (a vote)."""
        if self.policy_opts.get("policy") in ("s2t", "takeover") and self.teacher is None:
            self.teacher = store.default_model("teacher")
        models = open_models(
            self.model,
            bundle=self.bundle,
            teacher=self.teacher,
            ctx=self.ctx,
            threads=self.threads,
            gpu_layers=self.gpu_layers,
            n_seq=n_seq,
            unified=True if n_seq > 1 else None,
            pull=self.pull or None,
            adapter_scale=self.adapter_scale,
        )
        return models, build_policy(models, **self.policy_opts)


def run_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Add the shared options to a command; it receives them as one `run: RunOptions`."""

    @functools.wraps(f)
    def wrapper(**kw: Any) -> Any:
        engine_opts = {name: kw.pop(name) for name in _ENGINE_OPTIONS}
        policy_opts = {name: kw.pop(name) for name in _POLICY_OPTIONS}
        try:
            return f(RunOptions(**engine_opts, policy_opts=policy_opts), **kw)
        except KeyboardInterrupt:  # outside generation (loading or pulling the model)
            click.echo(err=True)
            sys.exit(EXIT_INTERRUPTED)

    for option in reversed([*_ENGINE_OPTIONS.values(), *_POLICY_OPTIONS.values()]):
        wrapper = option(wrapper)
    return wrapper


# ---- helpers -------------------------------------------------------------------------------


def stream(tokens: Iterator[Token], echo: bool = True, flips: bool = False) -> tuple[list[Token], bool]:
    """Consume `tokens`, echoing their text as it comes (tokens the selector changed highlighted
    with `flips`); returns (tokens, interrupted by Ctrl-C)."""
    out: list[Token] = []
    try:
        for tok in tokens:
            out.append(tok)
            if echo:
                text = click.style(tok.text, fg="yellow", underline=True) if flips and tok.flipped else tok.text
                click.echo(text, nl=False)  # click.echo flushes; styles are dropped when not a tty
    except KeyboardInterrupt:
        return out, True
    finally:
        close = getattr(tokens, "close", None)
        if close:  # run the generator's cleanup now (ChatSession keeps the partial answer)
            close()
    return out, False


def stats_line(stats: DecodeStats) -> str:
    return (
        f"[{stats.steps} tokens, {stats.tokens_per_s:.1f} tok/s, prompt {stats.prompt_tokens}, "
        f"triggers {stats.triggers}, flips {stats.flips}, finish {stats.finish_reason}]"
    )


def totals_line(total: DecodeStats, turns: int) -> str:
    return (
        f"{turns} turn{'s' if turns != 1 else ''}, {total.steps} tokens, {total.tokens_per_s:.1f} tok/s, "
        f"triggers {total.triggers}, flips {total.flips}"
    )


def _prompt_messages(text: str, system: str | None) -> list[Message]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]


# ---- generate ------------------------------------------------------------------------------


@click.command()
@click.argument("prompt")
@click.option("--raw", is_flag=True, help="Send PROMPT as-is, without the chat template.")
@click.option("--system", metavar="TEXT", help="System message (chat template only).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming.")
@click.option("--show-stats", is_flag=True, help="Print a stats line on stderr at the end.")
@click.option("--show-flips", is_flag=True, help="Highlight tokens the selector changed.")
@click.option(
    "--votes",
    type=click.IntRange(2, 64),
    default=None,
    metavar="N",
    help="Sample N answers as one batch (maj@N: the adapted SLM's under s2t-local; --temperature, "
    "default 0.7, top-k 20, top-p 0.8) and print the first whose final number most of them give; "
    "the prompt gets eval's math system message unless --system or --raw.",
)
@run_options
def generate(
    run: RunOptions,
    prompt: str,
    raw: bool,
    system: str | None,
    as_json: bool,
    show_stats: bool,
    show_flips: bool,
    votes: int | None,
) -> None:
    """Answer PROMPT (`-` reads stdin) as one chat turn, streaming tokens to stdout."""
    if raw and system:
        raise click.UsageError("--system needs the chat template; drop --raw")
    if votes:
        system = cli_vote.prepare(run, votes, system, raw)
    text = read_stdin() if prompt == "-" else prompt
    models, policy = run.load(n_seq=votes or 1)
    engine = models.slm
    ids = engine.tokenize(text) if raw else chat_tokens(engine, ChatTemplate(engine), _prompt_messages(text, system))
    if votes:
        cli_vote.generate_votes(run, models, ids, votes, as_json=as_json, show_stats=show_stats)
        return
    stats = DecodeStats()
    tokens = decode(engine, ids, max_tokens=run.max_tokens, stats=stats, **policy.decode_args())
    out, interrupted = stream(tokens, echo=not as_json, flips=show_flips)
    if interrupted:
        stats.finish_reason = "interrupted"
    if as_json:
        result = {
            "text": engine.detokenize([t.id for t in out]),
            "tokens": [t.id for t in out],
            "stats": stats.as_dict(),
            "model": run.model_name,
            "policy": policy.name,
        }
        click.echo(json.dumps(result))
    else:
        click.echo()
    if show_stats:
        click.echo(stats_line(stats), err=True)
    if interrupted:
        sys.exit(EXIT_INTERRUPTED)


# ---- chat ----------------------------------------------------------------------------------

CHAT_HELP = """\
/help   this help
/reset  forget the conversation (the system message stays)
/stats  totals for this session
/quit   leave (also /exit, Ctrl-D, or Ctrl-C twice at the prompt)
Ctrl-C during an answer stops it; the partial answer stays in the conversation."""


@click.command()
@click.option("--system", metavar="TEXT", help="System message for the whole session.")
@click.option("--show-stats", is_flag=True, help="Print a stats line on stderr after each answer.")
@click.option("--show-flips", is_flag=True, help="Highlight tokens the selector changed.")
@run_options
def chat(run: RunOptions, system: str | None, show_stats: bool, show_flips: bool) -> None:
    """Chat with the model (type /help for commands); reads lines from stdin when piped."""
    models, policy = run.load()
    if sys.stdin is None:  # stdin closed: nothing to read
        return
    sys.stdin.reconfigure(errors="surrogateescape")  # a line of invalid UTF-8 is refused, not fatal
    session = ChatSession(models.slm, policy, system=system, max_tokens=run.max_tokens)
    if sys.stdin.isatty():
        click.echo(f"{models.slm.path.name} · policy {policy.name}", err=True)
    repl(session, show_stats=show_stats, tty=sys.stdin.isatty(), flips=show_flips)


def read_stdin() -> str:
    """All of stdin (`generate -`); invalid UTF-8 is refused later, with the prompt's tokenization."""
    if sys.stdin is None:
        raise S2TError("no standard input to read the prompt from (`-`)")
    sys.stdin.reconfigure(errors="surrogateescape")
    return sys.stdin.read()


def _read_line(tty: bool) -> str | None:
    """One line of input, None at end of input."""
    if tty:
        try:
            return input(">>> ")
        except EOFError:
            click.echo()
            return None
    line = sys.stdin.readline()
    return line.rstrip("\r\n") if line else None


def repl(session: ChatSession, *, show_stats: bool = False, tty: bool = False, flips: bool = False) -> None:
    """Read questions and /commands until /quit or end of input; stream each answer."""
    if tty:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        click.echo("Type /help for commands, /quit to leave.")
    last_interrupt = 0.0
    turns = 0
    while True:
        try:
            line = _read_line(tty)
        except KeyboardInterrupt:
            if time.monotonic() - last_interrupt < 2.0:
                click.echo()
                return
            last_interrupt = time.monotonic()
            click.echo("\n(Ctrl-C again or Ctrl-D to quit)")
            continue
        if line is None:
            return
        last_interrupt = 0.0  # "Ctrl-C twice" means twice in a row
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            cmd = line.split()[0].lower()
            if cmd in ("/quit", "/exit", "/bye"):
                return
            if cmd == "/help":
                click.echo(CHAT_HELP)
            elif cmd == "/reset":
                session.reset()
                turns = 0
                click.echo("(conversation cleared)")
            elif cmd == "/stats":
                click.echo(totals_line(session.total, turns))
            else:
                click.echo(f"unknown command {cmd}; /help lists the commands")
            continue
        try:
            _, interrupted = stream(session.send(line), flips=flips)
        except S2TError as e:  # e.g. the conversation outgrew the context: keep the REPL
            click.echo(f"error: {e}", err=True)
            continue
        turns += 1
        click.echo()
        if interrupted:
            session.last.finish_reason = "interrupted"
        if show_stats:
            click.echo(stats_line(session.last), err=True)
