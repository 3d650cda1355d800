"""Off-ray perturbations: the update as merges other than a plain re-scaling see it.

Trap² shapes the loss along W0 + s*dW only. Merges also add other updates (W0 + s*dW + sum_j c_j dW_j)
and transform the update itself (DARE drop-and-rescale, magnitude pruning / TIES trimming, PEFT's
factor-wise combinations). An off-ray term is one such transformed weight, dW' = T(dW); the trainer
maximises the loss there as it does at re-scaled weights.

A term is an own-update transform, a partner, or both joined by '+':
- own transforms: 'dare' (w * M (.) dW / keep, M ~ Bernoulli(keep) per entry), 'prune' (w times the
  top-`keep` fraction of dW's entries by magnitude), 'factor_dare' (each LoRA factor dropped and
  rescaled on its own, then combined at weight w as sqrt(w) on each factor: peft's dare_linear
  combination), 'della' (w times mergekit's DELLA drop: entries kept with probabilities spread around `keep`
  by magnitude rank within each row, the layer's L1 norm restored), 'layer_scale' (each layer's dW at its own
  weight, uniform on the weight range: SCE's per-tensor weights); without one the own update is re-scaled, w * dW;
- partners: 'foreign' (sum_j c_j dW_j over the listed adapters of the same base, e.g. pseudo-partners from
  `make_pseudo_partners`), 'synthetic' (a random rank-r update U V^T with ||U V^T|| = c * ||dW||, per layer,
  redrawn every step) and 'spectral' (the same inside the span of the top 4r singular directions of the layer's
  base weight W0, where task vectors concentrate); with `trap_offray_shared_weight` every partner coefficient
  is the own weight w, as one shared merge weight gives.
'guard' (not a term one lists: `trap_guard_lambda`) is dW plus small dense noise, whose loss is
*minimised*, so the update tolerates quantization-sized perturbations.

The terms' names and the ranges each draws from are declared in `choices/offray.py` (pure data, which the settings
validate against); the package, by reason to change: `draws.py` (a step's draws), `transforms.py` (one stateless
function per part), `foreign.py` (loading other adapters), `pseudo.py` (partners the library makes itself),
`context.py` (`offray_layers`, `offray_update`, `offray_inputs`: the rows a pass takes). Adding a term: its part in
`choices/offray.py` and its function in `transforms.py`.

Inside `offray_update(model, draw)` every LoRA Linear layer of the trained adapter computes
W0 x + dW' x, with dW' built by autograd from the layer's own A and B, so gradients flow into them.
Every random choice comes from `draw.seed` and the layer's index (`seeding.py`), so a forward recomputed by
activation checkpointing sees the same masks, and a resumed run the same draws.
"""

from .._lazy import lazy_exports

_EXPORTS = {
    "GUARD": "..choices.offray",
    "OWN_TRANSFORMS": "..choices.offray",
    "PARTNERS": "..choices.offray",
    "RANGES": "..choices.offray",
    "Term": "..choices.offray",
    "parse_terms": "..choices.offray",
    "term": "..choices.offray",
    "OffrayDraw": ".draws",
    "draw_offray": ".draws",
    "draw_ranges": ".draws",
    "guard_draw": ".draws",
    "layer_parts": ".transforms",
    "parts_dense": ".transforms",
    "ForeignUpdate": ".foreign",
    "canonical_path": ".foreign",
    "load_foreign_update": ".foreign",
    "matched_foreign_updates": ".foreign",
    "make_pseudo_partners": ".pseudo",
    "offray_layers": ".context",
    "offray_update": ".context",
    "offray_inputs": ".context",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
