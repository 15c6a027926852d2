"""Benchmark files -> the 9 client files of one of the paper's two FedMIT scenarios.

    python -m pilot_hpc.data.prepare --scenario visual --out data/fedmit_visual \\
        --gqa-questions-train GQA/train_balanced_questions.json \\
        --gqa-questions-eval GQA/testdev_balanced_questions.json --gqa-images GQA/images \\
        --coco-train coco/annotations/captions_train2017.json --coco-images coco/train2017 \\
        --coco-eval coco/annotations/captions_val2017.json --coco-eval-images coco/val2017 \\
        --refcoco-refs "refcoco/refs(unc).p" --refcoco-instances refcoco/instances.json \\
        --refcoco-images coco/train2014 [--eval-max 500] [--seed 0]

    python -m pilot_hpc.data.prepare --scenario vqa --out data/fedmit_vqa \\
        --scienceqa-problems ScienceQA/data/scienceqa/problems.json \\
        --scienceqa-images ScienceQA/data/scienceqa/images \\
        --gqa-questions-train ... --gqa-questions-eval ... --gqa-images ... \\
        --ocrvqa-dataset OCR-VQA/dataset.json --ocrvqa-images OCR-VQA/images

Scenarios (tasks in task-id order, 3 clients each: clients 0-2 the first task, 3-5 the
second, 6-8 the third):
- visual: gqa (vqa_accuracy), coco (cider), refcoco (iou@0.5)
- vqa:    scienceqa (mc_accuracy), gqa (vqa_accuracy), ocrvqa (vqa_accuracy)

Writes OUT/client_KK_train.json and OUT/client_KK_eval.json (K = 00..08, LLaVA JSON with
absolute image paths, so data.image_root is not needed) and OUT/overlay.yaml with the
`data:` and `fl:` keys to merge into a run config (configs/fedmit_*_9client.yaml hold
the same keys for the default output folders).

Client split rule (the paper: "each dataset split at random into 3 equal client
shards"). By default (--shard-by image) all records of one image go to the same client,
so no client trains on another client's images (GQA, RefCOCO and OCR-VQA ask several
questions about one image):
1. the distinct images of a dataset's training records, in the order of their first
   record in the file (after the skips of `pilot_hpc.data.benchmarks`), are permuted
   with `numpy.random.default_rng(seed).permutation(m)` (m images);
2. the permuted images are cut into 3 contiguous runs; with n records in all, the k-th
   cut (k = 1, 2) follows the image whose running record count is closest to
   k (n // 3) + min(k, n % 3) (the shorter run on a tie; each run keeps at least one
   image), so a shard's count differs from the ideal by about one image's records;
3. with --train-max N the images are instead dealt out in permuted order, the first
   shard taking images until it holds N records or more, then the second, then the
   third; each shard keeps the first N of its records taken image by image in that
   order (an image's records in file order; the rest of its last image goes to no
   client). When the images run out before the third shard holds N records, step 2's
   cut applies, and each shard keeps at most N records the same way.
When every image has one record (COCO captions) this gives the shards of --shard-by
question, the rule of one record at a time: the records, in file order, are permuted
with `numpy.random.default_rng(seed).permutation(n)`; with --train-max N the
permutation is cut to its first 3 N entries; the result is cut into 3 contiguous parts
of n // 3 records each, and the n % 3 left over go one each to the first shards.
Either way each shard keeps the file order of its records, and the same files and seed
give the same shards, in either scenario (GQA's shards are the same in both). A
dataset with fewer than 3 distinct training images is an error with --shard-by image.

Evaluation: each client is scored on its task's evaluation split. With --eval-max N a
split longer than N is cut to the records at
`sorted(numpy.random.default_rng(seed).choice(n, N, replace=False))`; the 3 clients of a
task get the same evaluation file.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import dataclass

import numpy as np
import yaml

from pilot_hpc import jsonout
from pilot_hpc.data import benchmarks
from pilot_hpc.errors import BadInput, DataError

CLIENTS_PER_TASK = 3
SCENARIOS = {"visual": ("gqa", "coco", "refcoco"), "vqa": ("scienceqa", "gqa", "ocrvqa")}
TASK_METRICS = {"gqa": "vqa_accuracy", "coco": "cider", "refcoco": "iou@0.5", "scienceqa": "mc_accuracy",
                "ocrvqa": "vqa_accuracy"}
# The options each task cannot do without (argparse dests).
REQUIRED = {
    "gqa": ("gqa_questions_train", "gqa_questions_eval", "gqa_images"),
    "coco": ("coco_train", "coco_eval", "coco_images"),
    "refcoco": ("refcoco_refs", "refcoco_instances", "refcoco_images"),
    "scienceqa": ("scienceqa_problems", "scienceqa_images"),
    "ocrvqa": ("ocrvqa_dataset", "ocrvqa_images"),
}


def split_shards(n: int, num_shards: int, seed: int, per_shard_max: int | None = None) -> list[np.ndarray]:
    """Indices of each client's shard, one record at a time (--shard-by question: the
    module docstring)."""
    perm = np.random.default_rng(seed).permutation(n)
    if per_shard_max is not None:
        perm = perm[:per_shard_max * num_shards]
    base, extra = divmod(len(perm), num_shards)
    bounds = np.cumsum([0] + [base + (i < extra) for i in range(num_shards)])
    return [np.sort(perm[bounds[i]:bounds[i + 1]]) for i in range(num_shards)]


def split_by_image(images: list[str], num_shards: int, seed: int,
                   per_shard_max: int | None = None) -> list[np.ndarray]:
    """Indices of each client's shard, all records of one image in the same shard
    (--shard-by image: the rule in the module docstring). images[i] is record i's image."""
    first: dict[str, int] = {}
    members: list[list[int]] = []
    for i, image in enumerate(images):
        if image not in first:
            first[image] = len(members)
            members.append([])
        members[first[image]].append(i)
    if len(members) < num_shards:
        raise DataError(f"{len(images)} records show {len(members)} distinct images, too few for "
                        f"{num_shards} client shards by image")
    groups = [members[k] for k in np.random.default_rng(seed).permutation(len(members))]
    cuts = _dealt(groups, num_shards, per_shard_max) if per_shard_max is not None else None
    if cuts is None:
        counts = np.cumsum([0] + [len(g) for g in groups])  # counts[j]: records of the first j images
        base, extra = divmod(int(counts[-1]), num_shards)
        cuts = [0]
        for k in range(1, num_shards):
            nearest = int(np.argmin(np.abs(counts - (k * base + min(k, extra)))))  # the first of equals
            cuts.append(min(max(nearest, cuts[-1] + 1), len(groups) - (num_shards - k)))
        cuts.append(len(groups))
    shards = []
    for k in range(num_shards):
        shard = [i for g in groups[cuts[k]:cuts[k + 1]] for i in g][:per_shard_max]
        shards.append(np.sort(np.array(shard, dtype=np.int64)))
    return shards


def _dealt(groups: list[list[int]], num_shards: int, cap: int) -> list[int] | None:
    """Cuts that deal the images out in order, each shard until it holds `cap` records or
    more; None when the images run out first."""
    cuts, held = [0], 0
    for j, group in enumerate(groups, 1):
        held += len(group)
        if held >= cap:
            cuts.append(j)
            held = 0
            if len(cuts) == num_shards + 1:
                return cuts
    return None


def eval_subset(n: int, cap: int | None, seed: int) -> np.ndarray:
    """Indices of the evaluation records kept (all, or a seeded subsample of `cap`)."""
    if cap is None or n <= cap:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=cap, replace=False))


def convert(task: str, args: argparse.Namespace, part: str) -> benchmarks.Converted:
    """One task's train or eval split, read from the files named on the command line."""
    train = part == "train"
    if task == "gqa":
        return benchmarks.gqa(args.gqa_questions_train if train else args.gqa_questions_eval, args.gqa_images)
    if task == "coco":
        if train:
            return benchmarks.coco_captions(args.coco_train, args.coco_images, references=False)
        return benchmarks.coco_captions(args.coco_eval, args.coco_eval_images or args.coco_images, references=True)
    if task == "refcoco":
        return benchmarks.refcoco(args.refcoco_refs, args.refcoco_instances, args.refcoco_images,
                                  args.refcoco_train_split if train else args.refcoco_eval_split,
                                  box_frame=args.refcoco_box_frame)
    if task == "scienceqa":
        return benchmarks.scienceqa(args.scienceqa_problems, args.scienceqa_images,
                                    args.scienceqa_train_split if train else args.scienceqa_eval_split)
    if task == "ocrvqa":
        return benchmarks.ocrvqa(args.ocrvqa_dataset, args.ocrvqa_images,
                                 args.ocrvqa_train_split if train else args.ocrvqa_eval_split)
    raise ValueError(f"unknown task {task!r}; known: {sorted(TASK_METRICS)}")


@dataclass
class ClientData:
    client: int
    task: str
    train: list[dict]
    eval: list[dict]
    # What the conversion of the task's dataset skipped (reason -> records), before the split.
    train_skipped: dict[str, int]
    eval_skipped: dict[str, int]


def build(args: argparse.Namespace, log=print) -> list[ClientData]:
    """Converts the scenario's three datasets and splits each over its three clients."""
    clients: list[ClientData] = []
    for task in SCENARIOS[args.scenario]:
        train, held_out = convert(task, args, "train"), convert(task, args, "eval")
        log(f"{task}: train {train.summary()}; eval {held_out.summary()}")
        if len(train.records) < CLIENTS_PER_TASK:
            raise DataError(f"{train.source}: {len(train.records)} training records cannot fill "
                            f"{CLIENTS_PER_TASK} client shards")
        evaluation = [held_out.records[i] for i in eval_subset(len(held_out.records), args.eval_max, args.seed)]
        if args.shard_by == "image":
            try:
                shards = split_by_image([r["image"] for r in train.records], CLIENTS_PER_TASK, args.seed,
                                        args.train_max)
            except DataError as err:
                raise DataError(f"{train.source}: {err}; --shard-by question splits by record instead") from None
        else:
            shards = split_shards(len(train.records), CLIENTS_PER_TASK, args.seed, args.train_max)
        for shard in shards:
            clients.append(ClientData(len(clients), task, [train.records[i] for i in shard], evaluation,
                                      train.skipped, held_out.skipped))
    return clients


def _write_json(path: str, records: list[dict]) -> None:
    # Written aside and renamed, so an interrupted run never leaves a truncated file.
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        jsonout.dump(records, fh, ensure_ascii=False)
    os.replace(tmp, path)


def write(clients: list[ClientData], out: str, header: str) -> dict:
    """Writes the client files and overlay.yaml; returns the overlay's mapping."""
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    train_files, eval_files = [], []
    for c in clients:
        train_files.append(os.path.join(out, f"client_{c.client:02d}_train.json"))
        eval_files.append(os.path.join(out, f"client_{c.client:02d}_eval.json"))
        _write_json(train_files[-1], c.train)
        _write_json(eval_files[-1], c.eval)
    tasks = list(dict.fromkeys(c.task for c in clients))
    overlay = {
        "data": {"kind": "llava_json", "train_files": train_files, "eval_files": eval_files, "image_root": ""},
        "fl": {"num_clients": len(clients), "client_tasks": [c.task for c in clients],
               "task_metrics": {t: TASK_METRICS[t] for t in tasks}},
    }
    with open(os.path.join(out, "overlay.yaml"), "w", encoding="utf-8") as fh:
        fh.write(header)
        yaml.safe_dump(overlay, fh, sort_keys=False, default_flow_style=None, width=120)
    return overlay


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pilot_hpc.data.prepare",
                                description="Benchmark files -> 9 FedMIT client files (LLaVA JSON) + overlay.yaml.")
    p.add_argument("--scenario", required=True, choices=sorted(SCENARIOS))
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="seed of the client split and of --eval-max's subsample")
    p.add_argument("--eval-max", type=_positive, default=None, help="at most N evaluation records per task")
    p.add_argument("--train-max", type=_positive, default=None, help="at most N training records per client")
    p.add_argument("--shard-by", choices=("image", "question"), default="image",
                   help="image: all records of one image go to one client (default); question: each record "
                        "on its own, so one image's questions may land in several clients")
    g = p.add_argument_group("GQA")
    g.add_argument("--gqa-questions-train", help="e.g. train_balanced_questions.json")
    g.add_argument("--gqa-questions-eval", help="e.g. testdev_balanced_questions.json")
    g.add_argument("--gqa-images", help="folder of <imageId>.jpg")
    g = p.add_argument_group("COCO captions")
    g.add_argument("--coco-train", help="e.g. captions_train2017.json")
    g.add_argument("--coco-eval", help="e.g. captions_val2017.json")
    g.add_argument("--coco-images", help="folder of the training annotations' file_name images")
    g.add_argument("--coco-eval-images", help="folder of the evaluation images (default: --coco-images)")
    g = p.add_argument_group("RefCOCO (refer toolkit files)")
    g.add_argument("--refcoco-refs", help="refs(unc).p (a pickle; only plain data is loaded) or a .json list of refs")
    g.add_argument("--refcoco-instances", help="instances.json")
    g.add_argument("--refcoco-images", help="folder of the COCO train2014 images")
    g.add_argument("--refcoco-train-split", default="train")
    g.add_argument("--refcoco-eval-split", default="val", help="val, testA or testB")
    g.add_argument("--refcoco-box-frame", default="image", choices=benchmarks.BOX_FRAMES,
                   help="normalise boxes by the image's width/height, or by the padded square's side")
    g = p.add_argument_group("ScienceQA")
    g.add_argument("--scienceqa-problems", help="data/scienceqa/problems.json")
    g.add_argument("--scienceqa-images", help="folder holding <split>/<pid>/image.png: data/scienceqa/images, "
                   "where ScienceQA's tools/download.sh unpacks them")
    g.add_argument("--scienceqa-train-split", default="train")
    g.add_argument("--scienceqa-eval-split", default="test")
    g = p.add_argument_group("OCR-VQA")
    g.add_argument("--ocrvqa-dataset", help="dataset.json")
    g.add_argument("--ocrvqa-images", help="folder of <id>.<ext> cover images")
    g.add_argument("--ocrvqa-train-split", default="train", choices=sorted(benchmarks.OCRVQA_SPLITS))
    g.add_argument("--ocrvqa-eval-split", default="test", choices=sorted(benchmarks.OCRVQA_SPLITS))
    return p


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    """Returns 0 when written, 2 on bad input (the message names the file and record)."""
    p = parser()
    args = p.parse_args(argv)
    missing = [f"--{dest.replace('_', '-')}" for task in SCENARIOS[args.scenario] for dest in REQUIRED[task]
               if getattr(args, dest) is None]
    if missing:
        p.error(f"scenario {args.scenario} needs {' '.join(dict.fromkeys(missing))}")
    try:
        clients = build(args)
    except BadInput as err:
        print(f"prepare: error: {err}", file=sys.stderr)
        return 2
    command = shlex.join(["python", "-m", "pilot_hpc.data.prepare"] + list(sys.argv[1:] if argv is None else argv))
    header = (f"# Written by: {command}\n"
              "# The data: and fl: keys of a run config for these files: give this file as a second\n"
              "# --config after the scenario's (python -m pilot_hpc.main --config configs/fedmit_<scenario>_9client.yaml\n"
              "# --config <this file>), whose keys it replaces.\n")
    write(clients, args.out, header)
    for c in clients:
        # The skip counts are the dataset's, before the split: printed once per dataset above.
        print(f"client {c.client:02d} [{c.task}]: {len(c.train)} train records, {len(c.eval)} eval records")
    print(f"wrote {len(clients)} clients' files and overlay.yaml to {os.path.abspath(args.out)}; run them with "
          f"--config configs/fedmit_{args.scenario}_9client.yaml --config {os.path.join(args.out, 'overlay.yaml')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
