"""mergekit's file-based merge: a real merged model, as `mergekit-yaml` makes it, for users who want one.

    pip install 'trap2_hf[mergekit]'

    from trap2_hf.audit.mergekit import mergekit_merge
    merged = mergekit_merge(base_model, ["out/topic-adapter", "out/city-adapter"], "ties")

Each update is written as a full model folder (a PEFT adapter folded into the base with
`merge_and_unload`, a fine-tuned model or state saved as it is; `inputs.py`), mergekit's YAML is written
beside it, `mergekit.merge.run_merge` runs the merge, and the merged tensors are loaded into a copy of the
base model. Nothing here re-implements a merge. The audit does not go through files: it runs the same
mergekit methods in memory (`methods.merge_tensor`), and a test checks that both give the same weights.
"""

import contextlib
import copy
import glob
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from .inputs import WrittenInputs, tensor_names, written_inputs
from .methods import BASE, FIRST_UPDATE, applicable, fits, get, naive_weights


def merge_config(
    inputs: WrittenInputs, method: str, weights: Sequence[float] | None = None, params: dict | None = None
) -> dict:
    """mergekit's YAML configuration (as a dict) for `method` over the written inputs.

    `weights` (one per update; default `naive_weights`) go to each model's `weight`; each entry of
    `params` goes where mergekit's spec scopes it: per model (`density`, `epsilon`, `gamma`: a
    number, or a list with one per update) or shared (`normalize`, `rescale`, `lambda`, `t`, ...).
    """
    spec = get(method)
    n = len(inputs.update_dirs)
    low, high = spec.update_range()
    if not fits((low, high), n):
        wanted = f"exactly {low}" if low == high else f"at least {low}" if high is None else f"{low} to {high}"
        raise ValueError(f"mergekit method {method!r} merges {wanted} updates; got {n}. Use one of {applicable(n)}.")
    defaults = spec.parameter_defaults()
    params = {**spec.naive(), **(params or {})}
    unknown = sorted(set(params) - set(defaults) - ({"t"} if spec.t_from_weights else set()))
    if unknown or "weight" in params:
        raise ValueError(
            f"Parameters {unknown or ['weight']} are not parameters of mergekit's {method!r}; it takes "
            f"{sorted(set(defaults) - {'weight'})} (pass per-update weights as `weights`)."
        )
    if weights is None:
        weights = naive_weights(method, n)
    elif not spec.weighted:
        raise ValueError(f"mergekit method {method!r} takes no per-update weights; pass weights=None.")
    if weights is not None and len(weights) != n:
        raise ValueError(f"Pass one weight per update: got {len(weights)} weights for {n} updates.")
    per_model = {p.name for p in spec.spec.parameters if p.scope.value != "shared"} - {"weight"}
    shared = {k: v for k, v in params.items() if k not in per_model}
    models = []
    for i, folder in enumerate(inputs.update_dirs):
        model_params = {k: _one(v, i, n, k) for k, v in params.items() if k in per_model}
        if weights is not None and not spec.t_from_weights:
            model_params["weight"] = float(weights[i])
        models.append({"model": folder, **({"parameters": model_params} if model_params else {})})
    config = {"merge_method": spec.name, "dtype": "float32", "models": models}
    if spec.t_from_weights:
        total = float(sum(weights))
        shared.setdefault("t", 0.5 if abs(total) < 1e-12 else float(weights[1]) / total)
    if spec.base_role == BASE:
        config["base_model"] = inputs.base_dir
    elif spec.base_role == FIRST_UPDATE or inputs.layout == "inferred":
        # A method that ignores its base still takes the first update as mergekit's reference model
        # for an inferred layout (else mergekit picks one from a set, possibly the marked one).
        if inputs.layout == "inferred" and n == 1:
            raise ValueError(f"{method!r} on a single update of this architecture: pass two updates or more.")
        config["base_model"] = inputs.update_dirs[0]
    if shared:
        config["parameters"] = shared
    return config


def run_mergekit(
    inputs: WrittenInputs,
    method: str,
    weights: Sequence[float] | None = None,
    params: dict | None = None,
    out_dir: str | None = None,
    seed: int = 0,
) -> str:
    """Run mergekit's merge into `out_dir` (default: a new folder under the inputs' temporary folder)
    and return it; the folder holds mergekit's `mergekit_config.yml` beside the merged weights.
    `seed` seeds the randomised methods (DARE, DELLA); the caller's random states are restored."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    config = MergeConfiguration.model_validate(merge_config(inputs, method, weights, params))
    out_dir = out_dir or tempfile.mkdtemp(prefix=f"merged-{get(method).name}-", dir=inputs.workdir)
    options = MergeOptions(copy_tokenizer=False, quiet=True, random_seed=seed, device="cpu")
    with _restored_random_states(), _quiet_logging():
        run_merge(config, out_dir, options, config_source=config.to_yaml())
    return out_dir


def merged_tensors(inputs: WrittenInputs, out_dir: str) -> dict[str, torch.Tensor]:
    """The tensors of mergekit's output `out_dir`, by checkpoint name; every tensor of the base checkpoint
    must be there."""
    from safetensors.torch import load_file

    merged = {}
    for path in sorted(glob.glob(os.path.join(out_dir, "*.safetensors"))):
        merged.update(load_file(path))
    dropped = sorted(set(tensor_names(inputs.base_dir)) - set(merged))
    if dropped:
        raise RuntimeError(f"mergekit's output {out_dir!r} lacks tensors of the base checkpoint: {dropped[:5]}.")
    return merged


def load_merged(inputs: WrittenInputs, out_dir: str) -> nn.Module:
    """A copy of the base model holding the merged tensors of `out_dir` (tied weights follow their source)."""
    model = copy.deepcopy(inputs.base_model)
    state = model.state_dict()
    with torch.no_grad():
        for name, tensor in merged_tensors(inputs, out_dir).items():
            if name not in state:
                raise RuntimeError(f"mergekit's output names {name!r}, which the base model does not have.")
            state[name].copy_(tensor)
    return model


def mergekit_merge(
    base,
    updates: Sequence,
    method: str,
    weights: Sequence[float] | None = None,
    params: dict | None = None,
    out_dir: str | None = None,
    seed: int = 0,
) -> nn.Module:
    """Merge `updates` of `base` with mergekit's `method` and return the merged model (a copy of the
    base). `weights`: one per update (default 1/N; see `informed_weights`); `params`: mergekit's
    parameters of the method (defaults: `naive`); `out_dir`: keep mergekit's output folder there.
    Inputs as in `written_inputs`."""
    get(method)
    with written_inputs(base, updates) as inputs:
        folder = run_mergekit(inputs, method, weights, params, out_dir=out_dir, seed=seed)
        return load_merged(inputs, folder)


def mergekit_sweep(
    base,
    updates: Sequence,
    evaluate: Callable[[nn.Module], object],
    methods: Sequence[str] | None = None,
    seed: int = 0,
) -> list[dict]:
    """Every method that applies to this many updates (or `methods`), each with naive weights and
    parameters: `[{"method", "weights", "params", "layout", "result": evaluate(merged model)}]`.

    A method outside its input contract, or one mergekit refuses for these updates (multislerp, for
    instance, raises on a tensor no update changes, as with adapters), gets `"skipped": reason`
    instead of a result, and the sweep goes on.
    """
    with written_inputs(base, updates) as inputs:
        return sweep_inputs(inputs, evaluate, methods, seed)


def sweep_inputs(
    inputs: WrittenInputs,
    evaluate: Callable[[nn.Module], object],
    methods: Sequence[str] | None = None,
    seed: int = 0,
    load: Callable[[WrittenInputs, str], object] = load_merged,
) -> list[dict]:
    """`mergekit_sweep` over inputs already written (so other merges of the same inputs can follow); `evaluate`
    gets what `load` makes of each merge (`merged_tensors`: the tensors alone, no copy of the model)."""
    n = len(inputs.update_dirs)
    chosen = applicable(n) if methods is None else [get(m).name for m in methods]
    rows = []
    for name in chosen:
        weights = naive_weights(name, n)
        row = {"method": name, "weights": weights, "params": get(name).naive(), "layout": inputs.layout}
        if not fits(get(name).update_range(), n):
            rows.append({**row, "skipped": f"needs {get(name).describe()['updates']} updates, got {n}"})
            continue
        try:
            folder = run_mergekit(inputs, name, weights, seed=seed)
        except (ValueError, RuntimeError, TypeError) as error:
            rows.append({**row, "skipped": f"mergekit raised {type(error).__name__}: {error}"})
            continue
        try:
            row["result"] = evaluate(load(inputs, folder))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        rows.append(row)
    return rows


def _one(value, index: int, n: int, name: str):
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"Per-update parameter {name!r} has {len(value)} values for {n} updates.")
        return value[index]
    return value


@contextlib.contextmanager
def _restored_random_states() -> Iterator[None]:
    """mergekit seeds Python's, NumPy's and torch's global generators; give the caller back its own."""
    import numpy as np

    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng():
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


@contextlib.contextmanager
def _quiet_logging() -> Iterator[None]:
    """mergekit logs its layout inference as warnings on the root logger; the layout is reported in
    `WrittenInputs.layout` instead."""
    import logging

    loggers = [logging.getLogger(), logging.getLogger("mergekit")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
