"""CLI commands of this package, registered on the main typer app by cli.py: ``bench``, ``profile``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich import box
from rich.table import Table

from ..bars import Bars


def _ms(v: float) -> str:
    return f"{v:,.1f}" if v >= 100 else f"{v:,.2f}" if v >= 1 else f"{v:.3f}"


def render_bench(console, result) -> None:
    from .report import fmt_res, headline_label
    from .results import SPREAD

    p = result.protocol
    stat = headline_label(result)
    short = "median" if stat == "median" else "mean"
    names = {"ort": "onnxruntime", "executorch": "ExecuTorch (XNNPACK)", "litert": "LiteRT (XNNPACK)",
             "torch": "eager PyTorch"}
    runtimes = result.runtime.split(",")
    several = len(runtimes) > 1
    rt = " vs ".join(names.get(r, r) for r in runtimes)
    explain = "" if short == "median" else "mean = mean of the trimmed round means · runs = rounds × kept per round · "
    t = Table(title=f"bench · protocol {p.name} · {rt} · batch {p.batch} · {result.threads} thread(s)",
              caption=f"{explain}spread = {SPREAD} of the kept runs · MACs per image · "
                      f"GFLOP/s = 2 × MACs / {short}")
    flags_by = []
    for tm in result.timings:
        flags = []
        if tm.source == "file":
            flags.append("file")
        if tm.stopped_early:
            flags.append("[yellow]budget[/]")
        flags_by.append(" ".join(flags))
    t.add_column("model", no_wrap=True)
    t.add_column("res", justify="right", no_wrap=True)
    if several:
        t.add_column("runtime", no_wrap=True)
    if p.headline == "img/s":
        t.add_column("img/s", justify="right")
    for name in (f"{short} ms", "spread ms", "±%", "runs", "GMACs", "GFLOP/s"):
        t.add_column(name, justify="right")
    if several:
        t.add_column(f"× {runtimes[0]}", justify="right")
    if any(flags_by):
        t.add_column("note")
    first = {(tm.model, tm.res): tm for tm in result.timings if tm.runtime == runtimes[0]}
    for tm, flags in zip(result.timings, flags_by):
        row = [tm.model, fmt_res(tm.res)] + ([tm.runtime] if several else [])
        if p.headline == "img/s":
            row.append(f"{tm.images_per_s:,.1f}")
        row += [_ms(tm.headline_ms), _ms(tm.spread_ms), f"{100 * tm.spread_ms / tm.headline_ms:.0f}",
                f"{tm.rounds}×{tm.runs // tm.rounds}" if tm.rounds > 1 else f"{tm.runs:,}",
                "—" if tm.macs is None else f"{tm.macs_per_image / 1e9:.3g}",
                "—" if tm.gflops is None else f"{tm.gflops:.1f}"]
        if several:
            base = first.get((tm.model, tm.res))
            row.append("" if base is None or base is tm else f"{tm.headline_ms / base.headline_ms:.2f}")
        if any(flags_by):
            row.append(flags)
        t.add_row(*row, end_section=several and tm.runtime == runtimes[-1])
    console.print(t)
    env = result.env
    console.print(f"[dim]environment: {env.one_line()}[/]", highlight=False)
    if env.busy:
        console.print(f"[yellow]the machine was busy (load {env.load_average[0]:.1f} on {env.cpus_available} CPUs): "
                      "timings are inflated and noisy; re-run on an idle machine for figures to quote[/]",
                      highlight=False)
    console.print(f"[dim]protocol {p.name}: {p.summary}[/]", highlight=False)
    overrides = []
    if result.threads != p.threads:
        overrides.append(f"{result.threads} thread(s) instead of {p.threads}")
    if result.runs != p.runs:
        overrides.append(f"{result.runs:,} runs{' per round' if p.rounds > 1 else ''} instead of {p.runs:,}")
    if overrides:
        console.print(f"[yellow]overridden: {', '.join(overrides)}[/]", highlight=False)
    for d in p.differs:
        console.print(f"[dim]differs from the paper: {d}[/]", highlight=False)
    if result.cache_dir:
        console.print(f"[dim]exports cached in {result.cache_dir}[/]", highlight=False)
    for tm in result.timings:
        for n in tm.notes:
            if tm.runtime == "torch" and n.startswith("eager"):
                continue
            console.print(f"[yellow]{tm.model}@{fmt_res(tm.res)}{f' ({tm.runtime})' if several else ''}: {n}[/]",
                          highlight=False)


def _share(v: float) -> str:
    return f"{100 * v:.1f}%"


def render_profiles(console, profiles, top: int) -> None:
    from .profile import COMPUTE, GROUP_ORDER, MEMORY

    first = profiles[0]
    head = f"{first.model} at {first.res[0]}×{first.res[1]} · {first.threads} thread(s) · {first.runs} profiled runs"
    what = ("ExecuTorch ETDump events: XNNPACK operators inside the delegate, portable kernels outside"
            if first.runtime == "executorch" else "onnxruntime op types after its graph optimisations")
    console.print(f"[bold]profile[/] {head} · {what}", highlight=False)
    labels = [f"passes {p.passes}" for p in profiles]

    split = Table(title="memory-bound vs compute-bound (share of kernel time)")
    split.add_column("", no_wrap=True)
    for lab in labels:
        split.add_column(lab, justify="right")
    split.add_row("run time (profiled, median)", *(f"{_ms(p.run_ms)} ms" for p in profiles))
    split.add_row("kernel time per run", *(f"{_ms(p.kernel_ms)} ms" for p in profiles))
    split.add_row("nodes executed", *(str(p.node_count) for p in profiles))
    split.add_row(f"[bold]{COMPUTE}[/] (conv, matmul, gemm)", *(f"[bold]{_share(p.compute_share)}[/]" for p in profiles))
    split.add_row("  of which depthwise conv", *(_share(p.share(p.depthwise_ms)) for p in profiles))
    split.add_row(f"[bold]{MEMORY}[/]", *(f"[bold]{_share(p.memory_share)}[/]" for p in profiles))
    for g in GROUP_ORDER[1:-1]:
        if any(g in p.groups_ms for p in profiles):
            split.add_row(f"  {g}", *(_share(p.share(p.groups_ms.get(g, 0.0))) for p in profiles))
    if any(p.other_ms for p in profiles):
        split.add_row("other (unclassified)", *(_share(p.share(p.other_ms)) for p in profiles))
    console.print(split)
    console.print("[dim]kernel time: per node, the median over the profiled runs, summed (robust to a busy "
                  "machine); run time: wall time of a whole profiled run, waiting included[/]", highlight=False)

    ops = Table(title="per op type (per run: sum over its nodes of each node's median)", box=box.SIMPLE_HEAD,
                caption="class: C compute-bound, M memory-bound, ? unclassified")
    ops.add_column("op type", no_wrap=True)
    ops.add_column("class", justify="center")
    multi = len(profiles) > 1
    ops.add_column("nodes" + (f"\n{' → '.join(p.passes for p in profiles)}" if multi else ""), justify="right")
    for what in ("ms", "share"):
        for p in profiles:
            ops.add_column(what + (f"\n{p.passes}" if multi else ""), justify="right")
    by = [{o.op_type: o for o in p.ops} for p in profiles]
    order = sorted({k for d in by for k in d}, key=lambda k: -max(d[k].ms if k in d else 0 for d in by))
    for k in order:
        o = next(d[k] for d in by if k in d)
        counts = [str(d[k].nodes) if k in d else "0" for d in by]
        row = [k, {COMPUTE: "C", MEMORY: "M"}.get(o.cls, "?"),
               counts[0] if len(set(counts)) == 1 else " → ".join(counts)]
        row += [_ms(d[k].ms) if k in d else "—" for d in by]
        row += [_share(d[k].share) if k in d else "—" for d in by]
        ops.add_row(*row)
    console.print(ops)

    for p, lab in zip(profiles, labels):
        nodes = Table(title=f"slowest {min(top, len(p.nodes))} nodes · {lab}")
        for col, just in (("node\n[dim]module[/]", "left"), ("op", "left"), ("output", "left"), ("ms", "right"),
                          ("share", "right")):
            nodes.add_column(col, justify=just, overflow="fold")
        for n in p.nodes[:top]:
            op = n.op_type + (" (depthwise)" if n.depthwise else "") + (f"\n+{n.fused} fused" if n.fused else "")
            name = n.name + (f"\n[dim]{n.module}[/]" if n.module else "")
            nodes.add_row(name, op, "×".join(map(str, n.output_shape or [])), _ms(n.ms), _share(n.share))
        console.print(nodes)
        for note in p.notes:
            console.print(f"[yellow]{lab}: {note}[/]", highlight=False)


def register(app, console, handle_errors) -> None:
    @app.command("bench")
    @handle_errors
    def bench(
        models: str = typer.Argument(..., help="Comma-separated model names, 'all', or paths to exported .onnx files."),
        res: Optional[str] = typer.Option(None, "--res", help="Comma-separated resolutions, N or HxW "
                                          "(default: each model's own). Static .onnx files keep theirs."),
        protocol: str = typer.Option("iphone12", "--protocol", "-p", help="iphone12 | modelbench | shvit-cpu"),
        runtime: str = typer.Option("ort", "--runtime", help="ort (the exported ONNX file in onnxruntime) | executorch (the exported .pte, XNNPACK) | litert (the exported .tflite in LiteRT's interpreter, XNNPACK) | torch (eager PyTorch); several, comma-separated (ort,executorch,litert), give one table side by side."),
        threads: Optional[int] = typer.Option(None, "--threads", help="Intra-op threads (default: the protocol's)."),
        runs: Optional[int] = typer.Option(None, "--runs", help="Timed runs (per round for modelbench; "
                                           "default: the protocol's)."),
        max_seconds: Optional[float] = typer.Option(None, "--max-seconds", help="Stop timing one model × "
                                                    "resolution after this long (at least 10 runs / one round); "
                                                    "the table marks it."),
        passes: str = typer.Option("default", "--passes", help="Export passes: default | none | name,name,..."),
        json_out: Optional[Path] = typer.Option(None, "--json", help="Write all results (with every run) as JSON."),
        csv_out: Optional[Path] = typer.Option(None, "--csv", help="Write one row per model × resolution as CSV."),
        plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG plot of latency vs resolution."),
        cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Where exports are cached (default: "
                                                 "$EDGEVIT_EXPORT_CACHE/bench or ~/.cache/edgevit-export/bench)."),
        features: Optional[str] = typer.Option(None, "--features", help="Time the backbones (export --features): "
                                               "bare for all outputs, or e.g. s16,s32."),
    ):
        """Latency under a phone-like protocol (default iphone12): median ms, spread, MACs, GFLOP/s."""
        from .report import check_output, write_csv, write_json, write_plot
        from .runner import run_bench

        json_p = check_output(json_out, ".json", "--json")
        csv_p = check_output(csv_out, ".csv", "--csv")
        plot_p = check_output(plot, ".png", "--plot")
        with Bars(console, transient=True, eta=True) as bars:
            result = run_bench(models, res, protocol=protocol, runtime=runtime, threads=threads, runs=runs,
                               passes=passes, cache_dir=cache_dir, max_seconds=max_seconds, features=features,
                               progress=bars)
        render_bench(console, result)
        for p, write in ((json_p, write_json), (csv_p, write_csv), (plot_p, write_plot)):
            if p is not None:
                write(result, p)
                console.print(f"[bold green]wrote[/] {p}", highlight=False)

    @app.command("profile")
    @handle_errors
    def profile(
        model: str = typer.Argument(..., help="A model name or the path of an exported .onnx file."),
        res: Optional[str] = typer.Option(None, "--res", help="Resolution, N or HxW (default: the model's)."),
        passes: str = typer.Option("default", "--passes", help="default | none | name,name,... ; "
                                   "'none,default' profiles both side by side."),
        compare: bool = typer.Option(False, "--compare", help="Also profile the export without passes, side by side."),
        threads: int = typer.Option(2, "--threads", help="Intra-op threads (iphone12 protocol: 2)."),
        runs: int = typer.Option(50, "--runs", help="Profiled runs (after 5 warm-up runs)."),
        top: int = typer.Option(15, "--top", help="How many of the slowest nodes to list."),
        json_out: Optional[Path] = typer.Option(None, "--json", help="Write the aggregated profile as JSON."),
        cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Where exports are cached."),
        runtime: str = typer.Option("ort", "--runtime", help="ort (onnxruntime's profiler) | executorch (ETDump + "
                                    "Inspector: every XNNPACK operator and portable kernel)."),
    ):
        """Per-op profile (onnxruntime's profiler, or ExecuTorch's ETDump): time shares, memory- vs compute-bound."""
        from ..errors import EdgeExportError
        from .profile import run_profile
        from .report import check_output, write_atomic

        if top < 1:
            raise EdgeExportError(f"--top must be at least 1, got {top}")
        json_p = check_output(json_out, ".json", "--json")
        with Bars(console, transient=True, eta=True) as bars:
            profiles = run_profile(model, res, passes=passes, compare=compare, threads=threads, runs=runs,
                                   cache_dir=cache_dir, runtime=runtime, progress=bars)
        render_profiles(console, profiles, top)
        if json_p is not None:
            data = {"profiles": [p.as_dict() for p in profiles]}
            write_atomic(json_p, (json.dumps(data, indent=2) + "\n").encode())
            console.print(f"[bold green]wrote[/] {json_p}", highlight=False)
