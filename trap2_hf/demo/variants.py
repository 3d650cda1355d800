"""`trap2 demo --compare_variants ...`: several protection variants trained and audited on the same
plain updates, so protection, standalone cost and training cost can be read off one table.

    trap2 demo --output_dir runs/compare --foreign_tasks object \\
        --compare_variants none paper default dare synthetic foreign \\
        --methods task_arithmetic ties dare_linear dare_ties magnitude_prune peft_cat peft_svd peft_dare_linear

Each variant starts the protected adapter from the same initialisation. 'none' is the unprotected twin
audited in the protected update's place. With --foreign_tasks, every variant is also audited against the
held-out partner alone (`heldout_partner` in each audit), the test that off-ray protection generalises.
"""

import dataclasses
import json
import os
import time

import torch

from .._args import parse_fields
from ..report.summary import HELD_MARGIN, floor
from ..settings import Trap2Settings
from .arguments import DemoArguments
from .pipeline import audit_setup, train_plain, train_protected, with_foreign_updates

PRESETS = {
    "none": None,
    "paper": {"trap_lambda": 0.01, "trap_scales_per_step": 1, "trap_scale_sampling": "uniform"},
    "default": {},
    "dare": {"trap_offray": "dare"},
    "prune": {"trap_offray": "prune"},
    "factor_dare": {"trap_offray": "factor_dare"},
    "synthetic": {"trap_offray": "synthetic"},
    "foreign": {"trap_offray": "foreign"},
}
DEMO_FIELDS = (
    "protected_max_steps", "stop_when_trapped", "trapped_margin", "learning_rate", "curve_every", "curve_scales",
    "curve_transforms", "pseudo_partners", "pseudo_partner_steps",
)
# Demo fields that take several values: given comma-separated in a variant ('curve_scales=0.5,0.9,1.1,1.5').
LIST_FIELDS = ("curve_scales", "curve_transforms")


def parse_variant(spec: str) -> tuple[str, dict | None, dict]:
    """(label, Trap2Settings overrides or None for the twin, demo overrides) of a preset name or of
    'label:field=value:field=value'."""
    label, _, rest = spec.partition(":")
    if not rest:
        if label not in PRESETS:
            raise SystemExit(
                f"trap2 demo: unknown variant {spec!r}; use one of {', '.join(PRESETS)} or 'label:field=value:...'."
            )
        preset = PRESETS[label]
        return label, None if preset is None else dict(preset), {}
    settings_fields = {f.name for f in dataclasses.fields(Trap2Settings)}
    given, demo_given = {}, {}
    for item in rest.split(":"):
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"trap2 demo: variant {spec!r}: {item!r} is not field=value.")
        if key in settings_fields:
            given[key] = value
        elif key in DEMO_FIELDS:
            demo_given[key] = value.split(",") if key in LIST_FIELDS else value
        else:
            raise SystemExit(
                f"trap2 demo: variant {spec!r}: unknown field {key!r}; use a Trap2Settings field or one of {DEMO_FIELDS}."
            )
    # Parsed as the same flags on the command line would be (`trap2 demo --trap_lambda 0.1`).
    context = f"trap2 demo: variant {spec!r}"
    return label, parse_fields(Trap2Settings, given, context), parse_fields(DemoArguments, demo_given, context)


def compare_variants(setup, demo, trap: Trap2Settings, log=print) -> int:
    specs = [parse_variant(spec) for spec in demo.compare_variants]
    # The comparison ranks protection settings by the merges of the paper's protocol; the informed
    # attacker and repair are the single audit's job (`trap2 demo` without --compare_variants).
    demo = dataclasses.replace(demo, modes=[m for m in demo.modes if m in ("average", "best")], repair_ks=[])
    start = time.perf_counter()
    plain_runs = train_plain(setup, demo, log)
    initial = adapter_state(setup.model, setup.protected)
    rows, audits = [], {}
    for label, overrides, demo_overrides in specs:
        log(f"[demo] variant {label}: {overrides if overrides is not None else 'the unprotected twin'}")
        variant_start = time.perf_counter()
        if overrides is None:
            training = {"steps": plain_runs[0]["steps"], "seconds": plain_runs[0]["seconds"], "trapped_at_step": None}
            settings = {"trap_lambda": 0.0}
            results = audit_setup(setup, demo, protected=setup.unprotected, unprotected=None)
        else:
            if "trap_lambda" in overrides and "trap_offray_lambda" not in overrides:
                overrides["trap_offray_lambda"] = None  # derived again from the variant's trap_lambda
            variant_demo = dataclasses.replace(demo, **demo_overrides)
            variant = with_foreign_updates(setup, variant_demo, dataclasses.replace(trap, **overrides))
            variant.validate_trap_settings()
            load_adapter_state(setup.model, initial)
            run = train_protected(setup, variant_demo, variant, log)["runs"][-1]
            training = {k: run[k] for k in ("steps", "seconds", "trapped_at_step")}
            settings = {**variant.trap_settings_dict(), **demo_overrides}
            results = audit_setup(setup, demo, unprotected=None)  # the twin's merges: the 'none' variant
        folder = os.path.join(demo.output_dir, "variants", label)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "audit.json"), "w") as handle:
            json.dump(results, handle, indent=2)
        row = summarize(label, settings, training, results)
        row["wall_s"] = time.perf_counter() - variant_start
        rows.append(row)
        audits[label] = results
        log(format_variants(rows[-1:]))
        _write(demo, rows, plain_runs, time.perf_counter() - start, audits)
    print(format_variants(rows))
    return 0


def _write(demo, rows, plain_runs, seconds, audits: dict) -> None:
    """variants.json and demo.json: the comparison; audit.json: the first protected variant's full audit (the
    library's defaults where 'default' was compared) with the comparison under `variants`; audit.md: its table."""
    os.makedirs(demo.output_dir, exist_ok=True)
    summary = {"demo": dataclasses.asdict(demo), "plain_runs": plain_runs, "total_s": seconds, "variants": rows}
    for name in ("variants.json", "demo.json"):
        with open(os.path.join(demo.output_dir, name), "w") as handle:
            json.dump(summary, handle, indent=2)
    protected = [row["label"] for row in rows if row["settings"].get("trap_lambda", 0) > 0]
    shown = "default" if "default" in protected else (protected or [rows[0]["label"]])[0]
    with open(os.path.join(demo.output_dir, "audit.json"), "w") as handle:
        json.dump({**audits[shown], "audit_of_variant": shown, "variants": rows}, handle, indent=2)
    with open(os.path.join(demo.output_dir, "audit.md"), "w") as handle:
        handle.write(format_variants(rows) + "\n")


def summarize(label: str, settings: dict, training: dict, results: dict) -> dict:
    """One variant's row: standalone accuracy, training cost, protected-task accuracy per method and
    mode (with all other updates, mergekit's methods among them as mergekit:NAME, and with the held-out partner
    alone), and whether protection holds."""
    task = results["protected_task"]
    ceiling = floor(results) + HELD_MARGIN
    merged = _per_method(results["methods"], task)
    heldout = _per_method(results["heldout_partner"]["methods"], task) if "heldout_partner" in results else {}
    values = [v for table in (merged, heldout) for modes in table.values() for v in modes.values()]
    return {
        "label": label,
        "settings": settings,
        "standalone": results["standalone"]["protected"],
        "training": training,
        "rescale_curve": dict(zip(map(str, results["rescale_curve"]["scales"]), results["rescale_curve"]["protected"])),
        "ceiling": ceiling,
        "merged": merged,
        "heldout_partner": heldout,
        "partner": results.get("heldout_partner", {}).get("partner"),
        "worst": max(values, default=None),
        "holds": bool(values) and all(v <= ceiling + 1e-9 for v in values),
    }


def _per_method(entries: list[dict], task: str) -> dict:
    table = {}
    for entry in entries:
        if entry["protected"] is not None:  # a public grid none of whose points counted
            table.setdefault(entry["method"], {})[entry["mode"]] = entry["protected"][task]
    return table


def format_variants(rows: list[dict]) -> str:
    """Markdown: one row per variant; each method's cell is best/average protected-task accuracy."""
    methods = list(dict.fromkeys(m for row in rows for m in row["merged"]))
    heldout = list(dict.fromkeys(m for row in rows for m in row["heldout_partner"]))
    head = ["variant", "alone", "steps", "train s", *methods, *(f"{m} (held-out)" for m in heldout), "holds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["label"], f"{row['standalone']:.3f}", str(row["training"]["steps"]), f"{row['training']['seconds']:.0f}"]
        cells += [_cell(row["merged"].get(m, {})) for m in methods]
        cells += [_cell(row["heldout_partner"].get(m, {})) for m in heldout]
        cells.append("yes" if row["holds"] else "no")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_heldout(results: dict) -> str:
    task = results["protected_task"]
    section = results["heldout_partner"]
    table = _per_method(section["methods"], task)
    lines = [f"Merged with the held-out partner `{section['partner']}` only: `{task}` accuracy (best / average)."]
    lines += [f"- {method}: {_cell(modes)}" for method, modes in table.items()]
    return "\n".join(lines)


def _cell(modes: dict) -> str:
    return "/".join(f"{modes[m]:.2f}" if m in modes else "–" for m in ("best", "average"))


def adapter_state(model, adapter: str) -> dict[str, torch.Tensor]:
    """A copy of `adapter`'s parameters, to train several variants from the same initialisation."""
    marker = f".{adapter}."
    return {name: p.detach().clone() for name, p in model.named_parameters() if marker in name}


def load_adapter_state(model, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
