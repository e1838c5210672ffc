"""The keep-float rescue: which nodes to keep in float when int8 costs too much, found by measuring.

A tensor's own quantization error says little about what it does to the prediction (a conv output
whose one outlier channel stretches its scale has a fine SQNR and ruins the layers after it). So,
as NNCF's accuracy-control quantization does, every candidate is *tried*:

1. **Rank** — each candidate (the known transformer culprits first: attention products, norms,
   GELU, residual adds, first and last layer; then the sensitivity table's worst tensors) is kept
   float on its own, the program re-quantized with the same calibration, and its logits on a few
   held-out calibration images compared with the float model's (SQNR, dB). Candidates are ordered by
   how much they raise that SQNR; one that does not raise it is dropped.
2. **Revert greedily** — in that order, each candidate is added to the float set and the program
   evaluated on the evaluation images (the gate's own metric); a step that does not lower the drop
   (or, at equal drop, raise the logit SQNR) is undone. It stops within ``max_drop`` or after
   ``keep_float_max`` steps, and the program left built is the best one found, so the rescue never
   ships a worse drop than it started from.

The format supplies ``build(excluded) -> predictor``: quantize with those nodes float (the same
calibration) and return something that runs the new program; the rescue's last call to ``build``
is for the configuration it returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .. import metrics
from ..progress import Callback, emit
from . import accuracy as acc
from .results import KeepFloatStep

RANK_IMAGES = 32          # held-out calibration images each candidate is ranked on
MAX_CANDIDATES = 16       # candidates tried in the ranking (culprit groups first, then the table's worst),
CANDIDATES_PER_STEP = 3   # and at most this many per allowed step (--keep-float-max)
SENSITIVITY_CANDIDATES = 8   # of which at most this many of the sensitivity table's rows


@dataclass
class Candidate:
    """Nodes to keep in float together, and why they are a suspect."""

    label: str                          # e.g. "attention products (4 MatMul)", "activation conv2d_12"
    nodes: list[str]
    source: str                         # "culprit" | "sensitivity"
    gain_db: float | None = None        # logit SQNR gained when kept float alone (after ranking)

    def as_dict(self) -> dict:
        return {"label": self.label, "nodes": self.nodes, "source": self.source, "gain_db": self.gain_db}


def from_sensitivity(sens, limit: int) -> list[Candidate]:
    """The sensitivity table's suspects: the rows after whose consumers the error jumps most (an
    outlier that ruins the next layer), interleaved with the rows of worst own SQNR."""
    import math

    by_jump = sorted((s for s in sens if s.jump_db is not None and math.isfinite(s.jump_db)),
                     key=lambda s: -s.jump_db)
    picked, seen = [], set()
    for pair in zip(by_jump + [None] * len(sens), sens):
        for s in pair:
            if s is not None and s.tensor not in seen and len(picked) < limit:
                seen.add(s.tensor)
                picked.append(s)
    out = []
    for s in picked:
        own = f"{s.sqnr_db:.1f} dB own" if np.isfinite(s.sqnr_db) else "exact"
        jump = f", error +{s.jump_db:.1f} dB after it" if s.jump_db is not None and s.jump_db > 0.5 else ""
        out.append(Candidate(f"{s.kind} {s.tensor} ({s.op_type}, {own}{jump})", list(s.nodes), "sensitivity"))
    return out


def merge(culprits: list[Candidate], sens_candidates: list[Candidate], excluded: list[str],
          max_steps: int) -> list[Candidate]:
    """The table's first suspect, the culprit groups, then the rest of the table's rows; nothing
    already float, no node set twice; at most ``CANDIDATES_PER_STEP`` per step allowed."""
    limit = min(MAX_CANDIDATES, CANDIDATES_PER_STEP * max_steps)
    seen, out, already = set(), [], set(excluded)
    for c in sens_candidates[:1] + culprits + sens_candidates[1:]:
        nodes = [n for n in dict.fromkeys(c.nodes) if n not in already]
        key = frozenset(nodes)
        if not nodes or key in seen:
            continue
        seen.add(key)
        out.append(Candidate(c.label, nodes, c.source))
        if len(out) >= limit:
            break
    return out


@dataclass
class Rescue:
    steps: list[KeepFloatStep] = field(default_factory=list)
    ranking: list[Candidate] = field(default_factory=list)   # tried, best first (gain_db set)
    comparison: acc.Comparison | None = None                 # of the program left built; None: unchanged
    excluded: list[str] = field(default_factory=list)        # the float set of that program


def rescue(candidates: list[Candidate], excluded: list[str], lg: acc.Logits, ev_images, rank_images: list,
           float_fn, base_fn, build: Callable[[list[str]], Callable], opts, baseline: acc.Comparison,
           progress: Callback | None = None, what: str = "int8") -> Rescue:
    """Rank ``candidates`` on ``rank_images`` (preprocessed arrays), then revert them greedily
    against ``lg`` (the float logits of ``ev_images``), starting from ``excluded``, whose program
    ``base_fn`` runs and ``baseline`` measured."""
    out = Rescue(excluded=list(excluded))
    if not candidates:
        return out
    built = list(excluded)      # the float set of the program ``build`` left last

    def build_(excl: list[str]):
        nonlocal built
        built = list(excl)
        return build(excl)

    def logits(pred) -> np.ndarray:     # in chunks: a batch of 32 at 1024² does not fit in memory
        return np.concatenate([np.asarray(pred(np.stack(rank_images[i:i + 8])), np.float32)
                               for i in range(0, len(rank_images), 8)])

    ref = logits(float_fn) if rank_images else None

    def rank_sqnr(pred) -> float:
        return metrics.sqnr_db(ref, logits(pred))

    # 1. rank: each candidate alone on top of what is already float
    if rank_images:
        base_db = rank_sqnr(base_fn)
        for i, c in enumerate(candidates, 1):
            emit(progress, "rank keep-float candidates", i - 1, len(candidates))
            c.gain_db = rank_sqnr(build_(list(excluded) + c.nodes)) - base_db
        emit(progress, "rank keep-float candidates", len(candidates), len(candidates))
        ranked = sorted(candidates, key=lambda c: -c.gain_db)
        out.ranking = ranked
        order = [c for c in ranked if c.gain_db > 0.05]
    else:
        out.ranking = list(candidates)
        order = list(candidates)

    # 2. revert greedily, keeping only what helps on the evaluation images
    best, best_excl = baseline, list(excluded)
    images = list(ev_images) if len(ev_images) <= 2048 else ev_images   # read once, not each step
    for c in order:
        if len(out.steps) >= opts.keep_float_max or best.drop <= opts.max_drop:
            break
        trial = best_excl + [n for n in c.nodes if n not in best_excl]
        emit(progress, f"keep float: {c.label}"[:70])
        pred = build_(trial)
        lq = acc.collect_logits({"q": pred}, images, progress=progress,
                                task=f"evaluate {what} (keep-float step {len(out.steps) + 1})")
        cmp = acc.compare(lg.values["float"], lq.values["q"], lg.labels)
        better = cmp.drop < best.drop - 1e-9 or (abs(cmp.drop - best.drop) <= 1e-9
                                                  and cmp.agreement.sqnr_db > best.agreement.sqnr_db + 0.05)
        gain = f"; +{c.gain_db:.1f} dB logit SQNR alone on {len(rank_images)} held-out images" \
            if c.gain_db is not None else ""
        out.steps.append(KeepFloatStep([n for n in c.nodes if n not in best_excl], c.label + gain, len(trial),
                                       cmp.drop, kept=better))
        if better:
            best, best_excl = cmp, trial
    if built != best_excl:   # the last program built is not the best: build the best again
        emit(progress, "rebuild the best keep-float program")
        build(best_excl)
    out.comparison = best if best is not baseline else None
    out.excluded = best_excl
    return out
