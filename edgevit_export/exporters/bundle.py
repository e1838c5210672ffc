"""What an export leaves beside the artifact for the app developer who receives it.

Three pieces, all from data the export already has, for every format alike:

- :func:`complete_io`: the manifest's ``io`` made self-sufficient — for every input and output its
  name, shape, dtype and layout, and for the image input the whole recipe (channel order, resize,
  crop, value range, normalisation, and where the normalisation happens);
- :func:`resolve_labels`: the class names that travel with a classifier (``--labels``, the
  checkpoint's ``classes``, ImageNet-1k for a 1000-class head — or none, said so);
- :func:`card`: ``MODEL-RES.md``, generated from the manifest alone: what the artifact is, how to
  feed it (Swift for Core ML; Kotlin for ONNX Runtime, LiteRT and ExecuTorch), its parity figures and
  how to re-check it.

:func:`stage` completes the io, writes the labels file and the card into the staging folder and
returns the moves that put them in place beside the manifest (``X.json`` → ``X.labels.txt``,
``X.md``); :func:`labels_beside` reads the names back (``run``, ``quantize`` of an .onnx).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

RGB = "RGB"


@dataclass
class Labels:
    names: list[str] | None      # one per class, in the head's order; None: no names known
    source: str                  # "--labels FILE", "checkpoint", "imagenet-1k", "eval folder", or "none"
    count: int                   # the head's classes
    note: str = ""

    def as_dict(self, file: str | None) -> dict:
        d = {"file": file if self.names else None, "source": self.source, "classes": self.count}
        if self.note:
            d["note"] = self.note
        return d


def resolve_labels(num_classes: int, given: list[str] | None = None, given_source: str = "--labels",
                   checkpoint: list[str] | None = None) -> Labels:
    """The class names of a ``num_classes`` head: those given, else the checkpoint's, else
    ImageNet-1k's for a 1000-class head; a head of another size with no names is said to have none
    (its classes stay indices, and the note says how to name them)."""
    from ..labels import imagenet_labels

    if given is not None:
        return Labels(list(given), given_source, num_classes)
    if checkpoint is not None and len(checkpoint) == num_classes:
        return Labels(list(checkpoint), "checkpoint", num_classes)
    if num_classes == 1000:
        return Labels(imagenet_labels(), "imagenet-1k", num_classes,
                      "ImageNet-1k class names (the default for a 1000-class head)")
    return Labels(None, "none", num_classes,
                  f"the head has {num_classes} classes and no names were given: outputs are class indices "
                  f"0-{num_classes - 1}; pass --labels FILE (one name per line, in the head's order)")


def side_paths(manifest_path: Path) -> tuple[Path, Path]:
    """The labels file and the card beside a manifest: ``X.json`` → ``X.labels.txt``, ``X.md``."""
    stem = manifest_path.name[:-len(".json")] if manifest_path.name.endswith(".json") else manifest_path.stem
    return manifest_path.with_name(f"{stem}.labels.txt"), manifest_path.with_name(f"{stem}.md")


# --- io: every input and output described in full ------------------------------------------------

def image_recipe(preprocess: dict, normalization: dict) -> dict:
    """What an app does to a photo before this input takes it (timm's eval transform)."""
    h, w = preprocess.get("size") or [0, 0]
    crop = float(preprocess.get("crop_pct") or 1.0)
    cover = list(preprocess["resize_to_cover"])
    in_model = bool(normalization.get("in_graph"))
    rng = normalization.get("input_range", "normalized")
    top = rng.split("-", 1)[1] if in_model and "-" in rng else "1"
    return {
        "channel_order": RGB,
        "alpha": "dropped (an RGBA or greyscale image is converted to RGB first)",
        "resize": {"interpolation": preprocess.get("interpolation", "bicubic"), "keep_aspect": True,
                   "to_cover": cover, "shorter_side": min(cover) if h == w else None,
                   "how": "scale the image (aspect ratio kept) until it covers to_cover "
                          "(a square input: its shorter side becomes shorter_side)"},
        "crop": {"kind": "center", "size": [h, w], "crop_pct": crop},
        "value_range": [0, 255] if in_model else [0, 1],
        "scale": None if in_model else "divide 8-bit values by 255",
        "normalize": {"mean": list(normalization.get("mean", [])), "std": list(normalization.get("std", [])),
                      "formula": "(x - mean) / std per channel", "where": "model" if in_model else "app"},
        "feed": (f"raw 8-bit RGB values, 0-{top}: the model normalises" if in_model
                 else "(x / 255 - mean) / std, float32"),
    }


def complete_io(io: dict | None, normalization: dict, preprocess: dict, labels: Labels | None,
                labels_file: str | None, features: list | None = None) -> dict:
    """The backend's ``io`` with what an app developer needs filled in: layout and dtype on every
    input and output, the image recipe on the image input, what each output means."""
    io = {"inputs": [dict(d) for d in (io or {}).get("inputs", [])],
          "outputs": [dict(d) for d in (io or {}).get("outputs", [])],
          **{k: v for k, v in (io or {}).items() if k not in ("inputs", "outputs")}}
    layout = (normalization.get("layout") or "nchw").upper()
    for i, d in enumerate(io["inputs"]):
        image_type = d.get("kind") == "image"
        d.setdefault("dtype", "uint8 image" if image_type else "float32")
        d["layout"] = "image (CVPixelBuffer / CGImage, RGB)" if image_type else (d.get("layout") or layout).upper()
        if i == 0:
            d["image"] = image_recipe(preprocess, normalization)
    by_name = {f["name"]: f for f in features or []}
    for d in io["outputs"]:
        shape = d.get("shape")
        if d["name"] in by_name:
            f = by_name[d["name"]]
            d.setdefault("layout", "NCHW")
            d["meaning"] = f"feature map, stride {f['stride']} ({f['channels']} channels, output of {f['module']})"
        elif d.get("dtype") == "string":
            d["meaning"] = "the most likely class name" + (f" (from {labels_file})" if labels_file else "")
        elif str(d.get("dtype", "")).startswith("dict"):
            d["meaning"] = "probability per class name (softmax over the logits)"
        elif shape is not None and len(shape) == 2:
            d.setdefault("layout", "NC")
            named = (f"; class k is line k+1 of {labels_file}" if labels_file else
                     "; the classes have no names (indices)" if labels is not None else "")
            d["meaning"] = f"logits over {shape[1]} classes: softmax for probabilities{named}"
        elif shape is not None and len(shape) == 4:
            d.setdefault("layout", "NCHW")
    return io


# --- the card ----------------------------------------------------------------------------------

RUNTIMES = {"onnx": "ONNX Runtime (`com.microsoft.onnxruntime:onnxruntime-android`, or onnxruntime-objc on iOS)",
            "coreml": "Core ML (iOS / macOS)",
            "pte": "ExecuTorch with the XNNPACK delegate (`org.pytorch:executorch-android`)",
            "tflite": "LiteRT (`com.google.ai.edge.litert:litert`; the XNNPACK delegate is on by default)"}


def stage(tmp: Path, manifest: dict, manifest_path: Path, labels: Labels | None,
          features: list | None = None) -> tuple[list[tuple[Path, Path]], tuple[Path, ...]]:
    """Complete the manifest's ``io`` (:func:`complete_io`), write the labels file (a classifier
    with names) and the card into ``tmp``, record them in ``manifest`` (``labels``, ``bundle``).
    Returns the (staged, final) moves and the stale file to remove (a labels file of an earlier
    export where this one has no names)."""
    labels_path, card_path = side_paths(manifest_path)
    named = labels is not None and bool(labels.names)
    manifest["io"] = complete_io(manifest.get("io"), manifest["normalization"], manifest["preprocess"], labels,
                                 labels_path.name if named else None, features)
    moves = []
    if labels is not None:
        manifest["labels"] = labels.as_dict(labels_path.name)
        if labels.names:
            (tmp / labels_path.name).write_text("\n".join(labels.names) + "\n", encoding="utf-8")
            moves.append((tmp / labels_path.name, labels_path))
    manifest["bundle"] = [manifest["artifact"], *(final.name for _, final in moves), card_path.name,
                          manifest_path.name] + ([manifest["golden"]["file"]] if manifest.get("golden") else [])
    (tmp / card_path.name).write_text(card(manifest), encoding="utf-8")
    moves.append((tmp / card_path.name, card_path))
    return moves, () if named else (labels_path,)


def labels_beside(manifest_path: Path, manifest: dict) -> list[str] | None:
    """The class names an export wrote beside its manifest, or None. Read as written: repeats are
    kept (ImageNet-1k itself names 'crane' twice)."""
    from ..labels import read_labels

    path = side_paths(manifest_path)[0]
    if not (manifest.get("labels") or {}).get("file") or not path.is_file():
        return None
    return read_labels(path, unique=False)


def card(m: dict) -> str:
    """``MODEL-RES.md`` from a manifest: what it is, how to feed it, what it was checked against."""
    fmt = m.get("format", "onnx")
    io = m.get("io") or {}
    inp = (io.get("inputs") or [{}])[0]
    outs = io.get("outputs") or []
    rec = inp.get("image") or image_recipe(m.get("preprocess") or {}, m.get("normalization") or {})
    h, w = m.get("resolution") or rec["crop"]["size"]
    lab = m.get("labels") or {}
    int8 = "quantization" in m
    from . import FORMATS

    kind = FORMATS[fmt].title if fmt in FORMATS else fmt
    title = f"{m.get('model')} at {h}×{w} — {kind}{' (quantized)' if int8 else ''}"
    task = ("backbone: feature maps " + ", ".join(f"{f['name']} (stride {f['stride']})" for f in m["features"])
            if m.get("features") else f"image classifier, {lab.get('classes', '?')} classes")
    lines = [f"# {title}", "",
             f"`{m.get('artifact')}`: {m.get('paper') or m.get('family', '')}, {task}. "
             f"Runs in {RUNTIMES.get(fmt, fmt)}.", ""]
    if m.get("random_init") or (m.get("source") or {}).get("random_init"):
        lines += ["> **Random weights**: exported without `--weights`. The graph, shapes and preprocessing are "
                  "real; its predictions mean nothing. Re-export with your checkpoint before shipping.", ""]
    if lab.get("file"):
        lines += [f"Class names: `{lab['file']}`, one per line in the head's order ({lab.get('source')}).", ""]
    elif lab.get("note"):
        lines += [f"Class names: none — {lab['note']}.", ""]
    lines += ["## Files", "", "| file | what |", "| --- | --- |"]
    what = {m.get("artifact"): "the model", lab.get("file"): "class names, one per line",
            (m.get("golden") or {}).get("file"): "seeded inputs and PyTorch's outputs, for `edgevit-export check`"}
    for f in m.get("bundle") or [m.get("artifact")]:
        desc = what.get(f) or ("this page" if f.endswith(".md") else
                               "the manifest: everything on this page, as JSON" if f.endswith(".json") else "")
        lines.append(f"| `{f}` | {desc} |")
    lines += ["", "## Input", "", "| name | shape | dtype | layout |", "| --- | --- | --- | --- |"]
    for d in io.get("inputs") or [inp]:
        lines.append(f"| `{d.get('name')}` | {_shape(d.get('shape'))} | {d.get('dtype', '')} | {d.get('layout', '')} |")
    lines += ["", "Preprocessing (what the model was evaluated with; do the same in the app):", ""]
    lines += [f"{i}. {s}" for i, s in enumerate(preprocess_steps(rec, inp), 1)]
    lines += ["", "## Output", "", "| name | shape | dtype | meaning |", "| --- | --- | --- | --- |"]
    for d in outs:
        lines.append(f"| `{d.get('name')}` | {_shape(d.get('shape'))} | {d.get('dtype', '')} | {d.get('meaning', '')} |")
    lines += ["", "## In the app", ""] + snippet(m, rec, inp, outs)
    lines += ["", "## Checked against PyTorch", ""] + _parity(m)
    art = m.get("artifact")
    lines += ["", "## Re-check it", "", "```sh",
              f"edgevit-export check {art}                  # its runner on the golden inputs, against PyTorch's outputs",
              f"edgevit-export check {art} --weights CKPT   # against the PyTorch model rebuilt from CKPT",
              f"edgevit-export run {art} --image photo.jpg  # top-5 on an image, preprocessed as above",
              "```", "",
              f"Made by edgevit-export {(m.get('tools') or {}).get('edgevit_export', '')} on {m.get('created', '')}; "
              f"sha256 of the artifact `{m.get('sha256', '')}`.", ""]
    return "\n".join(lines)


def _shape(s) -> str:
    return "×".join(str(d) for d in s) if s else "—"


def preprocess_steps(rec: dict, inp: dict) -> list[str]:
    """The recipe as numbered steps, in the app's order."""
    r, c, n = rec["resize"], rec["crop"], rec["normalize"]
    h, w = c["size"]
    mean = ", ".join(f"{v:g}" for v in n["mean"])
    std = ", ".join(f"{v:g}" for v in n["std"])
    resize = (f"Resize so the shorter side is **{r['shorter_side']} px**" if r.get("shorter_side")
              else f"Resize (aspect ratio kept) until the image covers **{r['to_cover'][0]}×{r['to_cover'][1]}**")
    steps = ["Decode to 8-bit **RGB** (drop alpha; convert greyscale).",
             f"{resize}, aspect ratio kept, **{r['interpolation']}** interpolation.",
             f"Center-crop **{h}×{w}** (crop_pct {c['crop_pct']:g}: the crop is {c['crop_pct']:.1%} of the "
             f"resized shorter side)."]
    if inp.get("kind") == "image":
        steps.append(f"Hand the {h}×{w} RGB image to the model as a `CVPixelBuffer` (or `CGImage`) with values "
                     f"0–255: Core ML reads the channel order itself, and the model applies mean ({mean}) and "
                     f"std ({std}) inside. Do **not** normalise in the app.")
    elif n["where"] == "model":
        steps.append(f"Feed raw values 0–{rec['value_range'][1]} (no scaling): the model normalises with mean "
                     f"({mean}) / std ({std}) inside.")
    else:
        steps += ["Scale to **0–1**: divide each 8-bit value by 255.",
                  f"Normalise per channel: (x − mean) / std with mean = ({mean}), std = ({std}) in R, G, B order.",
                  f"Lay out as float32 **{inp.get('layout', 'NCHW')}** {_shape(inp.get('shape'))}"
                  + (" (channel planes R, then G, then B)." if str(inp.get("layout", "NCHW")).upper() == "NCHW"
                     else " (pixels interleaved R, G, B).")]
    return steps


def _parity(m: dict) -> list[str]:
    checks = m.get("checks") or {}
    rows = []
    if checks:
        for key, label in (("parity", "the saved artifact, run here"), ("program", "the rewritten graph, before "
                                                                                   "conversion")):
            p = checks.get(key)
            if p and "max_abs" in p:
                gate = f"≤ {p.get('tolerance'):g}" + (f", cosine ≥ {p['min_cosine']:g}" if p.get("min_cosine") else "")
                verdict = "pass" if p.get("passed") else "**fail**"
                if not p.get("gated", True):
                    verdict += " (not gated)"
                rows.append(f"| {label} | {p['max_abs']:.3g} | {p.get('max_rel', 0):.3g} | {p['cosine']:.6f} | "
                            f"{gate} | {verdict} |")
        ref = (checks.get("parity") or {}).get("reference", "")
        note = (checks.get("parity") or {}).get("note")
    if not rows:
        met = m.get("metrics") or {}
        ev = m.get("evaluation") or {}
        if met:
            return [f"Quantized against the float model on {ev.get('images', '?')} images: "
                    + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                for k, v in met.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
                    + ". The manifest's `metrics` and `gate` hold the whole comparison.", ""]
        return ["No parity check was run (`--no-check`): run `edgevit-export check` (below) before shipping."]
    out = ["| what | max abs err | max rel err | cosine | gate | result |", "| --- | --- | --- | --- | --- | --- |",
           *rows, "", f"Reference: {ref}; {m.get('golden', {}) and m['golden'].get('samples', 0)} seeded inputs."]
    if note:
        out += ["", f"{note}."]
    return out


def snippet(m: dict, rec: dict, inp: dict, outs: list[dict]) -> list[str]:
    """Feeding the artifact and reading its output, in the language of its platform."""
    fmt = m.get("format", "onnx")
    h, w = rec["crop"]["size"]
    n = rec["normalize"]
    mean = ", ".join(f"{v:g}f" for v in n["mean"])
    std = ", ".join(f"{v:g}f" for v in n["std"])
    swift_mean, swift_std = (", ".join(f"{v:g}" for v in n[k]) for k in ("mean", "std"))
    art = m.get("artifact", "model")
    labels = (m.get("labels") or {}).get("file")
    short = rec["resize"].get("shorter_side") or min(rec["resize"]["to_cover"])
    out_name = outs[0]["name"] if outs else "logits"
    crop = rec["crop"]["crop_pct"]
    if fmt == "coreml":
        cls = Path(art).stem.replace("-", "_").replace(".", "_")
        classifier = any(o.get("dtype") == "string" for o in outs)
        if inp.get("kind") == "image":
            read = (["    let best = results.first!   // VNClassificationObservation: .identifier (from the model's "
                     "class names), .confidence"] if classifier else
                    [f"    let out = (results.first as! VNCoreMLFeatureValueObservation).featureValue.multiArrayValue!"
                     f"   // '{out_name}'"])
            return ["Swift, with Vision (Core ML reads the channel order; the model normalises). Vision's "
                    f"`.centerCrop` scales the shorter side to {h} and crops the center; the region of interest "
                    f"below first keeps the center {crop:.1%}, which together is the crop_pct {crop:g} recipe "
                    f"(Vision resamples with its own filter, not {rec['resize']['interpolation']}: expect small "
                    "differences).", "",
                    "```swift", "import CoreML", "import Vision", "",
                    f"let model = try VNCoreMLModel(for: {cls}(configuration: MLModelConfiguration()).model)",
                    "let request = VNCoreMLRequest(model: model) { request, _ in",
                    "    guard let results = request.results, !results.isEmpty else { return }",
                    *read, "}",
                    "request.imageCropAndScaleOption = .centerCrop",
                    f"let f = {crop:g}   // crop_pct",
                    "request.regionOfInterest = CGRect(x: (1 - f) / 2, y: (1 - f) / 2, width: f, height: f)",
                    "try VNImageRequestHandler(cgImage: photo, orientation: .up).perform([request])",
                    "```"]
        read = ([f"let best = out.{out_name}                 // the most likely class name",
                 f"let probs = out.{out_name}_probs          // [class name: probability]"] if classifier else
                [f"let scores = out.featureValue(for: \"{out_name}\")!.multiArrayValue!"
                 + ("   // logits: softmax for probabilities" if not m.get("features") else "")])
        return ["Swift, tensor input: preprocess as above (resize, crop, /255, normalise) and fill an "
                f"`MLMultiArray` of shape [1, 3, {h}, {w}] in NCHW order.", "",
                "```swift", "import CoreML", "",
                f"let model = try {cls}(configuration: MLModelConfiguration())",
                f"let x = try MLMultiArray(shape: [1, 3, {h}, {w}], dataType: .float32)",
                f"let mean: [Float] = [{swift_mean}], std: [Float] = [{swift_std}]",
                f"// rgb: the {h}×{w} center crop as 8-bit RGB bytes, row-major, 3 per pixel",
                "let p = x.dataPointer.bindMemory(to: Float.self, capacity: x.count)",
                f"for c in 0..<3 {{ for i in 0..<({h} * {w}) {{",
                f"    p[c * {h * w} + i] = (Float(rgb[i * 3 + c]) / 255 - mean[c]) / std[c]",
                "}}",
                f"let out = try model.prediction(input: {cls}Input({inp.get('name', 'input')}: x))",
                *read, "```"]
    nhwc = str(inp.get("layout", "NCHW")).upper() == "NHWC"
    index = "(y * w + xx) * 3 + c" if nhwc else "c * h * w + y * w + xx"
    prep = ["// Preprocess: shorter side to %d, center-crop %dx%d, /255, (x - mean) / std, %s float32"
            % (short, h, w, "NHWC" if nhwc else "NCHW"),
            "fun preprocess(photo: Bitmap): FloatArray {",
            f"    val h = {h}; val w = {w}",
            f"    val s = {short}f / minOf(photo.width, photo.height)",
            "    val scaled = Bitmap.createScaledBitmap(photo, maxOf(w, (photo.width * s).roundToInt()),",
            "                                           maxOf(h, (photo.height * s).roundToInt()), true)",
            "    val crop = Bitmap.createBitmap(scaled, (scaled.width - w) / 2, (scaled.height - h) / 2, w, h)",
            "    val px = IntArray(w * h).also { crop.getPixels(it, 0, w, 0, 0, w, h) }",
            f"    val mean = floatArrayOf({mean}); val std = floatArrayOf({std})",
            "    val x = FloatArray(3 * h * w)",
            "    for (y in 0 until h) for (xx in 0 until w) {",
            "        val p = px[y * w + xx]",
            "        val rgb = intArrayOf((p shr 16) and 0xFF, (p shr 8) and 0xFF, p and 0xFF)",
            f"        for (c in 0 until 3) x[{index}] = (rgb[c] / 255f - mean[c]) / std[c]",
            "    }", "    return x", "}"]
    note = (f"Kotlin (Android). `createScaledBitmap(filter = true)` is bilinear, not "
            f"{rec['resize']['interpolation']}: expect small differences from the figures below.")
    shape = ", ".join(str(d) for d in inp.get("shape") or [1, 3, h, w])
    read_labels = ([f"val labels = context.assets.open(\"{labels}\").bufferedReader().readLines()"]
                   if labels else [])
    top = ("labels[best]" if labels else "best")
    if fmt == "onnx":
        body = ["val env = OrtEnvironment.getEnvironment()",
                f"val session = env.createSession(File(\"{art}\").readBytes())",
                *read_labels,
                "val x = preprocess(photo)",
                f"OnnxTensor.createTensor(env, FloatBuffer.wrap(x), longArrayOf({shape})).use {{ t ->",
                f"    session.run(mapOf(\"{inp.get('name')}\" to t)).use {{ r ->",
                "        val logits = (r[0].value as Array<FloatArray>)[0]",
                f"        val best = logits.indices.maxBy {{ logits[it] }}   // {top}",
                "    }", "}"]
        imports = ["import ai.onnxruntime.*"]
    elif fmt == "tflite":
        body = [f"val interpreter = Interpreter(File(\"{art}\"))   // FileUtil.loadMappedFile from assets",
                *read_labels,
                "val input = ByteBuffer.allocateDirect(4 * %d).order(ByteOrder.nativeOrder())" % (3 * h * w),
                "input.asFloatBuffer().put(preprocess(photo))",
                f"val logits = Array(1) {{ FloatArray({_classes(outs)}) }}",
                "interpreter.run(input, logits)",
                f"val best = logits[0].indices.maxBy {{ logits[0][it] }}   // {top}"]
        imports = ["import org.tensorflow.lite.Interpreter", "import java.nio.ByteBuffer", "import java.nio.ByteOrder"]
    else:
        body = [f"val module = Module.load(\"/data/local/tmp/{art}\")",
                *read_labels,
                f"val t = Tensor.fromBlob(preprocess(photo), longArrayOf({shape}))",
                "val logits = module.forward(EValue.from(t))[0].toTensor().dataAsFloatArray",
                f"val best = logits.indices.maxBy {{ logits[it] }}   // {top}"]
        imports = ["import org.pytorch.executorch.EValue", "import org.pytorch.executorch.Module",
                   "import org.pytorch.executorch.Tensor"]
    if m.get("features"):
        body = [b for b in body if "best" not in b] + ["// outputs: the feature maps in the Output table, NCHW"]
    return [note, "", "```kotlin", *imports, "import android.graphics.Bitmap", "import kotlin.math.roundToInt", "",
            *prep, "", *body, "```"]


def _classes(outs: list[dict]) -> int:
    s = outs[0].get("shape") if outs else None
    return int(s[-1]) if s else 1000
