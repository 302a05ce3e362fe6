"""S4 magnitude: iterative threshold pruning of connections, with sparse storage.

Peng & Wang (Control and Decision 34(6), 2019) prune GoogLeNet by deleting every connection
(conv and FC weight, inside the Inception modules too) whose magnitude falls below a
threshold, retrain the survivors, and iterate; 10.4 M → 0.65 M parameters (≈16×) at
comparable accuracy, realised on disk by storing the non-uniform sparse weights compactly.

Our reading (SPEC §4 S4), following Han et al. 2015 ("Learning both weights and connections"):
1. threshold, either one *global* magnitude percentile over all prunable weights that zeros
   exactly the requested ``sparsity``, or per layer ``t_l = q·σ(W_l)`` (``rule="layer-std"``),
   where σ is the std of the layer's surviving weights and ``q`` a quality parameter (one
   number, or one per layer from ``sensitivity_scan``); with a ``sparsity`` target the q·σ
   thresholds are scaled by one common factor so that the target is met exactly;
2. a mask per weight tensor (``masks.Masks``) keeps pruned connections at exactly zero while
   retraining: gradient hooks zero their gradients and every optimiser step re-applies the
   mask, so momentum and weight decay cannot revive them;
3. ``iterative_prune`` raises the sparsity step by step (50 → 75 → 87.5 → 93.75 % by default,
   i.e. halving the survivors each time, 16× at the end) and retrains between steps;
4. ``prunekit.sparse.export_sparse`` stores the result as CSR with 8-bit relative column gaps.

Choice of default, measured: ``rule="global"``. One-shot on the trained ResNet-20 CIFAR base
(1,000 test images, no retraining) it keeps 84.1 / 68.0 / 14.6 / 10.9 % top-1 at 50 / 75 / 87.5 /
93.75 % sparsity against 77.7 / 41.2 / 11.5 / 10.0 % for ``layer-std`` (uniform q), because it
spares the small, sensitive layers (classifier 28 %, stem 42 % at 93.75 %) and takes most from
the large redundant ones (up to 99.7 %). Near initialisation it can empty a layer (the default-init
classifier of GoogLeNet at 75 %): prune trained models, or use ``layer-std``.

Prunable weights are those of trainable convolutions (transposed ones too), Linear and Embedding
layers (the classifier included, as the paper prunes FC too); biases, BN and frozen operator convs are
never pruned. Zeros do
not make dense kernels faster, so ``after["macs"]`` stays the dense count; ``info`` adds
``sparse_macs``, the MACs that would remain if every zero weight were skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import PrunekitError
from ..masks import Masks
from ..measure import WEIGHTED, count_params, layer_macs
from . import Context, Option, PruneResult, register


def prunable_layers(model: nn.Module, ignored_layers: Iterable[str | nn.Module] | None = None,
                    include_classifier: bool = True) -> dict[str, nn.Module]:
    """Trainable conv/linear/embedding layers by name; frozen convs encode operations, not connections."""
    modules = dict(model.named_modules())
    layers = {n: m for n, m in modules.items() if isinstance(m, WEIGHTED) and m.weight.requires_grad}
    if not layers:
        raise PrunekitError("the model has no trainable convolution, Linear or Embedding layer to prune")
    classifier = next(reversed(layers))  # the last registered conv/linear is the output layer in every zoo model
    names = {m: n for n, m in modules.items()}
    for item in ignored_layers or ():
        name = item if isinstance(item, str) else names.get(item)
        if name not in modules:
            raise PrunekitError(f"ignored layer {item!r} is not a module of this model")
        layers.pop(name, None)
    if not include_classifier:
        layers.pop(classifier, None)
    return layers


def _sigma(w: torch.Tensor) -> float:
    """Std of the surviving weights: already-pruned zeros are not evidence that a layer is small."""
    alive = w[w != 0]
    return float(alive.std()) if alive.numel() > 1 else 0.0


@torch.no_grad()
def magnitude_masks(model: nn.Module, *, sparsity: float | None = None, rule: str = "global",
                    q: float | dict[str, float] = 1.0, ignored_layers: Iterable[str | nn.Module] | None = None,
                    include_classifier: bool = True) -> Masks:
    """Masks that drop the lowest-magnitude weights (not applied; call ``.apply`` or ``.attach``).

    ``rule="global"``: the ``round(sparsity·N)`` smallest |w| over all prunable weights.
    ``rule="layer-std"``: |w| < q_l·σ_l per layer; with ``sparsity`` the exact fraction with the
    smallest |w|/(q_l·σ_l) instead. A per-layer ``q`` dict leaves layers it omits (or gives 0) intact.
    """
    if rule not in ("global", "layer-std"):
        raise PrunekitError(f"unknown magnitude rule {rule!r}: choose 'global' or 'layer-std'")
    if rule == "global" and sparsity is None:
        raise PrunekitError("rule 'global' needs a sparsity target (e.g. sparsity=0.9)")
    layers = prunable_layers(model, ignored_layers, include_classifier)
    scale = {n: 1.0 for n in layers}
    if rule == "layer-std":
        qs = q if isinstance(q, dict) else dict.fromkeys(layers, float(q))
        if any(v < 0 for v in qs.values()):
            raise PrunekitError(f"q must be >= 0 for every layer, got {q}")
        scale = {n: qs.get(n, 0.0) * _sigma(m.weight) for n, m in layers.items() if qs.get(n, 0.0) > 0}
    if not scale:
        raise PrunekitError("no layer left to prune: every layer is ignored or has q = 0")
    weights = {n: layers[n].weight.detach() for n in scale}
    if sparsity is None:  # layer-std with absolute thresholds t_l = q_l·σ_l
        return Masks({f"{n}.weight": w.abs() >= scale[n] for n, w in weights.items()})
    scores = torch.cat([(w.abs() / max(scale[n], 1e-12)).flatten().float().cpu() for n, w in weights.items()])
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep[torch.argsort(scores, stable=True)[: round(sparsity * scores.numel())]] = False
    parts = keep.split([w.numel() for w in weights.values()])
    return Masks({f"{n}.weight": k.view_as(w).to(w.device) for (n, w), k in zip(weights.items(), parts, strict=True)})


@torch.no_grad()
def conv_linear_macs(model: nn.Module, example_inputs: torch.Tensor) -> tuple[int, int]:
    """(dense, non-zero) conv/linear MACs of one forward pass: what dense kernels do, and an ideal sparse kernel."""
    return tuple(sum(layer_macs(model, example_inputs, nonzero=nz)[1].values()) for nz in (False, True))


@register("magnitude", "S4: zero the smallest-magnitude conv/FC weights (global percentile or q·σ per layer)",
          kind="unstructured", keeps_zeros=True,
          own_cut=lambda o: "rule=layer-std" if o["rule"] == "layer-std" else None,  # q·σ per layer needs no target
          options=(Option("rule", str, "global", "global: one magnitude percentile; layer-std: |w| < q·σ per layer",
                          ("global", "layer-std")),
                   Option("q", (int, float, dict), 1.0, "layer-std: threshold in standard deviations (or per layer); "
                          "giving q sets rule=layer-std", implies={"rule": "layer-std"}),
                   Option("ignored_layers", (list, tuple, type(None)), None, "layers never pruned"),
                   Option("include_classifier", bool, True, "prune the output layer's weights too (as the paper)")))
def magnitude(model: nn.Module, ctx: Context, *, sparsity: float | None, rule: str, q: float | dict[str, float],
              ignored_layers: Iterable[str | nn.Module] | None, include_classifier: bool) -> PruneResult:
    """Prune in place; ``before``/``after`` params count non-zero parameters. Masks: ``masks.Masks.from_zeros``."""
    nonzero_before = count_params(model, nonzero=True)
    masks = magnitude_masks(model, sparsity=sparsity, rule=rule, q=q, ignored_layers=ignored_layers,
                            include_classifier=include_classifier)
    masks.apply(model)
    macs, macs_nonzero = conv_linear_macs(model, ctx.example_inputs[:1])  # per image; zeros keep dense MACs
    after = {"params": count_params(model, nonzero=True), "macs": macs}
    per_layer = {n.removesuffix(".weight"): round(1.0 - float(m.sum()) / m.numel(), 6) for n, m in masks.masks.items()}
    info = {"sparsity": masks.sparsity(), "nonzero_params": after["params"], "params": count_params(model),
            "sparse_macs": macs_nonzero, "rule": rule, "layer_sparsity": per_layer}
    target = {"sparsity": sparsity, "rule": rule} | ({"q": q} if rule == "layer-std" else {})
    return PruneResult(model, "magnitude", target, {"params": nonzero_before, "macs": macs}, after, info=info)


def iterative_prune(model: nn.Module, example_inputs: torch.Tensor,
                    schedule: Sequence[float] = (0.5, 0.75, 0.875, 0.9375),
                    retrain: Callable[[nn.Module, Masks, int], dict | None] | None = None,
                    **options: Any) -> list[dict]:
    """Prune to each sparsity in ``schedule``, retraining with the masks attached in between.

    ``retrain(model, masks, step)`` trains ``model`` in place (pass ``after_step=masks.after_step``
    to ``train.fit``) and may return metrics (e.g. accuracy) for the history. Put the model on its
    training device first: the mask hooks live on the parameters' device. ``options`` go to
    ``magnitude_masks`` (rule, q, ignored_layers, include_classifier).
    """
    if list(schedule) != sorted(schedule) or not all(0.0 <= s < 1.0 for s in schedule):
        raise PrunekitError(f"schedule must be increasing sparsities in [0, 1), got {list(schedule)}")
    history = []
    for step, level in enumerate(schedule):
        masks = magnitude_masks(model, sparsity=level, **options)
        masks.attach(model)  # applies the masks, then keeps them through retraining
        record: dict[str, Any] = {"step": step, "sparsity_target": level, "sparsity": masks.sparsity(),
                                  "params": count_params(model), "nonzero_params": count_params(model, nonzero=True)}
        try:
            if retrain is not None:
                record.update(retrain(model, masks, step) or {})
        finally:
            masks.detach()
        record["nonzero_params_after_retrain"] = count_params(model, nonzero=True)
        history.append(record)
    return history


@torch.no_grad()
def sensitivity_scan(model: nn.Module, evaluate: Callable[[nn.Module], float],
                     qs: Sequence[float] = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0), tolerance: float = 1.0,
                     ignored_layers: Iterable[str | nn.Module] | None = None,
                     include_classifier: bool = True) -> dict[str, float]:
    """Per layer, the largest q whose pruning of that layer alone costs at most ``tolerance``.

    ``evaluate(model)`` returns a score where higher is better (e.g. top-1 in %); the drop is
    measured against the unpruned model. 0.0 means even the smallest q hurt too much: leave the
    layer dense. The result feeds ``rule="layer-std", q=...`` (Han et al. 2015's sensitivity analysis).
    """
    base = evaluate(model)
    chosen: dict[str, float] = {}
    for name, layer in prunable_layers(model, ignored_layers, include_classifier).items():
        original = layer.weight.detach().clone()
        sigma = _sigma(original)
        chosen[name] = 0.0
        for q in sorted(qs):
            layer.weight.mul_(original.abs() >= q * sigma)
            drop = base - evaluate(model)
            layer.weight.copy_(original)
            if drop > tolerance:
                break
            chosen[name] = q
    return chosen
