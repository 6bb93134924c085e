"""`run_prompt_job`: one rank's run of a list of prompts through a `ShardedRunner`, results as JSON lines.

    python -m ultra_adaptive_kv_cache_engine.model.parallel.prompt_job JOB.json OUT_DIR

Started once per rank (by torchrun or `RankLauncher`); rank 0 leads the requests and the other ranks follow
what it broadcasts, as a server would (`ShardedRunner.lead` / `follow`). The job file is JSON: ``config`` (KVCacheConfig
fields; ``model_path`` names the model folder, ``persistence_path`` / ``enable_persistence`` the disk tier),
``prompts`` (lists of token ids), ``max_new_tokens``, ``tokenizer`` (a `TOKENIZERS` name), ``device``
("cpu" or "cuda") and ``timeout_s`` (how long a collective may wait for a peer).

Rank r writes to ``OUT_DIR/rank{r}.jsonl``, flushed line by line: a header ``{"rank", "degree",
"namespace", "kv_heads"}``, one line per request (greedy output, cached tokens, blocks fetched and
published, the agreed block table, timings; rank 0's tiers are made durable after every request), then
``{"done": true}``. If the group breaks (a peer died or timed
out), the rank flushes what rank 0 queued, prints the error on stderr and exits with `EXIT_GROUP_BROKE`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import torch
import torch.distributed as dist

from ...cache.sharded_group import EXIT_GROUP_BROKE, RankFailureError, ShardGroup, exit_after_group_failure
from ...config import KVCacheConfig
from ..text import ByteTextCodec, TextCodec
from .loading import load_sharded_model
from .runner import ShardedResult, ShardedRunner

TOKENIZERS: dict[str, Callable[[], TextCodec | None]] = {
    "folder": lambda: None,  # the model folder's own Hugging Face tokenizer
    "bytes": ByteTextCodec,  # UTF-8 bytes (the saved tiny random Llama)
}


@dataclass(frozen=True)
class PromptJob:
    """What every rank runs; `config` holds KVCacheConfig fields (validated by `kv_config`)."""

    config: dict[str, Any]
    prompts: tuple[tuple[int, ...], ...]
    max_new_tokens: int = 16
    tokenizer: str = "folder"
    device: str = "cpu"
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"tokenizer={self.tokenizer!r} is unknown; expected one of: {', '.join(TOKENIZERS)}")
        if not self.prompts or any(not p for p in self.prompts):
            raise ValueError("prompts must be a non-empty list of non-empty token id lists")
        if not self.config.get("model_path"):
            raise ValueError("config.model_path must name the model folder")
        object.__setattr__(self, "prompts", tuple(tuple(int(t) for t in p) for p in self.prompts))

    def kv_config(self) -> KVCacheConfig:
        return KVCacheConfig(**self.config)

    @classmethod
    def from_json(cls, text: str) -> PromptJob:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"a prompt job must be a JSON object, got {type(data).__name__}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def _record(index: int, result: ShardedResult, persisted: int) -> dict[str, Any]:
    g = result.generation
    return {
        "request": index, "output_ids": result.output_ids, "prompt_tokens": g.prompt_tokens,
        "cached_tokens": g.cached_tokens, "new_tokens": g.new_tokens, "local_blocks": result.local_blocks,
        "fetched_blocks": result.fetched_blocks, "published_blocks": result.published_blocks,
        "block_table": list(result.block_table), "persisted_blocks": persisted, "ttft_s": result.ttft_s,
        "total_s": result.fetch_s + g.total_s, "fetch_s": result.fetch_s, "publish_s": result.publish_s,
    }  # fmt: skip


def _write(out: IO[str], payload: dict[str, Any]) -> None:
    out.write(json.dumps(payload) + "\n")
    out.flush()


def _run(runner: ShardedRunner, job: PromptJob, out: IO[str]) -> None:
    """Rank 0 reads the prompts and leads; the other ranks follow what it broadcasts (as in serving)."""
    if runner.group.is_first:
        for index, prompt in enumerate(job.prompts):
            _write(out, _record(index, *runner.lead(prompt, job.max_new_tokens, persist=True)))
        runner.release_followers()
        return
    index = 0
    while (served := runner.follow()) is not None:
        _write(out, _record(index, *served))
        index += 1


def run_prompt_job(job: PromptJob, out_dir: str | Path) -> int:
    """Runs `job` as this process's rank (from the environment); returns the process exit code."""
    torch.set_num_threads(1)
    group = ShardGroup.from_environment(job.device, job.timeout_s)
    config = job.kv_config()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runner: ShardedRunner | None = None
    with open(out_dir / f"rank{group.rank}.jsonl", "a", encoding="utf-8") as out:
        try:
            assert config.model_path is not None
            loaded = load_sharded_model(config.model_path, group, config, TOKENIZERS[job.tokenizer]())
            runner = ShardedRunner(loaded, group, config)
            _write(out, {"rank": group.rank, "degree": group.degree, "namespace": runner.namespace_digest.hex(),
                         "kv_heads": runner.paged.spec.num_kv_heads})
            _run(runner, job, out)
        except RankFailureError as exc:
            if runner is not None:
                runner.close()
            print(f"rank {group.rank}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            return EXIT_GROUP_BROKE
        runner.close()
        _write(out, {"done": True})
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print("usage: python -m ultra_adaptive_kv_cache_engine.model.parallel.prompt_job JOB.json OUT_DIR",
              file=sys.stderr)
        return 2
    code = run_prompt_job(PromptJob.from_json(Path(args[0]).read_text(encoding="utf-8")), args[1])
    if code == EXIT_GROUP_BROKE:
        exit_after_group_failure(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
