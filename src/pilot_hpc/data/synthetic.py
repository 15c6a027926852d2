"""Synthetic FedMIT: procedurally drawn images and three checkable instruction tasks.

One shape per image (circle, square or triangle; four colours; small or large) sits
in one cell of a 3 x 3 grid. With 48 px images and 16 px patches every visual token
sees exactly one cell, so a tiny LLaVA can learn all three tasks in minutes on a CPU:
  - caption:   "a large red circle at the top left ."
  - vqa:       "what color is the circle ?" -> "red"   (colour, shape, place or size)
  - grounding: "give the box of the red circle ." -> "[0.02, 0.02, 0.31, 0.31]"
Boxes are normalised [x1, y1, x2, y2] with two decimals; since shapes sit centred in
a cell with one of two sizes, a box takes one of 18 values.

Clients of one task differ in their data (the non-IID part the client-specific
adapter is for): client k draws its dominant colour with probability 0.5. Scenario
knobs (config `data`; the defaults are this smoke world) change who sees what:
  - eval_split=task: every client of a task is scored on one shared split drawn from
    the task's whole distribution (no colour preference, every cell), as in the paper;
  - skew_alpha > 0: each client draws colours and cells from its own Dirichlet(alpha) mix;
  - unseen_cells: per task, grid cells that its clients (and the warm start, for that
    task) never see, while the other tasks' clients do: cross-task knowledge.
  - unseen_combos=latin3: per task, (colour, cell) combinations that its clients (and
    the warm start, for that task) never see, each combination unseen by exactly one
    task; every word and box stays in every task's training data. Test records carry
    "subset": "seen" or "unseen" for their task.

Files are written in the LLaVA-1.5 conversation format (a JSON list of records with
`id`, `image`, `conversations`) next to PNG images, and read back through the same
loader that real data uses (pilot_hpc.data.records).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (225, 200, 30)}
SHAPES = ("circle", "square", "triangle")
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
SIZES = {"small": 8, "large": 14}  # side in pixels inside a 16 px cell
GRID = 3

VQA_TEMPLATES = (
    ("what color is the {shape} ?", "color"),
    ("what shape is the {color} object ?", "shape"),
    ("where is the {shape} ?", "place"),
    ("is the {color} {shape} small or large ?", "size"),
)
CAPTION_PROMPTS = ("describe the image briefly .", "write a short caption for the image .")
GROUNDING_PROMPT = "give the box of the {color} {shape} ."


def vocabulary() -> list[str]:
    """Every word the generator can write, so the word-level tokenizer has no <unk>."""
    words = set(COLORS) | set(SHAPES) | set(ROWS) | set(COLS) | set(SIZES)
    for text in [t for t, _ in VQA_TEMPLATES] + list(CAPTION_PROMPTS) + [GROUNDING_PROMPT]:
        words.update(w for w in text.split() if not w.startswith("{"))
    words.update({"a", "at", "the", "object", "[", "]", ",", ".", "?", "USER", "ASSISTANT", ":"})
    words.update(box_values())
    return sorted(words)


def box_values(image_size: int = 48) -> list[str]:
    cell = image_size // GRID
    values = set()
    for side in SIZES.values():
        off = (cell - side) // 2
        for i in range(GRID):
            values.add(f"{(i * cell + off) / image_size:.2f}")
            values.add(f"{(i * cell + off + side) / image_size:.2f}")
    return sorted(values)


@dataclass
class Scene:
    color: str
    shape: str
    row: int
    col: int
    size: str

    def box(self, image_size: int) -> tuple[int, int, int, int]:
        cell = image_size // GRID
        side = SIZES[self.size]
        off = (cell - side) // 2
        x1, y1 = self.col * cell + off, self.row * cell + off
        return x1, y1, x1 + side, y1 + side

    def box_text(self, image_size: int) -> str:
        return "[" + ", ".join(f"{v / image_size:.2f}" for v in self.box(image_size)) + "]"

    @property
    def place(self) -> str:
        return f"{ROWS[self.row]} {COLS[self.col]}"


def draw(scene: Scene, image_size: int, rng: np.random.Generator) -> Image.Image:
    # Light background noise so that a pixel's value alone is not the answer.
    bg = 235 + rng.integers(-12, 12, size=(image_size, image_size, 1))
    img = Image.fromarray(np.repeat(bg, 3, axis=2).astype(np.uint8))
    pen = ImageDraw.Draw(img)
    x1, y1, x2, y2 = scene.box(image_size)
    fill = COLORS[scene.color]
    if scene.shape == "circle":
        pen.ellipse([x1, y1, x2 - 1, y2 - 1], fill=fill)
    elif scene.shape == "square":
        pen.rectangle([x1, y1, x2 - 1, y2 - 1], fill=fill)
    else:
        pen.polygon([((x1 + x2) / 2, y1), (x1, y2 - 1), (x2 - 1, y2 - 1)], fill=fill)
    return img


@dataclass(frozen=True)
class ClientMix:
    """How one client (or the warm start, per task) draws its scenes."""

    dominant: str | None = None  # the colour it prefers, taken with probability dominant_prob
    dominant_prob: float = 0.5
    color_weights: tuple[float, ...] | None = None  # skew_alpha > 0: replaces the dominant colour
    cell_weights: tuple[float, ...] | None = None  # over the 9 cells, row-major
    unseen: tuple[int, ...] = ()  # cells never drawn
    unseen_combos: tuple[tuple[int, int], ...] = ()  # (colour index, cell) pairs never drawn

    @property
    def plain(self) -> bool:
        return self.color_weights is None and self.cell_weights is None and not self.unseen and not self.unseen_combos

    def cell_probabilities(self) -> list[float]:
        w = list(self.cell_weights) if self.cell_weights is not None else [1.0] * GRID * GRID
        w = [0.0 if c in self.unseen else v for c, v in enumerate(w)]
        total = sum(w)
        if total <= 0:  # every weighted cell is unseen: spread over the seen ones
            w = [0.0 if c in self.unseen else 1.0 for c in range(GRID * GRID)]
            total = sum(w)
        return [v / total for v in w]


def draw_scene(rng: random.Random, mix: ClientMix) -> Scene:
    colors = list(COLORS)
    if mix.plain:  # the smoke world's draw, call for call (its data must not change)
        color = mix.dominant if mix.dominant and rng.random() < mix.dominant_prob else rng.choice(colors)
        return Scene(color=color, shape=rng.choice(SHAPES), row=rng.randrange(GRID), col=rng.randrange(GRID),
                     size=rng.choice(list(SIZES)))
    if mix.unseen_combos:
        return _draw_combo(rng, mix)
    if mix.color_weights is not None:
        color = rng.choices(colors, weights=mix.color_weights)[0]
    else:
        color = mix.dominant if mix.dominant and rng.random() < mix.dominant_prob else rng.choice(colors)
    shape = rng.choice(SHAPES)
    cell = rng.choices(range(GRID * GRID), weights=mix.cell_probabilities())[0]
    return Scene(color=color, shape=shape, row=cell // GRID, col=cell % GRID, size=rng.choice(list(SIZES)))


def _draw_combo(rng: random.Random, mix: ClientMix) -> Scene:
    """Colour and cell drawn jointly, P(c, j) proportional to colour weight x cell weight
    over the combinations the mix may see (uniform over those when its weights leave none)."""
    colors = list(COLORS)
    color_w = mix.color_weights or tuple(1.0 for _ in colors)
    cell_p = mix.cell_probabilities()
    banned = set(mix.unseen_combos)
    pairs = [(c, j) for c in range(len(colors)) for j in range(GRID * GRID)]
    weights = [0.0 if (c, j) in banned else color_w[c] * cell_p[j] for c, j in pairs]
    if sum(weights) <= 0:
        weights = [0.0 if p in banned else 1.0 for p in pairs]
    c, cell = rng.choices(pairs, weights=weights)[0]
    return Scene(color=colors[c], shape=rng.choice(SHAPES), row=cell // GRID, col=cell % GRID,
                 size=rng.choice(list(SIZES)))


def latin3_unseen(task_index: int) -> tuple[tuple[int, int], ...]:
    """data.unseen_combos=latin3: the (colour index, cell) pairs task `task_index` (0..2)
    never sees: (c + j) % 3 == t, 12 of the 36, so every colour keeps 6 of its 9 cells and
    every cell 2 or 3 of its 4 colours."""
    return tuple((c, j) for c in range(len(COLORS)) for j in range(GRID * GRID) if (c + j) % 3 == task_index)


def make_turn(task: str, scene: Scene, image_size: int, rng: random.Random) -> tuple[str, str]:
    """(question, answer) of one instruction sample."""
    if task == "caption":
        answer = f"a {scene.size} {scene.color} {scene.shape} at the {scene.place} ."
        return rng.choice(CAPTION_PROMPTS), answer
    if task == "vqa":
        template, asked = rng.choice(VQA_TEMPLATES)
        answers = {"color": scene.color, "shape": scene.shape, "place": scene.place, "size": scene.size}
        return template.format(shape=scene.shape, color=scene.color), answers[asked]
    if task == "grounding":
        return GROUNDING_PROMPT.format(color=scene.color, shape=scene.shape), scene.box_text(image_size)
    raise ValueError(f"synthetic data: unknown task {task!r}")


def write_split(folder: str, name: str, tasks: list[str], count: int, seed: int, mix: ClientMix | dict[str, ClientMix],
                image_size: int, subset=None) -> str:
    """Writes `count` samples of the given task mix to <folder>/<name>.json (+ PNGs);
    `mix` is one ClientMix, or one per task; subset(task, scene): the record's "subset"
    tag (None: no tag)."""
    rng = random.Random(seed)
    np_rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "images", name), exist_ok=True)
    records = []
    for i in range(count):
        task = tasks[i % len(tasks)]
        scene = draw_scene(rng, mix[task] if isinstance(mix, dict) else mix)
        question, answer = make_turn(task, scene, image_size, rng)
        rel = f"images/{name}/{i:06d}.png"
        draw(scene, image_size, np_rng).save(os.path.join(folder, rel))
        records.append({
            "id": f"{name}-{i:06d}",
            "image": rel,
            "task": task,
            "conversations": [
                {"from": "human", "value": f"<image>\n{question}"},
                {"from": "gpt", "value": answer},
            ],
        })
        tag = subset(task, scene) if subset is not None else None
        if tag is not None:
            records[-1]["subset"] = tag
    path = os.path.join(folder, f"{name}.json")
    with open(path, "w") as fh:
        json.dump(records, fh)
    return path


@dataclass
class SyntheticSpec:
    client_tasks: list[str]
    train_sizes: list[int]
    eval_samples: int
    pretrain_samples: int
    image_size: int
    seed: int
    # Scenario knobs (config `data`); at these defaults the key is the smoke world's.
    eval_split: str = "client"
    dominant_prob: float = 0.5
    skew_alpha: float = 0.0
    unseen_cells: dict[str, list[int]] = field(default_factory=dict)
    unseen_combos: str = ""

    KNOB_DEFAULTS = {"eval_split": "client", "dominant_prob": 0.5, "skew_alpha": 0.0, "unseen_cells": {},
                     "unseen_combos": ""}

    def combos_unseen_by(self, task: str) -> tuple[tuple[int, int], ...]:
        if self.unseen_combos != "latin3":
            return ()
        return latin3_unseen(sorted(set(self.client_tasks)).index(task))

    def subset(self, task: str, scene: "Scene") -> str | None:
        """A test item's tag: whether its task trains on its (colour, cell) combination."""
        if not self.unseen_combos:
            return None
        combo = (list(COLORS).index(scene.color), scene.row * GRID + scene.col)
        return "unseen" if combo in self.combos_unseen_by(task) else "seen"

    def key(self) -> str:
        import hashlib

        # A knob at its default stays out of the key, so that worlds cached before the
        # knobs existed keep their folders (and the base models trained on them).
        fields = {k: v for k, v in self.__dict__.items() if self.KNOB_DEFAULTS.get(k, object()) != v}
        blob = json.dumps(fields, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def client_mix(self, k: int) -> ClientMix:
        colors = list(COLORS)
        unseen = tuple(sorted(self.unseen_cells.get(self.client_tasks[k], ())))
        combos = self.combos_unseen_by(self.client_tasks[k])
        if self.skew_alpha > 0:
            # Its own generator: the scene streams of the plain world stay as they are.
            gen = np.random.default_rng([self.seed, k, 7919])
            color_w = tuple(float(v) for v in gen.dirichlet([self.skew_alpha] * len(colors)))
            cell_w = tuple(float(v) for v in gen.dirichlet([self.skew_alpha] * GRID * GRID))
            return ClientMix(color_weights=color_w, cell_weights=cell_w, unseen=unseen, unseen_combos=combos)
        return ClientMix(dominant=colors[k % len(colors)], dominant_prob=self.dominant_prob, unseen=unseen,
                         unseen_combos=combos)

    def test_split_name(self, task: str) -> str:
        return f"task_{task}_test"


def client_train_sizes(num_clients: int, low: int, high: int, seed: int) -> list[int]:
    """n_k differ between clients (so sample-weighted aggregation is not a plain mean)."""
    rng = random.Random(seed * 7919 + 17)
    return [rng.randint(low, high) for _ in range(num_clients)]


def generate(spec: SyntheticSpec, folder: str) -> None:
    """Writes the whole synthetic FedMIT world into `folder` (atomically: temp + rename)."""
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".synthetic-", dir=parent)
    tasks = sorted(set(spec.client_tasks))
    # Seeds: the base model's warm-start data uses a stream disjoint from every client's.
    # It draws like no client in particular, except that a task's unseen cells stay
    # unseen for that task there too (the base model must not know them either).
    warm = {t: ClientMix(unseen=tuple(sorted(spec.unseen_cells.get(t, ()))), unseen_combos=spec.combos_unseen_by(t))
            for t in tasks}
    write_split(tmp, "pretrain", tasks, spec.pretrain_samples, spec.seed * 1000 + 999, warm, spec.image_size)
    for k, task in enumerate(spec.client_tasks):
        mix = spec.client_mix(k)
        write_split(tmp, f"client_{k:02d}_train", [task], spec.train_sizes[k], spec.seed * 1000 + 2 * k,
                    mix, spec.image_size)
        if spec.eval_split == "client":
            write_split(tmp, f"client_{k:02d}_eval", [task], spec.eval_samples, spec.seed * 1000 + 2 * k + 1,
                        ClientMix(dominant=mix.dominant, dominant_prob=mix.dominant_prob), spec.image_size)
    if spec.eval_split == "task":
        # One split per task from its whole distribution (every colour, every cell):
        # what all of that task's clients are scored on.
        for i, task in enumerate(tasks):
            write_split(tmp, spec.test_split_name(task), [task], spec.eval_samples, spec.seed * 1000 + 500 + i,
                        ClientMix(), spec.image_size, subset=spec.subset)
    with open(os.path.join(tmp, "spec.json"), "w") as fh:
        json.dump(spec.__dict__, fh, indent=1)
    if os.path.isdir(folder):  # another process won the race; keep its copy
        shutil.rmtree(tmp)
        return
    os.replace(tmp, folder)


def spec_for(cfg) -> SyntheticSpec:
    """The synthetic world a run config asks for."""
    sizes = client_train_sizes(cfg.fl.num_clients, cfg.data.train_min, cfg.data.train_max, cfg.run.seed)
    d = cfg.data
    return SyntheticSpec(list(cfg.fl.client_tasks), sizes, d.eval_samples, cfg.pretrain.samples, cfg.model.image_size,
                         cfg.run.seed, eval_split=d.eval_split, dominant_prob=d.dominant_prob, skew_alpha=d.skew_alpha,
                         unseen_cells={t: sorted(c) for t, c in sorted(d.unseen_cells.items())},
                         unseen_combos=d.unseen_combos)


def folder_for(spec: SyntheticSpec, cache_dir: str) -> str:
    return os.path.join(os.path.expanduser(cache_dir), f"synthetic-{spec.key()}")


def ensure(spec: SyntheticSpec, cache_dir: str) -> str:
    """The folder of this spec's data, generated on first use."""
    folder = folder_for(spec, cache_dir)
    if not os.path.isfile(os.path.join(folder, "spec.json")):
        generate(spec, folder)
    return folder


def client_files(folder: str, num_clients: int) -> tuple[list[str], list[str]]:
    """(train files, eval files) per client; with eval_split=task the clients of a task
    share one eval file."""
    with open(os.path.join(folder, "spec.json")) as fh:
        spec = json.load(fh)
    train = [os.path.join(folder, f"client_{k:02d}_train.json") for k in range(num_clients)]
    if spec.get("eval_split", "client") == "task":
        evals = [os.path.join(folder, f"task_{spec['client_tasks'][k]}_test.json") for k in range(num_clients)]
    else:
        evals = [os.path.join(folder, f"client_{k:02d}_eval.json") for k in range(num_clients)]
    return train, evals
