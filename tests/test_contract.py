"""The one model contract (edgevit_export/models/__init__.py), on every registered model."""

import pytest
import torch

from edgevit_export.registry import create_model, get_model_info, list_models


def _small_res(info) -> tuple[int, int]:
    """The smallest accepted size, and one step wider (non-square: catches an H/W mix-up)."""
    r = -(-info.min_res // info.res_multiple) * info.res_multiple
    return r, r + info.res_multiple


def _stage_outputs(model, fn, x):
    """``fn(x)`` with every stage's output recorded (``model.stage_names`` in order)."""
    outs, hooks = [], []
    for name in model.stage_names:
        hooks.append(model.get_submodule(name).register_forward_hook(
            lambda _m, _i, o: outs.append(o[0] if isinstance(o, (tuple, list)) else o)))
    try:
        return fn(x), outs
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("name", list_models())
def test_model_contract(name):
    info = get_model_info(name)
    model = create_model(name)
    x = torch.randn(2, 3, *_small_res(info), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats, stages = _stage_outputs(model, model.forward_features, x)
        logits = model(x)
        head = model.forward_head(feats)
    # the last feature map: N×C×h×w, at the last stage's resolution
    assert feats.dim() == 4 and feats.shape[0] == 2 and feats.shape[1] > 0, feats.shape
    assert len(stages) == len(model.stage_names) >= 3
    last = stages[-1]
    tokens = last.shape[2] * last.shape[3] if last.dim() == 4 else last.shape[1]
    assert tokens == feats.shape[2] * feats.shape[3]
    # forward is forward_head ∘ forward_features, exactly
    assert torch.equal(head, logits)
    assert isinstance(model.num_classes, int) and model.num_classes == 1000
    assert logits.shape == (2, model.num_classes)
    assert callable(getattr(model, "prepare_for_export", print))  # optional (its effect: test_fastvit.py)


def _one_per_family() -> list[str]:
    seen = {}
    for n in list_models():
        seen.setdefault(get_model_info(n).family, n)
    return list(seen.values())


@pytest.mark.parametrize("name", _one_per_family())
def test_num_classes_and_headless(name):
    info = get_model_info(name)
    x = torch.randn(1, 3, *_small_res(info))
    with torch.no_grad():
        model = create_model(name, num_classes=7)
        assert model.num_classes == 7 and model(x).shape == (1, 7)
        # no classifier: the head pools the map into one feature vector per image
        model = create_model(name, num_classes=0)
        feats = model.forward_features(x)
        out = model(x)
    assert model.num_classes == 0
    assert out.dim() == 2 and out.shape[0] == 1 and out.shape[1] > 0
    assert torch.equal(model.forward_head(feats), out)
