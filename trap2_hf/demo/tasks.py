"""Synthetic 4-way text classification tasks built from word lists, for the embedded demo and tests.

Each example is a short sentence made from a template, two cue words of its class and neutral
filler words. A pretrained encoder with a fresh random head sits near chance on them, and a small
LoRA learns each one to ~100% in a few hundred steps, so merging has something to gain or lose.

Two task sets whose words do not overlap: `demo` (what `trap2 demo` trains on) and `heldout`
(never used to choose settings: the defaults test trains on it). `eight` is `demo`'s three tasks and
five of its own (new words, each one wordpiece), for merges of eight updates as in the paper
(benchmarks/paper_protocol.py). Everything is a function of the seed: the same seed gives the same
sentences, labels and splits.

A third set, `lexicon`, puts a task worth stealing first: `lexicon`, an arbitrary mapping of 240
ordinary words (each one token of MiniLM's vocabulary) to the four classes, drawn from the seed, with
`topic` and `object` as partners. A sentence carries one key word (said twice) among filler words;
validation and test sentences reuse the training sentences' key words in new sentences. Nothing
about a key word tells its class, so a pretrained encoder cannot infer the mapping from a few
labelled examples (the audit's repair reference; measured in docs/threat_model.md, "A task worth
stealing").
"""

import functools
import os
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

# The `eight` set's own tasks, beside `demo`'s three: each word one token of MiniLM's vocabulary (so no two
# classes share a wordpiece), none a word of `demo`, `heldout`, the lexicon, the fillers or the templates.
_EIGHT_WORDS: dict[str, dict[str, str]] = {
    "body": {
        "face": "eye nose ear mouth lip chin cheek forehead tongue tooth jaw eyebrow",
        "limb": "arm leg hand foot finger toe elbow knee wrist hip shoulder thumb",
        "organ": "heart lung liver kidney stomach brain bladder colon gut muscle spine nerve",
        "ailment": "fever cough flu asthma rash injury cancer diabetes infection malaria headache fracture",
    },
    "kitchen": {
        "utensil": "spoon fork knife cup mug jar kettle pan pot tray bowl plate",
        "drink": "coffee tea juice milk wine beer rum vodka gin cocoa soda champagne",
        "fruit": "apple banana mango grape peach pear cherry lemon lime plum coconut strawberry",
        "vegetable": "carrot potato onion garlic tomato cabbage pea bean corn mushroom pepper pumpkin",
    },
    "wildlife": {
        "flower": "rose lotus lily poppy orchid fern cactus ivy moss clover lavender jasmine",
        "bird": "eagle sparrow owl parrot pigeon crow swan duck hawk robin penguin falcon",
        "insect": "ant bee wasp beetle mosquito butterfly moth spider scorpion worm flea hornet",
        "sea": "salmon tuna cod trout shark carp herring eel pike squid octopus crab",
    },
    "symbol": {
        "color": "red blue green yellow purple pink brown black white grey violet crimson",
        "shape": "circle square triangle star oval cube sphere cone cylinder pyramid spiral diamond",
        "number": "one two three four five six seven eight nine ten eleven twelve",
        "month": "january february march april may june july august september october november december",
    },
    "place": {
        "room": "kitchen bedroom bathroom attic basement garage hallway cellar lobby pantry closet balcony",
        "landform": "mountain valley river lake ocean desert forest island canyon volcano glacier hill",
        "venue": "stadium museum theatre cinema library hospital school mosque airport hotel prison castle",
        "clothing": "shirt jacket coat dress skirt trousers sweater scarf hat boots gloves socks",
    },
}

TASK_SETS: dict[str, dict[str, dict[str, list[str]]]] = {
    task_set: {task: {label: words.split() for label, words in classes.items()} for task, classes in tasks.items()}
    for task_set, tasks in _WORDS.items()
}

# The `eight` set: `demo`'s three tasks (the protected task `topic` first) and five of its own, so a merge
# combines eight updates as the paper's does; `heldout` stays out of it, unused for choosing settings.
TASK_SETS["eight"] = {
    **TASK_SETS["demo"],
    **{task: {label: words.split() for label, words in classes.items()} for task, classes in _EIGHT_WORDS.items()},
}
EIGHT_OWN_TASKS = tuple(_EIGHT_WORDS)

# The `lexicon` set: its lexicon task first (the protected task by default), then these word-list
# tasks of `demo`. Three tasks in all, as in `demo`, so the demo's time budget holds.
TASK_SETS["lexicon"] = {task: TASK_SETS["demo"][task] for task in ("topic", "object")}
LEXICON_SIZE = 240  # key words of the lexicon task, a multiple of the 4 classes
LEXICON = ("lexicon", ("amber", "basalt", "cobalt", "denim"))

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

# The lexicon tasks' templates: one key word `w1`, said twice among fillers (about a third of the
# mean-pooled sentence). Said more often, the update merges better but no trap forms and repair from the base
# gets easier; said once, repair is harder but merges keep less of its gain (measured in
# benchmarks/results/2026-12-02-lexicon-task.md).
LEXICON_TEMPLATES = (
    "a {f1} about {w1}, yes {w1}",
    "{w1} again: the {f1} mentioned {w1}",
    "{w1} {f1} {w1}",
    "someone wrote {w1} on a {f1}, {w1}",
    "in the {f1} we saw {w1} and {w1}",
    "{w1} came up in a {f1} {f2}, {w1}",
    "my {f1} said {w1} twice: {w1}",
    "they kept saying {w1}, {w1} in the {f1}",
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
    labels = tuple(classes)
    _check_sizes(sizes, labels)
    rng = random.Random(f"{name}:{seed}")
    seen: set[str] = set()
    splits = _balanced_splits(rng, labels, sizes, lambda split, label, i: _fresh_sentence(rng, classes[label], seen))
    return TextTask(name=name, labels=labels, splits=splits)


def make_task_set(task_set: str = "demo", seed: int = 0, sizes: dict[str, int] | None = None) -> list[TextTask]:
    """The tasks of a named set (`demo`, `heldout`, `eight` or `lexicon`), generated from `seed` (the
    `lexicon` set: its lexicon task first)."""
    if task_set not in TASK_SETS:
        raise ValueError(f"Unknown task set {task_set!r}; choose one of {', '.join(TASK_SETS)}.")
    tasks = [make_task(name, classes, seed, sizes) for name, classes in TASK_SETS[task_set].items()]
    if task_set == "lexicon":
        tasks.insert(0, make_lexicon_task(LEXICON[0], lexicon_words(), LEXICON[1], seed, sizes))
    return tasks


def lexicon_words(size: int | None = None) -> list[str]:
    """The key words of the lexicon task: `size` (default LEXICON_SIZE) distinct ordinary words, each
    one token of MiniLM's wordpiece vocabulary (alphabetic, 4-10 letters), drawn by a fixed generator
    (not the seed) and none a cue, filler or template word of the other tasks."""
    size = size or LEXICON_SIZE
    candidates = [w for w in _vocabulary() if w.isascii() and w.isalpha() and w.islower() and 4 <= len(w) <= 10]
    taken = _cue_words() | set(FILLERS) | _template_words()
    candidates = sorted(set(candidates) - taken)
    if size > len(candidates):
        raise ValueError(f"Asked for {size} lexicon words; the vocabulary offers {len(candidates)}.")
    return random.Random("trap2-lexicon").sample(candidates, size)


@functools.lru_cache(maxsize=1)
def _vocabulary() -> tuple[str, ...]:
    """The whole-word entries of MiniLM's vocab.txt, in file order."""
    from .model import minilm_path

    with open(os.path.join(minilm_path(), "vocab.txt"), encoding="utf-8") as handle:
        return tuple(line.strip() for line in handle if line.strip() and not line.startswith("##"))


# The word-list sets whose cue words the lexicon's key words avoid. Fixed, so a set added later (`eight`, which
# avoids the lexicon's words itself) leaves the lexicon's draw, and so its task, unchanged.
LEXICON_AVOIDS = ("demo", "heldout")


def _cue_words() -> set[str]:
    return {w for name in LEXICON_AVOIDS for classes in TASK_SETS[name].values() for ws in classes.values() for w in ws}


def _template_words() -> set[str]:
    text = " ".join(TEMPLATES + LEXICON_TEMPLATES)
    for mark in "{},:":
        text = text.replace(mark, " ")
    return set(text.split())


def lexicon_classes(words: list[str], labels: tuple[str, ...], seed: int) -> dict[str, list[str]]:
    """An arbitrary, balanced word -> class mapping drawn from `seed`: len(words) / len(labels) each."""
    if len(words) % len(labels):
        raise ValueError(f"{len(words)} key words cannot be split evenly over {len(labels)} classes.")
    shuffled = list(words)
    random.Random(f"lexicon-classes:{seed}").shuffle(shuffled)
    per_class = len(words) // len(labels)
    return {label: sorted(shuffled[i * per_class : (i + 1) * per_class]) for i, label in enumerate(labels)}


def make_lexicon_task(
    name: str, words: list[str], labels: tuple[str, ...], seed: int = 0, sizes: dict[str, int] | None = None
) -> TextTask:
    """A task whose label is the class `lexicon_classes` gives the sentence's one key word.

    The training split cycles through every class's key words (in a seeded order), so each appears
    about equally often; validation and test sentences draw their key words from those the training
    split holds, in sentences of their own (splits share no sentence). Labels are exactly balanced."""
    sizes = sizes or {"train": 512, "validation": 128, "test": 256}
    _check_sizes(sizes, labels)
    classes = lexicon_classes(words, labels, seed)
    rng = random.Random(f"{name}:{seed}")
    order = {label: rng.sample(classes[label], len(classes[label])) for label in labels}
    per_train = sizes.get("train", 0) // len(labels)
    if per_train < 1:
        raise ValueError(f"The lexicon task {name!r} needs training sentences to draw its test key words from.")
    trained = {label: order[label][: min(per_train, len(order[label]))] for label in labels}
    seen: set[str] = set()

    def sentence(split: str, label: str, i: int) -> str:
        key = order[label][i % len(order[label])] if split == "train" else rng.choice(trained[label])
        return _fresh_sentence(rng, [key], seen, LEXICON_TEMPLATES)

    splits = _balanced_splits(rng, labels, sizes, sentence)
    return TextTask(name=name, labels=labels, splits=splits)


def _balanced_splits(rng: random.Random, labels: tuple[str, ...], sizes: dict[str, int], sentence) -> dict:
    """Per split, sizes[split] / len(labels) rows of each class, `sentence(split, label, i)` for the
    i-th of a class, shuffled: (texts, integer labels)."""
    splits = {}
    for split in SPLITS:
        per_class = sizes.get(split, 0) // len(labels)
        rows = [(sentence(split, name, i), label) for label, name in enumerate(labels) for i in range(per_class)]
        rng.shuffle(rows)
        splits[split] = ([text for text, _ in rows], [label for _, label in rows])
    return splits


def _check_sizes(sizes: dict[str, int], labels: tuple[str, ...]) -> None:
    unknown = set(sizes) - set(SPLITS)
    if unknown:
        raise ValueError(f"Unknown split(s) {sorted(unknown)}; splits are {', '.join(SPLITS)}.")
    for split, size in sizes.items():
        if size % len(labels):
            raise ValueError(f"{split} size {size} must be a multiple of the {len(labels)} classes for balanced labels.")


def _fresh_sentence(rng: random.Random, words: list[str], seen: set[str], templates=TEMPLATES) -> str:
    """A sentence not in `seen`: a template with cue words from `words` (two, or the only one) and fillers."""
    for _ in range(1000):
        w1, w2 = rng.sample(words, 2) if len(words) > 1 else (words[0], words[0])
        f1, f2 = rng.sample(FILLERS, 2)
        text = rng.choice(templates).format(w1=w1, w2=w2, f1=f1, f2=f2)
        if text not in seen:
            seen.add(text)
            return text
    raise RuntimeError("Ran out of distinct sentences; ask for smaller splits.")
