"""Command line: parse, call the API, render with rich. Thin by design.

Exit codes: 0 success · 1 a check failed · 2 bad input or usage.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from .calibration.data import OVERRIDE_HELP as PRE_HELP
from .errors import CheckFailed, EdgeExportError


def _no_metavar(get_help_option):
    def get(ctx):
        opt = get_help_option(ctx)
        if opt is not None and opt.metavar is None:
            opt.metavar = ""
        return opt
    return get


class _OneLineErrors(TyperGroup):
    """Usage errors (an unknown option, a missing argument, a value of the wrong type) in the same
    one line as every other user error, instead of typer's boxed panel; exit 2."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for cmd in [self, *self.commands.values()]:   # a flag takes no value: no "<bool>" in --help
            for p in cmd.params:
                if getattr(p, "is_flag", False) and p.metavar is None:
                    p.metavar = ""
            cmd.get_help_option = _no_metavar(cmd.get_help_option)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.TyperException as e:   # typer's own click: UsageError, BadParameter, NoSuchOption, …
            if type(e).__name__ == "NoArgsIsHelpError":
                e.show()
                code = 0
            else:
                ctx = getattr(e, "ctx", None)
                hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
                msg = " ".join(e.format_message().split())
                err_console.print(f"[bold red]error:[/] {msg}{hint}", highlight=False, soft_wrap=True)
                code = getattr(e, "exit_code", 2)
        except typer.Abort:
            err_console.print("[bold red]error:[/] aborted", highlight=False)
            code = 1
        else:
            code = rv if isinstance(rv, int) else 0
        if not standalone_mode:
            return code
        sys.exit(code)


app = typer.Typer(cls=_OneLineErrors, add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="Export efficient vision transformers to ONNX, Core ML, ExecuTorch and LiteRT; check, "
                       "quantize, benchmark.")


def _version(value: bool) -> None:
    if value:
        from . import __version__

        console.print(f"edgevit-export {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit."),
          verbose: bool = typer.Option(False, "--verbose", "-v",
                                       help="Show the runtimes' own log lines and warnings (kept out of normal "
                                            "output), e.g. for a bug report.")):
    """Export efficient vision transformers to ONNX, Core ML, ExecuTorch and LiteRT; check, quantize, benchmark."""
    from .quiet import VERBOSE_ENV

    if verbose:
        os.environ[VERBOSE_ENV] = "1"


console = Console()
err_console = Console(stderr=True)


def _quiet_libraries() -> None:
    from .quiet import verbose

    if verbose():
        return
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    for name in ("torch", "torch.onnx", "torch.export", "torch._export", "coremltools", "onnxscript", "root"):
        logging.getLogger(name).setLevel(logging.ERROR)


USER_OS_ERRORS = {errno.ENAMETOOLONG, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR,
                  errno.ELOOP, errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def handle_errors(fn):
    """User mistakes → one line on stderr and exit 2; failed checks → exit 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .progress import sticky_interrupts

        _quiet_libraries()
        try:
            with sticky_interrupts():
                return fn(*args, **kwargs)
        except EdgeExportError as e:
            err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2)
        except CheckFailed as e:
            err_console.print(f"[bold red]check failed:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(1)
        except OSError as e:
            if e.errno not in USER_OS_ERRORS:
                raise
            # a path the user named that the system refuses (too long, not permitted, full disk)
            where = f": {str(e.filename)[:120]}{'…' if len(str(e.filename)) > 120 else ''}" if e.filename else ""
            err_console.print(f"[bold red]error:[/] {e.strerror}{where}; check the paths given",
                              highlight=False, soft_wrap=True)
            raise typer.Exit(2)
        except KeyboardInterrupt:   # staged files are gone by now (artifacts.staging)
            err_console.print("interrupted: nothing was written", highlight=False)
            raise typer.Exit(130)

    return wrapper


FEATURES_HELP = ("Export the backbone: no pooling or classifier; outputs are the feature maps detection and "
                 "segmentation heads take, named by stride (feat_s8, feat_s16, ...). Bare: all of them; or a subset, e.g. "
                 "--features s16,s32 ('edgevit-export info MODEL' lists them).")


def _tag_note(model: str, weights) -> None:
    """A timm name with its pretrained tag (``fastvit_t8.apple_in1k``): say what it means here."""
    if "." not in model:
        return
    from .registry import canonical_name

    name = canonical_name(model)
    tail = "" if weights else "; nothing is downloaded: give the checkpoint with --weights FILE"
    console.print(f"[yellow]{model}: timm's pretrained tag '{model.split('.', 1)[1]}' names weights, "
                  f"not a model — this is {name}{tail}[/]", highlight=False, soft_wrap=True)


def _fmt_m(v: float | None, digits: int = 1) -> str:
    return "—" if v is None else f"{v:,.{digits}f}"


@app.command("list")
@handle_errors
def list_cmd(
    family: Optional[str] = typer.Option(None, help="Only this family (e.g. SHViT)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """Every model: params and MACs at its default resolution next to the paper's († where the params disagree; info says why)."""
    from .api import summarize
    from .registry import get_model_info, list_models

    names = list_models()
    if family:
        names = [n for n in names if get_model_info(n).family.lower() == family.lower()]
        if not names:
            raise EdgeExportError(f"no models in family '{family}'; run 'edgevit-export list' to see families")
    rows = []
    with console.status("measuring params and MACs…"):
        for n in names:
            rows.append(summarize(n))
    if as_json:
        console.print_json(json.dumps([r.__dict__ for r in rows]))
        return
    t = Table(title="edgevit-export models (params and MACs measured here; top-1 is the paper's)")
    t.add_column("model", no_wrap=True)
    for col in ("res", "params M", "paper", "MMACs", "paper", "top-1"):
        t.add_column(col, justify="right", no_wrap=True)
    for r in rows:
        mark = "" if r.params_agree else " †"
        t.add_row(r.name, str(r.default_res), f"{r.params / 1e6:.2f}{mark}", _fmt_m(r.paper_params_m),
                  f"{r.macs / 1e6:,.0f}", _fmt_m(r.paper_macs_m, 0), _fmt_m(r.paper_top1))
    console.print(t)
    if not all(r.params_agree for r in rows):
        console.print("† differs from the paper's printed figure by more than 1% and its rounding; "
                      "'edgevit-export info MODEL' says why.")


@app.command()
@handle_errors
def info(
    model: str = typer.Argument(..., help="Model name (see 'edgevit-export list')."),
    res: Optional[str] = typer.Option(None, "--res", help="Input size: N or HxW (default: the model's)."),
):
    """Params, MACs at a resolution, and each stage's feature-map shape and token count."""
    from .api import info as api_info

    r = api_info(model, res)
    _tag_note(model, weights=None)
    s = r.summary
    console.print(f"[bold]{s.name}[/] — {s.family}, {s.paper}")
    console.print(f"input {r.res[0]}×{r.res[1]} · params {s.params / 1e6:.2f} M · MACs {s.macs / 1e6:,.1f} M"
                  f" (paper at {s.default_res}: {_fmt_m(s.paper_params_m)} M params, "
                  f"{_fmt_m(s.paper_macs_m, 0)} MMACs, top-1 {_fmt_m(s.paper_top1)})")
    from .calibration.data import Preprocess

    console.print(f"takes H, W multiples of {r.info.res_multiple}, at least {r.info.min_res}; "
                  f"normalisation mean {r.info.mean} std {r.info.std}")
    console.print(f"eval transform (quantize, evaluate, run): {Preprocess.of_model(r.info, r.res).describe()}",
                  highlight=False)
    if r.info.preprocess_source:
        console.print(f"  source: {r.info.preprocess_source}", highlight=False)
    if s.params_note:
        delta = s.params / 1e6 / s.paper_params_m - 1
        console.print(f"params vs paper: {delta:+.1%} — {s.params_note}")
    if s.weights_note:
        console.print(f"weights: {s.weights_note}")
    t = Table()
    for col in ("stage", "output shape", "channels", "tokens"):
        t.add_column(col, justify="left" if col in ("stage", "output shape") else "right")
    for st in r.stages:
        t.add_row(st.name, "×".join(str(d) for d in st.shape), str(st.channels), f"{st.tokens:,}")
    console.print(t)
    f = Table(title="backbone outputs (export --features)", title_justify="left")
    for col in ("output", "stride", "channels", "shape", "from"):
        f.add_column(col, justify="right" if col in ("stride", "channels") else "left")
    for feat, shape in r.features:
        f.add_row(feat.name, str(feat.stride), str(feat.channels), "×".join(str(d) for d in shape),
                  feat.module + (f" → {feat.norm}" if feat.norm else ""))
    console.print(f)


def render_bundle(manifest_path: Path, manifest: dict) -> None:
    """What an export wrote, file by file (the manifest's ``bundle``), and a head without names."""
    folder = manifest_path.parent
    lab = manifest.get("labels") or {}
    golden = manifest.get("golden") or {}
    art = manifest.get("artifact")
    what = {art: f"the model, {_size(folder / art)}" if (folder / art).exists() else "the model",
            lab.get("file"): f"class names ({lab.get('source')})",
            manifest_path.name: "manifest: io recipe, checks",
            golden.get("file"): "inputs + PyTorch outputs, for check"}
    files = manifest.get("bundle") or [art, manifest_path.name]
    console.print(f"[bold green]wrote[/] {len(files)} files to {folder}/", highlight=False)
    width = max(len(f) for f in files)
    app_code = "Swift" if manifest.get("format") == "coreml" else "Kotlin"
    for f in files:
        desc = what.get(f) or (f"how to feed it ({app_code})" if f.endswith(".md") else "")
        console.print(f"  {f:<{width}}  {desc}", highlight=False)
    if lab.get("source") == "none":
        console.print(f"[yellow]note:[/] {lab['note']}", highlight=False)


@app.command()
@handle_errors
def export(
    model: str = typer.Argument(..., help="Model name (see 'edgevit-export list')."),
    format: str = typer.Option("onnx", "--format", "-f", help="onnx | coreml | pte | tflite"),
    res: Optional[str] = typer.Option(None, "--res", help="Input size: N or HxW (default: the model's)."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Checkpoint (.pth/.pt or .safetensors), official or timm layout."),
    out: Path = typer.Option(Path("exports"), "--out", help="Output directory."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Exact artifact path (overrides --out)."),
    opset: int = typer.Option(18, help="ONNX opset (17 or newer)."),
    batch: int = typer.Option(1, help="Static batch size."),
    passes: str = typer.Option("default", help="default | none | name,name,... (see 'edgevit-export passes')."),
    distilled: Optional[bool] = typer.Option(None, "--distilled/--no-distilled",
                                             help="Distillation head (default: detected from the checkpoint)."),
    target: str = typer.Option("iOS16", help="Core ML deployment target: iOS16 | iOS17 | iOS18."),
    precision: str = typer.Option("fp16", help="Core ML compute precision: fp16 | fp32."),
    tensor_input: bool = typer.Option(False, "--tensor-input", help="Core ML: plain normalised float input 'images'."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="Class names, one per line (default: the "
                                          "checkpoint's, or ImageNet-1k for a 1000-class head); written beside "
                                          "the artifact, and into a Core ML classifier."),
    logits: bool = typer.Option(False, "--logits", help="Core ML: raw logits output instead of a classifier."),
    layout: str = typer.Option("nchw", "--layout", help="LiteRT: input layout nchw (PyTorch's) | nhwc (an interleaved camera/bitmap buffer)."),
    crop_pct: Optional[str] = typer.Option(None, "--crop-pct",
                                           help=PRE_HELP["crop_pct"] + " Recorded in the manifest."),
    interpolation: Optional[str] = typer.Option(None, "--interpolation", help=PRE_HELP["interpolation"]),
    mean: Optional[str] = typer.Option(None, "--mean", help=PRE_HELP["mean"] + " What the artifact expects "
                                       "(Core ML: baked into the image input's normalisation)."),
    std: Optional[str] = typer.Option(None, "--std", help=PRE_HELP["std"]),
    features: Optional[str] = typer.Option(None, "--features", help=FEATURES_HELP),
    no_check: bool = typer.Option(False, "--no-check", help="Skip the parity/structure checks."),
    force: bool = typer.Option(False, "--force", help="Replace existing files."),
):
    """Capture → op-rewrite passes → ONNX / Core ML / ExecuTorch / LiteRT → check against PyTorch."""
    from . import api

    started = time.perf_counter()

    def progress(event):
        if event.task == "build model":
            _tag_note(model, weights)
        if event.task == "build model" and weights is None:  # inputs are valid by now
            console.print(f"[yellow]no --weights: {model} is randomly initialised (seed 0); "
                          "the artifact is for testing the pipeline, not for predictions[/]")
        bars(event)

    from .bars import Bars

    with Bars(console) as bars:
        r = api.export(model, format=format, res=res, weights=str(weights) if weights else None, out=out,
                       output=output, opset=opset, batch=batch, check=not no_check, force=force,
                       passes=passes, distilled=distilled, target=target, precision=precision,
                       tensor_input=tensor_input, labels=str(labels) if labels else None, logits=logits,
                       layout=layout, crop_pct=crop_pct, interpolation=interpolation, mean=mean, std=std,
                       features=features, progress=progress)
    render_passes(r.pipeline)
    if r.manifest.get("padding"):
        console.print(f"[yellow]{r.res[0]}x{r.res[1]} is not a multiple of what {model} takes: {r.manifest['padding']}[/]",
                      highlight=False)
    render_checks(r.checks)
    render_bundle(r.manifest_path, r.manifest)
    console.print(f"[dim]{time.perf_counter() - started:.1f}s in all[/]")
    if not r.passed:
        failed = [k for k, c in r.checks.items() if not c.get("passed", True)]
        fp16 = r.manifest["backend"].get("precision") == "fp16"
        hint = ("; the model loses accuracy in fp16 — export with --precision fp32"
                if failed == ["parity"] and fp16 else "")
        raise CheckFailed(f"{', '.join(failed)} did not pass (artifact kept for inspection: {r.artifact}){hint}")


def _size(p: Path) -> str:
    from .exporters.artifacts import size_bytes

    return f"{size_bytes(p) / 1e6:.1f} MB"


def render_passes(pipe) -> None:
    if not pipe.passes:
        console.print("[dim]passes: none[/]")
        return
    t = Table(title="op-rewrite passes (graph before → after)")
    for col in ("pass", "rewrites", "nodes", "reshape", "permute", "rank", "rel err"):
        t.add_column(col, justify="left" if col == "pass" else "right", no_wrap=True)
    for p in pipe.passes:
        b, a = p.before, p.after
        row = [p.name, str(p.changed), f"{b.nodes}→{a.nodes}", f"{b.reshape}→{a.reshape}",
               f"{b.permute}→{a.permute}", f"{b.max_rank}→{a.max_rank}", f"{p.max_rel_err:.0e}"]
        t.add_row(*row)
    console.print(t)
    for p in pipe.passes:
        if p.refused:
            console.print(f"[yellow]pass {p.name} refused:[/] {p.refused}", highlight=False)


def render_checks(checks: dict) -> None:
    for name, c in checks.items():
        ok = c.get("passed", True)
        mark = "[green]PASS[/]" if ok else "[red]FAIL[/]"
        if c.get("gated") is False:
            mark = "[cyan]INFO[/]"
        if "max_rel" in c:
            cos = f" ≥ {c['min_cosine']:g}" if c.get("min_cosine") else ""
            agree = f"top-1 agreement {c['top1_agree'] * 100:.0f}% " if "top1_agree" in c else ""
            per = c.get("outputs")
            console.print(f"{mark} {name} vs {c.get('reference', 'pytorch')}: max abs {c['max_abs']:.2e}, "
                          f"max rel {c['max_rel']:.2e} (≤ {c['tolerance']:g}{', worst ' + c['worst'] if per else ''}),"
                          f" cosine {c['cosine']:.6f}{cos}, {agree}over {c['samples']} inputs", highlight=False)
            for out, o in (per or {}).items():   # a backbone: each feature map on its own scale
                console.print(f"     {out}: max rel {o['max_rel']:.2e}, cosine {o['cosine']:.6f}", highlight=False)
            if c.get("note"):
                console.print(f"     [dim]{c['note']}[/]", highlight=False)
        else:
            console.print(f"{mark} {name}: {c.get('summary', '')}")


@app.command("passes")
@handle_errors
def passes_cmd():
    """The op-rewrite passes, one line each, and the default pipeline per format."""
    from .exporters import FORMATS
    from .passes import PASSES

    t = Table(title="op-rewrite passes (✓: in the format's default pipeline)", show_lines=True)
    t.add_column("pass: what it rewrites", ratio=1, overflow="fold")
    for fmt in FORMATS:
        t.add_column(fmt, justify="center", no_wrap=True)
    for name, p in PASSES.items():
        t.add_row(f"[bold]{name}[/]\n[dim]{p.summary}[/]", *("✓" if name in f.passes else "" for f in FORMATS.values()))
    console.print(t)


@app.command("inspect")
@handle_errors
def inspect_cmd(
    model: str = typer.Argument(..., help="Model name (see 'edgevit-export list')."),
    res: Optional[str] = typer.Option(None, "--res", help="Input size: N or HxW (default: the model's)."),
    format: str = typer.Option("onnx", "--format", "-f", help="onnx | coreml | pte | tflite (which default pipeline; each also shows how its runtime takes the graph, before and after)."),
    passes: str = typer.Option("default", help="default | none | name,name,..."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """Mobile-unfriendliness report before and after the pass pipeline, each finding with its source."""
    from dataclasses import asdict

    from . import api

    with console.status("capturing and rewriting…") as status:
        r = api.inspect(model, res=res, format=format, passes=passes, progress=lambda e: status.update(f"{e.task}…"))
    if as_json:
        print(json.dumps(asdict(r), indent=2, default=str))
        return
    console.print(f"[bold]{r.model}[/] at {r.res[0]}×{r.res[1]}, {r.format} pipeline: "
                  f"{', '.join(r.passes) or 'no passes'}")
    t = Table(title="graph before → after the passes")
    t.add_column("finding")
    t.add_column("before", justify="right")
    t.add_column("after", justify="right")
    t.add_row("total ops", str(r.before["nodes"]), str(r.after["nodes"]))
    t.add_row("max tensor rank", str(r.before["max_rank"]), str(r.after["max_rank"]))
    notes = []     # where and why, under the table: module paths are too long for a cell at 80 columns
    for fb, fa in zip(r.findings_before, r.findings_after):
        style = "green" if fa.count < fb.count else ("red" if fa.count else "")
        notes.append((fb.what, fa.examples or fb.examples, "after" if fa.examples else "before", fb.source))
        t.add_row(f"{fb.what} [{len(notes)}]", str(fb.count), f"[{style}]{fa.count}[/]" if style else str(fa.count))
    console.print(t)
    for i, (what, where, when, source) in enumerate(notes, 1):
        console.print(f"[{i}] {what}: {source}", highlight=False)
        for w in where:
            console.print(f"    {when}: {w}", highlight=False, soft_wrap=True)
    if r.runtime:
        rt = Table(title=f"{r.runtime['title']}: before → after the passes")
        rt.add_column("")
        rt.add_column("before", justify="right", overflow="fold")
        rt.add_column("after", justify="right", overflow="fold")
        for label, before in r.runtime["before"]["rows"].items():
            rt.add_row(label, str(before), str(r.runtime["after"]["rows"].get(label, "")))
        console.print(rt)


@app.command("run")
@handle_errors
def run_cmd(
    artifact: Path = typer.Argument(..., help="An exported .onnx or .mlpackage."),
    image: Optional[list[Path]] = typer.Option(None, "--image", "-i", help="Image file(s); repeat the flag. "
                                               "Without: one seeded input."),
    top: int = typer.Option(5, "--top", help="How many classes to show."),
    crop_pct: Optional[str] = typer.Option(None, "--crop-pct", help=PRE_HELP["crop_pct"].replace(
        "the model's, see 'info'", "the manifest's")),
    interpolation: Optional[str] = typer.Option(None, "--interpolation", help=PRE_HELP["interpolation"].replace(
        "the model's", "the manifest's")),
    mean: Optional[str] = typer.Option(None, "--mean", help=PRE_HELP["mean"] + " Not for artifacts that "
                                       "normalise inside the graph."),
    std: Optional[str] = typer.Option(None, "--std", help=PRE_HELP["std"]),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """Run an artifact here with the preprocessing its manifest records: top-k labels, output statistics."""
    from dataclasses import asdict

    from . import api

    with console.status("running…") as status:
        r = api.run(artifact, images=image, top=top, crop_pct=crop_pct, interpolation=interpolation, mean=mean,
                    std=std, progress=lambda e: status.update(f"{e.task}…"))
    if as_json:
        print(json.dumps(asdict(r), indent=2, default=str))
        return
    console.print(f"[bold]{r.artifact.name}[/] in {r.runtime}  [dim]({r.seconds:.2f}s)[/]", highlight=False)
    console.print(f"[dim]input: {r.preprocess}[/]", highlight=False)
    if r.random_init:
        what = "its classes" if r.predictions else "its outputs"
        console.print(f"[yellow]this artifact was exported with random weights: {what} mean nothing[/]")
    for p in r.predictions:
        console.print(f"[bold]{p.source}[/] — {r.probabilities}:", highlight=False, soft_wrap=True)
        t = Table()
        t.add_column("#", justify="right")
        t.add_column("class")
        t.add_column("probability", justify="right")
        for k, (label, prob) in enumerate(p.top, 1):
            t.add_row(str(k), label, f"{prob:.4f}")
        console.print(t)
    t = Table(title="outputs", title_justify="left")
    for col in ("name", "shape", "min", "max", "mean", "std"):
        t.add_column(col, justify="left" if col in ("name", "shape") else "right")
    for o in r.outputs:
        t.add_row(o.name, "×".join(map(str, o.shape)), f"{o.min:.4g}", f"{o.max:.4g}", f"{o.mean:.4g}", f"{o.std:.4g}")
    console.print(t)


@app.command("check")
@handle_errors
def check_cmd(
    artifact: Path = typer.Argument(..., help="An exported .onnx or .mlpackage (its manifest beside it)."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Recompute PyTorch's outputs from this "
                                           "checkpoint (default: the golden file written at export)."),
):
    """Re-run an artifact's parity check against PyTorch; exit 1 when it fails."""
    from . import api

    with console.status("checking…") as status:
        r = api.check(artifact, weights=str(weights) if weights else None,
                      progress=lambda e: status.update(f"{e.task}…"))
    if not r.sha256_matches:
        console.print(f"[yellow]{r.artifact.name} differs from the file its manifest describes (sha256)[/]")
    render_checks({"parity": r.parity})
    if not r.passed:
        raise CheckFailed(f"{r.artifact.name} does not match PyTorch within its gate "
                          f"(max rel {r.parity['max_rel']:.2e} > {r.parity['tolerance']:g}"
                          + (f" or cosine {r.parity['cosine']:.6f} < {r.parity['min_cosine']:g}"
                             if r.parity.get("min_cosine") else "") + ")")


def _register_commands() -> None:
    from .bench.commands import register as register_bench
    from .calibration.commands import register as register_quantize

    register_bench(app, console, handle_errors)
    register_quantize(app, console, handle_errors)


_register_commands()


# Options whose value may be left out: given bare, they take this value (typer has no optional values).
OPTIONAL_VALUES = {"--features": "all"}


def argv(args: list[str]) -> list[str]:
    """``--features`` given bare (last, or followed by another option) → ``--features all``."""
    out = []
    for i, a in enumerate(args):
        out.append(a)
        if a in OPTIONAL_VALUES and (i + 1 == len(args) or args[i + 1].startswith("-")):
            out.append(OPTIONAL_VALUES[a])
    return out


def main() -> None:
    try:
        app(args=argv(sys.argv[1:]), standalone_mode=True)
    except KeyboardInterrupt:   # outside a command (while importing, say)
        err_console.print("interrupted: nothing was written", highlight=False)
        sys.exit(130)


if __name__ == "__main__":
    main()
