"""CLI commands of this package, registered on the main typer app by cli.py:
``quantize``, ``evaluate``, and the demo helpers ``shapes`` and ``train-shapes``."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from ..bars import Bars
from .data import OVERRIDE_HELP as PRE_HELP


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}%"


def _db(v: float | None) -> str:
    if v is None:
        return "—"
    return "∞" if not math.isfinite(v) else f"{v:.1f}"


def _mb(n: int | None) -> str:
    return "—" if n is None else f"{n / 1e6:.1f} MB"


def _skips(console: Console, what: str, non_images: int, corrupt: list) -> None:
    if non_images:
        console.print(f"[yellow]{what}: skipped {non_images} non-image file{'s' if non_images != 1 else ''}[/]")
    for path, reason in corrupt[:10]:
        console.print(f"[yellow]{what}: skipped corrupt image {path} ({reason})[/]", highlight=False)
    if len(corrupt) > 10:
        console.print(f"[yellow]{what}: and {len(corrupt) - 10} more corrupt images (listed in the manifest)[/]")


def render_quantize(console: Console, r) -> None:
    c = r.comparison
    ev = r.evaluation
    cand = "compressed" if r.format == "coreml" else "int8"
    src = {"coreml": "PyTorch emulation", "pte": "ExecuTorch, the saved .pte",
           "tflite": "LiteRT, the saved .tflite"}.get(r.format, "onnxruntime")
    t = Table(title=f"{r.model} {r.res[0]}x{r.res[1]} — float vs {cand} ({src}) on {ev.images} images of "
                    f"{ev.source}{'' if ev.labelled else ' (no labels)'}")
    for col in ("", "float", cand, "change"):
        t.add_column(col, justify="left" if not col else "right")
    if c.labelled:
        t.add_row("top-1", _pct(c.float_topk.top1), _pct(c.quant_topk.top1),
                  f"{c.quant_topk.top1 - c.float_topk.top1:+.2f} pts")
        t.add_row(f"top-{c.float_topk.k}", _pct(c.float_topk.top5), _pct(c.quant_topk.top5),
                  f"{c.quant_topk.top5 - c.float_topk.top5:+.2f} pts")
    a = c.agreement
    t.add_row("top-1 agreement", "", _pct(a.top1_agree), "")
    t.add_row("logit cosine (mean / min)", "", f"{a.cosine:.4f} / {a.min_cosine:.4f}", "")
    t.add_row("logit SQNR", "", f"{_db(a.sqnr_db)} dB", "")
    fb = r.sizes.get("float_bytes")
    qb = r.sizes.get("int8_bytes", r.sizes.get("compressed_bytes"))
    t.add_row("size", _mb(fb), _mb(qb), f"{qb / fb:.2f}×" if fb and qb else "")
    console.print(t)
    if r.baseline is not None:
        b = r.baseline
        console.print(f"before --keep-float: {b.drop_label} {b.drop:.2f}")
    if r.ranking:
        rk = Table(title="--keep-float auto: candidates ranked by the logit SQNR each gains when kept float alone")
        for col in ("#", "candidate", "nodes", "gain"):
            rk.add_column(col, justify="right" if col in ("#", "nodes", "gain") else "left")
        for i, c in enumerate(r.ranking, 1):
            rk.add_row(str(i), c.label, str(len(c.nodes)), "" if c.gain_db is None else f"{c.gain_db:+.1f} dB")
        console.print(rk)
    if r.steps:
        st = Table(title="--keep-float auto: candidates kept float in ranked order (undone where the drop did not fall)")
        for col in ("step", "candidate", "float nodes", "drop", "kept"):
            st.add_column(col, justify="right" if col in ("step", "float nodes", "drop") else "left")
        for i, s in enumerate(r.steps, 1):
            st.add_row(str(i), s.because.split("; ")[0], str(s.excluded), f"{s.drop:.2f}",
                       "kept" if s.kept else "undone")
        console.print(st)
        if r.excluded:
            console.print(f"kept in float (for --keep-float): {','.join(r.excluded)}", highlight=False, soft_wrap=True)
    if r.sensitivity:
        stt = Table(title="per-layer sensitivity (int8 error, worst first; SQNR in dB, higher is better)")
        for col in ("#", "kind", "tensor", "op", "own Q/DQ", "vs float"):
            stt.add_column(col, justify="right" if col in ("#", "own Q/DQ", "vs float") else "left",
                           overflow="fold")
        for i, s in enumerate(r.sensitivity[:10], 1):
            stt.add_row(str(i), s.kind, s.tensor, s.op_type, _db(s.sqnr_db), _db(s.xmodel_db))
        console.print(stt)
        # the node names to copy, whole, under the table (a table cell would cut them at 80 columns)
        console.print("to keep a row float: --keep-float NODES, with NODES:", highlight=False)
        for i, s in enumerate(r.sensitivity[:10], 1):
            console.print(f"  {i:>2}  {','.join(s.nodes)}", highlight=False, soft_wrap=True)
    if r.calibration is not None:
        cal = r.calibration
        console.print(f"calibration: {r.method}, {cal.images} images from {cal.source} "
                      f"(file list sha256 {cal.files_sha256[:12]}); {cal.preprocess}", highlight=False)
        _skips(console, "calibration", cal.non_images, cal.corrupt)
    _skips(console, "evaluation", ev.non_images, ev.corrupt)
    console.print(f"scheme: {r.scheme}" + (f"; kept in float: {len(r.excluded)} nodes" if r.excluded else ""))
    for n in r.notes:
        style = "bold yellow" if n.startswith("SYNTHETIC") or "randomly initialised" in n else "yellow"
        console.print(f"[{style}]note: {n}[/]", highlight=False)


def render_evaluate(console: Console, r) -> None:
    t = Table(title=f"accuracy on {r.dataset.root} ({'PyTorch' if r.kind == 'pytorch' else 'onnxruntime'})")
    for col in ("model", "input", "images", "classes", "top-1", f"top-{r.topk.k}", "seconds"):
        t.add_column(col, justify="left" if col == "model" else "right")
    t.add_row(r.model, f"{r.res[0]}x{r.res[1]}", str(r.topk.images), str(len(r.dataset.classes)),
              _pct(r.topk.top1), _pct(r.topk.top5), f"{r.seconds:.1f}")
    console.print(t)
    if len(r.per_class) <= 20:
        pc = Table(title="top-1 per class")
        pc.add_column("class")
        pc.add_column("images", justify="right")
        pc.add_column("top-1", justify="right")
        counts = r.dataset.per_class
        for name, v in r.per_class.items():
            pc.add_row(name, str(counts.get(name, 0)), _pct(v))
        console.print(pc)
    if r.preprocess:
        console.print(f"preprocess: {r.preprocess}", highlight=False)
    _skips(console, "data", r.dataset.non_images, r.corrupt)
    for n in r.notes:
        console.print(f"[yellow]note: {n}[/]", highlight=False)


def register(app, console, handle_errors) -> None:
    @app.command("quantize")
    @handle_errors
    def quantize_cmd(
        model: str = typer.Argument(..., help="Model name (see 'edgevit-export list') or a float FILE.onnx."),
        res: Optional[str] = typer.Option(None, "--res", help="Input size: N or HxW (default: the model's)."),
        weights: Optional[Path] = typer.Option(None, "--weights", help="Checkpoint (.pth/.pt or .safetensors) for a model name."),
        calib: Optional[str] = typer.Option(None, "--calib", help="Calibration image folder (any nesting), or "
                                                                  "'synthetic' for a smoke run (not for shipping)."),
        calib_size: int = typer.Option(256, "--calib-size", help="Calibration images to use."),
        method: str = typer.Option("minmax", "--method", help="Calibration: minmax | entropy | percentile (onnx); "
                                                               "minmax | histogram (pte, tflite)."),
        per_channel: bool = typer.Option(True, "--per-channel/--per-tensor", help="Weight scales per output "
                                                                                 "channel (default) or per tensor."),
        reduce_range: Optional[bool] = typer.Option(None, "--reduce-range/--no-reduce-range",
                                                    help="ONNX: 7-bit weights, exact on every CPU (default); "
                                                         "--no-reduce-range for VNNI x86 or ARM targets."),
        eval_dir: Optional[Path] = typer.Option(None, "--eval", help="Evaluation folder: labelled (one sub-folder "
                                                                     "per class) for top-1/top-5, else agreement."),
        labels: Optional[Path] = typer.Option(None, "--labels", help="Class order for --eval: one folder name "
                                                                     "per line (default: sorted folder names)."),
        eval_size: Optional[int] = typer.Option(None, "--eval-size", help="Evaluate on at most N images."),
        max_drop: float = typer.Option(1.0, "--max-drop", help="Gate: top-1 drop in points (without labels: "
                                                               "top-1 disagreement in %); exceeding it exits 1."),
        keep_float: Optional[str] = typer.Option(None, "--keep-float", help="'auto' (keep the most sensitive "
                                                                            "nodes float until within --max-drop) "
                                                                            "or NODE,NODE,..."),
        keep_float_max: int = typer.Option(12, "--keep-float-max", help="--keep-float auto: at most N steps "
                                                                        "(ranking up to 3N candidates)."),
        format: str = typer.Option("onnx", "--format", "-f", help="onnx (int8 QDQ) | pte (int8 ExecuTorch, "
                                                                  "XNNPACK) | tflite (int8 LiteRT, XNNPACK) | "
                                                                  "coreml (weight compression)."),
        int8_io: bool = typer.Option(False, "--int8-io", help="LiteRT: int8 input and output tensors (default: "
                                                              "float, quantized inside the model)."),
        weights_bits: Optional[int] = typer.Option(None, "--weights-bits", help="Core ML: 8 (linear int8 weights, "
                                                                                "the default)."),
        palettize: Optional[int] = typer.Option(None, "--palettize", help="Core ML: 4 | 6 | 8-bit palettized "
                                                                          "weights (k-means)."),
        sensitivity: Optional[int] = typer.Option(None, "--sensitivity", help="Images for the per-layer "
                                                  "sensitivity table (default: 8 when the gate fails or with "
                                                  "--keep-float auto; 0: skip)."),
        out: Path = typer.Option(Path("exports"), "--out", help="Output directory."),
        threads: int = typer.Option(2, "--threads", help="CPU threads for onnxruntime / PyTorch."),
        force: bool = typer.Option(False, "--force", help="Replace existing files."),
        crop_pct: Optional[str] = typer.Option(None, "--crop-pct", help=PRE_HELP["crop_pct"] + " For an .onnx: "
                                               "default its manifest's."),
        interpolation: Optional[str] = typer.Option(None, "--interpolation", help=PRE_HELP["interpolation"]),
        mean: Optional[str] = typer.Option(None, "--mean", help=PRE_HELP["mean"]),
        std: Optional[str] = typer.Option(None, "--std", help=PRE_HELP["std"]),
    ):
        """Quantize (int8 QDQ ONNX, int8 ExecuTorch .pte, int8 LiteRT .tflite, or Core ML weight compression) and
        measure what it cost in accuracy."""
        from .quantize import quantize

        if weights is None and not model.endswith(".onnx"):
            console.print(f"[yellow]no --weights: {model} is randomly initialised (seed 0); accuracy figures "
                          "mean nothing for it[/]")
        if calib == "synthetic" and format != "coreml":
            console.print("[bold yellow]--calib synthetic: drawn shapes, a smoke run of the pipeline — not for "
                          "shipping; calibrate on real images from your domain[/]")
        started = time.perf_counter()
        with Bars(console) as bars:
            r = quantize(model, res=res, weights=str(weights) if weights else None, calib=calib,
                         calib_size=calib_size, method=method, per_channel=per_channel, reduce_range=reduce_range,
                         eval_dir=eval_dir, labels=labels, eval_size=eval_size, max_drop=max_drop,
                         keep_float=keep_float, keep_float_max=keep_float_max, format=format,
                         weights_bits=weights_bits, palettize=palettize,
                         sensitivity_samples=sensitivity, out=out, force=force, threads=threads, int8_io=int8_io,
                         crop_pct=crop_pct, interpolation=interpolation, mean=mean, std=std,
                         progress=bars)
        render_quantize(console, r)
        if not r.gated:
            console.print(f"[cyan]INFO[/] {r.comparison.drop_label}: {r.drop:.2f} (--max-drop {r.max_drop:g} "
                          f"{'holds' if r.within else 'exceeded'}); {r.gate_note}", highlight=False)
        else:
            mark = "[green]PASS[/]" if r.passed else "[red]FAIL[/]"
            console.print(f"{mark} {r.comparison.drop_label}: {r.drop:.2f} (≤ {r.max_drop:g})")
        from ..cli import render_bundle     # the same listing as export's: every file of the bundle

        render_bundle(r.manifest_path, r.manifest)
        console.print(f"[dim]{time.perf_counter() - started:.1f}s in all[/]")
        if not r.passed:
            from ..errors import CheckFailed

            hint = "" if r.format == "coreml" or r.steps else "; try --keep-float auto"
            raise CheckFailed(f"{r.comparison.drop_label} is {r.drop:.2f} > --max-drop {r.max_drop:g}{hint} "
                              f"(artifact kept for inspection: {r.artifact})")

    @app.command("evaluate")
    @handle_errors
    def evaluate_cmd(
        model: str = typer.Argument(..., help="Model name (PyTorch) or an .onnx artifact."),
        data: Path = typer.Option(..., "--data", help="Labelled folder: one sub-folder per class (ImageNet-style)."),
        res: Optional[str] = typer.Option(None, "--res", help="Input size for a model name (default: the model's)."),
        weights: Optional[Path] = typer.Option(None, "--weights", help="Checkpoint (.pth/.pt or .safetensors) for a model name."),
        labels: Optional[Path] = typer.Option(None, "--labels", help="Class order: one folder name per line "
                                                                     "(default: sorted folder names)."),
        limit: Optional[int] = typer.Option(None, "--limit", help="Evaluate on at most N images (spread over "
                                                                  "classes)."),
        threads: int = typer.Option(2, "--threads", help="CPU threads."),
        crop_pct: Optional[str] = typer.Option(None, "--crop-pct", help=PRE_HELP["crop_pct"] + " For an .onnx: "
                                               "default its manifest's."),
        interpolation: Optional[str] = typer.Option(None, "--interpolation", help=PRE_HELP["interpolation"]),
        mean: Optional[str] = typer.Option(None, "--mean", help=PRE_HELP["mean"]),
        std: Optional[str] = typer.Option(None, "--std", help=PRE_HELP["std"]),
    ):
        """Top-1/top-5 of a model or an ONNX artifact on a labelled image folder."""
        from .evaluation import evaluate

        if weights is None and not model.endswith(".onnx"):
            console.print(f"[yellow]no --weights: {model} is randomly initialised (seed 0); its accuracy means "
                          "nothing[/]")
        with Bars(console) as bars:
            r = evaluate(model, data, res=res, weights=str(weights) if weights else None, labels=labels,
                         limit=limit, threads=threads, crop_pct=crop_pct, interpolation=interpolation, mean=mean,
                         std=std, progress=bars)
        render_evaluate(console, r)

    @app.command("shapes")
    @handle_errors
    def shapes_cmd(
        out: Path = typer.Argument(..., help="Folder to write (one sub-folder per class)."),
        per_class: int = typer.Option(100, "--per-class", help="Images per class."),
        size: int = typer.Option(73, "--size", help="Image side in pixels (73 → 64 after center crop)."),
        seed: int = typer.Option(3, "--seed", help="Draw seed (training uses 1 and 2)."),
        domain: str = typer.Option("shapes", "--domain", help="shapes | textures (told apart by hue in "
                                                               "small steps: harder on int8)."),
    ):
        """Write the procedurally drawn 10-class shapes set, ImageNet-style (for demos and tests)."""
        from ..errors import EdgeExportError
        from .shapes import DOMAINS, write_shapes

        from dataclasses import replace

        from ..exporters import artifacts

        if per_class < 1 or not 16 <= size <= 4096 or per_class > 100_000:
            raise EdgeExportError("--per-class must be 1 to 100000 and --size 16 to 4096")
        if domain not in DOMAINS:
            raise EdgeExportError(f"--domain must be one of {' | '.join(DOMAINS)}, not {domain!r}")
        out = artifacts.check_out_dir(out)
        with Bars(console) as bars, artifacts.staging(out) as tmp:   # drawn aside, then moved in: never half a set
            s = write_shapes(tmp, per_class, size=size, seed=seed, domain=domain, progress=bars)
            artifacts.commit_all([(tmp / c, out / c) for c in s.classes], force=True)
        s = replace(s, root=out)
        console.print(f"[bold green]wrote[/] {s.count} images in {len(s.classes)} classes to {s.root}")

    @app.command("train-shapes")
    @handle_errors
    def train_shapes_cmd(
        out: Path = typer.Option(Path("shapes-demo"), "--out", help="Folder for the checkpoint and data."),
        model: str = typer.Option("shvit_s1", "--model", help="Zoo model to train (10-class head)."),
        res: int = typer.Option(64, "--res", help="Training resolution."),
        per_class: int = typer.Option(200, "--per-class", help="Training images per class."),
        epochs: int = typer.Option(10, "--epochs"),
        threads: Optional[int] = typer.Option(None, "--threads", help="Default: 2, or 1 on a busy machine."),
        force: bool = typer.Option(False, "--force", help="Replace an existing checkpoint."),
        domain: str = typer.Option("shapes", "--domain", help="shapes | textures (told apart by hue in "
                                                               "small steps: harder on int8)."),
    ):
        """Demo: train a small model on drawn shapes, and write calibration and test folders for it."""
        from ..errors import EdgeExportError, OutputError
        from .shapes import DOMAINS, write_shapes
        from .train import TEST_SEED, TRAIN_SEED, draw_size, train_shapes

        if domain not in DOMAINS:
            raise EdgeExportError(f"--domain must be one of {' | '.join(DOMAINS)}, not {domain!r}")
        from ..exporters import artifacts

        from .options import check_threads

        check_threads(threads)
        out = artifacts.check_out_dir(out)
        ckpt = out / (f"{model}-shapes-{res}.pth" if domain == "shapes" else f"{model}-{domain}-{res}.pth")
        if ckpt.exists() and not force:
            raise OutputError(f"{ckpt} already exists; pass --force to retrain")
        with Bars(console) as bars, artifacts.staging(out) as tmp:   # all three land together, or nothing
            r = train_shapes(tmp / ckpt.name, model=model, res=res, per_class=per_class, epochs=epochs,
                             threads=threads, domain=domain, progress=bars)
            write_shapes(tmp / "calib", 30, size=draw_size(res), seed=TRAIN_SEED, domain=domain, progress=bars)
            write_shapes(tmp / "test", 100, size=draw_size(res), seed=TEST_SEED, domain=domain, progress=bars)
            names = ckpt.with_name(f"{ckpt.stem}.labels.txt")     # the head's classes, in order (also in the .pth)
            (tmp / names.name).write_text("\n".join(r.classes) + "\n", encoding="utf-8")
            artifacts.commit_all([(tmp / ckpt.name, ckpt), (tmp / names.name, names), (tmp / "calib", out / "calib"),
                                  (tmp / "test", out / "test")], force=True)
        t = Table(title=f"{model} trained on drawn {domain} at {res}px")
        for col in ("train images", "epochs", "train top-1", "held-out top-1", "seconds", "threads"):
            t.add_column(col, justify="right")
        t.add_row(str(r.train_images), str(r.epochs), _pct(r.train_top1), _pct(r.val_top1), f"{r.seconds:.0f}",
                  str(r.threads))
        console.print(t)
        console.print(f"[bold green]wrote[/] {ckpt}, {names.name} (class names), {out / 'calib'} (calibration), "
                      f"{out / 'test'} (held-out)")
        console.print(f"next: edgevit-export quantize {model} --res {res} --weights {ckpt} --calib {out / 'calib'} "
                      f"--eval {out / 'test'}", highlight=False)
