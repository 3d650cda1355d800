"""The guard: the released update alone survives benign perturbations of its merged weights as its twin does.

A user who loads the protected update does not always compute in float32: a half-precision checkpoint,
or 8-bit weights, round every weight. The update is folded into the base weights (W0 + dW, what
`merge_and_unload` gives for an adapter, the fine-tuned state for a full fine-tune), then evaluated with
those merged weights

- `float32`: as they are (the reference of the perturbations below);
- `bfloat16`, `float16`: every floating-point parameter cast down and back up to its own dtype, what
  loading a half-precision checkpoint does to the values (the arithmetic stays in float32, so the check
  runs on any CPU);
- `int8`: the weight of every `nn.Linear` rounded to nearest on a symmetric 8-bit grid with one absmax
  scale per output channel, then dequantised. That is bitsandbytes' LLM.int8() weight quantisation
  without its outlier handling (stricter: no column is kept in 16 bits); bitsandbytes itself is not
  needed, so the check runs where it is not installed. Other parameters keep their values.

The protected update holds under a perturbation when its protected-task accuracy is no more than
`TOLERANCE` below its twin's under the same perturbation (without a twin: below its own float32
accuracy). The model's weights are restored bit for bit after each perturbation.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .settings import PERTURBATIONS
from .task_vectors import applied

TOLERANCE = 0.01  # one point of accuracy
_CASTS = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def cast_round_trip(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor` stored in `dtype` and read back in its own dtype."""
    return tensor.to(dtype).to(tensor.dtype)


def int8_round_trip(weight: torch.Tensor) -> torch.Tensor:
    """`weight` (out_features x in_features) quantised to int8 per output channel (absmax / 127, round to
    nearest) and dequantised, in its own dtype. A row of zeros stays zero."""
    scale = weight.detach().float().abs().amax(dim=1, keepdim=True) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    quantised = torch.round(weight.detach().float() / scale).clamp(-127, 127)
    return (quantised * scale).to(weight.dtype)


def check_perturbations(perturbations) -> tuple[str, ...]:
    perturbations = tuple(perturbations)
    unknown = [p for p in perturbations if p not in PERTURBATIONS]
    if unknown:
        raise ValueError(f"Unknown benign perturbation(s) {unknown}; choose among {list(PERTURBATIONS)}.")
    return perturbations


@contextmanager
def perturbed(model: nn.Module, perturbation: str) -> Iterator[None]:
    """The model with its current weights perturbed by `perturbation` (see the module docstring); the
    original tensors are put back on exit. PEFT adapter weights (not part of the merged model) are left out."""
    originals = []
    try:
        with torch.no_grad():
            for param, value in list(_targets(model, check_perturbations([perturbation])[0])):
                originals.append((param, param.data))
                param.data = value
        yield
    finally:
        for param, data in reversed(originals):
            param.data = data


def _targets(model: nn.Module, perturbation: str):
    adapters = set(getattr(model, "peft_config", {}))

    def merged_weight(name: str) -> bool:
        return not adapters.intersection(name.split("."))

    if perturbation == "float32":
        return
    if perturbation in _CASTS:
        for name, param in model.named_parameters():
            if param.is_floating_point() and merged_weight(name):
                yield param, cast_round_trip(param.data, _CASTS[perturbation])
        return
    seen = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and merged_weight(name) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            yield module.weight, int8_round_trip(module.weight.data)


def run_benign(auditor, variants: list[str], protected_task: str, perturbations: tuple[str, ...]) -> dict:
    """The `benign` section of audit.json: per variant ("protected", "unprotected"), the protected-task
    accuracy (report split) of the update folded into the base under each perturbation; the gap of the
    protected update to its reference and whether it holds within `TOLERANCE`."""
    scores = {}
    for variant in variants:
        scores[variant] = {}
        for perturbation in perturbations:
            def context(v=variant, p=perturbation):
                return _folded_and_perturbed(auditor, v, p)

            scores[variant][perturbation] = auditor.score(context, protected_task)
    twin = scores.get("unprotected")
    if twin is None and "float32" in perturbations:
        reference = {p: scores["protected"]["float32"] for p in perturbations}
    else:
        reference = twin
    gap = None if reference is None else {p: scores["protected"][p] - reference[p] for p in perturbations}
    held = None if gap is None else {p: value >= -TOLERANCE - 1e-9 for p, value in gap.items()}
    return {
        "perturbations": list(perturbations),
        "tolerance": TOLERANCE,
        "reference": "twin" if twin is not None else ("float32" if reference is not None else None),
        "protected": scores["protected"],
        "unprotected": twin,
        "gap": gap,
        "held": held,
        "all_held": None if held is None else all(held.values()),
    }


@contextmanager
def _folded_and_perturbed(auditor, variant: str, perturbation: str) -> Iterator[None]:
    with auditor.base(), applied(auditor.model, auditor.vector(variant)), perturbed(auditor.model, perturbation):
        yield

