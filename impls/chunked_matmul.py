"""pixel_major_matmul a chunk of examples at a time: mix the kernels of a chunk that fits in the
L2 caches, run its products while they are there, then mix the next.

Source: the cache-blocking idea applied to CondConv's per-example kernels. At batch 32 the
kernels of a 1152→192 1×1 layer are 28 MB, four times its input: mixing them all first writes
them to memory and reads them back. A chunk of `c` examples keeps `c·P` values in cache between
the mix and the product; `c` is the number of examples whose kernels fit in the L2 of the cores
PyTorch uses (CPU 0's L2 size × threads, from sysfs; 1 MiB per thread where sysfs does not say).
Costs: `⌈B/c⌉` mixes and bmms instead of one, each smaller, and a concatenation of the outputs.

Prediction, written before measuring it in the suite: on this project's 2-core machine (2 MiB of
L2 per core, a very large shared L3 that already holds all B·P kernels) it loses to
pixel_major_matmul by 1.2–2× at batch 8 and 32 on the 7×7 layers, because each small bmm splits
poorly over the threads and the L3 removes most of what it saves; it can only win where the last
level cache is small next to B·P. Prototype measured here: 1.2–2.0× pixel_major_matmul's latency
at chunks of 2–8 examples, within 10% of it only at 16.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from condconv_bench.machine.environment import cache_bytes
from condconv_bench.impls.batched_matmul import not_for_depthwise
from condconv_bench.impls.pixel_major_matmul import as_output, columns_pixel_major, pixel_major_kernels, pixel_major_traffic
from condconv_bench.core.contract import CondConvBase
from condconv_bench.core.registry import register_impl
from condconv_bench.core.spec import LayerSpec, Pair
from condconv_bench.core.traffic import Traffic, output_bytes

_FALLBACK_L2_BYTES = 2**20


_budget_found: dict[int, int] = {}  # thread count → bytes of L2 those threads have, read once


def _l2_budget_bytes() -> int:
    """The L2 bytes of the threads in use (the machine's L2 per core × torch's thread count)."""
    threads = torch.get_num_threads()
    if threads not in _budget_found:
        _budget_found[threads] = (cache_bytes("L2") or _FALLBACK_L2_BYTES) * threads
    return _budget_found[threads]


# A machine constant: under torch.compile it is evaluated eagerly and baked into the graph (the
# marker `torch.compiler.assume_constant_result` sets, without importing the compiler), since
# dynamo cannot trace the sysfs reads and the thread count behind it and would fail with
# fullgraph=True. A graph compiled under one thread count keeps that count's chunk size.
_l2_budget_bytes._dynamo_marked_constant = True  # type: ignore[attr-defined]


def chunk_size(layer: CondConvBase, batch_size: int, itemsize: int) -> int:
    """Examples whose mixed kernels fit together in the L2 caches of the threads in use."""
    return _examples_per_chunk(layer.spec, batch_size, itemsize)


def _examples_per_chunk(spec: LayerSpec, batch_size: int, itemsize: int) -> int:
    return max(1, min(batch_size, _l2_budget_bytes() // (spec.kernel_numel * itemsize)))


@register_impl("chunked_matmul")
class ChunkedMatmul(CondConvBase):
    """pixel_major_matmul over chunks of examples whose kernels fit in the L2 caches."""

    batch_fixed_export = "splits the batch into chunks in Python, so a trace keeps the chunks of the batch it saw"
    dispatchable = True

    def conditional_forward(self, x: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        step = chunk_size(self, batch, x.element_size())
        linear = self.spec.kind == "linear"
        columns = x.unsqueeze(1) if linear else columns_pixel_major(self, x)
        groups = 1 if linear else self.spec.groups
        products = [
            torch.bmm(columns[start * groups : (start + step) * groups], pixel_major_kernels(self, routing_weights[start : start + step]))
            for start in range(0, batch, step)
        ]
        products = products[0] if len(products) == 1 else torch.cat(products)
        bias = self.mixed_bias(routing_weights)
        if linear:
            out = products.squeeze(1)
            return out if bias is None else out + bias
        return as_output(self, products, x, bias)

    @classmethod
    def unsuited_reason(cls, spec: LayerSpec) -> str | None:
        return not_for_depthwise(spec)

    @classmethod
    def analytic_bytes(cls, spec: LayerSpec, batch_size: int, input_size: Pair, itemsize: int) -> Traffic:
        """pixel_major_matmul's bytes (all B kernels are still written and read, a chunk at a time,
        from L2 rather than memory), plus the concatenation of the chunks' products when there are
        several (at this process's thread count)."""
        traffic = pixel_major_traffic(spec, batch_size, input_size, itemsize)
        chunked = _examples_per_chunk(spec, batch_size, itemsize) < batch_size
        return replace(traffic, copies=traffic.copies + (output_bytes(spec, batch_size, input_size, itemsize) if chunked else 0))
