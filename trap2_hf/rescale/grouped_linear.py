"""The Linear (and Conv1D) layer of the per-row re-scaling (`full_per_row.py`): one autograd function whose rows are
grouped by scale, the first group at theta, each other at theta_s = theta0 + s*(theta - theta0)."""

from contextlib import nullcontext

import torch
import torch.nn.functional as F


def lerp_to(theta0: torch.Tensor, theta: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """theta0 + s*(theta - theta0), in theta's dtype (theta0 may be kept in another); s a number or a tensor."""
    return torch.lerp(theta0.to(theta.dtype), theta, scale)


class GroupedLinear(torch.autograd.Function):
    """concat_g(x_g @ W_g^T + b_g), W_g = lerp(W0, W, s_g) (W itself for the first group), without saving any W_g.

    Each group's matmul writes straight into its rows of the output (and of grad_x), so no concatenation copies
    the activations; the weight's gradient adds s_g * grad_g^T x_g group by group, so no scaled copy of
    grad_out is made either (profiled: those two copies and the scaling were a tenth of a fused step's time)."""

    @staticmethod
    def forward(ctx, x, weight, bias, weight0, bias0, groups):
        ctx.groups, ctx.has_bias = groups, bias is not None
        ctx.autocast = _autocast_state(x.device.type)
        ctx.save_for_backward(x, weight, weight0)
        if groups.uniform:  # one group: F.linear, fewest ops (small models are dispatch-bound)
            return F.linear(x, *_weights(weight, bias, weight0, bias0, groups, 1))
        dtype = _compute_dtype(x, ctx.autocast)
        rows = _flat(x).to(dtype)
        out = rows.new_empty(rows.shape[0], weight.shape[0])
        with _no_autocast(ctx.autocast):
            for g, span in _spans(x, groups):
                w, b = _weights(weight, bias, weight0, bias0, groups, g)
                if b is None:
                    torch.mm(rows[span], w.to(dtype).t(), out=out[span])
                else:
                    torch.addmm(b.to(dtype), rows[span], w.to(dtype).t(), out=out[span])
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, weight0 = ctx.saved_tensors
        groups = ctx.groups
        dtype = _compute_dtype(x, ctx.autocast)
        grads = _flat(grad_out).to(dtype)
        rows = _flat(x).to(dtype)
        grad_x = grad_weight = grad_bias = None
        with _no_autocast(ctx.autocast):
            spans = _spans(x, groups)
            if ctx.needs_input_grad[0]:
                weights = [_weights(weight, None, weight0, None, groups, g)[0].to(dtype) for g, _ in spans]
                if len(spans) == 1:
                    grad_x = grads[spans[0][1]].mm(weights[0])
                else:
                    grad_x = rows.new_empty(rows.shape)
                    for (g, span), w in zip(spans, weights):
                        torch.mm(grads[span], w, out=grad_x[span])
                grad_x = grad_x.view(x.shape).to(x.dtype)
            # d theta_s / d theta = s: each group's rows count s times in the weight's gradient.
            for g, span in spans if ctx.needs_input_grad[1] or ctx.needs_input_grad[2] else ():
                scale = _scale_of(groups, g)
                if ctx.needs_input_grad[1]:
                    if grad_weight is None:
                        grad_weight = torch.mm(grads[span].t(), rows[span])
                        if scale != 1:
                            grad_weight.mul_(scale)
                    else:
                        grad_weight.addmm_(grads[span].t(), rows[span], alpha=scale)
                if ctx.has_bias and ctx.needs_input_grad[2]:
                    part = grads[span].sum(0).mul_(scale)
                    grad_bias = part if grad_bias is None else grad_bias.add_(part)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(weight.dtype)
        return grad_x, grad_weight, grad_bias, None, None, None


def _spans(x: torch.Tensor, groups) -> list[tuple[int, slice]]:
    """(group, slice of _flat(x)) for every group with rows, as `full_per_row._chunks` splits them."""
    if groups.uniform:
        return [(1, slice(None))]
    per_row = x[0].numel() // x.shape[-1] if x.shape[0] else 0
    spans, start = [], 0
    for g, size in enumerate(groups.sizes):
        if size:
            spans.append((g, slice(start * per_row, (start + size) * per_row)))
        start += size
    return spans


def _scale_of(groups, g: int) -> float:
    return 1.0 if g == 0 else groups.scales[g - 1]


def _flat(x: torch.Tensor) -> torch.Tensor:
    """(rows * positions, features): a row's positions are consecutive, so a group's rows are one slice."""
    return x.reshape(-1, x.shape[-1])


def _compute_dtype(x: torch.Tensor, autocast_state) -> torch.dtype:
    """The dtype F.linear would compute in: autocast's where it is on (for floating inputs), else the input's."""
    _, dtype, enabled = autocast_state
    return dtype if enabled and x.is_floating_point() else x.dtype


def _no_autocast(autocast_state):
    """The inputs are cast by hand (`_compute_dtype`), and out= matmuls are not autocast."""
    device_type, _, enabled = autocast_state
    return torch.autocast(device_type, enabled=False) if enabled else nullcontext()


def _weights(weight, bias, weight0, bias0, groups, g: int):
    if g == 0:
        return weight, bias
    scale = groups.scales[g - 1]
    return lerp_to(weight0, weight, scale), None if bias is None else lerp_to(bias0, bias, scale)


def _autocast_state(device_type: str):
    enabled = torch.is_autocast_enabled(device_type)
    return device_type, torch.get_autocast_dtype(device_type), enabled
