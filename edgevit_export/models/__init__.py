"""One file per model family; importing this package registers every model.

The model contract. Every registered model, whatever its family, is an ``nn.Module`` with

- ``forward_features(x)``: image batch (N, 3, H, W) → the **last feature map**, a 4-D tensor
  (N, C, h, w) (h, w = H, W over the network stride). It includes the family's final norm where
  that norm acts per position (EdgeViT's and EfficientFormerV2's BatchNorm2d, LITv2's and
  EfficientFormer's LayerNorm over tokens); families whose last stage works on tokens (N, h·w, C)
  hand them back as the map they came from.
- ``forward_head(features)``: that map → logits (N, num_classes): whatever the family does after
  its last stage — global pooling, a norm after pooling (SHViT's, EfficientViT's BatchNorm1d),
  MobileNetV3's and FastViT's head convs, the classifier, distillation heads averaged. A model
  built with ``num_classes=0`` has no classifier and returns the pooled features.
- ``forward(x)``, exactly ``forward_head(forward_features(x))``.
- ``num_classes``: the number of logits (0: no classifier).
- ``stage_names``: dotted names of the submodules whose outputs are the per-stage features, in
  order (``measure.stage_shapes`` hooks them; ``model.get_submodule(name)``). Their outputs are
  maps, or tokens (N, h·w, C) where the family's stage works on tokens (LITv2, EfficientFormer's
  last stage).
- ``feature_info``: the backbone's pyramid, a list of :class:`edgevit_export.features.Feature`
  (stride, channels, the module of ours it comes from, any norm added to it), shallow to deep —
  the maps the family's detection/segmentation heads take (the official dense-prediction code, or
  timm's ``feature_info`` where there is none), named ``feat_s<stride>``.
- ``forward_intermediates(x, indices)``: image → the maps at those positions of ``feature_info``,
  each (N, C, ⌈H/stride⌉, ⌈W/stride⌉), computing no further than the deepest one asked for
  (``export --features`` captures it through ``features.Backbone``).
- optionally ``prepare_for_export()``: an in-place rewrite into the inference form that keeps the
  outputs (FastViT's structural reparameterisation); ``api.prepare_model`` calls it if present.

Parameter names stay those of the official or timm code, so their checkpoints load strictly.
``tests/test_contract.py`` checks the contract on every registered model.
"""

import importlib
import pkgutil

for _m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")
