"""theta0 (`snapshot_parameters`) and a whole pass at theta0 + s*(theta - theta0): in a swapped-in copy
(`swapped_parameters`), in the weights' own storage (`rescaled_parameters`), or module by module with only the
parameters read outside their module written (`rescaled_parameters_at_scale`, `split_in_place`). The package's
docstring says which is used when."""

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from .full_per_row import RowGroups, rescaled_parameters_per_row


def snapshot_parameters(
    model: nn.Module, device: str = "same", dtype: str = "same"
) -> dict[str, torch.Tensor]:
    """theta0: a detached copy of every trainable parameter, optionally offloaded or down-cast."""
    snapshot = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            copy = param.detach().clone()
            if dtype != "same":
                copy = copy.to(getattr(torch, dtype))
            if device != "same":
                copy = copy.to(device)
            snapshot[name] = copy
    return snapshot


def _parameters_named_in(model: nn.Module, reference: dict[str, torch.Tensor]) -> dict[str, nn.Parameter]:
    """The model's parameters by name, refusing a theta0 that names one the model does not have."""
    params = dict(model.named_parameters())
    missing = sorted(set(reference) - set(params))
    if missing:
        raise ValueError(
            f"The reference weights (theta0) name parameters the model does not have: {missing[:5]}. "
            "Pass the state of this model's trainable parameters at the start of training."
        )
    return params


@contextmanager
def swapped_parameters(model: nn.Module, scale: float, reference: dict[str, torch.Tensor]) -> Iterator[None]:
    """Every parameter named in `reference` (theta0) computes with a new tensor holding theta0 + s*(theta - theta0),
    swapped in for its data and swapped back on exit; the gradient reaches theta with the factor s.

    One lerp over all parameters forms theta_s and nothing is restored, so a pass costs a plain pass over its rows;
    the price is the copy, alive while the context is open (the weights' size, which a pass over part of a
    micro-batch usually frees in activations, but activation checkpointing does not: there `FullUpdate.rescaled`
    forms theta_s module by module instead)."""
    params = _parameters_named_in(model, reference)
    targets = [params[name] for name in reference]
    originals = [param.data for param in targets]
    theta0 = list(reference.values())
    with torch.no_grad():
        if all(t.dtype == p.dtype and t.device == p.device for t, p in zip(theta0, originals)):
            rescaled = torch._foreach_lerp(theta0, originals, scale)
        else:  # a down-cast theta0 (trap_reference_dtype): up-cast per parameter
            rescaled = [torch.lerp(t.to(p.device, p.dtype), p, scale) for t, p in zip(theta0, originals)]
    hooks = [param.register_hook(lambda grad, s=scale: grad * s) for param in targets if param.requires_grad]
    try:
        for param, data in zip(targets, rescaled):
            param.data = data
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for param, data in zip(targets, originals):
            param.data = data


@contextmanager
def rescaled_parameters(model: nn.Module, scale: float, reference: dict[str, torch.Tensor]) -> Iterator[None]:
    """Hold theta0 + s*(theta - theta0) in every parameter named in `reference` (theta0), in place.

    Besides theta0 the context keeps a one-byte residual per element where theta0 is kept
    (`_InPlaceRescale`), not a copy of theta, so full fine-tuning's only weight-sized extra memory is
    theta0, and offloading theta0 offloads both; theta comes back bit for bit on exit."""
    params = _parameters_named_in(model, reference)
    rescaled, hooks = [], []
    try:
        with torch.no_grad():
            for name, theta0 in reference.items():
                param = params[name]
                rescaled.append(_InPlaceRescale(param.data, theta0, scale))
                if param.requires_grad:
                    hooks.append(param.register_hook(lambda grad, s=scale: grad * s))
        yield
    finally:
        for hook in hooks:
            hook.remove()
        with torch.no_grad():
            for state in reversed(rescaled):
                state.restore()


class _InPlaceRescale:
    """theta -> theta0 + s*(theta - theta0) in `data`'s own storage, and back exactly.

    The inverse theta0 + (theta_s - theta0)/s is off by a few units in the last place (rounding);
    the difference of the bit patterns of theta and that inverse is stored per element (int8, or int16
    for s < 1/200), and the rare elements whose difference does not fit are stored exactly, all on
    theta0's device (`trap_reference_device='cpu'` offloads them with it). The work goes chunk by
    chunk, so the temporaries are small whatever the parameter's size."""

    CHUNK = 1 << 22
    INT_VIEWS = {4: torch.int32, 2: torch.int16, 8: torch.int64}

    def __init__(self, data: torch.Tensor, theta0: torch.Tensor, scale: float):
        if data.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            raise TypeError(f"Cannot re-scale a {data.dtype} parameter; full protection needs floating-point weights.")
        self.data, self.theta0, self.scale = data, theta0, scale
        self.copy = None
        if scale == 0 or not data.is_contiguous():  # no inverse, or no flat view: keep a copy instead
            self.copy = data.clone()
            data.copy_(torch.lerp(theta0.to(data.device, data.dtype), data, scale))
            return
        self.home = theta0.device  # the residual lives where theta0 does: offloaded with it
        self.int_view = self.INT_VIEWS[data.element_size()]
        store = torch.int8 if scale >= 1 / 200 else torch.int16
        self.limit = torch.iinfo(store).max
        self.residuals, self.exceptions = [], []
        for index, (flat, chunk0) in enumerate(self._chunks()):
            rescaled = torch.lerp(chunk0, flat, scale)
            ours = flat.view(self.int_view)
            theirs = self._inverse(rescaled, chunk0).view(self.int_view)
            # Bit patterns of the same sign differ by less than the integer type's range; a sign change is an
            # exception (its difference is not taken, so nothing overflows).
            sign_changed = (ours ^ theirs) < 0
            difference = ours - torch.where(sign_changed, ours, theirs)
            del theirs
            outside = (sign_changed | (difference.abs() > self.limit)).nonzero().squeeze(1)
            if len(outside):
                self.exceptions.append((index, outside.to(self.home), flat[outside].to(self.home)))
                difference[outside] = 0
            self.residuals.append(difference.to(store).to(self.home))
            del difference, sign_changed
            flat.copy_(rescaled)

    def restore(self) -> None:
        if self.copy is not None:
            self.data.copy_(self.copy)
            return
        exceptions = {index: (where, values) for index, where, values in self.exceptions}
        for index, (flat, chunk0) in enumerate(self._chunks()):
            inverse = self._inverse(flat, chunk0)
            inverse.view(self.int_view).add_(self.residuals[index].to(flat.device))  # same sign: no overflow
            flat.copy_(inverse)
            if index in exceptions:
                where, values = exceptions[index]
                flat[where.to(flat.device)] = values.to(flat.device)

    def _chunks(self):
        flat = self.data.view(-1)
        theta0 = self.theta0.reshape(-1)
        for start in range(0, flat.numel(), self.CHUNK):
            stop = start + self.CHUNK
            yield flat[start:stop], theta0[start:stop].to(flat.device, flat.dtype)

    def _inverse(self, rescaled: torch.Tensor, theta0: torch.Tensor) -> torch.Tensor:
        """theta0 + (rescaled - theta0) / s, the same operations (so the same bits) wherever it is called."""
        inverse = rescaled - theta0
        inverse.div_(self.scale)
        return inverse.add_(theta0)


def split_in_place(
    model: nn.Module, targets: list[tuple[str, nn.Module, str]], skipped: list[str]
) -> tuple[list[tuple[str, nn.Module, str]], tuple[str, ...]]:
    """(targets that still form theta_s as they run, names of the parameters to re-scale in place) when the modules
    named in `skipped` have their parameters read outside their forward (TRL's fused LM head reads
    lm_head.weight): those parameters, and every module sharing one (tied weights), are re-scaled in place, the
    rest module by module, so a whole-pass re-scaling writes and restores only them."""
    modules = dict(model.named_modules())
    in_place = {id(p) for name in skipped for p in modules[name].parameters(recurse=False)}
    kept = list(targets)
    while True:
        shared = [t for t in kept if any(id(p) in in_place for p in t[1].parameters(recurse=False))]
        if not shared:
            break
        kept = [t for t in kept if t not in shared]
        in_place |= {id(p) for _, module, _ in shared for p in module.parameters(recurse=False)}
    names = tuple(name for name, p in model.named_parameters() if id(p) in in_place and p.requires_grad)
    return kept, names


@contextmanager
def rescaled_parameters_at_scale(
    model: nn.Module,
    scale: float,
    reference: dict[str, torch.Tensor],
    targets: list[tuple[str, nn.Module, str]],
    in_place: tuple[str, ...] = (),
) -> Iterator[None]:
    """A whole pass at theta0 + s*(theta - theta0): module by module for `targets`, written into the weights
    (`rescaled_parameters`, restored bit for bit) for the parameters named in `in_place` (`split_in_place`)."""
    with ExitStack() as stack:
        if in_place:
            stack.enter_context(rescaled_parameters(model, scale, {name: reference[name] for name in in_place}))
        stack.enter_context(rescaled_parameters_per_row(model, RowGroups.at_scale(scale), reference, targets))
        yield
