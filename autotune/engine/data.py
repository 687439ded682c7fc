"""Training batches: seeded synthetic tokens or a memory-mapped token file, split across DP ranks.

The global batch of optimizer step k is fixed by the job alone: G = job.global_batch sequences of
seq_len + 1 tokens, row j of step k drawn from (job.seed, k, j). Data-parallel rank r takes rows
[r G/dp, (r+1) G/dp) and cuts them into grad_accum micro-batches of plan.micro_batch rows, so
every dp x micro x accum split of the same job trains on exactly the same tokens. Each rank makes
only the rows it trains on.

Sources (job.data.source):
- "synthetic": row j of step k is a random walk x_t = (x_{t-1} + d_t) mod vocab whose steps d_t
  come from a small set of offsets fixed by job.seed. The next token is one of a handful, so a
  model's loss falls from ln(vocab) towards ln(len(offsets)) within a few dozen steps (tests and
  tuning runs can see that training works), and a row costs one cumsum to make.
- a path: a flat token file in the nanoGPT convention (job.data.dtype uint16 or uint32, no
  header), read through numpy.memmap. Row j of step k starts at an offset drawn uniformly from
  (job.seed, k, j), as nanoGPT samples its batches.

Turning a text file into such a file, with a byte-level tokenizer (token = byte, vocab 256, which
the tiny models fit):

    python -m autotune.engine.data prepare input.txt out.bin

The output is written atomically (a temporary file beside it, then renamed).
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import sys
from pathlib import Path

import numpy as np
import torch

from autotune.engine.config import ConfigError, JobConfig, ModelConfig, PlanConfig
from autotune.engine.files import atomic_writer

SYNTHETIC = "synthetic"
N_OFFSETS = 4  # successors of each synthetic token: the loss floor is ln(4) ~ 1.39
BYTE_VOCAB = 256


def micro_batches(
    job: JobConfig, model: ModelConfig, plan: PlanConfig, step: int, dp_rank: int, dp_size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's plan.grad_accum (inputs, targets) micro-batches of step `step`, int64 on the CPU.

    inputs and targets are [plan.micro_batch, job.seq_len]; targets are inputs shifted by one.
    """
    micro = plan.micro_batch
    accum = plan.grad_accum if plan.grad_accum is not None else job.global_batch // (micro * dp_size)
    if not 0 <= dp_rank < dp_size or micro * accum * dp_size != job.global_batch:
        raise ValueError(
            f"dp rank {dp_rank} of {dp_size} x micro_batch {micro} x grad_accum {accum} "
            f"does not split job.global_batch={job.global_batch}"
        )
    per_rank = job.global_batch // dp_size
    first = dp_rank * per_rank
    rows = sequences(job, model, step, range(first, first + per_rank))
    return [(chunk[:, :-1], chunk[:, 1:]) for chunk in rows.split(micro)]


def sequences(job: JobConfig, model: ModelConfig, step: int, rows: range) -> torch.Tensor:
    """Rows `rows` of step `step`'s global batch: [len(rows), seq_len + 1] int64."""
    length = job.seq_len + 1
    if job.data.source == SYNTHETIC:
        offsets = synthetic_offsets(job.seed, model.vocab_size)
        return torch.stack([_synthetic_row(job.seed, step, j, length, offsets, model.vocab_size) for j in rows])
    tokens = token_file(job.data.source, job.data.dtype, length)
    starts = [int(torch.randint(len(tokens) - length + 1, (), generator=_row_generator(job.seed, step, j)))
              for j in rows]
    batch = torch.from_numpy(np.stack([tokens[s:s + length] for s in starts]).astype(np.int64))
    if batch.numel() and int(batch.max()) >= model.vocab_size:
        raise ConfigError(
            f"job.data.source: {job.data.source} holds token {int(batch.max())} >= model.vocab_size="
            f"{model.vocab_size}; use a token file made for this model's vocabulary (or the right job.data.dtype)"
        )
    return batch


def _row_generator(seed: int, step: int, row: int) -> torch.Generator:
    """A generator for one row of one step: a hash, so no two (seed, step, row) share a stream."""
    digest = hashlib.blake2b(f"{seed}/{step}/{row}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


@functools.lru_cache(maxsize=8)
def synthetic_offsets(seed: int, vocab_size: int) -> torch.Tensor:
    """The N_OFFSETS distinct step sizes of the synthetic random walk, fixed by the job's seed."""
    gen = torch.Generator().manual_seed(seed)
    n = min(N_OFFSETS, vocab_size)
    return torch.randperm(vocab_size, generator=gen)[:n].clone()


def _synthetic_row(seed: int, step: int, row: int, length: int, offsets: torch.Tensor, vocab: int) -> torch.Tensor:
    gen = _row_generator(seed, step, row)
    start = torch.randint(vocab, (1,), generator=gen)
    steps = offsets.index_select(0, torch.randint(len(offsets), (length - 1,), generator=gen))
    return torch.cat([start, start + steps.cumsum(0)]) % vocab


@functools.lru_cache(maxsize=8)
def _open_token_file(path: str, dtype: str, mtime_ns: int) -> np.memmap:
    return np.memmap(path, dtype=np.dtype(dtype), mode="r")


def token_file(path: str, dtype: str, min_tokens: int = 1) -> np.memmap:
    """The token file at `path` as a read-only memmap, checked to hold at least `min_tokens`."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"job.data.source: no such file {path}; give a .bin token file or `synthetic`")
    itemsize = np.dtype(dtype).itemsize
    size = p.stat().st_size
    if size % itemsize:
        raise ConfigError(
            f"job.data.source: {path} is {size} bytes, not a whole number of {dtype} tokens; check job.data.dtype"
        )
    if size // itemsize < min_tokens:
        raise ConfigError(
            f"job.data.source: {path} holds {size // itemsize} tokens; a sequence needs job.seq_len + 1 = "
            f"{min_tokens}; give a larger token file or a shorter job.seq_len"
        )
    return _open_token_file(str(p.resolve()), dtype, p.stat().st_mtime_ns)


def check_vocab(job: JobConfig, model: ModelConfig, chunk: int = 1 << 26) -> None:
    """Every token of the data file is below model.vocab_size (one pass over the file, in chunks:
    at disk speed: 0.2 s for 1 GB in the page cache), so a bad token ends the run before it starts."""
    if job.data.source == SYNTHETIC:
        return
    tokens = token_file(job.data.source, job.data.dtype, job.seq_len + 1)
    for start in range(0, len(tokens), chunk):
        end = min(start + chunk, len(tokens))
        largest = int(tokens[start:end].max())
        if largest >= model.vocab_size:
            raise ConfigError(
                f"job.data.source: {job.data.source} holds token {largest} >= model.vocab_size={model.vocab_size} "
                f"(in tokens {start:,}..{end - 1:,}); use a token file made for this model's vocabulary "
                "(or the right job.data.dtype)"
            )


# --- text -> byte-level token file ----------------------------------------------------------

def prepare(text_path: str | Path, out_path: str | Path, chunk_bytes: int = 1 << 24) -> int:
    """Write the bytes of `text_path` as uint16 tokens (0..255) to `out_path`, atomically.

    Returns the number of tokens written.
    """
    src, out = Path(text_path), Path(out_path)
    if not src.is_file():
        raise ConfigError(f"no such text file {src}; give the text file to tokenize")
    if src.stat().st_size == 0:
        raise ConfigError(f"{src} is empty; there is nothing to tokenize")
    if not out.parent.is_dir():
        raise ConfigError(f"cannot write {out}: no folder {out.parent}")
    if out.is_dir() or out.resolve() == src.resolve():
        raise ConfigError(f"cannot write {out}: it is {'a folder' if out.is_dir() else 'the text file'}; give a new .bin path")
    count = 0
    with atomic_writer(out) as dst, src.open("rb") as f:
        while chunk := f.read(chunk_bytes):
            np.frombuffer(chunk, dtype=np.uint8).astype(np.uint16).tofile(dst)
            count += len(chunk)
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m autotune.engine.data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="text file -> byte-level uint16 token .bin (vocab 256)")
    prep.add_argument("text", help="input text file")
    prep.add_argument("out", help="output .bin token file (job.data.source=OUT, job.data.dtype=uint16)")
    args = parser.parse_args(argv)
    try:
        n = prepare(args.text, args.out)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {n} tokens (byte-level, vocab {BYTE_VOCAB}, uint16) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
