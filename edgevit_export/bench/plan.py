"""What ``bench`` and ``profile`` are asked to time: model names and ONNX files, checked, and every
(model, resolution) they expand to, checked before anything is exported or timed."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import EdgeExportError
from .onnx_facts import onnx_input


@dataclass(frozen=True)
class ModelSpec:
    """A registered model name, or a path to an exported ``.onnx`` file."""

    name: str
    path: Path | None = None

    @property
    def is_file(self) -> bool:
        return self.path is not None


def _looks_like_path(s: str) -> bool:
    return s.lower().endswith(".onnx") or os.sep in s or "/" in s or Path(s).expanduser().is_file()


def parse_models(spec: str | list[str]) -> list[ModelSpec]:
    """``"shvit_s1,litv2_s"`` | ``"all"`` | paths to ``.onnx`` files (mixed freely) → specs, checked."""
    from ..registry import get_model_info, list_models

    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    items = [s for s in items if s]
    if not items:
        raise EdgeExportError("no models given; pass names (e.g. shvit_s1,litv2_s), 'all', or .onnx files")
    out: list[ModelSpec] = []
    for s in items:
        if s == "all":
            out += [ModelSpec(n) for n in list_models()]
        elif _looks_like_path(s):
            p = Path(s).expanduser()
            onnx_input(p)  # raises a one-line error if it is not a loadable ONNX model
            out.append(ModelSpec(p.stem, p))
        else:
            get_model_info(s)  # UnknownModelError with suggestions
            out.append(ModelSpec(s))
    seen, unique = set(), []
    for m in out:
        key = (m.name, m.path)
        if key not in seen:
            seen.add(key)
            unique.append(m)
    return unique



def parse_res_list(res: str | int | list | None) -> list[str | None]:
    if res is None:
        return [None]
    if isinstance(res, int):
        return [str(res)]
    items = [s.strip() for s in res.split(",")] if isinstance(res, str) else [str(s) for s in res]
    items = [s for s in items if s]
    return items or [None]


@dataclass
class Plan:
    spec: ModelSpec
    hw: tuple[int, int]
    item: str
    notes: list[str] = field(default_factory=list)


def plan(models: list[ModelSpec], res: list[str | None], batch: int, runtime: str,
         features: bool = False) -> list[Plan]:
    """Every (model, resolution) to time, checked before anything is exported or timed."""
    from ..exporters.artifacts import res_tag
    from ..memory import check_fits
    from ..registry import get_model_info, parse_resolution

    out = []
    for m in models:
        if m.is_file:
            if runtime == "torch":
                raise EdgeExportError(f"--runtime torch times models by name; {m.path} is an ONNX file "
                                      "(use --runtime ort, or pass the model name)")
            inp = onnx_input(m.path)
            n, _c, h, w = inp.shape
            if n is not None and n != batch:
                raise EdgeExportError(f"{m.path} was exported with batch {n} but the protocol runs batch {batch}; "
                                      f"export it with --batch {batch} or pass the model name")
            notes = []
            if h is not None and w is not None:
                hws = [(h, w)]  # a static file has one resolution, whatever --res says
                if any(r is not None for r in res):
                    notes.append(f"static file: timed at its own {res_tag((h, w))}, --res does not apply")
            else:
                hws = []
                for r in res:
                    if r is None:
                        raise EdgeExportError(f"{m.path} has a symbolic height/width; pass --res")
                    parts = [int(p) for p in r.lower().split("x")] if r.replace("x", "").isdigit() else []
                    if len(parts) not in (1, 2):
                        raise EdgeExportError(f"resolution '{r}': use N or HxW, e.g. 1024 or 768x1024")
                    hws.append((parts[0], parts[-1]))
            out += [Plan(m, hw, f"{m.path.name}@{res_tag(hw)}", notes) for hw in hws]
        else:
            info = get_model_info(m.name)
            for r in res:
                hw = parse_resolution(r, info, features)
                check_fits(m.name, info, hw, batch, "benchmark", features)
                out.append(Plan(m, hw, f"{m.name}@{res_tag(hw)}"))
    seen, unique = set(), []
    for p in out:
        if (p.spec, p.hw) not in seen:
            seen.add((p.spec, p.hw))
            unique.append(p)
    return unique
