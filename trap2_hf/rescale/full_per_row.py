"""Full fine-tuning re-scaled row by row: the copied rows compute with theta0 + s*(theta - theta0), module by module.

The fused step (`modes/fused.py`) runs the micro-batch's b rows followed by copies of some of them, the copies of each
scale s_k side by side. For a LoRA adapter a copy's scale multiplies the branch's output; for a full fine-tune
every module that holds a trainable parameter computes

    y = concat(m(x_rows; theta), m(x_copies_1; theta_{s_1}), m(x_copies_2; theta_{s_2}), ...),
    theta_s = theta0 + s*(theta - theta0),

its input being what the modules before it produced for the same rows. That is the whole model at theta_s for
the copies' rows, exactly, for any module whose rows do not interact (no batch statistics) and that reads its
parameters as attributes inside its own forward; the gradient reaches theta with the factor s (d theta_s / d
theta), as in two_pass. The modules known to be such (`full_row_targets`), each run its cheapest way:

- Linear and GPT-2's Conv1D: one autograd function (`grouped_linear.py`) that forms each scale's weights in the
  forward and again in the backward instead of saving them (a saved copy per scale would cost K*theta of memory): a
  copied row costs a plain row's three matmuls, plus one weight-sized lerp per scale and direction; each group's
  matmuls write into their rows of one output, so the activations are not copied again.
- Embedding: a row of the table, so theta0's rows are gathered and blended per row, lerp(E0[ids], E[ids], s)
  (position ids shared by all rows, shape (1, T), give each row its own blend).
- LayerNorm / RMSNorm (any `*LayerNorm` / `*RMSNorm` class, Gemma's 1 + gamma too): one run with per-row vectors
  lerp(gamma0, gamma, s_row) of shape (rows, 1, ..., features) where the module's forward broadcasts them and
  gives what one run per scale gives (checked at the module's first call; transformers' RMSNorms do, torch's
  F.layer_norm does not); else the module runs once per scale with its vectors re-scaled.

A trainable parameter held by any other module (a custom layer, a parametrization, weight norm, a batch norm)
raises NotImplementedError; a module holding one whose forward does not run while the model does (its weights
read elsewhere, as TRL's fused LM head reads lm_head.weight) raises RuntimeError on leaving the context. theta0
must be on the parameters' device.

`RowGroups.at_scale(s)` puts every row at s: sub_batch's and two_pass's re-scaled passes use it instead of writing
theta_s into the weights (`at_scale.rescaled_parameters`), which is what the trainer falls back to otherwise; where
only some modules' parameters are read outside their forward, only those are written (`split_in_place`).
"""

import weakref
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .adapter import patched_forward
from .grouped_linear import GroupedLinear, lerp_to

NORM_SUFFIXES = ("LayerNorm", "RMSNorm")


@dataclass(frozen=True)
class RowGroups:
    """The rows of a fused batch by scale: `sizes[0]` original rows (s = 1), then `sizes[k]` copies at
    `scales[k - 1]`; `row_scales` holds each row's scale. `uniform`: every row at `scales[0]`, whatever the shape
    (a sub_batch or two_pass pass, `at_scale`)."""

    sizes: tuple[int, ...]
    scales: tuple[float, ...]
    row_scales: torch.Tensor
    uniform: bool = False
    _cast: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def at_scale(cls, scale: float) -> "RowGroups":
        """Every row at `scale`: the re-scaled pass of sub_batch / two_pass without writing theta_s in place."""
        return cls(sizes=(0,), scales=(float(scale),), row_scales=torch.tensor(float(scale), dtype=torch.float64),
                   uniform=True)

    @classmethod
    def of_copies(cls, batch_size: int, copy_scale_index: torch.Tensor, scales: list[float]) -> "RowGroups":
        """Groups of consecutive copies of the same scale (`FusedPlan` puts each scale's copies side by side);
        `scales[copy_scale_index[j]]` is copy j's scale, kept as the Python float two_pass uses."""
        index, counts = torch.unique_consecutive(copy_scale_index, return_counts=True)
        group_scales = tuple(float(scales[k]) for k in index.tolist())
        per_copy = torch.tensor(
            [s for s, n in zip(group_scales, counts.tolist()) for _ in range(n)], dtype=torch.float64
        )
        return cls(
            sizes=(batch_size, *counts.tolist()),
            scales=group_scales,
            row_scales=torch.cat([torch.ones(batch_size, dtype=torch.float64), per_copy]),
        )

    @property
    def rows(self) -> int:
        return sum(self.sizes)

    def per_row(self, like: torch.Tensor) -> torch.Tensor:
        """Each row's scale, shaped to broadcast over `like` (rows on dimension 0)."""
        key = (like.device, like.dtype)
        if key not in self._cast:  # once per step and device/dtype, not once per module
            self._cast[key] = self.row_scales.to(device=like.device, dtype=like.dtype)
        return self._cast[key].view(-1, *([1] * (like.dim() - 1)))

    def check(self, x: torch.Tensor, module_name: str) -> torch.Tensor:
        if self.uniform:
            return x
        if x.dim() == 0 or x.shape[0] != self.rows:
            raise RuntimeError(
                f"The fused full fine-tune needs every module with trainable parameters to see the batch on "
                f"dimension 0, but {module_name} got shape {tuple(x.shape)} for a batch of {self.rows} rows "
                "(flattened tokens?). Use trap_mode='sub_batch' or 'two_pass' for this model."
            )
        return x


def _is_norm(module: nn.Module) -> bool:
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return True
    params = list(module.parameters(recurse=False))
    return (
        type(module).__name__.endswith(NORM_SUFFIXES)
        and not any(True for _ in module.children())
        and all(p.dim() == 1 for p in params)
    )


def _kind_of(module: nn.Module) -> str | None:
    """How a module computes its copies' rows, or None where it is not known to be exact."""
    from transformers.pytorch_utils import Conv1D

    if type(module) is nn.Linear:  # subclasses may change forward: not assumed
        return "linear"
    if type(module) is Conv1D:
        return "conv1d"
    if type(module) is nn.Embedding and module.max_norm is None:  # max_norm renormalises rows in place
        return "table"
    if _is_norm(module):
        return "norm"
    return None


def full_row_targets(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(name, module, kind) for every module holding a trainable parameter, or NotImplementedError naming the first
    module the fused full fine-tune cannot run exactly (and the modes that can)."""
    targets = []
    for name, module in model.named_modules():
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        if torch.nn.utils.parametrize.is_parametrized(module) or any(
            hasattr(module, attr) for attr in ("weight_g", "weight_orig")  # parametrized, weight norm, pruning
        ):
            kind = None
        else:
            kind = _kind_of(module)
        if kind is None:
            raise NotImplementedError(
                f"trap_mode='fused' on a full fine-tune runs each module with trainable parameters at theta0 + "
                f"s*(theta - theta0) row by row, which is known to be exact for Linear, Conv1D, Embedding and "
                f"LayerNorm/RMSNorm layers; {name or 'the model'} ({type(module).__name__}) is none of them. Use "
                "trap_mode='sub_batch' or 'two_pass', or freeze its parameters."
            )
        targets.append((name, module, kind))
    if not targets:
        raise ValueError("The model has no trainable parameter to re-scale; nothing would be protected.")
    return targets


@contextmanager
def rescaled_parameters_per_row(
    model: nn.Module,
    groups: RowGroups,
    reference: dict[str, torch.Tensor],
    targets: list[tuple[str, nn.Module, str]] | None = None,
) -> Iterator[None]:
    """While inside, the rows of each group in `groups` compute with theta0 + s*(theta - theta0) (`reference` is
    theta0, by parameter name); the first group, the original rows, with theta itself."""
    targets = full_row_targets(model) if targets is None else targets
    theta0_of = {}
    for name, param in model.named_parameters():
        if name in reference:
            theta0_of[id(param)] = reference[name]
    forwards = {"linear": _linear_rows, "conv1d": partial(_linear_rows, transposed=True), "table": _table_rows,
                "norm": _norm_rows}
    called = set()
    with ExitStack() as stack:
        for name, module, kind in targets:
            theta0 = {}
            for local, param in module.named_parameters(recurse=False):
                theta0[local] = _theta0_for(param, theta0_of, name, local)
            forward = partial(forwards[kind], module=module, name=name, groups=groups, theta0=theta0)
            stack.enter_context(patched_forward(module, partial(_counted, forward, called, name)))
        yield
    skipped = [name for name, _, _ in targets if name not in called]
    if called and skipped:
        raise RuntimeError(
            f"{skipped[0]} holds trainable parameters but its forward did not run while the model did: the model reads "
            "them some other way (e.g. module.weight in another layer's code), which theta0 + s*(theta - theta0) "
            "formed module by module would miss. Use trap_mode='two_pass' (exact for any model), or freeze "
            "that module if it is unused."
        )


def _counted(forward, called: set, name: str, original_forward, *args, **kwargs):
    called.add(name)
    return forward(original_forward, *args, **kwargs)


def _theta0_for(param: nn.Parameter, theta0_of: dict, module_name: str, local: str) -> torch.Tensor:
    if not param.requires_grad:
        return param.detach()  # a frozen parameter is its own theta0
    if id(param) not in theta0_of:
        raise ValueError(
            f"The reference weights (theta0) have no entry for the trainable parameter {module_name}.{local}. Pass "
            "the state of every trainable parameter at the start of training."
        )
    theta0 = theta0_of[id(param)]
    if theta0.device != param.device:
        raise ValueError(
            f"theta0 of {module_name}.{local} is on {theta0.device}, the parameter on {param.device}: the fused full "
            "fine-tune reads theta0 every step. Keep it on the device (trap_reference_device='same') or use "
            "trap_mode='sub_batch'."
        )
    return theta0


# ----------------------------------------------------------------------------- Linear, Conv1D
def _linear_rows(original_forward, x, *, module, name, groups: RowGroups, theta0, transposed=False):
    groups.check(x, name)
    weight, weight0 = module.weight, theta0["weight"]
    if transposed:  # Conv1D: x @ W + b with W of shape (in, out), a Linear with W^T
        weight, weight0 = weight.t(), weight0.t()
    bias = module.bias
    bias0 = theta0.get("bias") if bias is not None else None
    return GroupedLinear.apply(x, weight, bias, weight0, bias0, groups)


def _chunks(x: torch.Tensor, groups: RowGroups):
    """(group, rows) for every group with rows; group 0 computes at theta, group k at scales[k - 1]."""
    if groups.uniform:
        return [(1, x)]
    return [(g, chunk) for g, chunk in enumerate(x.split(list(groups.sizes))) if chunk.shape[0]]


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


# ----------------------------------------------------------------------------- Embedding
def _table_rows(original_forward, ids, *, module, name, groups: RowGroups, theta0):
    out = original_forward(ids)  # at theta, every row (or the one row that all rows share)
    b = groups.sizes[0]
    if groups.uniform:
        copy_ids = ids
    elif ids.dim() > 0 and ids.shape[0] == 1 and groups.rows > 1:  # e.g. position ids (1, T): each row its own blend
        out = out.expand(groups.rows, *out.shape[1:])
        copy_ids = ids
    else:
        groups.check(ids, name)
        copy_ids = ids[b:]
    with torch.no_grad():
        rows0 = F.embedding(copy_ids, theta0["weight"].to(out.dtype), module.padding_idx)
    copies = out[b:]
    blended = torch.lerp(rows0.expand_as(copies), copies, groups.per_row(out)[b:].expand_as(copies))
    return blended if groups.uniform else torch.cat([out[:b], blended])


# ----------------------------------------------------------------------------- LayerNorm, RMSNorm
def _norm_rows(original_forward, x, *args, module, name, groups: RowGroups, theta0, **kwargs):
    """Each row with its own re-scaled vectors, broadcast over its positions in one run of the module, where the
    module's forward takes vectors of that shape and gives what a run per group gives (checked at its first call,
    `_ROWS_BROADCAST`); else one run per group."""
    groups.check(x, name)
    verdict = _ROWS_BROADCAST.get(module)
    # One scale in the batch would let a forward that gives every row the first row's vectors pass the check.
    if groups.uniform or verdict is False or (verdict is None and sum(1 for n in groups.sizes if n) < 2):
        return _norm_per_group(original_forward, x, *args, module=module, groups=groups, theta0=theta0, **kwargs)
    values = {}
    for local, param in module.named_parameters(recurse=False):
        row_scales = groups.row_scales.to(device=param.device, dtype=param.dtype).view(-1, *([1] * (x.dim() - 1)))
        values[local] = lerp_to(theta0[local], param, row_scales)  # exactly theta where s = 1
    try:
        with _parameters_replaced(module, values):
            out = original_forward(x, *args, **kwargs)
    except RuntimeError:  # e.g. F.layer_norm, which wants the vectors' own shape
        out = None
    if verdict is None:
        with torch.no_grad():
            expected = _norm_per_group(original_forward, x, *args, module=module, groups=groups, theta0=theta0, **kwargs)
        _ROWS_BROADCAST[module] = (
            torch.is_tensor(out) and out.shape == expected.shape and torch.allclose(out, expected, rtol=1e-4, atol=1e-6)
        )
    if _ROWS_BROADCAST[module]:
        return out
    return _norm_per_group(original_forward, x, *args, module=module, groups=groups, theta0=theta0, **kwargs)


# Per norm module, whether its forward broadcasts per-row vectors (shape (rows, 1, ..., features)) correctly.
_ROWS_BROADCAST: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def _norm_per_group(original_forward, x, *args, module, groups: RowGroups, theta0, **kwargs):
    parts = []
    for g, chunk in _chunks(x, groups):
        if g == 0:
            parts.append(original_forward(chunk, *args, **kwargs))
            continue
        scale = groups.scales[g - 1]
        values = {local: lerp_to(theta0[local], param, scale) for local, param in module.named_parameters(recurse=False)}
        with _parameters_replaced(module, values):
            parts.append(original_forward(chunk, *args, **kwargs))
    return _cat(parts)


@contextmanager
def _parameters_replaced(module: nn.Module, values: dict[str, torch.Tensor]) -> Iterator[None]:
    """While inside, `module.<name>` reads the (non-leaf) tensor `values[name]`, so gradients flow to the parameter."""
    saved = {name: module._parameters[name] for name in values}
    module._parameters.update(values)
    try:
        yield
    finally:
        module._parameters.update(saved)
