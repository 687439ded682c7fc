"""How the measured tables are fitted and kept: small models of one family and attention kind,
least squares on their features, one file per engine version in the coefficient cache.

The cache folder is $AUTOTUNE_CACHE, else ~/.cache/autotune (the tests point it at a temporary
folder). A file's name carries a fingerprint of the sources the measurements depend on, so an
engine change refits instead of reading stale coefficients.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from autotune.engine.config import ModelConfig
from autotune.engine.files import write_atomic

# a long sequence and a batch of short ones: per-token and per-sequence terms (rotary tables) separate
FIT_BATCHES = ((1, 20), (3, 8))


def fit_shapes(family: str, gqa: bool) -> list[ModelConfig]:
    """Small models of one family and attention kind, widths varied so every feature separates;
    the last two with heads narrower (or wider) in total than d_model, so q separates from h."""
    widths = [(32, 4, 80, None), (48, 6, 64, None), (64, 4, 112, None), (48, 3, 160, None), (80, 10, 96, None),
              (64, 4, 96, 8), (32, 2, 64, 24)]
    shapes = []
    for i, (h, a, f, head_dim) in enumerate(widths):
        g = (a // 2 if a % 2 == 0 else 1) if gqa else a
        if family == "gpt2" or (head_dim or h // a) % 2 == 0:
            shapes.append(ModelConfig(
                name=f"fit{i}", family=family, n_layers=2, d_model=h, n_heads=a, n_kv_heads=g, d_ff=f,
                vocab_size=96 + 32 * i, max_seq_len=64, tie_embeddings=family == "gpt2", attn_head_dim=head_dim,
            ))
    return shapes


def lstsq(rows: list[dict], ys: list[float], names: tuple[str, ...]) -> dict[str, float]:
    """Least-squares coefficients of `names` (the features in `rows`) for the targets `ys`."""
    x = np.array([[r[n] for n in names] for r in rows], dtype=np.float64)
    coef = np.linalg.lstsq(x, np.array(ys, dtype=np.float64), rcond=None)[0]
    return {n: float(c) for n, c in zip(names, coef)}


def cache_dir() -> Path:
    return Path(os.environ.get("AUTOTUNE_CACHE", Path.home() / ".cache" / "autotune"))


def _engine_fingerprint() -> str:
    """What the measured bytes depend on: the engine's model (its MoE layer too), checkpointing and
    kernels, this package, torch."""
    from autotune import kernels
    from autotune.engine import model, moe, parallel

    files = [Path(model.__file__), Path(moe.__file__), Path(parallel.__file__), *sorted(Path(__file__).parent.glob("*.py")),
             *sorted(Path(kernels.__file__).parent.glob("*.py"))]
    src = b"".join(f.read_bytes() for f in files)
    return hashlib.sha256(src + torch.__version__.encode()).hexdigest()[:16]


def cached_fit(kind: str, family: str, gqa: bool, fit: Callable[[], dict]) -> dict[str, dict]:
    """A fitted table of one (family, gqa) group from the cache (a file per engine version), else
    `fit()` on one thread, written there for the next process."""
    path = cache_dir() / f"{kind}-{family}-{'gqa' if gqa else 'mha'}-{_engine_fingerprint()}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        pass
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: more threads only contend (seconds -> minutes on a busy host)
    try:
        fits = fit()
    finally:
        torch.set_num_threads(threads)
    try:
        write_atomic(path, json.dumps(fits, indent=2))
    except OSError:
        pass  # a read-only home: the fit is cheap and stays in memory
    return fits
