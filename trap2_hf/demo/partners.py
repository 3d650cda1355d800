"""The demo's partners for off-ray protection: the 'foreign' term's updates (other tasks' plain updates,
`--foreign_tasks`, or pseudo-partners, `--pseudo_partners`) and the held-out partner the audit merges alone.

Pseudo-partners are `make_pseudo_partners` run on the protected task's training inputs, each through a random head
of its own and with random labels, so no real task's update is used in training and every partner the audit
merges stays held out."""

import dataclasses
import os

from ..settings import Trap2Settings
from .arguments import DemoArguments

# Far from the seeds of the tasks' own heads (seed * 1000 + i), so a pseudo-partner never shares one.
HEAD_SEED = 7_000_000


def pseudo_partner_folders(setup, seed: int, count: int, steps: int, folder: str) -> list[str]:
    """Train `count` pseudo-partners of the protected adapter for `steps` steps each and return their folders
    (for trap_foreign_adapters); all drawn from `seed`, so every variant of one run gets the same ones."""
    from ..offray import make_pseudo_partners
    from . import model as demo_model

    task = setup.protected_task
    rows = demo_model.EncodedDataset(setup.data[task]["train"])
    hidden, num_labels = setup.heads[task].in_features, setup.heads[task].out_features
    folders = []
    for k in range(count):
        head = demo_model.random_head(hidden, num_labels, HEAD_SEED + 1000 * seed + k)
        folders += make_pseudo_partners(
            demo_model.TaskClassifier(setup.model, head), rows, os.path.join(folder, f"pseudo_{k}"), n=1,
            steps=steps, seed=1000 * seed + k, collate_fn=demo_model.trimmed_collate, adapter=setup.protected,
        )
    return folders


def with_foreign_updates(setup, demo: DemoArguments, trap: Trap2Settings) -> Trap2Settings:
    """`trap` with trap_foreign_adapters set to the saved plain updates of `demo.foreign_tasks` (or to
    `demo.pseudo_partners` pseudo-partners), when a 'foreign' off-ray term asks for them."""
    if not any("foreign" in term.split("+") for term in trap.trap_offray_terms):
        return trap
    if demo.pseudo_partners:
        folder = os.path.join(demo.output_dir, "pseudo_partners")
        folders = pseudo_partner_folders(setup, demo.seed, demo.pseudo_partners, demo.pseudo_partner_steps, folder)
        return _with_adapters(trap, folders)
    if not demo.foreign_tasks:
        raise SystemExit(
            "trap2 demo: a 'foreign' trap_offray term needs --foreign_tasks (e.g. --foreign_tasks object) or "
            "--pseudo_partners (e.g. 3)."
        )
    folders = []
    for task in demo.foreign_tasks:
        if task not in setup.others:
            raise SystemExit(f"trap2 demo: --foreign_tasks {task!r} is not one of the other tasks {list(setup.others)}.")
        root = os.path.join(demo.output_dir, "foreign_updates")
        setup.model.save_pretrained(root, selected_adapters=[setup.others[task]])
        folders.append(os.path.join(root, setup.others[task]))
    return _with_adapters(trap, folders)


def _with_adapters(trap: Trap2Settings, folders: list[str]) -> Trap2Settings:
    settings = dataclasses.replace(trap, trap_foreign_adapters=folders)
    settings.validate_trap_settings()
    return settings


def heldout_partner(setup, demo: DemoArguments) -> str | None:
    """The task whose plain update is merged alone with the protected one: never a foreign update."""
    if demo.heldout_partner:
        if demo.heldout_partner not in setup.others or demo.heldout_partner in (demo.foreign_tasks or []):
            raise SystemExit(
                f"trap2 demo: --heldout_partner {demo.heldout_partner!r} must be one of the other tasks "
                f"{list(setup.others)} and not in --foreign_tasks."
            )
        return demo.heldout_partner
    if demo.foreign_tasks:
        return next((t for t in setup.others if t not in demo.foreign_tasks), None)
    return None
