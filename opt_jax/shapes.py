"""Shape bucketing and the bounded cache of compiled programs.

`generate`, log-likelihood scoring and the serving engine all pad variable lengths up to a
bucket, so that a handful of shapes compile instead of one per length, and keep the programs
they build for each static configuration in a bounded, thread-safe LRU cache (the server calls
them from several threads; an unbounded cache would keep every compiled executable alive).
"""

from __future__ import annotations

import collections
import math
import threading
from collections.abc import Callable, Hashable


def round_up(n: int, multiple: int) -> int:
    """The smallest positive multiple of `multiple` that is >= n (at least one bucket)."""
    if multiple <= 0:
        raise ValueError(f"bucket size must be positive, got {multiple}")
    return max(multiple, math.ceil(n / multiple) * multiple)


class ProgramCache:
    """A bounded LRU map from static keys to built programs, safe across threads.

    `get(key, build)` returns the program for `key`, calling `build()` outside the lock on a
    miss (tracing can take seconds; two threads racing on one key keep the first program).
    """

    def __init__(self, size: int):
        if size <= 0:
            raise ValueError(f"ProgramCache size must be positive, got {size}")
        self.size = size
        self._programs: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, build: Callable[[], object]):
        with self._lock:
            if key in self._programs:
                self._programs.move_to_end(key)
                return self._programs[key]
        program = build()
        with self._lock:
            program = self._programs.setdefault(key, program)
            self._programs.move_to_end(key)
            while len(self._programs) > self.size:
                self._programs.popitem(last=False)
        return program

    def clear(self) -> None:
        with self._lock:
            self._programs.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._programs)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._programs
