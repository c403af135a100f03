"""`s2t-edge serve` on the tiny SLM: the real server on a loopback port, driven by the official
`openai` client (streamed and not), raw HTTP for the errors, the worker thread in-process for
what timing would make flaky over HTTP (a full queue, cancellation, shutdown), and the web chat
in a real headless Chromium."""

from __future__ import annotations

import json
import time
import urllib.parse
from collections.abc import Callable
from http.client import HTTPConnection
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="the serve extra is not installed: pip install -e '.[serve]'")
openai = pytest.importorskip("openai", reason="the dev extra is not installed")

from s2t_edge.batch import MIN_SHARED  # noqa: E402
from s2t_edge.decode import DecodeStats, Token, decode  # noqa: E402
from s2t_edge.engine import reusable_prefix  # noqa: E402
from s2t_edge.policy import Policy, greedy, sampling  # noqa: E402
from s2t_edge.prompt import ChatTemplate, chat_tokens  # noqa: E402
from s2t_edge.runtime import Models, build_policy, open_models  # noqa: E402
from s2t_edge.serve.protocol import APIError  # noqa: E402
from s2t_edge.serve.textstream import Piece, TextStream  # noqa: E402
from s2t_edge.serve.worker import Done, Failed, Job, Worker  # noqa: E402
from tests.browser import Browser, find_chromium  # noqa: E402
from tests.serving import Server, http, serving, sse_events  # noqa: E402

KEY = "test-key-123"
MSGS = [{"role": "user", "content": "What is 2 + 2?"}]


@pytest.fixture(scope="module")
def server(tiny_gguf: Path, always_bundle: Path) -> Server:
    """S2T-LOCAL with a bundle whose trigger fires at every step (so flips happen), a key set."""
    with serving(tiny_gguf, "--bundle", str(always_bundle), "--threads", "1", "--parallel", "3", "--api-key", KEY) as s:
        yield s


@pytest.fixture(scope="module")
def ref_models(tiny_gguf: Path, always_bundle: Path) -> Models:
    m = open_models(str(tiny_gguf), bundle=str(always_bundle), ctx=256, threads=1, progress=False)
    yield m
    m.close()


Reference = Callable[..., tuple[list[int], list[Token], DecodeStats]]


@pytest.fixture(scope="module")
def reference(ref_models: Models) -> Reference:
    """What the decode loop itself produces (ids, tokens, stats) for a chat or a raw prompt."""
    e = ref_models.slm

    def run(messages=None, *, prompt: str | None = None, max_tokens: int = 12, policy: Policy | None = None):
        ids = e.tokenize(prompt) if prompt is not None else chat_tokens(e, ChatTemplate(e), messages)
        st = DecodeStats()
        pol = policy or build_policy(ref_models)
        toks = list(decode(e, ids, max_tokens=max_tokens, stats=st, **pol.decode_args()))
        return ids, toks, st

    return run


def client(server: Server, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=120)


def flipped_text(tokens: list[Token]) -> str:
    """The text of flipped tokens as the server marks it (a flip in an incomplete UTF-8 character
    marks the piece that completes it)."""
    out, flag = [], False
    for t in tokens:
        flag |= t.flipped
        if t.text:
            if flag:
                out.append(t.text)
            flag = False
    return "".join(out)


# ---- the OpenAI API ----------------------------------------------------------------------------


def test_chat_matches_the_decode_loop_streamed_and_not(server: Server, reference: Reference, ref_models) -> None:
    prompt, toks, st = reference(MSGS, max_tokens=12)
    text = ref_models.slm.detokenize([t.id for t in toks])
    c = client(server)
    r = c.chat.completions.create(model="tiny", messages=MSGS, max_tokens=12)
    assert r.choices[0].message.content == text
    assert r.choices[0].finish_reason == st.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), len(toks))
    ext = r.model_extra["s2t"]
    assert ext["policy"] == "s2t-local"
    assert (ext["steps"], ext["triggers"], ext["flips"]) == (st.steps, st.triggers, st.flips)
    assert st.flips > 0

    pieces, final, use = [], None, None
    for ch in c.chat.completions.create(
        model="tiny", messages=MSGS, max_tokens=12, stream=True, stream_options={"include_usage": True}
    ):
        if ch.usage is not None:
            use = ch.usage
        for choice in ch.choices:
            if choice.delta.content:
                pieces.append((choice.delta.content, bool((ch.model_extra.get("s2t") or {}).get("flipped"))))
            if choice.finish_reason:
                final = (choice.finish_reason, ch.model_extra["s2t"])
    assert "".join(p for p, _ in pieces) == text
    assert len(pieces) > 1  # streamed piece by piece
    assert "".join(p for p, f in pieces if f) == flipped_text(toks) != ""
    assert final[0] == st.finish_reason and final[1]["flips"] == st.flips
    assert (use.prompt_tokens, use.completion_tokens) == (len(prompt), len(toks))


def test_greedy_by_model_alias(server: Server, reference: Reference, ref_models) -> None:
    _, toks, st = reference(MSGS, max_tokens=10, policy=greedy())
    r = client(server).chat.completions.create(model="tiny:greedy", messages=MSGS, max_tokens=10)
    assert r.choices[0].message.content == ref_models.slm.detokenize([t.id for t in toks])
    assert r.model == "tiny:greedy"
    ext = r.model_extra["s2t"]
    assert ext["policy"] == "greedy" and ext["triggers"] == 0 and ext["flips"] == 0


def test_completions_raw_prompt(server: Server, reference: Reference, ref_models) -> None:
    prompt, toks, _ = reference(prompt="def add(a, b):", max_tokens=8)
    text = ref_models.slm.detokenize([t.id for t in toks])
    c = client(server)
    r = c.completions.create(model="tiny", prompt="def add(a, b):", max_tokens=8)
    assert r.choices[0].text == text and r.usage.prompt_tokens == len(prompt)
    streamed = "".join(
        ch.choices[0].text
        for ch in c.completions.create(model="tiny", prompt="def add(a, b):", max_tokens=8, stream=True)
        if ch.choices
    )
    assert streamed == text


def test_sampling_is_per_request_and_seeded(server: Server, reference: Reference, ref_models) -> None:
    pol = sampling(0.9, top_p=0.9, top_k=40, seed=5)
    _, toks, _ = reference(MSGS, max_tokens=12, policy=pol)
    c = client(server)
    kw = {"model": "tiny", "messages": MSGS, "max_tokens": 12, "temperature": 0.9, "top_p": 0.9, "seed": 5}
    a = c.chat.completions.create(**kw)
    b = c.chat.completions.create(**kw)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.choices[0].message.content == ref_models.slm.detokenize([t.id for t in toks])
    assert a.model_extra["s2t"]["policy"] == "sample"


def test_n_choices_are_seeded_samples_streamed_and_not(server: Server, reference: Reference, ref_models) -> None:
    """`n` choices decode together in the batch: choice i is the sample of seed + i, streamed or
    not; usage counts the prompt once and every choice's tokens."""
    want, want_tokens = [], []
    for i in range(3):
        _, toks, _ = reference(MSGS, max_tokens=12, policy=sampling(0.9, top_p=0.9, top_k=40, seed=5 + i))
        want.append(ref_models.slm.detokenize([t.id for t in toks]))
        want_tokens.append(len(toks))
    assert len(set(want)) > 1
    c = client(server)
    kw = {"model": "tiny", "messages": MSGS, "max_tokens": 12, "temperature": 0.9, "top_p": 0.9, "seed": 5, "n": 3}
    r = c.chat.completions.create(**kw)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    assert [ch.message.content for ch in r.choices] == want
    assert all(ch.model_extra["s2t"]["policy"] == "sample" for ch in r.choices)
    assert r.usage.completion_tokens == sum(want_tokens)
    parts: dict[int, str] = {0: "", 1: "", 2: ""}
    finished, usage = set(), None
    for ev in c.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
        for ch in ev.choices:
            parts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finished.add(ch.index)
        usage = ev.usage or usage
    assert [parts[i] for i in range(3)] == want and finished == {0, 1, 2}
    assert usage is not None and usage.completion_tokens == r.usage.completion_tokens
    assert usage.prompt_tokens == r.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError, match="at most 3 here"):
        c.chat.completions.create(**(kw | {"n": 4}))
    with pytest.raises(openai.BadRequestError, match="set temperature > 0"):
        c.chat.completions.create(**(kw | {"temperature": 0}))
    with pytest.raises(openai.BadRequestError, match="'seed' must be an integer >= 0"):
        c.chat.completions.create(**(kw | {"seed": -1}))


def test_stop_string_cuts_the_answer(server: Server, reference: Reference, ref_models) -> None:
    _, toks, _ = reference(MSGS, max_tokens=20)
    text = ref_models.slm.detokenize([t.id for t in toks])
    p = next(i for i in range(3, len(text) - 1) if "\ufffd" not in text[i : i + 2] and text.find(text[i : i + 2]) == i)
    stop = text[p : p + 2]
    c = client(server)
    r = c.chat.completions.create(model="tiny", messages=MSGS, max_tokens=20, stop=[stop, "never-there"])
    assert r.choices[0].message.content == text[:p] and r.choices[0].finish_reason == "stop"
    streamed = c.chat.completions.create(model="tiny", messages=MSGS, max_tokens=20, stop=stop, stream=True)
    chunks = list(streamed)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text[:p]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_a_chats_next_turn_reuses_the_cells_of_the_last(server: Server, reference: Reference, ref_models) -> None:
    """A finished request's cells stay in its slot: the next turn of the chat prefills only what
    is new (`cached_tokens`), and answers as a fresh decode would."""
    chat = [{"role": "user", "content": "Count from one to five, please."}]
    ok, first = http(server.url, "/v1/chat/completions", {"messages": chat, "max_tokens": 6}, key=KEY)
    assert ok == 200
    chat += [first["choices"][0]["message"], {"role": "user", "content": "And now backwards."}]
    ok, second = http(server.url, "/v1/chat/completions", {"messages": chat, "max_tokens": 6}, key=KEY)
    assert ok == 200
    ids, toks, _ = reference(chat, max_tokens=6)
    assert second["choices"][0]["message"]["content"] == ref_models.slm.detokenize([t.id for t in toks])
    assert second["usage"]["prompt_tokens"] == len(ids)
    assert first["usage"]["prompt_tokens"] <= second["usage"]["prompt_tokens_details"]["cached_tokens"] < len(ids)


def test_models_and_health(server: Server) -> None:
    assert {m.id for m in client(server).models.list()} == {"tiny", "tiny:greedy"}
    status, h = http(server.url, "/health")  # no key needed
    assert status == 200 and h["status"] == "ok" and h["policy"] == "s2t-local" and h["parallel"] == 3
    assert h["adapted"] is False  # a reranker bundle: the web chat offers plain greedy


# ---- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "key", "status", "code"),
    [
        ("/v1/chat/completions", {"messages": MSGS}, None, 401, "invalid_api_key"),
        ("/v1/chat/completions", {"messages": MSGS}, "wrong", 401, "invalid_api_key"),
        ("/v1/models", None, None, 401, "invalid_api_key"),
        ("/v1/chat/completions", b'{"messages": [', KEY, 400, None),
        ("/v1/chat/completions", b"[1, 2]", KEY, 400, None),
        ("/v1/chat/completions", {"model": "tiny"}, KEY, 400, None),
        ("/v1/chat/completions", {"messages": [{"content": "no role"}]}, KEY, 400, None),
        ("/v1/chat/completions", {"messages": MSGS, "temperature": "hot"}, KEY, 400, None),
        ("/v1/chat/completions", {"messages": MSGS, "max_tokens": 0}, KEY, 400, None),
        ("/v1/chat/completions", {"messages": MSGS, "n": 2}, KEY, 400, None),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "word " * 400}]},
            KEY,
            400,
            "context_length_exceeded",
        ),
        ("/v1/completions", {"prompt": "word " * 400}, KEY, 400, "context_length_exceeded"),
        ("/v1/completions", {"prompt": ""}, KEY, 400, None),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "bad \\ud800 text"}]}', KEY, 400, None),
        ("/v1/completions", b'{"prompt": "\\udfff"}', KEY, 400, None),
        ("/v1/nothing", {"prompt": "x"}, KEY, 404, None),
    ],
)
def test_errors_are_openai_error_objects(server: Server, path, body, key, status, code) -> None:
    got, err = http(server.url, path, body, method="POST" if body is not None else "GET", key=key)
    assert got == status, err
    assert set(err) == {"error"} and set(err["error"]) == {"message", "type", "param", "code"}
    assert err["error"]["message"] and "Traceback" not in err["error"]["message"]
    assert err["error"]["code"] == code
    # and the server keeps serving
    ok, r = http(server.url, "/v1/chat/completions", {"messages": MSGS, "max_tokens": 2}, key=KEY)
    assert ok == 200 and r["usage"]["completion_tokens"] <= 2


def test_official_client_raises_typed_errors(server: Server) -> None:
    with pytest.raises(openai.AuthenticationError):
        client(server, "wrong").chat.completions.create(model="tiny", messages=MSGS)
    with pytest.raises(openai.BadRequestError, match="context"):
        client(server).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "word " * 400}])
    status, err = http(server.url, "/v1/chat/completions", method="GET", key=KEY)
    assert status == 405 and "error" in err


def test_disconnected_client_frees_its_slot(server: Server) -> None:
    u = urllib.parse.urlparse(server.url)
    conn = HTTPConnection(u.hostname, u.port, timeout=60)
    body = {"messages": MSGS, "max_tokens": 200, "stream": True}
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Authorization": f"Bearer {KEY}"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("content-type").startswith("text/event-stream")
    resp.readline()
    resp.close()
    conn.close()  # gone mid-answer
    deadline = time.monotonic() + 10
    while True:
        _, h = http(server.url, "/health")
        if h["running"] == 0 and h["queued"] == 0:
            break
        assert time.monotonic() < deadline, h
        time.sleep(0.05)
    ok, _ = http(server.url, "/v1/chat/completions", {"messages": MSGS, "max_tokens": 2}, key=KEY)
    assert ok == 200


# ---- the worker thread, in-process -----------------------------------------------------------------


@pytest.fixture()
def plain2(tiny_gguf: Path) -> Models:
    m = open_models(str(tiny_gguf), bundle="none", ctx=2 * 256, threads=1, progress=False, n_seq=2)
    yield m
    m.close()


def job(
    m: Models, text: str | list[dict], max_tokens: int = 8, on_event: Callable[[object], None] | None = None
) -> Job:
    """A chat job (a user message, or the whole chat) whose events are kept in `job.events`."""
    events: list = []
    chat = [{"role": "user", "content": text}] if isinstance(text, str) else text

    def emit(ev: object) -> None:
        events.append(ev)
        if on_event is not None:
            on_event(ev)

    j = Job(chat_tokens(m.slm, ChatTemplate(m.slm), chat), max_tokens, greedy(), emit)
    j.events = events  # type: ignore[attr-defined]
    return j


def wait_until(cond: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def run_to_the_end(w: Worker, jobs: list[Job]) -> None:
    """Start the worker, wait until every job is done, shut it down."""
    w.start()
    try:
        wait_until(lambda: all(isinstance(j.events[-1:] and j.events[-1], Done) for j in jobs))
    finally:
        w.shutdown(0)
        assert w.join(30)


def test_worker_batches_together_and_refuses_a_full_queue(plain2: Models, reference: Reference) -> None:
    w = Worker(plain2.slm, greedy(), parallel=2, queue_size=1, ctx=256)
    jobs = [job(plain2, q) for q in ("What is 2 + 2?", "Name a colour.", "Say hello.")]
    with pytest.raises(APIError) as full:  # a request's choices are taken together or not at all
        w.submit(*jobs, job(plain2, "a fourth choice"))
    assert full.value.status == 503 and w.load["queued"] == 0
    w.submit(jobs[0])  # before the thread starts: all three arrive together
    w.submit(*jobs[1:])
    with pytest.raises(APIError) as full:
        w.submit(job(plain2, "one too many"))
    assert full.value.status == 503 and full.value.code == "queue_full"
    run_to_the_end(w, jobs)
    dones = [j.events[-1] for j in jobs]
    assert [d.stats["batch"] for d in dones[:2]] == [2, 2]  # the first two shared every step
    assert dones[2].stats["queue_s"] > 0  # the third waited for a slot
    for j, q in zip(jobs, ("What is 2 + 2?", "Name a colour.", "Say hello.")):
        _, toks, _ = reference([{"role": "user", "content": q}], max_tokens=8, policy=greedy())
        assert "".join(p.text for p in j.events if isinstance(p, Piece)) == plain2.slm.detokenize([t.id for t in toks])
    with pytest.raises(APIError, match="shutting down"):
        w.submit(job(plain2, "late"))


def test_worker_copies_a_shared_system_prompt(plain2: Models, reference: Reference) -> None:
    """Two requests with one system prompt: the second copies its cells from the first's slot,
    says so, and answers as it would alone."""
    system = {"role": "system", "content": "You are a careful assistant. Think step by step, then answer briefly."}
    chats = [[system, {"role": "user", "content": q}] for q in ("What is 2 + 2?", "Name a colour.")]
    jobs = [job(plain2, chat) for chat in chats]
    w = Worker(plain2.slm, greedy(), parallel=2, queue_size=2, ctx=256)
    w.submit(jobs[0])
    w.submit(jobs[1])
    run_to_the_end(w, jobs)
    shared = reusable_prefix(jobs[0].prompt, jobs[1].prompt)
    assert shared >= MIN_SHARED
    assert [j.events[-1].stats["cached_tokens"] for j in jobs] == [0, shared]
    for j, chat in zip(jobs, chats):
        _, toks, _ = reference(chat, max_tokens=8, policy=greedy())
        assert "".join(p.text for p in j.events if isinstance(p, Piece)) == plain2.slm.detokenize([t.id for t in toks])


def test_worker_cancel_frees_the_slot_at_once(plain2: Models) -> None:
    w = Worker(plain2.slm, greedy(), parallel=1, queue_size=2, ctx=256)
    first = job(plain2, "Count to five.", max_tokens=200, on_event=lambda ev: setattr(first, "cancelled", True))
    waiting = job(plain2, "Say hello.")
    dropped = job(plain2, "never run")
    dropped.cancelled = True
    for j in (first, waiting, dropped):
        w.submit(j)
    w.start()
    try:
        wait_until(lambda: bool(waiting.events) and isinstance(waiting.events[-1], Done))
        wait_until(lambda: w.load == {"running": 0, "queued": 0})
    finally:
        w.shutdown(0)
        assert w.join(30)
    assert not any(isinstance(e, Done | Failed) for e in first.events)  # cancelled after its first piece
    assert sum(isinstance(e, Piece) for e in first.events) <= 2
    assert dropped.events == []


def test_worker_shutdown_ends_running_jobs_cleanly(plain2: Models) -> None:
    w = Worker(plain2.slm, greedy(), parallel=1, queue_size=1, ctx=256)
    running = job(plain2, "Count to five.", max_tokens=200, on_event=lambda ev: w.shutdown(0))
    queued = job(plain2, "Say hello.")
    w.submit(running)
    w.submit(queued)
    w.start()
    assert w.join(30)
    for j in (running, queued):
        assert isinstance(j.events[-1], Failed) and j.events[-1].error.status == 503
    assert w.load == {"running": 0, "queued": 0}


def test_text_stream_holds_back_a_possible_stop_string() -> None:
    ts = TextStream(["END"])
    assert [p.text for p in ts.push(b"abc E", True)] == ["abc "]
    assert ts.push(b"N") == []
    assert [(p.text, p.flipped) for p in ts.push(b"Dx")] == []
    assert ts.stopped
    ts = TextStream(["END"])
    assert [(p.text, p.flipped) for p in ts.push(b"ab E", True)] == [("ab ", True)]
    assert [(p.text, p.flipped) for p in ts.push(b"x")] == [("E", True), ("x", False)]
    ts = TextStream()
    assert ts.push("é".encode()[:1], True) == []
    assert [(p.text, p.flipped) for p in ts.push("é".encode()[1:])] == [("é", True)]


# ---- shutdown and the web chat -------------------------------------------------------------------


def test_sigterm_stops_cleanly(tiny_gguf: Path) -> None:
    with serving(tiny_gguf, "--bundle", "none", "--threads", "1", "--grace", "0") as s:
        u = urllib.parse.urlparse(s.url)
        conn = HTTPConnection(u.hostname, u.port, timeout=60)
        conn.request("POST", "/v1/chat/completions", json.dumps({"messages": MSGS, "max_tokens": 200, "stream": True}))
        resp = conn.getresponse()
        lines = iter(resp.readline, b"")
        first = next(sse_events(lines))
        assert first["choices"][0]["delta"]["role"] == "assistant"
        t0 = time.monotonic()
        s.proc.send_signal(15)
        events = list(sse_events(lines))  # finished, or ended with an error event
        assert events[-1] == "[DONE]"
        last = events[-2]
        assert ("error" in last and last["error"]["code"] == "shutting_down") or last["choices"][0]["finish_reason"]
        assert s.proc.wait(30) == 0 and time.monotonic() - t0 < 30
        assert "Traceback" not in s.stderr()


def test_web_chat_streams_and_marks_flips(server: Server, tmp_path: Path) -> None:
    exe = find_chromium()
    if exe is None:
        pytest.skip("no Chromium on this machine (Debian: apt-get install -y chromium); .ci/run installs it")
    with Browser(exe, tmp_path / "profile") as b:
        b.goto(server.url + "/")
        b.wait_for("document.getElementById('info').textContent.includes('s2t-local')")
        assert b.eval("document.getElementById('greedy').disabled") is False  # no adapter: greedy is served
        assert b.eval("document.querySelectorAll('script[src], link[href]').length") == 0  # nothing fetched
        b.eval(f"document.getElementById('key').value = {json.dumps(KEY)}")
        b.eval("document.getElementById('prompt').value = 'What is 2 + 2?'")
        b.eval("document.getElementById('send').click()")
        b.wait_for("document.querySelector('.msg.assistant .stats, .msg.assistant .error') !== null")
        assert b.eval("document.querySelector('.msg.assistant .error')") is None
        answer = b.eval("document.querySelector('.msg.assistant').childNodes.length")
        flips = b.eval("document.querySelectorAll('.msg.assistant mark.flip').length")
        stats = b.eval("document.querySelector('.msg.assistant .stats').textContent")
        b.screenshot(tmp_path / "web-chat.png")
    assert answer > 3  # pieces appended as they streamed, then the stats line
    assert flips > 0
    assert "policy s2t-local" in stats and "flips 0" not in stats
