"""The bench export cache: a model name is exported once per (resolution, batch, passes, toolkit
version) into a cache directory, and re-used while its manifest's sha256 still matches the file."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..progress import Callback
from .onnx_facts import sibling_manifest


def default_cache_dir() -> Path:
    """``$EDGEVIT_EXPORT_CACHE/bench``, else ``$XDG_CACHE_HOME/edgevit-export/bench``
    (``~/.cache/edgevit-export/bench``)."""
    root = os.environ.get("EDGEVIT_EXPORT_CACHE")
    if root:
        return Path(root).expanduser() / "bench"
    xdg = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(xdg).expanduser() / "edgevit-export" / "bench"


def _passes_tag(passes: str) -> str:
    tag = passes.replace(",", "+").replace(" ", "")
    if len(tag) > 60:
        tag = hashlib.sha256(tag.encode()).hexdigest()[:12]
    return tag


def cache_path(cache_dir: Path, name: str, hw: tuple[int, int], batch: int, passes: str,
               format: str = "onnx", features: str | None = None) -> Path:
    from .. import __version__
    from ..exporters import get
    from ..exporters.artifacts import res_tag

    feat = "" if features is None else "-feat" + _passes_tag(features.replace("feat_", "") or "all")
    return (cache_dir / name /
            f"{name}-{res_tag(hw)}{feat}-b{batch}-{_passes_tag(passes)}-v{__version__}{get(format).suffix}")


def cached_export(name: str, hw: tuple[int, int], *, batch: int, passes: str, cache_dir: Path,
                  progress: Callback | None = None, format: str = "onnx",
                  features: str | None = None) -> tuple[Path, dict, bool]:
    """The exported file for (model, res, batch, passes, version): re-used when its manifest's
    sha256 matches, otherwise exported through ``api.export``. Returns (path, manifest, reused)."""
    from .. import api

    from ..exporters import get

    path = cache_path(cache_dir, name, hw, batch, passes, format, features)
    manifest = sibling_manifest(path, get(format).manifest_path(path)) if path.is_file() else None
    if manifest is not None:
        return path, manifest, True
    r = api.export(name, format=format, res=hw, output=path, check=False, force=True, batch=batch,
                   passes=passes, features=features, progress=progress)
    return r.artifact, r.manifest, False
