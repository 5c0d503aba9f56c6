"""What the TPU compiler's heap holds at its peak, read off an XLA dump (issue #25).

libtpu writes, for `XLA_FLAGS="--xla_dump_to=DIR"`, each module's buffer assignment
(`*after_optimizations-buffer-assignment.txt`: every allocation and, for the preallocated
temporary one, each value's offset and size) and its live ranges
(`*after_optimizations-live-range.txt`: each value's first and last position in the flattened
schedule). From the two this module rebuilds the temporary heap over time:

  live peak   the most bytes live at one position (the union of the live values' slices);
  allocation  the heap's size: where the highest value ends;

and the values live at the peak, with and without the values that carry a `while` loop's
state from one iteration to the next (phis: a scan's stacked residuals and gradients). On the
grid's points `compiled.memory_analysis().temp_size_in_bytes` is 2 x allocation - live peak
without loop state, within 2% (tpu_grid.py --report counts them): the compiler reports its
heap, then the heap again less its transient values.
"""

from __future__ import annotations

import collections
import glob
import os
import re

_VALUE = re.compile(r"value: <\d+ (\S+)( \(phi\))? @\d+> \(size=(\d+),offset=(\d+)\): (\S+)")


def _largest_module(directory: str) -> str:
    """The buffer-assignment file of the largest module in the dump (the training step)."""
    files = glob.glob(os.path.join(directory, "*after_optimizations-buffer-assignment.txt"))
    if not files:
        raise FileNotFoundError(f"no *after_optimizations-buffer-assignment.txt in {directory}")
    return max(files, key=os.path.getsize)


def _temp_allocation(text: str) -> tuple[int, str]:
    """(size, text) of the largest preallocated-temp allocation of the default memory space."""
    blocks = re.split(r"\n(?=allocation \d+:)", text)
    temps = [
        b for b in blocks
        if "preallocated-temp" in b.split("\n", 1)[0] and "color" not in b.split("\n", 1)[0]
    ]  # fmt: skip
    sizes = [int(re.search(r"size (\d+)", b).group(1)) for b in temps]
    i = max(range(len(temps)), key=sizes.__getitem__)
    return sizes[i], temps[i]


def _union(slices) -> int:
    """Bytes covered by (offset, size) slices (values may share a slice)."""
    total, end = 0, -1
    for start, stop in sorted((o, o + z) for o, z in slices):
        if start > end:
            total += stop - start
        elif stop > end:
            total += stop - end
        end = max(end, stop)
    return total


def read(directory: str, top: int = 12) -> dict:
    """The heap of the largest module dumped in `directory`.

    Returns:
      {"allocation": bytes, "live_peak": bytes, "fragmentation": allocation - live_peak,
       "live_peak_without_loop_state": the live peak not counting loop-state values (phis),
       "peak_values": [[shape, bytes], ...] the `top` largest values live at the peak}.
    """
    assignment = _largest_module(directory)
    with open(assignment) as f:
        allocation, block = _temp_allocation(f.read())
    with open(assignment.replace("-buffer-assignment.txt", "-live-range.txt")) as f:
        live_text = f.read()
    section = live_text[live_text.index("BufferLiveRange:") : live_text.index("Live ranges at")]
    ranges = {
        m.group(1).removesuffix("{}"): (int(m.group(2)), int(m.group(3)))
        for m in re.finditer(r"^\s+(\S+):(\d+)-(\d+)$", section, re.M)
    }
    at = collections.defaultdict(list)  # position -> live (offset, size, shape, loop state?)
    for name, phi, size, offset, shape in _VALUE.findall(block):
        first, last = ranges[name.removesuffix("{}")]
        for t in range(first, last + 1):
            at[t].append((int(offset), int(size), shape.split("{")[0], bool(phi)))
    peak_at = max(at, key=lambda t: _union((o, z) for o, z, _, _ in at[t]))
    live = at[peak_at]
    peak = _union((o, z) for o, z, _, _ in live)
    # The same without the values that carry a loop's state (phis): the compiler's reported
    # temporaries exceed the allocation by about allocation minus this on most grid points.
    without_phis = max(_union((o, z) for o, z, _, phi in vs if not phi) for vs in at.values())
    distinct = {(o, z): shape for o, z, shape, _ in live}  # one entry per slice
    largest = sorted(distinct.items(), key=lambda kv: -kv[0][1])[:top]
    return {
        "allocation": allocation,
        "live_peak": peak,
        "fragmentation": allocation - peak,
        "live_peak_without_loop_state": without_phis,
        "peak_values": [[shape, size] for (_, size), shape in largest],
    }
