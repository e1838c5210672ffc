"""Will it fit? The peak memory of a model's forward pass, measured on the meta device, against
what this machine has available — checked before anything is allocated.

A resolution far too large (``--res 100000``) would otherwise end in the allocator's traceback
after minutes of work, or in the kernel's OOM killer. The forward pass runs on the meta device
(shapes only, no memory, ~0.1 s) under a dispatch mode that keeps the running total of the
activations alive — each tensor's storage counted while any tensor that an operator returned on it
is referenced — and its peak. An export holds more than one forward's activations at once
(PyTorch's reference outputs, the runtime's arena while it checks the artifact, the converter's
copy of the weights), so the request is refused when ``FACTOR`` times the activation peak, plus the
weights, exceeds the available memory; the error names the largest size that fits.
"""

from __future__ import annotations

import os
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .errors import ResolutionError

# What a command holds at its peak, in forward-pass activation peaks beyond the process's own
# footprint (ru_maxrss of exports of SHViT-S1 and FastViT-SA12 at 1024 and 2048 on this project's
# Linux machine, ONNX / Core ML / LiteRT / ExecuTorch: 3.0-5.4x; FastViT-SA12 ONNX at 2048, 6.9 GB).
FACTOR = 6.0
BASE = 1.5e9          # the process itself: torch, onnxruntime, coremltools and the converters imported
# quantize: onnxruntime's calibration makes every node's output a graph output, so one calibration
# batch holds all activations of the forward pass at once, not just the live ones
# (and training keeps them all for the backward pass)
ALL_OUTPUTS = {"quantize", "train"}


class _PeakLive(TorchDispatchMode):
    """Running total of the storages operators return, each counted until its last tensor dies."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = self.total = 0
        self.refs: dict[int, int] = {}

    def _release(self, key: int, nbytes: int) -> None:
        left = self.refs[key] - 1
        if left:
            self.refs[key] = left
        else:
            del self.refs[key]
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key, nbytes = storage._cdata, storage.nbytes()
                if key not in self.refs:
                    self.refs[key] = 0
                    self.live += nbytes
                    self.total += nbytes
                    self.peak = max(self.peak, self.live)
                self.refs[key] += 1
                weakref.finalize(t, self._release, key, nbytes)
        return out


@torch.no_grad()
def activations(model: torch.nn.Module, hw: tuple[int, int], batch: int = 1) -> tuple[float, float]:
    """(peak bytes of activations alive at once, bytes of all activations) in one forward pass of
    ``model`` (moved to the meta device; a meta skeleton stays where it is) at ``batch``×3×H×W,
    the input included. ``inf`` where the shapes overflow what the ops accept."""
    model = model.to("meta").eval()
    mode = _PeakLive()
    x = torch.empty(batch, 3, *hw, device="meta")
    try:
        with mode:
            model(x)
    except (RuntimeError, OverflowError, ValueError):   # sizes beyond int64 or what the ops accept
        return float("inf"), float("inf")
    inp = x.numel() * x.element_size()
    return float(mode.peak + inp), float(mode.total + inp)


def weights_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * 4 for p in model.parameters()) + sum(b.numel() * b.element_size() for b in model.buffers())


def available_bytes() -> float:
    """Memory this process can still take: MemAvailable, or less where a cgroup limit applies."""
    avail = float("inf")
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            avail = min(avail, int(limit) - used)
    except (OSError, ValueError):
        pass
    if avail == float("inf"):
        try:
            avail = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2   # macOS: half of RAM
        except (ValueError, OSError):
            pass
    return avail


def _gb(n: float) -> str:
    if n == float("inf"):
        return "more memory than any machine has"
    return "about " + (f"{n / 1e12:,.1f} TB" if n >= 1e12 else f"{n / 1e9:,.1f} GB") + " of memory"


def needed_bytes(skel: torch.nn.Module, hw: tuple[int, int], batch: int, what: str = "export",
                 per_pixel: float = 0.0) -> float:
    """``per_pixel``: bytes the command holds for each input pixel besides the forward pass (a
    training set drawn in memory)."""
    peak, total = activations(skel, hw, batch)
    return (BASE + 2 * weights_bytes(skel) + FACTOR * peak + (2 * total if what in ALL_OUTPUTS else 0)
            + per_pixel * hw[0] * hw[1])


def check_fits(name: str, info, hw: tuple[int, int], batch: int = 1, what: str = "export",
               features: bool = False, available: float | None = None, per_pixel: float = 0.0) -> float:
    """Refuse (ResolutionError) a resolution and batch whose estimated peak does not fit in the
    available memory, naming the largest size (same aspect ratio, the model's multiple) and the
    largest batch that do. Returns the estimate in bytes."""
    from .measure import skeleton

    skel = skeleton(info.builder)
    forward = skel
    if features:
        from .features import Backbone, feature_info
        forward = Backbone(skel, list(range(len(feature_info(skel)))))
    need = needed_bytes(forward, hw, batch, what, per_pixel)
    avail = available_bytes() if available is None else available
    if need <= avail:
        return need
    hint = _largest_fitting(forward, info, hw, batch, avail, what, per_pixel)
    size = f"{hw[0]}x{hw[1]}" + (f" at batch {batch}" if batch > 1 else "")
    have = f"{avail / 1e9:,.1f} GB"
    raise ResolutionError(f"{name} at {size} needs {_gb(need)} to {what} (estimated from its forward pass "
                          f"on the meta device) and this machine has {have} available; {hint}")


def _largest_fitting(forward, info, hw, batch, avail, what, per_pixel) -> str:
    m, smallest = info.res_multiple, info.min_res
    fits = lambda h, w, b=1: needed_bytes(forward, (h, w), b, what, per_pixel) <= avail   # noqa: E731
    hints = []
    if batch > 1 and fits(*hw):
        lo, hi = 1, batch          # fits at lo, not at hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(*hw, mid) else (lo, mid)
        hints.append(f"the largest batch that fits at this size is --batch {lo}")

    def size(k: int) -> tuple[int, int]:   # k multiples along the longer side, the aspect ratio kept
        long_, short = max(hw), min(hw)
        a, b = k * m, max(smallest, round(k * short / long_) * m)
        return (a, b) if hw[0] >= hw[1] else (b, a)

    lo_k = max(1, -(-smallest // m))
    b = batch if fits(*size(lo_k), batch) else 1
    if fits(*size(lo_k), b):
        lo, hi = lo_k, max(hw) // m    # fits at lo, not at hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(*size(mid), b) else (lo, mid)
        h, w = size(lo)
        res = str(h) if h == w else f"{h}x{w}"
        hints.append(f"the largest size that fits is --res {res}" + (" at --batch 1" if b != batch else ""))
    if not hints:
        return "not even its smallest size fits: close other programs or use a machine with more memory"
    return " or ".join(hints)
