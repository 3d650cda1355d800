"""mergekit as a merge backend: the audit's updates merged by mergekit's own methods, as real mergers do.

    pip install 'trap2_hf[mergekit]'

    from trap2_hf.audit.mergekit_backend import mergekit_merge
    merged = mergekit_merge(base_model, ["out/topic-adapter", "out/city-adapter"], "ties")

Each update is written as a full model folder (a PEFT adapter folded into the base with
`merge_and_unload`, a fine-tuned model or state saved as it is), mergekit's YAML is written beside it,
`mergekit.merge.run_merge` runs the merge, and the merged tensors are loaded into a copy of the base
model. Nothing here re-implements a merge: the table below only says how each mergekit method is
wired (which base, how many updates, how per-update weights enter) and what a naive merger passes.
Facts mergekit owns (parameter names, scopes, defaults, input contracts) are read from its registry.
"""

import contextlib
import copy
import glob
import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .methods import DEFAULT_DENSITY

MERGEKIT_VERSION = "0.1.5"
INSTALL_HINT = "pip install 'trap2_hf[mergekit]'"
# How the pretrained base enters mergekit's YAML: as `base_model` (the merge works on task vectors),
# not at all (the merge works on the full weights), or the first update as `base_model` (slerp's
# interpolation between two models).
BASE, NO_BASE, FIRST_UPDATE = "pretrained base", "not used", "first update"
# A `config.json` architecture mergekit has no definition for: it then infers the layout from the
# checkpoints' tensor names (see `WrittenInputs.layout`).
INFERRED_ARCHITECTURE = "Trap2InferredLayout"


@dataclass(frozen=True)
class MergekitMethod:
    """How one mergekit method is called: `naive` holds what a naive merger passes beyond the
    per-update weights (1/N each); `t_from_weights` maps two weights to slerp's `t = w2 / (w1 + w2)`
    (nuslerp's own convention), so every method takes the same weight list."""

    name: str
    summary: str
    naive: dict = field(default_factory=dict)
    base: str | None = None
    t_from_weights: bool = False

    @property
    def spec(self):
        """mergekit's own declaration of the method (parameters with scope and default, contract)."""
        return _mergekit().merge_methods.registry.get(self.name).spec

    @property
    def base_role(self) -> str:
        if self.base is not None:
            return self.base
        return NO_BASE if self.spec.contract.base.value in ("ignored", "forbidden") else BASE

    @property
    def weighted(self) -> bool:
        """Whether the method takes one weight per update (slerp's `t` comes from two weights)."""
        return self.t_from_weights or "weight" in self.parameter_defaults()

    def parameter_defaults(self) -> dict:
        return {p.name: (None if p.required else p.default) for p in self.spec.parameters}

    def update_range(self) -> tuple[int, int | None]:
        """(fewest, most) updates mergekit's input contract accepts with this wiring."""
        contract = self.spec.contract
        with_base = self.base_role == BASE
        low, high = max(1, contract.min_inputs - with_base), contract.max_inputs
        high = None if high is None else high - with_base
        if with_base:
            low = max(low, contract.min_non_base or 0)
            if contract.max_non_base is not None:
                high = contract.max_non_base if high is None else min(high, contract.max_non_base)
        return low, high

    def describe(self) -> dict:
        low, high = self.update_range()
        return {
            "method": self.name,
            "summary": self.summary,
            "base": self.base_role,
            "updates": f"exactly {low}" if low == high else f"at least {low}" if high is None else f"{low}-{high}",
            "weights": "t = w2 / (w1 + w2)" if self.t_from_weights else "per update" if self.weighted else "none",
            "parameters": self.parameter_defaults(),
            "naive": self.naive,
        }


_SPARSE = {"density": DEFAULT_DENSITY}
METHODS: dict[str, MergekitMethod] = {
    m.name: m
    for m in (
        MergekitMethod("linear", "sum_i w_i theta_i / sum_i w_i over the full weights (normalize)"),
        MergekitMethod("task_arithmetic", "theta0 + lambda sum_i w_i tau_i"),
        MergekitMethod("ties", "magnitude trim, sign election, disjoint mean (normalize)", _SPARSE),
        MergekitMethod("dare_ties", "random drop and rescale, then TIES' election", _SPARSE),
        MergekitMethod("dare_linear", "random drop and rescale, then a weighted sum", _SPARSE),
        MergekitMethod("breadcrumbs", "drop the largest gamma and the smallest entries, weighted sum", _SPARSE),
        MergekitMethod("breadcrumbs_ties", "breadcrumbs' sparsification, then TIES' election", _SPARSE),
        MergekitMethod("della", "magnitude-ranked random drop (density +- epsilon), TIES' election", _SPARSE),
        MergekitMethod("della_linear", "DELLA's drop, then a weighted sum", _SPARSE),
        MergekitMethod("sce", "select by variance, weights from squared magnitudes, sign election (no weights)"),
        MergekitMethod("model_stock", "interpolation to the base by the updates' angles (no weights)"),
        MergekitMethod("karcher", "Riemannian (Karcher) mean of the full weights (no weights)"),
        MergekitMethod("multislerp", "spherical interpolation of any number of task vectors"),
        MergekitMethod("slerp", "spherical interpolation between two models", base=FIRST_UPDATE, t_from_weights=True),
        MergekitMethod("nuslerp", "spherical interpolation of two task vectors"),
    )
}


def get(name: str) -> MergekitMethod:
    if name not in METHODS:
        raise KeyError(f"Unknown mergekit method {name!r}; known methods: {', '.join(METHODS)}.")
    return METHODS[name]


def applicable(num_updates: int) -> list[str]:
    """The methods whose input contract accepts `num_updates` updates (slerp and nuslerp: two)."""
    return [n for n, m in METHODS.items() if _fits(m.update_range(), num_updates)]


def naive_weights(method: str, num_updates: int) -> list[float] | None:
    """What a naive merger uses: 1/N for every update; None for methods without weights."""
    return [1.0 / num_updates] * num_updates if get(method).weighted else None


def informed_weights(num_updates: int, others: float, protected: float = 1.0, protected_index: int = 0) -> list[float]:
    """The informed attacker's weights: the protected update at `protected` (its nominal scale is
    1.0), every other update at `others`."""
    if not 0 <= protected_index < num_updates:
        raise ValueError(f"protected_index={protected_index} is outside the {num_updates} updates.")
    return [protected if i == protected_index else others for i in range(num_updates)]


def method_table() -> str:
    """The table of methods as Markdown, from `describe()`."""
    rows = [
        "| method | base | updates | weights | naive | mergekit parameters (default) |",
        "|---|---|---|---|---|---|",
    ]
    for method in METHODS.values():
        d = method.describe()
        params = ", ".join(f"{k} ({v})" for k, v in d["parameters"].items() if k != "weight")
        naive = ", ".join(f"{k} {v}" for k, v in d["naive"].items()) or "mergekit's defaults"
        rows.append(f"| {d['method']} | {d['base']} | {d['updates']} | {d['weights']} | {naive} | {params or '-'} |")
    return "\n".join(rows)


# ---- the inputs: one model folder per update ----------------------------------------------------


@dataclass
class WrittenInputs:
    """The base and the updates as model folders mergekit reads, and the model the result loads into.

    `layout` is "mergekit" when mergekit's architecture definition covers the checkpoint, or
    "inferred" when it does not (a head it does not declare, a missing pooler, or mergekit 0.1.5's
    `BertModel` definition, whose optional aliased `position_ids` fails in its planner): one update's
    folder then names an architecture mergekit does not know, so mergekit infers the layout from the
    checkpoints' tensor names and merges every tensor, exact for updates that share the base's names.
    """

    base_dir: str
    update_dirs: list[str]
    base_model: nn.Module
    layout: str
    workdir: str


@contextlib.contextmanager
def written_inputs(base, updates: Sequence, workdir: str | None = None) -> Iterator[WrittenInputs]:
    """Write the base and each update as a full model folder in a temporary folder (under `workdir`
    if given), removed on exit with mergekit's cached readers of it.

    `base` is a transformers model, a PEFT model (its adapters are left out) or a model folder. Each
    update is a model folder, a PEFT adapter folder (folded into the base), a transformers model (a
    full fine-tune), a `(PeftModel, adapter_name)` pair (that adapter folded in), or a fine-tuned
    state `{parameter name: tensor}` keyed like the base's `named_parameters()`.
    """
    _mergekit()
    if not updates:
        raise ValueError("Pass at least one update to merge.")
    root = tempfile.mkdtemp(prefix="trap2-mergekit-", dir=workdir)
    try:
        base_model = _base_model(base)
        base_dir = os.path.join(root, "base")
        _save(base_model, base_dir)
        dirs = [_write_update(base_model, u, os.path.join(root, f"update_{i}")) for i, u in enumerate(updates)]
        layout = _layout(base_dir)
        if layout == "inferred":
            # mergekit infers a layout when any input lacks a definition; the last update is never
            # the model it reads transformers' tensor names from (the base, or the first update).
            dirs[-1] = _marked_for_inference(dirs[-1], root)
        yield WrittenInputs(base_dir, dirs, base_model, layout, root)
    finally:
        _forget_readers(root)
        shutil.rmtree(root, ignore_errors=True)


def _base_model(base) -> nn.Module:
    if isinstance(base, (str, os.PathLike)):
        return _load_model_folder(os.fspath(base))
    if hasattr(base, "peft_config"):
        return copy.deepcopy(base).unload()
    if not hasattr(base, "save_pretrained"):
        raise TypeError(
            f"base must be a transformers model, a PEFT model or a model folder; got {type(base).__name__}."
        )
    return base


def _write_update(base_model: nn.Module, update, folder: str) -> str:
    if isinstance(update, (str, os.PathLike)):
        path = os.fspath(update)
        if os.path.isfile(os.path.join(path, "adapter_config.json")):
            from peft import PeftModel

            folded = PeftModel.from_pretrained(copy.deepcopy(base_model), path).merge_and_unload()
            _save(folded, folder)
            return folder
        if os.path.isfile(os.path.join(path, "config.json")):
            return path
        raise ValueError(f"Update {path!r} holds neither adapter_config.json (an adapter) nor config.json (a model).")
    if isinstance(update, tuple) and len(update) == 2 and hasattr(update[0], "peft_config"):
        peft_model, name = update
        if name not in peft_model.peft_config:
            raise ValueError(f"The PEFT model has no adapter {name!r} (adapters: {', '.join(peft_model.peft_config)}).")
        folded = copy.deepcopy(peft_model)
        folded.set_adapter(name)
        _save(folded.merge_and_unload(adapter_names=[name]), folder)
        return folder
    if isinstance(update, Mapping):
        model = copy.deepcopy(base_model)
        params = dict(model.named_parameters())
        unknown = sorted(set(update) - set(params))
        if unknown:
            raise ValueError(f"The fine-tuned state names parameters the base model does not have: {unknown[:5]}.")
        with torch.no_grad():
            for name, tensor in update.items():
                params[name].copy_(tensor)
        _save(model, folder)
        return folder
    if hasattr(update, "save_pretrained") and not hasattr(update, "peft_config"):
        _save(update, folder)
        return folder
    raise TypeError(
        f"Cannot write an update of type {type(update).__name__}: pass a model folder, an adapter folder, a "
        "transformers model, a (PeftModel, adapter_name) pair or a {parameter name: tensor} state."
    )


def _save(model: nn.Module, folder: str) -> None:
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(folder)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _layout(base_dir: str) -> str:
    """'mergekit' if mergekit's architecture definition names every tensor of the base checkpoint and
    finds every tensor it requires, else 'inferred'."""
    from mergekit.architecture import arch_info_for_config
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base_dir)
    names = set(_tensor_names(base_dir))
    try:
        arch = arch_info_for_config(config)
        weights = arch.all_weights(config) if arch is not None else None
    except Exception:  # a definition that cannot even be configured for this checkpoint
        weights = None
    if weights is None:
        return "inferred"
    declared, fits = set(), True
    for weight in weights:
        known = {weight.name, *(weight.aliases or ()), *(weight.tied_names or ())}
        declared |= known
        # mergekit 0.1.5's planner concatenates a list and the tuple of an optional weight's aliases.
        broken = weight.optional and weight.aliases
        fits &= not broken and (weight.optional or bool(known & names))
    return "mergekit" if fits and names <= declared else "inferred"


def _marked_for_inference(folder: str, root: str) -> str:
    """`folder` with an architecture mergekit does not know, so that it infers the layout from the
    tensors; the base keeps its own, from which mergekit reads tied weights. A folder outside `root`
    (the user's) is shadowed by links to its files, never edited."""
    if not os.path.abspath(folder).startswith(os.path.abspath(root) + os.sep):
        shadow = os.path.join(root, "inferred_" + os.path.basename(os.path.normpath(folder)))
        os.makedirs(shadow)
        for name in os.listdir(folder):
            if name != "config.json":
                os.symlink(os.path.abspath(os.path.join(folder, name)), os.path.join(shadow, name))
        shutil.copy(os.path.join(folder, "config.json"), os.path.join(shadow, "config.json"))
        folder = shadow
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        raw = json.load(f)
    raw["architectures"] = [INFERRED_ARCHITECTURE]
    with open(path, "w") as f:
        json.dump(raw, f, indent=2)
    return folder


def _tensor_names(folder: str) -> list[str]:
    from safetensors import safe_open

    names = []
    for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        with safe_open(path, "pt") as f:
            names.extend(f.keys())
    if not names:
        raise FileNotFoundError(f"No *.safetensors weights in {folder!r}; save the model with save_pretrained.")
    return names


def _load_model_folder(folder: str) -> nn.Module:
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    architecture = (config.architectures or [None])[0]
    cls = getattr(transformers, architecture or "", None)
    if cls is None:
        raise ValueError(f"Model folder {folder!r} names architecture {architecture!r}, which transformers lacks.")
    return cls.from_pretrained(folder)


def _forget_readers(root: str) -> None:
    """Drop mergekit's cached readers of folders under `root` (its LoaderCache is process-wide)."""
    try:
        from mergekit.io.tasks import LoaderCache
    except ImportError:
        return
    loaders = LoaderCache().loaders
    for ref in [r for r in loaders if os.path.abspath(str(r.model.path)).startswith(os.path.abspath(root))]:
        loaders.pop(ref).flush()


# ---- the merge ----------------------------------------------------------------------------------


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
    if not _fits((low, high), n):
        wanted = f"exactly {low}" if low == high else f"at least {low}" if high is None else f"{low} to {high}"
        raise ValueError(f"mergekit method {method!r} merges {wanted} updates; got {n}. Use one of {applicable(n)}.")
    defaults = spec.parameter_defaults()
    params = {**spec.naive, **(params or {})}
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
    config = {"merge_method": method, "dtype": "float32", "models": models}
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
    out_dir = out_dir or tempfile.mkdtemp(prefix=f"merged-{method}-", dir=inputs.workdir)
    options = MergeOptions(copy_tokenizer=False, quiet=True, random_seed=seed, device="cpu")
    with _restored_random_states(), _quiet_logging():
        run_merge(config, out_dir, options, config_source=config.to_yaml())
    return out_dir


def load_merged(inputs: WrittenInputs, out_dir: str) -> nn.Module:
    """A copy of the base model holding the merged tensors of `out_dir`; every tensor of the base
    checkpoint must be there (tied weights follow their source)."""
    from safetensors.torch import load_file

    merged = {}
    for path in sorted(glob.glob(os.path.join(out_dir, "*.safetensors"))):
        merged.update(load_file(path))
    dropped = sorted(set(_tensor_names(inputs.base_dir)) - set(merged))
    if dropped:
        raise RuntimeError(f"mergekit's output {out_dir!r} lacks tensors of the base checkpoint: {dropped[:5]}.")
    model = copy.deepcopy(inputs.base_model)
    state = model.state_dict()
    with torch.no_grad():
        for name, tensor in merged.items():
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
    inputs: WrittenInputs, evaluate: Callable[[nn.Module], object], methods: Sequence[str] | None = None, seed: int = 0
) -> list[dict]:
    """`mergekit_sweep` over inputs already written (so other merges of the same inputs can follow)."""
    n = len(inputs.update_dirs)
    chosen = applicable(n) if methods is None else [get(m).name for m in methods]
    rows = []
    for name in chosen:
        weights = naive_weights(name, n)
        row = {"method": name, "weights": weights, "params": dict(get(name).naive), "layout": inputs.layout}
        if not _fits(get(name).update_range(), n):
            rows.append({**row, "skipped": f"needs {get(name).describe()['updates']} updates, got {n}"})
            continue
        try:
            folder = run_mergekit(inputs, name, weights, seed=seed)
        except (ValueError, RuntimeError, TypeError) as error:
            rows.append({**row, "skipped": f"mergekit raised {type(error).__name__}: {error}"})
            continue
        try:
            row["result"] = evaluate(load_merged(inputs, folder))
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


def _fits(bounds: tuple[int, int | None], n: int) -> bool:
    low, high = bounds
    return n >= low and (high is None or n <= high)


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


def _mergekit():
    try:
        import mergekit
        import mergekit.merge_methods.registry  # noqa: F401
    except ImportError as err:
        raise ImportError(f"The mergekit backend needs mergekit=={MERGEKIT_VERSION}: {INSTALL_HINT}.") from err
    return mergekit
