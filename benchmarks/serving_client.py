"""The load generator of bench_serving.py: asyncio + httpx, streamed OpenAI requests, open-loop arrivals.

Every request is sent with `stream: true` and `stream_options.include_usage` (a server that does not know
the option may ignore it), greedy (`temperature: 0`), and read as server-sent events: the time of each
content chunk, the text, and the usage when the server sends one. Arrivals never wait for earlier answers
(open loop): conversations start at their scripted times, trace requests at their arrival times; only the
next turn of a conversation waits for its own answer (its history holds the answer). httpx ignores proxy
variables here (`trust_env=False`): the servers are on loopback.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from typing import Any

import httpx
from serving_stats import RequestRecord
from serving_workloads import Conversation, TraceRequest

REQUEST_TIMEOUT_S = 600.0


def new_client(concurrency: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    return httpx.AsyncClient(timeout=httpx.Timeout(REQUEST_TIMEOUT_S, connect=30.0), limits=limits, trust_env=False)


def _content(chunk: dict[str, Any]) -> str:
    out = []
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta")
        out.append((delta.get("content") or "") if isinstance(delta, dict) else (choice.get("text") or ""))
    return "".join(out)


def _usage(record: RequestRecord, usage: dict[str, Any]) -> None:
    record.prompt_tokens = usage.get("prompt_tokens")
    record.completion_tokens = usage.get("completion_tokens")
    details = usage.get("prompt_tokens_details") or {}
    record.cached_tokens = details.get("cached_tokens")


async def stream_request(client: httpx.AsyncClient, url: str, body: dict[str, Any], record: RequestRecord,
                         t0: float) -> None:
    """Sends `body` (a chat or completion request) to `url` and fills `record`; never raises (errors go to
    `record.error`). `t0`: the run's start on time.perf_counter(); `record.sent_s` is set here."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}, "temperature": 0}
    sent = time.perf_counter()
    record.sent_s = sent - t0
    pieces: list[str] = []
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code >= 400:
                text = (await response.aread()).decode("utf-8", "replace")
                record.error = f"HTTP {response.status_code}: {text[:300]}"
                return
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    record.error = f"stream error: {json.dumps(chunk['error'])[:300]}"
                    return
                text = _content(chunk)
                if text:
                    record.chunk_s.append(time.perf_counter() - sent)
                    pieces.append(text)
                if chunk.get("usage"):
                    _usage(record, chunk["usage"])
        record.done_s = time.perf_counter() - t0
        record.text = "".join(pieces)
        if not record.chunk_s:
            record.error = "the stream ended without a content chunk"
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"[:300]


async def _sleep_until(t0: float, offset_s: float) -> None:
    delay = t0 + offset_s - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)


async def run_conversations(base_url: str, model: str, conversations: Sequence[Conversation], server: str,
                            rnd: int, records: list[RequestRecord]) -> list[RequestRecord]:
    """Plays every conversation against the chat route of `base_url`; appends one record per turn sent to
    `records` as it is sent (so a run cancelled midway keeps what it sent), and returns them."""
    mine: list[RequestRecord] = []
    url = base_url + "/v1/chat/completions"

    async def play(client: httpx.AsyncClient, conv: Conversation, t0: float) -> None:
        await _sleep_until(t0, conv.start_s)
        messages = [{"role": "system", "content": conv.system}]
        for turn, (user, think) in enumerate(zip(conv.users, conv.think_s, strict=True)):
            messages.append({"role": "user", "content": user})
            record = RequestRecord(server, "chat", rnd, conv.client, turn, 0.0, conv.max_tokens)
            records.append(record)
            mine.append(record)
            await stream_request(client, url, {"model": model, "messages": list(messages),
                                               "max_tokens": conv.max_tokens}, record, t0)
            if not record.ok:
                return  # the conversation cannot go on without its answer
            messages.append({"role": "assistant", "content": record.text})
            if turn + 1 < len(conv.users):
                await asyncio.sleep(think)

    async with new_client(len(conversations)) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(play(client, c, t0) for c in conversations))
    return mine


async def run_trace(base_url: str, model: str, requests: Sequence[TraceRequest], server: str,
                    rnd: int, records: list[RequestRecord]) -> list[RequestRecord]:
    """Sends every trace request at its arrival time (one user message each) to the chat route; appends one
    record per request to `records` as it is sent, and returns them."""
    url = base_url + "/v1/chat/completions"
    mine: list[RequestRecord] = []

    async def send(client: httpx.AsyncClient, req: TraceRequest, t0: float) -> None:
        await _sleep_until(t0, req.arrival_s)
        record = RequestRecord(server, "trace", rnd, req.index, 0, req.arrival_s, req.max_tokens)
        records.append(record)
        mine.append(record)
        body = {"model": model, "messages": [{"role": "user", "content": req.prompt}], "max_tokens": req.max_tokens}
        await stream_request(client, url, body, record, t0)

    async with new_client(len(requests)) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(send(client, q, t0) for q in requests))
    return mine


async def run_completions(base_url: str, model: str, prompts: Sequence[str], max_tokens: int, clients: int,
                          server: str, workload: str, rnd: int) -> list[RequestRecord]:
    """`clients` closed-loop clients sharing `prompts` (client i sends prompts i, i + clients, ... in turn) to
    the text-completion route, all starting at once."""
    url = base_url + "/v1/completions"
    records: list[RequestRecord] = []

    async def loop(client: httpx.AsyncClient, i: int, t0: float) -> None:
        for turn, prompt in enumerate(prompts[i::clients]):
            record = RequestRecord(server, workload, rnd, i, turn, 0.0, max_tokens)
            records.append(record)
            await stream_request(client, url, {"model": model, "prompt": prompt, "max_tokens": max_tokens}, record,
                                 t0)

    async with new_client(clients) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(loop(client, i, t0) for i in range(clients)))
    return records


async def get_model_id(base_url: str) -> str:
    """The first model id the server lists at /v1/models."""
    async with httpx.AsyncClient(timeout=30.0, trust_env=False) as client:
        response = await client.get(base_url + "/v1/models")
        response.raise_for_status()
        return str(response.json()["data"][0]["id"])
