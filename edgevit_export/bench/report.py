"""Bench results as rows (for tables), JSON, CSV and a PNG plot — every file written atomically."""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path

from ..errors import OutputError
from .results import SPREAD, BenchResult, Timing

CSV_FIELDS = ["model", "res", "batch", "runtime", "protocol", "threads", "headline_ms", "median_ms", "mean_ms",
              "p10_ms", "p90_ms", "spread_ms", "q1_ms", "q3_ms", "min_ms", "max_ms", "runs", "rounds",
              "warmup_runs", "macs_per_image", "macs", "gflops", "images_per_s", "source", "path", "cached",
              "stopped_early", "cpu", "onnxruntime", "torch", "date"]


def check_output(path: str | Path | None, suffix: str, option: str) -> Path | None:
    """Validate an output file path before any work: right suffix, not a directory, parent writable."""
    if path is None:
        return None
    p = Path(path).expanduser()
    if p.suffix.lower() != suffix:
        raise OutputError(f"{option} {p}: the file name must end in {suffix}")
    if p.is_dir():
        raise OutputError(f"{option} {p} is a directory; pass a file name ending in {suffix}")
    parent = p.parent
    probe = parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise OutputError(f"{option} {p}: cannot write in {parent}; pass a writable location")
    return p


def write_atomic(path: Path, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path`` and rename it into place."""
    path = Path(path).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror}; pass a writable location") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fmt_res(res) -> str:
    h, w = res
    return str(h) if h == w else f"{h}x{w}"


def rows(result: BenchResult) -> list[dict]:
    """One flat dict per model × resolution (CSV columns; the CLI table reads the same rows)."""
    out = []
    env = result.env
    for t in result.timings:
        d = t.as_dict(samples=False)
        d.update(res=fmt_res(t.res), protocol=result.protocol.name, cpu=env.cpu, onnxruntime=env.onnxruntime,
                 torch=env.torch, date=env.date)
        out.append({k: d.get(k) for k in CSV_FIELDS})
    return out


def to_json(result: BenchResult, samples: bool = True) -> str:
    return json.dumps(result.as_dict(samples), indent=2) + "\n"


def write_json(result: BenchResult, path: str | Path, samples: bool = True) -> Path:
    return write_atomic(Path(path), to_json(result, samples).encode())


def to_csv(result: BenchResult) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in rows(result):
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


def write_csv(result: BenchResult, path: str | Path) -> Path:
    return write_atomic(Path(path), to_csv(result).encode())


def headline_label(result: BenchResult) -> str:
    p = result.protocol
    return "mean of trimmed round means" if p.rounds > 1 else "median"


def markdown_table(result: BenchResult) -> str:
    """The bench table as GitHub markdown (for READMEs and benchmarks/results)."""
    p = result.protocol
    head = ["model", "res", "batch", f"{headline_label(result)} ms", f"spread ({SPREAD}) ms", "runs", "GMACs/img",
            "GFLOP/s"]
    if p.headline == "img/s":
        head.append("img/s")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    for t in result.timings:
        cells = [t.model, fmt_res(t.res), str(t.batch), f"{t.headline_ms:,.2f}", f"{t.spread_ms:,.2f}",
                 f"{t.runs:,}", "—" if t.macs is None else f"{t.macs_per_image / 1e9:.2f}",
                 "—" if t.gflops is None else f"{t.gflops:.1f}"]
        if p.headline == "img/s":
            cells.append(f"{t.images_per_s:,.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_png(result: BenchResult) -> bytes:
    """Latency against resolution per model (log-log: resolutions and times grow by factors; a
    p10–p90 band), and achieved GFLOP/s; with a single resolution, a ranking instead
    (see :func:`_plot_ranking`)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    if len({t.res for t in result.timings}) == 1 and len(result.timings) > 1:
        return _plot_ranking(result, plt)
    by_model: dict[str, list[Timing]] = {}
    for t in result.timings:
        by_model.setdefault(_label(result, t), []).append(t)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 5.4), gridspec_kw={"width_ratios": [3, 2]},
                                  layout="constrained")
    cmap = plt.get_cmap("tab10")
    all_res = sorted({t.res[0] * t.res[1] for t in result.timings})
    texts = []
    for i, (name, ts) in enumerate(sorted(by_model.items())):
        ts = sorted(ts, key=lambda t: t.res[0] * t.res[1])
        x = [(t.res[0] * t.res[1]) ** 0.5 for t in ts]
        y = [t.headline_ms for t in ts]
        c = cmap(i % 10)
        ax.plot(x, y, "o-", color=c, label=name, lw=2, ms=6)
        ax.fill_between(x, [t.p10_ms for t in ts], [t.p90_ms for t in ts], color=c, alpha=0.15, lw=0)
        # below and right of each point: latency lines rise to the right, so that side is clear
        texts += [_note(ax, _fmt(yi), (xi, yi), c, 7, -12) for xi, yi in zip(x, y)]
        g = [t.gflops for t in ts]
        if any(v is not None for v in g):
            ax2.plot([xi for xi, v in zip(x, g) if v is not None], [v for v in g if v is not None], "o-",
                     color=c, label=name, lw=2, ms=6)
    ticks = sorted({round(v ** 0.5) for v in all_res})
    for a in (ax, ax2):
        a.set_xscale("log")
        a.set_xticks(ticks)
        a.xaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:g}"))
        a.xaxis.set_minor_formatter(NullFormatter())
        a.grid(True, which="major", alpha=0.35)
        a.grid(True, which="minor", alpha=0.1)
        a.set_xlabel("input resolution, px (√(H·W) for non-square inputs; log scale)")
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.margins(x=0.1, y=0.15)
    ax2.margins(x=0.1)
    stat = headline_label(result)
    ax.set_ylabel(f"ms per batch of {result.protocol.batch} ({stat}; band p10–p90; log scale)")
    ax.set_title("latency vs resolution")
    ax.legend(loc="upper left", fontsize=9, frameon=True)
    ax2.set_ylabel("achieved GFLOP/s (2 × MACs / time)")
    ax2.set_title("achieved throughput")
    if ax2.lines:
        ax2.legend(loc="lower right", fontsize=9, frameon=True)
    ax2.set_ylim(bottom=0)
    _labels_apart(fig, texts)
    return _png(fig, plt, result)


def _fmt(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def _note(ax, text: str, xy, color, dx: float = 6, dy: float = 4):
    import matplotlib.patheffects as pe

    return ax.annotate(text, xy, textcoords="offset points", xytext=(dx, dy), fontsize=8, color=color,
                       path_effects=[pe.withStroke(linewidth=2.5, foreground="white")])


def _labels_apart(fig, texts, step: float = 9.0, tries: int = 10, leaders: bool = False) -> None:
    """Move annotations whose boxes overlap an earlier one up or down (alternately, in ``step``
    points) until they stand free, so that no value or name is printed over another; with
    ``leaders``, a label moved away from its point gets a thin line back to it."""
    if not texts:
        return
    fig.canvas.draw()         # limits and layout settle first: the boxes are then where they will print
    renderer = fig.canvas.get_renderer()
    placed = []
    for t in texts:
        x0, y0 = t.get_position()
        for k in range(tries + 1):
            shift = ((k + 1) // 2) * step * (1 if k % 2 else -1)
            t.set_position((x0, y0 + shift))
            box = t.get_window_extent(renderer).expanded(1.02, 1.1)
            if not any(box.overlaps(b) for b in placed):
                break
        placed.append(t.get_window_extent(renderer))
        if leaders and shift:
            t.axes.annotate("", t.xy, xytext=t.get_position(), textcoords="offset points",
                            arrowprops={"arrowstyle": "-", "lw": 0.5, "color": t.get_color(), "alpha": 0.6,
                                        "shrinkA": 0, "shrinkB": 3})


def _png(fig, plt, result: BenchResult) -> bytes:
    """Title the figure with protocol, runtime and machine; say on the figure when the machine was
    busy while it was timed; render it."""
    env = result.env
    names = {"ort": f"onnxruntime {env.onnxruntime}", "torch": f"PyTorch {env.torch}", "executorch": "ExecuTorch (XNNPACK)",
             "litert": "LiteRT (XNNPACK)"}
    rt = " vs ".join(names.get(r, r) for r in result.runtime.split(","))
    fig.suptitle(f"{rt} · protocol {result.protocol.name} · {result.threads} thread(s)\n"
                 f"{env.machine_line()} · {env.date[:10]}", fontsize=11)
    if env.busy:
        fig.supxlabel(f"the machine was busy when timing started (load {env.load_average[0]:.1f} on "
                      f"{env.cpus_available} CPUs): these times are slower than this machine can do",
                      color="#b00020", fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _label(result: BenchResult, t: Timing) -> str:
    """A model's name, with its runtime when the result holds several."""
    return f"{t.model} · {t.runtime}" if "," in result.runtime else t.model


def _family(name: str) -> str:
    from ..errors import UnknownModelError
    from ..registry import get_model_info

    try:
        return get_model_info(name).family
    except UnknownModelError:
        return "file"


def _plot_ranking(result: BenchResult, plt) -> bytes:
    """One resolution, many models: throughput (or latency) ranked on a linear axis, so that a bar
    twice as long is twice as fast, with p10–p90 whiskers and the value past each whisker,
    coloured by family; and latency against MACs per image (log-log: points, not lengths), which
    shows who beats their MACs."""
    p = result.protocol
    per_s = p.headline == "img/s"
    value = (lambda t: t.images_per_s) if per_s else (lambda t: t.headline_ms)  # noqa: E731
    ts = sorted(result.timings, key=value, reverse=per_s)
    fams = sorted({_family(t.model) for t in ts})
    cmap = plt.get_cmap("tab10")
    color = {f: cmap(i % 10) for i, f in enumerate(fams)}
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 0.32 * len(ts) + 2.6), gridspec_kw={"width_ratios": [3, 2]},
                                  layout="constrained")
    y = list(range(len(ts)))[::-1]
    vals = [value(t) for t in ts]
    if per_s:  # whiskers from the latency quantiles, converted
        lo = [v - t.batch * 1000 / t.p90_ms for v, t in zip(vals, ts)]
        hi = [t.batch * 1000 / t.p10_ms - v for v, t in zip(vals, ts)]
    else:
        lo = [v - t.p10_ms for v, t in zip(vals, ts)]
        hi = [t.p90_ms - v for v, t in zip(vals, ts)]
    lo, hi = [max(0.0, v) for v in lo], [max(0.0, v) for v in hi]
    ax.barh(y, vals, xerr=[lo, hi], color=[color[_family(t.model)] for t in ts], alpha=0.85,
            error_kw={"lw": 1, "capsize": 2})
    ax.set_yticks(y)
    ax.set_yticklabels([_label(result, t) for t in ts], fontsize=9)
    for yi, v, h in zip(y, vals, hi):
        ax.annotate(_fmt(v), (v + h, yi), textcoords="offset points", xytext=(4, 0), va="center", fontsize=8)
    ax.set_xlim(0, max(v + h for v, h in zip(vals, hi)) * 1.12)
    ax.set_ylim(-0.6, len(ts) - 0.4)
    ax.set_xlabel("images per second (whiskers: p10–p90 run)" if per_s
                  else f"ms per batch of {p.batch} ({headline_label(result)}; whiskers p10–p90)")
    ax.set_title(f"fastest at the top · {fmt_res(ts[0].res)} px, batch {p.batch}")
    ax.grid(True, axis="x", alpha=0.25)
    texts = []
    for f in fams:
        sel = [t for t in ts if _family(t.model) == f and t.macs]
        ax2.scatter([t.macs_per_image / 1e6 for t in sel], [t.headline_ms / t.batch for t in sel], color=color[f],
                    label=f, s=28)
        texts += [_note(ax2, _label(result, t), (t.macs_per_image / 1e6, t.headline_ms / t.batch), color[f], 5, 2)
                  for t in sel]
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("MMACs per image (log scale)")
    ax2.set_ylabel("ms per image (log scale)")
    ax2.set_title("latency vs MACs per image")
    ax2.grid(True, which="both", alpha=0.2)
    ax2.margins(x=0.15, y=0.1)
    ax2.legend(fontsize=8, loc="upper left")
    _labels_apart(fig, texts, leaders=True)
    return _png(fig, plt, result)


def write_plot(result: BenchResult, path: str | Path) -> Path:
    return write_atomic(Path(path), plot_png(result))
