"""Tiny fixtures of the paper's five benchmarks, each in the format and folder layout its
own download gives:

    GQA/train_balanced_questions.json,
    GQA/testdev_balanced_questions.json           GQA's questions1.2.zip
    GQA/images/<imageId>.jpg                      GQA's images.zip
    coco/annotations/captions_train2017.json,
    coco/annotations/captions_val2017.json        COCO's annotations_trainval2017.zip
    coco/train2017/, coco/val2017/, coco/train2014/
                                                  COCO's train2017.zip, val2017.zip, train2014.zip
    refcoco/refs(unc).p (a Python 2 pickle),
    refcoco/instances.json                        the refer toolkit's refcoco.zip
    ScienceQA/data/scienceqa/problems.json        the ScienceQA repository
    ScienceQA/data/scienceqa/images/<split>/<pid>/image.png
                                                  its tools/download.sh
    OCR-VQA/dataset.json                          OCR-VQA's download
    OCR-VQA/images/<id>.<imageURL's extension>    its loadDataset.py (fetches the covers)

    python tests/official_formats.py OUT

writes all five under OUT with the blemishes real downloads have (trouble=True below),
so prepare's skip report shows each reason. tests/unit/test_benchmarks.py and the
walk-through's e2e test build theirs with the same functions.
"""

from __future__ import annotations

import json
import os
import pickle
import sys

from PIL import Image


def _image(path, size=(32, 24)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, (200, 30, 30)).save(path)


def dump_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(obj, fh)
    return str(path)


def _dump_pairs(path, pairs):
    """A JSON object written from (key, value) pairs, a repeated key as often as listed
    (json.dump of a dict cannot write one)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        fh.write("{" + ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in pairs) + "}")
    return str(path)


def py2_pickle(obj) -> bytes:
    """obj as Python 2's cPickle (protocol 2) writes it: str as 8-bit BINSTRING opcodes.

    Python 3 cannot write those (it pickles bytes through _codecs.encode), so the opcodes
    are spelled out: EMPTY_DICT/EMPTY_LIST, MARK, items, SETITEMS/APPENDS, BININT.
    """
    if isinstance(obj, dict):
        return b"}(" + b"".join(py2_pickle(k) + py2_pickle(v) for k, v in obj.items()) + b"u"
    if isinstance(obj, list):
        return b"](" + b"".join(py2_pickle(v) for v in obj) + b"e"
    if isinstance(obj, str):
        raw = obj.encode("utf-8")
        return b"U" + bytes([len(raw)]) + raw
    return b"J" + int(obj).to_bytes(4, "little", signed=True)


# trouble=True adds, in each benchmark's own format, ids that the file lists twice (the
# later entry differs, so a test sees which one is kept) and images below MIN_IMAGE_SIDE
# = 14 px on a side, next to one of exactly 14 x 14 px that is kept.


def make_gqa(root, trouble=False) -> dict:
    for name in ("n1", "n2", "n3"):
        _image(f"{root}/GQA/images/{name}.jpg")
    train = [(f"{i:03d}", {"imageId": f"n{i % 3 + 1}", "question": f"What is item {i}?", "answer": f"thing{i}",
                           "fullAnswer": "unused", "types": {}}) for i in range(7)]
    train.append(("099", {"imageId": "gone", "question": "Lost?", "answer": "yes"}))  # no image file
    if trouble:
        for name, size in (("n4", (1, 1)), ("n5", (13, 40)), ("n6", (14, 14))):
            _image(f"{root}/GQA/images/{name}.jpg", size)
        train += [("200", {"imageId": "n4", "question": "Tiny?", "answer": "yes"}),
                  ("201", {"imageId": "n4", "question": "Tiny again?", "answer": "yes"}),
                  ("202", {"imageId": "n5", "question": "Narrow?", "answer": "yes"}),
                  ("203", {"imageId": "n6", "question": "Just big enough?", "answer": "yes"}),
                  ("000", {"imageId": "n2", "question": "Listed twice?", "answer": "later"}),
                  ("005", {"imageId": "n1", "question": "Listed twice?", "answer": "later"})]
    test = {"t1": {"imageId": "n1", "question": "Is the car red?", "answer": "no"},
            "t2": {"imageId": "n2", "question": "Which side?", "answer": "left"},
            "t3": {"imageId": "n3", "question": "What color?", "answer": "blue"}}
    return {"train": _dump_pairs(f"{root}/GQA/train_balanced_questions.json", train),
            "eval": dump_json(f"{root}/GQA/testdev_balanced_questions.json", test), "images": f"{root}/GQA/images"}


def _coco_file(root, name, ids, no_caption=(), no_file=(), tiny=(), twice=()):
    images, anns = [], []
    for i in ids:
        size = (2, 2) if i in tiny else (32, 24)
        images.append({"id": i, "file_name": f"{i:012d}.jpg", "width": size[0], "height": size[1]})
        if i not in no_file:
            _image(f"{root}/coco/{name}/{i:012d}.jpg", size)
        if i not in no_caption:
            anns += [{"id": 10 * i + k, "image_id": i, "caption": f" A  photo {i}, caption {k}.\n"} for k in range(3)]
    images += [dict(images[ids.index(i)], file_name="listed_twice.jpg") for i in twice]
    return dump_json(f"{root}/coco/annotations/captions_{name}.json", {"images": images, "annotations": anns})


def make_coco(root, trouble=False) -> dict:
    extra = {"tiny": [9], "twice": [1]} if trouble else {}
    ids = [1, 2, 3, 4, 5, 6] + ([9] if trouble else [])
    return {"train": _coco_file(root, "train2017", ids, no_caption=[5], no_file=[6], **extra),
            "eval": _coco_file(root, "val2017", [7, 8]),
            "images": f"{root}/coco/train2017", "eval_images": f"{root}/coco/val2017"}


REFS = [
    # image 100 is 200 x 100 px, image 101 is 50 x 80 px, image 103 is 40 x 20 px.
    {"ref_id": 0, "ann_id": 1000, "image_id": 100, "split": "train", "file_name": "COCO_train2014_100_1000.jpg",
     "sentences": [{"sent": "left  man", "raw": "Left man"}, {"sent": "guy on the left"}]},
    {"ref_id": 1, "ann_id": 1001, "image_id": 101, "split": "train", "sentences": [{"sent": "tall dog"}]},
    {"ref_id": 2, "ann_id": 1000, "image_id": 100, "split": "train", "sentences": [{"sent": "man again"}]},
    {"ref_id": 3, "ann_id": 1001, "image_id": 101, "split": "val", "sentences": [{"sent": "the dog"}]},
    {"ref_id": 4, "ann_id": 1002, "image_id": 102, "split": "train", "sentences": [{"sent": "a"}, {"sent": "b"}]},
    {"ref_id": 5, "ann_id": 1003, "image_id": 103, "split": "train", "sentences": [{"sent": "red  ball"}]},
]


def make_refcoco(root, refs=REFS, trouble=False, py2=False) -> dict:
    """py2: refs(unc).p as the refer toolkit ships it, pickled by Python 2 (its str load
    as bytes); otherwise pickled by this Python."""
    images = [{"id": 100, "file_name": "COCO_train2014_000000000100.jpg", "width": 200, "height": 100},
              {"id": 101, "file_name": "COCO_train2014_000000000101.jpg", "width": 50, "height": 80},
              {"id": 102, "file_name": "COCO_train2014_000000000102.jpg", "width": 10, "height": 10},
              {"id": 103, "file_name": "COCO_train2014_000000000103.jpg", "width": 40, "height": 20}]
    if trouble:
        images.append({"id": 104, "file_name": "COCO_train2014_000000000104.jpg", "width": 13, "height": 13})
        refs = refs + [{"ref_id": 6, "ann_id": 1004, "image_id": 104, "split": "train",
                        "sentences": [{"sent": "tiny thing"}]},
                       {"ref_id": 0, "ann_id": 1001, "image_id": 101, "split": "train",
                        "sentences": [{"sent": "listed twice"}, {"sent": "again"}]}]
    for img in images:
        if img["id"] != 102:  # image 102's file is missing
            _image(f"{root}/coco/train2014/{img['file_name']}", (img["width"], img["height"]))
    anns = [{"id": 1000, "image_id": 100, "bbox": [20, 10, 50, 40], "category_id": 1},
            {"id": 1001, "image_id": 101, "bbox": [5, 8, 20, 40], "category_id": 18},
            {"id": 1002, "image_id": 102, "bbox": [0, 0, 5, 5], "category_id": 1},
            {"id": 1003, "image_id": 103, "bbox": [4, 2, 10, 10], "category_id": 37},
            {"id": 1004, "image_id": 104, "bbox": [1, 1, 5, 5], "category_id": 37}]
    os.makedirs(f"{root}/refcoco", exist_ok=True)
    with open(f"{root}/refcoco/refs(unc).p", "wb") as fh:
        if py2:
            fh.write(b"\x80\x02" + py2_pickle(refs) + b".")
        else:
            pickle.dump(refs, fh, protocol=2)
    return {"refs": f"{root}/refcoco/refs(unc).p", "images": f"{root}/coco/train2014",
            "instances": dump_json(f"{root}/refcoco/instances.json", {"images": images, "annotations": anns})}


def make_scienceqa(root, trouble=False) -> dict:
    def problem(split, q, choices, answer, image="image.png", hint=""):
        return {"question": q, "choices": choices, "answer": answer, "hint": hint, "image": image, "split": split,
                "task": "closed choice", "lecture": "", "solution": ""}
    problems = {
        "1": problem("train", "Which animal?", ["cat", "dog", "fish"], 1, hint="A hint."),
        "2": problem("train", "Which is hot?", ["ice", "fire"], 1),
        "3": problem("train", "No picture?", ["yes", "no"], 0, image=None),  # text only: skipped
        "4": problem("train", "Which planet?", ["Mars", "Venus", "Earth", "Moon", "Sun"], 4),
        "5": problem("train", "Which one?", ["x", "y"], 0),
        "6": problem("test", "Pick one.", ["up", "down"], 0, hint="Context here"),
        "7": problem("val", "Val?", ["a", "b"], 1),
    }
    pairs = list(problems.items())
    if trouble:
        pairs += [("8", problem("train", "Too narrow?", ["yes", "no"], 0)),
                  ("2", problem("train", "Listed twice?", ["yes", "no"], 0))]
    folder = f"{root}/ScienceQA/data/scienceqa"
    for pid, p in pairs:
        if p["image"]:
            _image(f"{folder}/images/{p['split']}/{pid}/image.png", (40, 13) if pid == "8" else (32, 24))
    return {"problems": _dump_pairs(f"{folder}/problems.json", pairs), "images": f"{folder}/images"}


def make_ocrvqa(root, trouble=False, dead_cover=False) -> dict:
    """dead_cover: one more book whose cover file holds the HTML error page a dead
    imageURL served (an unreadable_image)."""
    def book(split, n):
        return {"imageURL": "http://x/y.jpg", "questions": [f"Q{k} of this book?" for k in range(n)],
                "answers": [f"ans {k}" for k in range(n)], "title": "T", "genre": "G", "split": split}
    data = {"b1": book(1, 2), "b2": book(1, 2), "b3": book(1, 1), "b4": book(3, 2), "b5": book(1, 3),
            "b6": book(2, 1)}
    folder = f"{root}/OCR-VQA"
    _image(f"{folder}/images/b1.jpg")
    _image(f"{folder}/images/b2.gif")  # the download keeps each cover's own extension
    _image(f"{folder}/images/b3.png")
    _image(f"{folder}/images/b4.jpg")
    _image(f"{folder}/images/b6.jpg")  # b5's cover is missing
    pairs = list(data.items())
    if trouble:
        _image(f"{folder}/images/b7.gif", (1, 1))  # what a dead cover URL serves
        pairs += [("b7", book(1, 2)), ("b1", book(1, 3))]
    if dead_cover:
        with open(f"{folder}/images/b8.jpg", "w") as fh:
            fh.write("<html><body>404 Not Found</body></html>")
        pairs.append(("b8", book(1, 1)))
    return {"dataset": _dump_pairs(f"{folder}/dataset.json", pairs), "images": f"{folder}/images"}


def write_all(root) -> dict[str, dict]:
    """All five benchmarks under root, with the blemishes of real downloads."""
    return {"gqa": make_gqa(root, trouble=True), "coco": make_coco(root, trouble=True),
            "refcoco": make_refcoco(root, trouble=True, py2=True), "scienceqa": make_scienceqa(root, trouble=True),
            "ocrvqa": make_ocrvqa(root, trouble=True, dead_cover=True)}


def prepare_argv(scenario: str, files: dict[str, dict], out) -> list[str]:
    """pilot_hpc.data.prepare's arguments for write_all's files (its defaults otherwise)."""
    g = files["gqa"]
    gqa = ["--gqa-questions-train", g["train"], "--gqa-questions-eval", g["eval"], "--gqa-images", g["images"]]
    if scenario == "visual":
        c, r = files["coco"], files["refcoco"]
        return ["--scenario", "visual", "--out", str(out)] + gqa + [
            "--coco-train", c["train"], "--coco-images", c["images"], "--coco-eval", c["eval"],
            "--coco-eval-images", c["eval_images"],
            "--refcoco-refs", r["refs"], "--refcoco-instances", r["instances"], "--refcoco-images", r["images"]]
    s, o = files["scienceqa"], files["ocrvqa"]
    return ["--scenario", "vqa", "--out", str(out), "--scienceqa-problems", s["problems"],
            "--scienceqa-images", s["images"]] + gqa + [
        "--ocrvqa-dataset", o["dataset"], "--ocrvqa-images", o["images"]]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python tests/official_formats.py OUT", file=sys.stderr)
        return 2
    root = os.path.abspath(argv[0])
    for task, files in write_all(root).items():
        for what, path in files.items():
            count = sum(len(names) for _, _, names in os.walk(path)) if os.path.isdir(path) else None
            extra = f" ({count} files)" if count is not None else ""
            print(f"{task} {what}: {os.path.relpath(path, root)}{extra}")
    print(f"wrote GQA, COCO, RefCOCO, ScienceQA and OCR-VQA in their download layouts under {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
