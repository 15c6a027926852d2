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
adapter is for): client k draws its dominant colour with probability 0.5.

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
from dataclasses import dataclass

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


def draw_scene(rng: random.Random, dominant_color: str | None) -> Scene:
    colors = list(COLORS)
    color = dominant_color if dominant_color and rng.random() < 0.5 else rng.choice(colors)
    return Scene(
        color=color,
        shape=rng.choice(SHAPES),
        row=rng.randrange(GRID),
        col=rng.randrange(GRID),
        size=rng.choice(list(SIZES)),
    )


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


def write_split(folder: str, name: str, tasks: list[str], count: int, seed: int, dominant: str | None,
                image_size: int) -> str:
    """Writes `count` samples of the given task mix to <folder>/<name>.json (+ PNGs)."""
    rng = random.Random(seed)
    np_rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "images", name), exist_ok=True)
    records = []
    for i in range(count):
        task = tasks[i % len(tasks)]
        scene = draw_scene(rng, dominant)
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

    def key(self) -> str:
        import hashlib

        blob = json.dumps(self.__dict__, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def client_train_sizes(num_clients: int, low: int, high: int, seed: int) -> list[int]:
    """n_k differ between clients (so sample-weighted aggregation is not a plain mean)."""
    rng = random.Random(seed * 7919 + 17)
    return [rng.randint(low, high) for _ in range(num_clients)]


def generate(spec: SyntheticSpec, folder: str) -> None:
    """Writes the whole synthetic FedMIT world into `folder` (atomically: temp + rename)."""
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".synthetic-", dir=parent)
    colors = list(COLORS)
    tasks = sorted(set(spec.client_tasks))
    # Seeds: the base model's warm-start data uses a stream disjoint from every client's.
    write_split(tmp, "pretrain", tasks, spec.pretrain_samples, spec.seed * 1000 + 999, None, spec.image_size)
    for k, task in enumerate(spec.client_tasks):
        dominant = colors[k % len(colors)]
        write_split(tmp, f"client_{k:02d}_train", [task], spec.train_sizes[k], spec.seed * 1000 + 2 * k,
                    dominant, spec.image_size)
        write_split(tmp, f"client_{k:02d}_eval", [task], spec.eval_samples, spec.seed * 1000 + 2 * k + 1,
                    dominant, spec.image_size)
    with open(os.path.join(tmp, "spec.json"), "w") as fh:
        json.dump(spec.__dict__, fh, indent=1)
    if os.path.isdir(folder):  # another process won the race; keep its copy
        shutil.rmtree(tmp)
        return
    os.replace(tmp, folder)


def spec_for(cfg) -> SyntheticSpec:
    """The synthetic world a run config asks for."""
    sizes = client_train_sizes(cfg.fl.num_clients, cfg.data.train_min, cfg.data.train_max, cfg.run.seed)
    return SyntheticSpec(list(cfg.fl.client_tasks), sizes, cfg.data.eval_samples, cfg.pretrain.samples,
                         cfg.model.image_size, cfg.run.seed)


def folder_for(spec: SyntheticSpec, cache_dir: str) -> str:
    return os.path.join(os.path.expanduser(cache_dir), f"synthetic-{spec.key()}")


def ensure(spec: SyntheticSpec, cache_dir: str) -> str:
    """The folder of this spec's data, generated on first use."""
    folder = folder_for(spec, cache_dir)
    if not os.path.isfile(os.path.join(folder, "spec.json")):
        generate(spec, folder)
    return folder


def client_files(folder: str, num_clients: int) -> tuple[list[str], list[str]]:
    train = [os.path.join(folder, f"client_{k:02d}_train.json") for k in range(num_clients)]
    evals = [os.path.join(folder, f"client_{k:02d}_eval.json") for k in range(num_clients)]
    return train, evals
