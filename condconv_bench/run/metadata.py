"""`run.json`, typed: what a run records besides its rows (schema version, suite, environment,
the machine's measured ceilings) and what readers rely on in it. The rest is kept as written, so a
field a reader does not use never makes a run unreadable."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from condconv_bench.run.columns import READABLE_VERSIONS


class _Record(BaseModel):
    model_config = ConfigDict(extra="allow")  # what readers do not use is kept as written


class SuiteRecord(_Record):
    name: str
    sha256: str
    gate: dict[str, Any] = {}


class MatmulPeak(BaseModel):
    device: str
    dtype: str
    threads: int
    flops_per_s: float = Field(gt=0)
    dense_flops_per_s: float | None = Field(default=None, gt=0)  # since version 4: best of matmul and 1x1 conv
    depthwise_flops_per_s: float | None = Field(default=None, gt=0)  # since version 4
    measurements: int = Field(default=1, ge=1)  # the ceilings are the best of this many (`machine.ceilings.best_ceilings`)


class MemoryBandwidth(BaseModel):
    """A device's measured bandwidths at one thread count (`machine.ceilings.memory_bandwidths`)."""

    model_config = ConfigDict(extra="allow")

    device: str
    threads: int
    dram_bytes_per_s: float = Field(gt=0)
    llc_bytes_per_s: float = Field(gt=0)
    llc_bytes: int | None = None
    stream_bytes_per_s: list[tuple[int, float]] = []  # [buffer bytes, bytes/s]; empty in runs that did not measure it
    measurements: int = Field(default=1, ge=1)


class RunMetadata(_Record):
    """`run.json`, any readable version: what readers rely on is typed; the rest (timing settings,
    allocator, timestamps, the environment's details) is kept as written."""

    schema_version: Literal[*READABLE_VERSIONS]  # type: ignore[valid-type]
    suite: SuiteRecord
    environment: dict[str, Any] = {}
    matmul_peaks: list[MatmulPeak] = []
    memory_bandwidths: list[MemoryBandwidth] = []
    shard: str | None = None
