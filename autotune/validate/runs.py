"""The runs schema (docs/runs.md): one measured training run per JSON line, read into a typed `Run`.

Published runs (`../shared/published/runs.jsonl`), the project's own probe records and a user's
past runs share it. A value the source does not state is "unstated" (or null, or an optional
field left out); every other value must have its field's type. A malformed line is one
`RunError` naming its line and field, and the lines after it are still read.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

UNSTATED = "unstated"

# field -> (type, required). "count" is a positive integer, "number" a positive float; an
# optional field may be left out; any field but the texts and the architecture may be "unstated".
FIELDS: dict[str, tuple[str, bool]] = {
    "source": ("text", True), "table": ("text", False), "model": ("text", True), "arch": ("arch", False),
    "gpu": ("text", True), "gpus": ("count", True), "nodes": ("count", False), "interconnect": ("text", False),
    "dp": ("count", True), "tp": ("count", False), "pp": ("count", False), "cp": ("count", False),
    "zero": ("text", False), "micro_batch": ("count", False), "global_batch": ("count", False),
    "seq_len": ("count", True), "precision": ("text", False), "ac": ("text", False), "other": ("text", False),
    "tokens_per_s_per_gpu": ("number", False), "tflops_per_gpu": ("number", False), "mfu": ("fraction", False),
    "peak_mem_gib": ("number", False), "step_time_s": ("number", False), "notes": ("text", False),
    "config": ("object", False),
}
ARCH_FIELDS = ("n_layers", "d_model", "n_heads", "kv_heads", "ffn", "vocab")
MEASURES = ("tokens_per_s_per_gpu", "step_time_s", "tflops_per_gpu", "mfu")  # what a row's speed may be given as


class RunError(ValueError):
    """A malformed row: its line (1-based) and field, and what is wrong."""

    def __init__(self, line: int, field_name: str, message: str):
        super().__init__(f"line {line}: field {field_name!r}: {message}")
        self.line, self.field = line, field_name


@dataclass(frozen=True)
class Run:
    """One row. None stands for "unstated" (or left out)."""

    line: int
    source: str
    model: str
    gpu: str
    gpus: int
    dp: int
    seq_len: int
    table: str = ""
    arch: dict[str, Any] | None = None
    nodes: int | None = None
    interconnect: str = ""
    tp: int | None = None
    pp: int | None = None
    cp: int | None = None
    zero: str = ""
    micro_batch: int | None = None
    global_batch: int | None = None
    precision: str = ""
    ac: str = ""
    other: str = ""
    tokens_per_s_per_gpu: float | None = None
    tflops_per_gpu: float | None = None
    mfu: float | None = None
    peak_mem_gib: float | None = None
    step_time_s: float | None = None
    notes: str = ""
    config: dict[str, Any] | None = field(default=None, hash=False)  # the engine's own model/job/plan, exact

    @property
    def label(self) -> str:
        return f"line {self.line}: {self.model} on {self.gpus} x {self.gpu}"


def _stated(value: Any) -> bool:
    return value is not None and not (isinstance(value, str) and value.strip().lower() == UNSTATED)


def _check(line: int, name: str, kind: str, value: Any) -> Any:
    """The value of one field as its type, or a RunError saying what it should be."""
    if kind == "text":
        if not isinstance(value, str):
            raise RunError(line, name, f"{value!r} is not text")
        return value
    if not _stated(value):
        return None
    if kind == "count":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RunError(line, name, f"{value!r} is not a positive integer (or \"unstated\")")
        return value
    if kind in ("number", "fraction"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise RunError(line, name, f"{value!r} is not a positive number (or \"unstated\")")
        if kind == "fraction" and value > 1:
            raise RunError(line, name, f"{value!r} is above 1; give MFU as a fraction (0.41, not 41)")
        return float(value)
    if kind == "object":
        if not isinstance(value, dict):
            raise RunError(line, name, f"{value!r} is not an object")
        return value
    return _check_arch(line, value)


def _check_arch(line: int, arch: Any) -> dict[str, Any]:
    if not isinstance(arch, dict):
        raise RunError(line, "arch", f"{arch!r} is not an object of {', '.join(ARCH_FIELDS)} (or null)")
    out = {}
    for key, value in arch.items():
        if _stated(value) and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise RunError(line, f"arch.{key}", f"{value!r} is not a positive number (or \"unstated\")")
        out[key] = value if _stated(value) else None
    return out


def parse_run(line: int, text: str) -> Run:
    """One JSON line as a Run; a RunError names the first field that is wrong."""
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise RunError(line, "(line)", f"not JSON ({e.msg} at column {e.colno})")
    if not isinstance(row, dict):
        raise RunError(line, "(line)", "not a JSON object")
    values: dict[str, Any] = {}
    for name, (kind, required) in FIELDS.items():
        if name not in row:
            if required:
                raise RunError(line, name, "missing (required; see docs/runs.md)")
            continue
        checked = _check(line, name, kind, row[name])
        if checked is None and required:
            raise RunError(line, name, "must be stated (required; see docs/runs.md)")
        if checked is not None:
            values[name] = checked
    if not any(m in values for m in MEASURES) and "peak_mem_gib" not in values:
        raise RunError(line, "tokens_per_s_per_gpu", "no measurement: give tokens_per_s_per_gpu, step_time_s, "
                       "tflops_per_gpu, mfu or peak_mem_gib")
    return Run(line=line, **values)


def read_runs(path: str | Path) -> tuple[list[Run], list[RunError]]:
    """Every well-formed row of a runs file and one RunError per malformed row (blank lines skipped)."""
    runs, errors = [], []
    for number, text in enumerate(Path(path).read_text().splitlines(), start=1):
        if not text.strip():
            continue
        try:
            runs.append(parse_run(number, text))
        except RunError as e:
            errors.append(e)
    return runs, errors
