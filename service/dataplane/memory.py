"""How much memory the service may use for request and answer data, and a counter to admit by it.

:func:`detect_budget` reads the container's memory limit (cgroup v2 ``memory.max``, else cgroup v1
``memory.limit_in_bytes``) and takes off what the process already uses (the JAX runtime and the
compiled variants) and a safety margin. Without a limit it falls back to a fixed default, or to a
fraction of the machine's memory when that is smaller. ``SURROGATE_MEMORY_BUDGET`` overrides it.

:class:`MemoryBudget` is the admission counter: a request reserves the bytes it will hold (its
decoded arrays, its result, its encoded answer) before it computes, and releases them when done.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "DEFAULT_BUDGET",
    "MARGIN",
    "MemoryBudget",
    "budget_from_settings",
    "cgroup_limit",
    "detect_budget",
    "own_rss",
]

#: The budget when the container sets no memory limit (capped by :data:`HOST_FRACTION` of MemTotal).
DEFAULT_BUDGET = 1 << 30
#: Share of the container limit kept free for what the budget does not count (allocator slack,
#: Python objects, buffers of the server itself).
MARGIN = 0.10
#: Without a container limit, the budget is at most this share of the machine's memory.
HOST_FRACTION = 0.25
#: Limits at or above this are "no limit" (cgroup v1 writes a page-rounded 2**63 - 1 for none).
UNLIMITED = 1 << 60
#: The smallest budget ever returned: a limit so tight that little is left still serves small requests.
MIN_BUDGET = 16 << 20


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except (OSError, ValueError):
        return None
    if text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return value if 0 < value < UNLIMITED else None


def cgroup_limit(root: Path | str = "/sys/fs/cgroup") -> int | None:
    """The container's memory limit in bytes, or None when there is none (or none readable)."""
    root = Path(root)
    v2 = root / "memory.max"
    if v2.exists():
        return _read_int(v2)
    return _read_int(root / "memory" / "memory.limit_in_bytes")


def _mem_total(meminfo: Path) -> int | None:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def own_rss(status: Path | str = "/proc/self/status") -> int:
    """This process's resident memory in bytes (0 where /proc is not available)."""
    try:
        for line in Path(status).read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def detect_budget(
    own_rss: int,
    *,
    cgroup_root: Path | str = "/sys/fs/cgroup",
    meminfo: Path | str = "/proc/meminfo",
    default: int = DEFAULT_BUDGET,
) -> tuple[int, str]:
    """The bytes of request data the process may hold at once, and where the figure comes from.

    With a container limit: ``limit * (1 - MARGIN) - own_rss`` (at least ``MIN_BUDGET``), source
    ``"cgroup"``. Without one: ``default``, or ``HOST_FRACTION`` of MemTotal when that is smaller,
    source ``"default"`` or ``"meminfo"``. ``own_rss`` is the process's footprint when the budget is
    taken (after the warm-up, so that the compiled variants are in it).
    """
    limit = cgroup_limit(cgroup_root)
    if limit is not None:
        return max(int(limit * (1 - MARGIN)) - max(own_rss, 0), MIN_BUDGET), "cgroup"
    total = _mem_total(Path(meminfo))
    if total is not None and int(total * HOST_FRACTION) < default:
        return max(int(total * HOST_FRACTION), MIN_BUDGET), "meminfo"
    return default, "default"


def budget_from_settings(configured: int | None) -> tuple[int, str]:
    """``SURROGATE_MEMORY_BUDGET`` when set (source ``"setting"``), else :func:`detect_budget`."""
    if configured is not None:
        return configured, "setting"
    return detect_budget(own_rss())


class MemoryBudget:
    """A count of reserved bytes against a capacity.

    Not thread-safe, and needs not be: it is used from the event loop only (one thread; nothing is
    awaited between the check and the update in :meth:`try_acquire`). Callers in worker threads
    must hand their calls to the loop (``loop.call_soon_threadsafe``).
    """

    __slots__ = ("capacity", "in_use", "peak")

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        self.capacity = int(capacity)
        self.in_use = 0
        self.peak = 0

    @property
    def available(self) -> int:
        return self.capacity - self.in_use

    def try_acquire(self, n: int) -> bool:
        """Reserve ``n`` bytes if they fit; False (and nothing reserved) when they do not. A request
        larger than the whole capacity never fits."""
        if n < 0:
            raise ValueError("cannot acquire a negative number of bytes")
        if self.in_use + n > self.capacity:
            return False
        self.in_use += n
        self.peak = max(self.peak, self.in_use)
        return True

    def release(self, n: int) -> None:
        """Give back ``n`` bytes reserved by :meth:`try_acquire`."""
        if n < 0 or n > self.in_use:
            raise ValueError(f"releasing {n} bytes but {self.in_use} are in use")
        self.in_use -= n

    def __repr__(self) -> str:
        return f"MemoryBudget(in_use={self.in_use}, capacity={self.capacity})"
