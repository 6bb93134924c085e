"""model layer (L3): loading models, naming their KV, and the Hugging Face cache adapter.

Names are loaded on first use, so importing this package does not import transformers.
"""

from __future__ import annotations

from ..lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "LoadedModel": ".loaded",
    "KVShape": ".loaded",
    "load_model": ".loader",
    "resolve_model_folder": ".loader",
    "embedded_gguf_path": ".convert",
    "ensure_converted": ".convert",
    "TinyLlamaSpec": ".tiny",
    "build_tiny_llama": ".tiny",
    "TextCodec": ".text",
    "HFTextCodec": ".text",
    "ByteTextCodec": ".text",
    "PagedHFCache": ".hf_cache",
    "PrefixCache": ".prefix_cache",
    "ReuseReport": ".prefix_cache",
    "WorkingLayer": ".working_layer",
    "GenerationResult": ".generation",
    "generate_with_prefix_cache": ".generation",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
