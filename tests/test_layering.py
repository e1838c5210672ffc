"""Module layering: imports go one way (registry uses weights; weights knows no registry)."""

import ast
from pathlib import Path

import edgevit_export

PKG = Path(edgevit_export.__file__).parent


def _imports(module: str) -> set[str]:
    """Package-relative modules a file imports (``from .x import``/``from ..x import``), anywhere in it."""
    tree = ast.parse((PKG / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            found.update([node.module] if node.module else [a.name for a in node.names])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("edgevit_export."):
            found.add(node.module.split(".", 1)[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".", 1)[1] for a in node.names if a.name.startswith("edgevit_export."))
    return found


def test_weights_does_not_import_the_registry():
    assert "registry" not in _imports("weights")
    assert "weights" in _imports("registry")


def test_create_model_still_loads_weights(tmp_path):
    import torch

    from edgevit_export.registry import create_model

    src = create_model("mobilenetv3_small_100", num_classes=3, seed=1)
    path = tmp_path / "m.pth"
    torch.save({"state_dict": src.state_dict()}, path)
    loaded = create_model("mobilenetv3_small_100", weights=str(path))
    assert loaded.num_classes == 3
    for k, v in src.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
