"""`engine.stream(request)` and `process_request({..., "stream": True})` on the tiny random Llama: chunks
concatenate to the non-streamed text, exactly the last one finishes, bad requests fail before iteration,
closing the stream cancels and frees the blocks, concurrent requests share steps."""

from __future__ import annotations

import asyncio
import gc
import threading

import pytest
import torch

from ultra_adaptive_kv_cache_engine import KVCacheConfig, UltraAdaptiveKVCacheEngine
from ultra_adaptive_kv_cache_engine.engine.incremental_text import IncrementalText
from ultra_adaptive_kv_cache_engine.engine.loop_waker import LoopWaker
from ultra_adaptive_kv_cache_engine.engine.request_stream import ChunkStream
from ultra_adaptive_kv_cache_engine.engine.requests import RequestError
from ultra_adaptive_kv_cache_engine.engine.sampling import SamplingParams
from ultra_adaptive_kv_cache_engine.engine.scheduler import QueueFullError
from ultra_adaptive_kv_cache_engine.engine.scheduler_config import SchedulerConfig
from ultra_adaptive_kv_cache_engine.engine.sequence_state import SequenceState
from ultra_adaptive_kv_cache_engine.engine.session import ModelSession
from ultra_adaptive_kv_cache_engine.engine.stream import StreamChunk, merge_chunks
from ultra_adaptive_kv_cache_engine.model.tiny import build_tiny_llama

CONFIG = KVCacheConfig(max_tokens=4096, block_size=4, max_new_tokens=12, max_memory=2 * 1024**2)


@pytest.fixture(scope="module")
def tiny():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield build_tiny_llama()
    torch.set_num_threads(threads)


@pytest.fixture
def engine(tiny):
    with UltraAdaptiveKVCacheEngine(CONFIG, model=tiny) as engine:
        yield engine


async def collect(stream) -> list[StreamChunk]:
    return [chunk async for chunk in stream]


async def idle(session: ModelSession) -> None:
    for _ in range(2000):
        if not session.scheduler.has_work():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the scheduler never went idle")


def balanced(session: ModelSession) -> bool:
    cache = session.cache
    return cache.stats()["sequences"] == 0 and cache.num_free_blocks == cache.num_blocks


@pytest.mark.asyncio
async def test_stream_chunks_concatenate_to_the_processed_text(engine):
    for request in ({"text": "Tell me 1", "raw": True, "max_new_tokens": 16},
                    {"messages": [{"role": "user", "content": "Hi"}], "max_new_tokens": 10},
                    {"text": "Tell me 1", "raw": True, "max_new_tokens": 16, "stop": ["/X"]}):
        whole = await engine.process_request(request)
        chunks = await collect(engine.stream(request))
        assert "".join(c.text for c in chunks) == whole["text"]
        assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
        last = chunks[-1]
        assert last.finish_reason == whole["finish_reason"] and last.completion_tokens == whole["completion_tokens"]
        assert {(c.prompt_tokens, c.cached_tokens) for c in chunks} == {(whole["prompt_tokens"], last.cached_tokens)}
        assert sum(len(c.token_ids) for c in chunks) == last.completion_tokens
        counts = [c.completion_tokens for c in chunks]
        assert counts == sorted(counts)
    stopped = await engine.process_request({"text": "Tell me 1", "raw": True, "max_new_tokens": 16, "stop": ["/X"]})
    assert stopped["finish_reason"] == "stop" and "/X" not in stopped["text"]
    assert set(stopped) >= {"text", "cache_hit", "cached_tokens", "prompt_tokens", "completion_tokens", "ttft_ms",
                            "latency_ms", "finish_reason"}


@pytest.mark.asyncio
async def test_process_request_with_stream_returns_the_iterator(engine):
    stream = await engine.process_request({"text": "hello", "stream": True, "max_new_tokens": 5})
    chunks = await collect(stream)
    assert chunks[-1].finish_reason == "length" and chunks[-1].completion_tokens == 5
    assert "".join(c.text for c in chunks) == (await engine.process_request({"text": "hello", "max_new_tokens": 5}))[
        "text"]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("request_", "match"),
    [
        ({"text": ""}, "field 'text' is empty"),
        ({"text": "hi", "max_new_tokens": 0}, "max_new_tokens=0 is out of range"),
        ({"text": "hi", "stream": "yes"}, "stream='yes' must be true or false"),
        ({"text": "hi", "priority": "high"}, "priority='high' must be an integer"),
        ({"action": "retrieve", "key": torch.ones(1)}, "only the 'process' action streams"),
        ({"text": "x" * 600}, "exceeds the model's context of 512 tokens"),
    ],
)
async def test_bad_requests_raise_before_iteration(engine, request_, match):
    with pytest.raises(RequestError, match=match):
        engine.stream(request_)
    if request_.get("action") != "retrieve":
        with pytest.raises(RequestError, match=match):
            await engine.process_request({**request_, "stream": request_.get("stream", True)})
    with pytest.raises(RequestError, match="applies to the 'process' action only"):
        await engine.process_request({"action": "retrieve", "key": torch.ones(1), "stream": True})


@pytest.mark.asyncio
async def test_closing_the_stream_cancels_and_frees_the_blocks(engine):
    stream = engine.stream({"text": "a long answer please", "max_new_tokens": 200})
    first = await stream.__anext__()
    assert first.finish_reason is None
    await stream.aclose()
    session = engine._session
    assert stream.state.finish_reason == "cancelled" and stream.state.num_tokens < 30 + 200
    assert balanced(session)
    with pytest.raises(StopAsyncIteration):
        await stream.__anext__()
    # a consumer that just goes away: the stream is collected, the request cancelled
    gone = engine.stream({"text": "another long answer", "max_new_tokens": 200})
    state = gone.state
    async for _ in gone:
        break
    del gone
    gc.collect()
    await idle(session)
    assert state.finish_reason == "cancelled" and len(state.generated) < 200 and balanced(session)


@pytest.mark.asyncio
async def test_cancelling_the_awaiting_task_cancels_the_request(engine):
    task = asyncio.ensure_future(engine.process_request({"text": "cancel me", "max_new_tokens": 300}))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    session = engine._session
    await idle(session)
    assert balanced(session)


@pytest.mark.asyncio
async def test_concurrent_requests_share_decode_steps(engine, tiny):
    prompts = [f"question number {i}" for i in range(5)]
    with UltraAdaptiveKVCacheEngine(CONFIG, model=tiny) as alone:
        expected = [(await alone.process_request({"text": p}))["text"] for p in prompts]
    await engine.process_request({"text": "warm up"})
    session = engine._session
    rows: list[int] = []
    execute = session.backend.execute

    def recording(chunks):
        rows.append(sum(c.is_decode for c in chunks))
        return execute(chunks)

    session.backend.execute = recording
    got = await asyncio.gather(*(engine.process_request({"text": p}) for p in prompts))
    assert [g["text"] for g in got] == expected
    assert max(rows) > 1  # batched, not serialized
    assert engine.get_stats()["model"]["requests"] == 6 and balanced(session)


@pytest.mark.asyncio
async def test_a_full_waiting_queue_raises_queue_full(tiny):
    session = ModelSession(CONFIG, loaded=tiny, scheduler_config=SchedulerConfig(max_waiting=2))
    session.steps.close()  # no step runs: requests stay waiting
    session.stream({"text": "one"})
    session.stream({"text": "two"})
    with pytest.raises(QueueFullError, match="max_waiting=2"):
        session.stream({"text": "three"})


# -- merging and batched wake-ups (engine/stream.py, engine/request_stream.py, engine/loop_waker.py) ----------

def chunk(text: str, ids: tuple[int, ...], done: int, reason: str | None = None) -> StreamChunk:
    return StreamChunk(text=text, token_ids=ids, finish_reason=reason, prompt_tokens=7, cached_tokens=4,
                       completion_tokens=done)


def test_merge_chunks_concatenates_and_keeps_the_last_counts():
    merged = merge_chunks([chunk("a", (1,), 1), chunk("", (2,), 2), chunk("bc", (3, 4), 4, "length")])
    assert merged == chunk("abc", (1, 2, 3, 4), 4, "length")
    one = chunk("x", (9,), 1)
    assert merge_chunks([one]) is one
    with pytest.raises(ValueError, match="at least one chunk"):
        merge_chunks([])
    with pytest.raises(ValueError, match="only the last chunk"):
        merge_chunks([chunk("a", (1,), 1, "stop"), chunk("b", (2,), 2)])


class CountingLoop(asyncio.SelectorEventLoop):
    """A real event loop that counts the wake-ups other threads send it."""

    def __init__(self) -> None:
        super().__init__()
        self.wakeups = 0

    def call_soon_threadsafe(self, callback, *args, context=None):
        self.wakeups += 1
        return super().call_soon_threadsafe(callback, *args, context=context)


def on_thread(fn) -> None:
    thread = threading.Thread(target=fn)
    thread.start()
    thread.join()


def test_a_reader_behind_the_steps_gets_them_merged_in_one_read_and_an_error_after_them():
    loop = CountingLoop()
    stream = ChunkStream(SequenceState(prompt=[1], params=SamplingParams(max_new_tokens=4),
                                       text=IncrementalText(lambda ids: "")), cancel=lambda state: None)

    def steps():
        for item in (chunk("a", (1,), 1), chunk("b", (2,), 2), RuntimeError("step failed"), chunk("c", (3,), 3)):
            assert stream.put(item)

    async def read():
        await asyncio.sleep(0)  # the steps ran before the first read
        first = await stream.__anext__()
        with pytest.raises(RuntimeError, match="step failed"):
            await stream.__anext__()
        return first

    on_thread(steps)
    assert loop.run_until_complete(read()) == chunk("ab", (1, 2), 2) and stream.done
    loop.close()


def test_one_wakeup_per_loop_per_batch_and_dead_loops_cancel_their_streams():
    waker = LoopWaker()
    loop = CountingLoop()
    cancelled: list[SequenceState] = []
    streams = [ChunkStream(SequenceState(prompt=[1], params=SamplingParams(max_new_tokens=4),
                                         text=IncrementalText(lambda ids: "")), cancelled.append, waker)
               for _ in range(5)]

    async def read_all():
        return await asyncio.gather(*(s.__anext__() for s in streams))

    def one_step():
        with waker.batch():
            for i, s in enumerate(streams):
                assert s.put(chunk(str(i), (i,), 1))
            assert loop.wakeups == 0  # held until the batch ends

    task = loop.create_task(read_all())
    loop.run_until_complete(asyncio.sleep(0.01))  # every reader waits now
    on_thread(one_step)
    got = loop.run_until_complete(task)
    assert [c.text for c in got] == ["0", "1", "2", "3", "4"] and loop.wakeups == 1
    # readers that wait on a loop that closes: the batch's end cancels their requests
    waiting = loop.create_task(streams[0].__anext__())
    loop.run_until_complete(asyncio.sleep(0.01))
    loop.close()

    def dead_step():
        with waker.batch():
            streams[0].put(chunk("x", (9,), 2))

    on_thread(dead_step)
    assert cancelled == [streams[0].state] and not waiting.done()
    with pytest.raises(RuntimeError, match="inside a hold"), waker.batch(), waker.batch():
        pass


@pytest.mark.parametrize("defer", [False, True])
def test_the_step_loop_wakes_a_step_s_streams_once(tiny, defer):
    """One wake-up per step; deferred (as on CUDA), a step's wake-up goes out at the next step's launch."""
    session = ModelSession(CONFIG, loaded=tiny)
    session.steps.threaded, session.steps.defer_wakeups = False, defer
    loop = CountingLoop()
    streams = [session.stream({"text": f"q{i}", "raw": True, "max_new_tokens": 6}) for i in range(4)]

    async def next_chunks():
        return await asyncio.gather(*(s.__anext__() for s in streams))

    task = loop.create_task(next_chunks())
    loop.run_until_complete(asyncio.sleep(0.01))
    on_thread(session.steps.step)  # one step: every prompt prefilled, each stream's first token
    assert loop.wakeups == (0 if defer else 1)
    if defer:
        on_thread(session.steps.step)  # the second step's launch sends the first step's wake-up
    got = loop.run_until_complete(task)
    assert loop.wakeups == 1 and all(1 <= c.completion_tokens <= 1 + defer for c in got)
    steps: list[int] = []
    task = loop.create_task(next_chunks())
    loop.run_until_complete(asyncio.sleep(0.01))
    on_thread(lambda: steps.append(session.steps.run_until_idle()))  # idle: what the last step held goes out
    got = loop.run_until_complete(task)  # every stream read up to its end in one read: merged
    assert [(c.finish_reason, c.completion_tokens) for c in got] == [("length", 6)] * 4
    assert 2 <= loop.wakeups <= 1 + steps[0] and balanced(session)
    session.close()
    loop.close()


@pytest.mark.asyncio
async def test_paged_cache_is_the_seeds_class_over_the_engines_own_blocks(engine):
    from ultra_adaptive_kv_cache_engine import PagedKVCache

    done = await engine.process_request({"action": "process", "text": "the same prompt, reused", "max_new_tokens": 3})
    paged = engine.paged_cache()
    session = engine._model_session()
    assert isinstance(paged, PagedKVCache) and paged.manager is session.cache
    prompt = session.encode_request({"text": "the same prompt, reused"})
    full = len(prompt) // CONFIG.block_size * CONFIG.block_size
    assert done["text"] and paged.lookup(prompt).num_tokens == full  # the request's blocks, found through it
    seq = paged.new_sequence(prompt, max_cached_tokens=len(prompt) - 1)
    assert paged.num_cached_tokens(seq) == (len(prompt) - 1) // CONFIG.block_size * CONFIG.block_size
    paged.free(seq)
    assert session.cache.num_free_blocks == session.cache.num_blocks


def test_paged_cache_over_refuses_anything_but_a_manager_and_extra_arguments(engine):
    from ultra_adaptive_kv_cache_engine import PagedKVCache

    with pytest.raises(TypeError, match="KVCacheManager"):
        PagedKVCache.over(object())
    with pytest.raises(ValueError, match="as it is"):
        PagedKVCache(CONFIG, num_blocks=4, manager=engine.paged_cache().manager)
