"""Where the host time of a promotion goes (CUDA): bench_quant_promotion's live path for one format, a 16k
prefix, with cProfile around the promoting request and around the same request served from the pool, plus
wall-clock phases (submit -> promotion start, the promotion, promotion end -> first token). Prints tables."""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time

import bench_quant_promotion as bq
import torch
from bench_quant_decode import build_model

from ultra_adaptive_kv_cache_engine.cache import manager as manager_module


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--formats", default="none,fp8")
    p.add_argument("--tokens", type=int, default=16384)
    a = p.parse_args()
    cuda = torch.cuda.is_available()
    args = argparse.Namespace(quick=not cuda, tokens=a.tokens, repeats=3, layers=32 if cuda else 2, seed=0, context=a.tokens, steps=4,
                              promotion_run=bq.PROMOTION_RUN, mapped_reads=True)
    device = torch.device("cuda" if cuda else "cpu")
    model = build_model(args, device, torch.bfloat16 if cuda else torch.float32)
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, model.shape.vocab_size, (args.tokens + 1,), generator=gen).tolist()
    warm = torch.randint(3, model.shape.vocab_size, (4 * bq.BS + 1,), generator=gen).tolist()
    original_serve, original_promote = bq.serve, manager_module.KVCacheManager._promote
    marks: dict[str, float] = {}

    def promote(self, *rest):  # type: ignore[no-untyped-def]
        marks["promote_start"] = time.perf_counter()
        out = original_promote(self, *rest)
        marks["promote_end"] = time.perf_counter()
        return out

    manager_module.KVCacheManager._promote = promote
    for fmt in a.formats.split(","):
        profs: list[tuple[str, cProfile.Profile, dict[str, float]]] = []

        def serve(loop, prompt_ids):  # type: ignore[no-untyped-def]
            if len(prompt_ids) < 1000:
                return original_serve(loop, prompt_ids)
            marks.clear()
            prof = cProfile.Profile()
            marks["submit"] = time.perf_counter()
            prof.enable()
            out = original_serve(loop, prompt_ids)
            prof.disable()
            marks["first_token"] = marks["submit"] + out[0]
            profs.append((fmt, prof, dict(marks)))  # noqa: B023 (used within this iteration)
            return out

        bq.serve = serve
        result = bq.run_arm(model, args, None if fmt == "none" else fmt, prompt, warm)
        print(f"== {fmt}: ttft {result['ttft_ms']} ms, pool hit {result['pool_hit_ttft_ms']} ms, dma floor {result['dma_floor_ms']} ms")
        for i, (_, _prof, m) in enumerate(profs):
            phases = {k: round((m[k] - m["submit"]) * 1e3, 2) for k in m}
            print(f"-- {fmt} request {i} phases (ms after submit): {phases}")
        for i in (2, len(profs) - 1):  # a steady promotion and a pool hit
            stream = io.StringIO()
            pstats.Stats(profs[i][1], stream=stream).sort_stats("tottime").print_stats(22)
            print(f"-- {fmt} request {i} profile by own time\n" + "\n".join(stream.getvalue().splitlines()[6:36]))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
