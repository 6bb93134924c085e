"""`DigestPoller`: keeps each instance's `InstanceDigest` current by polling its `GET /v1/cache/digest`.

One task per instance polls every `interval_s`, and at once when woken (`wake`: the router does so after each
answer from the instance, which has just committed or loaded that prompt's blocks). A poll sends
`?since=<generation held>` (the delta) once a full report is held; a delta that does not follow (the instance
restarted) is answered by asking for the full set at once. A poll that fails (connection, a status other than
200: an instance without the route, a wrong API key; a malformed report) forgets the digest, so the instance is
routed by text chunks until a full report comes back. An instance marked down is not polled. Runs on the
router's event loop (its client); outcomes are counted in `uakv_router:digest_polls_total{instance,outcome}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import httpx

from ..metrics import LOGGER_NAME
from .digests import StaleDigest
from .instances import Instance
from .metrics import RouterMetrics

logger = logging.getLogger(LOGGER_NAME)
DIGEST_PATH = "/v1/cache/digest"


class DigestPoller:
    """Polls the digests of `instances` with `client` (see the module docstring)."""

    def __init__(self, instances: list[Instance], interval_s: float, api_key: str | None, timeout_s: float,
                 metrics: RouterMetrics, tokenizer: str = "") -> None:
        self.instances, self.interval_s, self.timeout_s, self.metrics = instances, interval_s, timeout_s, metrics
        self.tokenizer = tokenizer
        self.headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._wake = {i.url: asyncio.Event() for i in instances}
        self._tasks: list[asyncio.Task[None]] = []
        self._failing: set[str] = set()

    def start(self, client: httpx.AsyncClient) -> None:
        self._tasks = [asyncio.create_task(self._loop(client, i)) for i in self.instances]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def wake(self, instance: Instance) -> None:
        """Poll `instance` now (or as soon as its current poll ends)."""
        self._wake[instance.url].set()

    async def _loop(self, client: httpx.AsyncClient, instance: Instance) -> None:
        wake = self._wake[instance.url]
        while True:
            if instance.healthy:
                await self.poll(client, instance)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), self.interval_s)
            wake.clear()

    async def poll(self, client: httpx.AsyncClient, instance: Instance) -> str:
        """One poll (two when a delta does not follow); returns its outcome: full, delta or failed."""
        digest = instance.digest
        for _ in range(2):
            started = time.monotonic()
            since = {"since": str(digest.generation)} if digest.ready else {}
            try:
                answer = await client.get(instance.url + DIGEST_PATH, params=since, headers=self.headers,
                                          timeout=self.timeout_s)
                if answer.status_code != 200:
                    raise ValueError(f"status {answer.status_code}: {answer.text[:200]}")
                outcome = digest.apply(answer.json(), started)
            except StaleDigest:
                digest.clear()
                continue
            except (httpx.HTTPError, ValueError) as exc:
                digest.clear()
                return self._count(instance, "failed", exc)
            return self._count(instance, outcome)
        return self._count(instance, "failed", StaleDigest("two deltas in a row did not follow"))

    def _count(self, instance: Instance, outcome: str, error: Exception | None = None) -> str:
        self.metrics.digest_polls.labels(instance=instance.url, outcome=outcome).inc()
        if outcome == "full" and self.tokenizer and instance.digest.tokenizer != self.tokenizer:
            logger.warning("router: %s reports tokenizer %s..., the router's is %s...: routed by text chunks (give "
                           "the router the instances' --model-path)", instance.url, instance.digest.tokenizer[:12],
                           self.tokenizer[:12])
        if error is not None and instance.url not in self._failing:
            self._failing.add(instance.url)
            logger.warning("router: no cache digest from %s (%r); routing it by text chunks until one comes",
                           instance.url, error)
        elif error is None and instance.url in self._failing:
            self._failing.discard(instance.url)
            logger.info("router: cache digest from %s again", instance.url)
        return outcome
