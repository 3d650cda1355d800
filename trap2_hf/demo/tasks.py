"""Synthetic 4-way text classification tasks built from word lists, for the embedded demo and tests.

Each example is a short sentence made from a template, two cue words of its class and neutral
filler words. A pretrained encoder with a fresh random head sits near chance on them, and a small
LoRA learns each one to ~100% in a few hundred steps, so merging has something to gain or lose.

Two task sets whose words do not overlap: `demo` (what `trap2 demo` trains on) and `heldout`
(never used to choose settings: the defaults test trains on it). Everything is a function of the
seed: the same seed gives the same sentences, labels and splits.
"""

import random
from dataclasses import dataclass

SPLITS = ("train", "validation", "test")

# Twelve cue words per class; a class is a space-separated word list.
_WORDS: dict[str, dict[str, dict[str, str]]] = {
    "demo": {
        "topic": {
            "sport": "football tennis hockey rugby cricket golf boxing cycling skiing rowing swimming volleyball",
            "food": "bread cheese pasta soup rice salad butter noodles pizza omelette yogurt pancakes",
            "music": "guitar violin piano drums melody chorus concert orchestra trumpet saxophone opera symphony",
            "weather": "rain snow thunder fog storm drizzle hail sunshine breeze frost hurricane humidity",
        },
        "object": {
            "animal": "dog cat horse rabbit tiger elephant wolf zebra giraffe monkey squirrel camel",
            "vehicle": "car truck bus bicycle motorcycle train tractor scooter van tram ambulance taxi",
            "tool": "hammer wrench screwdriver spanner drill pliers chisel shovel axe ladder crowbar rake",
            "furniture": "sofa chair table wardrobe bed desk shelf cupboard stool bench dresser armchair",
        },
        "region": {
            "europe": "paris berlin madrid rome vienna lisbon prague warsaw amsterdam brussels oslo dublin",
            "asia": "tokyo beijing seoul bangkok delhi jakarta manila hanoi shanghai mumbai osaka taipei",
            "americas": "chicago toronto boston lima bogota santiago denver montreal houston seattle havana quito",
            "africa": "cairo nairobi lagos accra dakar kampala casablanca tunis addis luanda harare khartoum",
        },
    },
    "heldout": {
        "emotion": {
            "joy": "happy delighted cheerful joyful glad thrilled elated merry content pleased jolly ecstatic",
            "anger": "angry furious irritated annoyed enraged outraged livid hostile bitter resentful cross irate",
            "fear": "afraid scared terrified frightened nervous anxious "
            "panicked worried timid alarmed uneasy fearful",
            "sadness": "sad gloomy miserable lonely heartbroken depressed "
            "sorrowful unhappy mournful tearful grieving downcast",
        },
        "profession": {
            "medicine": "doctor nurse surgeon dentist pharmacist paramedic "
            "therapist physician midwife radiologist cardiologist medic",
            "law": "lawyer judge attorney prosecutor barrister solicitor "
            "notary paralegal magistrate clerk jury advocate",
            "building": "carpenter plumber electrician bricklayer mason welder "
            "roofer architect builder plasterer glazier surveyor",
            "farming": "farmer shepherd rancher gardener harvester beekeeper "
            "herdsman ploughman fisherman forester grower breeder",
        },
        "material": {
            "metal": "steel iron copper aluminium bronze brass tin zinc nickel titanium silver lead",
            "wood": "oak pine maple birch walnut cedar teak mahogany bamboo plywood spruce ash",
            "fabric": "cotton wool silk linen denim velvet nylon polyester leather felt satin tweed",
            "mineral": "granite marble quartz slate limestone basalt sandstone clay chalk flint gravel pebble",
        },
    },
}

TASK_SETS: dict[str, dict[str, dict[str, list[str]]]] = {
    task_set: {task: {label: words.split() for label, words in classes.items()} for task, classes in tasks.items()}
    for task_set, tasks in _WORDS.items()
}

FILLERS = (
    "morning evening report story note letter message picture video photo small large old new quiet busy "
    "long short bright dark simple strange usual recent local distant"
).split()

TEMPLATES = (
    "a {f1} {f2} about {w1} and {w2}",
    "the {f1} mentioned {w1} then {w2}",
    "{w1} {f1} {w2} {f2}",
    "someone wrote a {f1} on {w1} with {w2}",
    "in the {f1} {f2} we saw {w1} and {w2}",
    "{w1} and {w2} came up in a {f1} {f2}",
    "my {f1} was full of {w1} {w2}",
    "they kept talking about {w1} {f1} {w2}",
)


@dataclass(frozen=True)
class TextTask:
    """One classification task: its class names and, per split, sentences with integer labels."""

    name: str
    labels: tuple[str, ...]
    splits: dict[str, tuple[list[str], list[int]]]

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def chance(self) -> float:
        return 1.0 / len(self.labels)


def make_task(
    name: str,
    classes: dict[str, list[str]],
    seed: int = 0,
    sizes: dict[str, int] | None = None,
) -> TextTask:
    """Build one task: unique sentences, exactly balanced labels in every split, splits disjoint."""
    sizes = sizes or {"train": 512, "validation": 128, "test": 256}
    unknown = set(sizes) - set(SPLITS)
    if unknown:
        raise ValueError(f"Unknown split(s) {sorted(unknown)}; splits are {', '.join(SPLITS)}.")
    labels = tuple(classes)
    for split, size in sizes.items():
        if size % len(labels):
            raise ValueError(f"{split} size {size} must be a multiple of the {len(labels)} classes for balanced labels.")
    rng = random.Random(f"{name}:{seed}")
    seen: set[str] = set()
    splits = {}
    for split in SPLITS:
        per_class = sizes.get(split, 0) // len(labels)
        rows = []
        for label, label_name in enumerate(labels):
            for _ in range(per_class):
                rows.append((_fresh_sentence(rng, classes[label_name], seen), label))
        rng.shuffle(rows)
        splits[split] = ([text for text, _ in rows], [label for _, label in rows])
    return TextTask(name=name, labels=labels, splits=splits)


def make_task_set(task_set: str = "demo", seed: int = 0, sizes: dict[str, int] | None = None) -> list[TextTask]:
    """The tasks of a named set (`demo` or `heldout`), generated from `seed`."""
    if task_set not in TASK_SETS:
        raise ValueError(f"Unknown task set {task_set!r}; choose one of {', '.join(TASK_SETS)}.")
    return [make_task(name, classes, seed, sizes) for name, classes in TASK_SETS[task_set].items()]


def _fresh_sentence(rng: random.Random, words: list[str], seen: set[str]) -> str:
    for _ in range(1000):
        w1, w2 = rng.sample(words, 2)
        f1, f2 = rng.sample(FILLERS, 2)
        text = rng.choice(TEMPLATES).format(w1=w1, w2=w2, f1=f1, f2=f2)
        if text not in seen:
            seen.add(text)
            return text
    raise RuntimeError("Ran out of distinct sentences; ask for smaller splits.")
