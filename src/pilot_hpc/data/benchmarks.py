"""The paper's benchmarks, read in the form they ship in, as LLaVA instruction records.

Each reader takes the benchmark's own files (never downloads anything) and returns a
`Converted`: the records, as dicts in the suite's LLaVA JSON format
(`pilot_hpc.data.records`), with absolute image paths, plus counts of what it skipped.

| benchmark | files | one record per | answer |
|---|---|---|---|
| GQA | `*_balanced_questions.json` (qid -> question), `<images>/<imageId>.jpg` | question | short answer |
| COCO captions | `captions_*.json` (COCO format), `<images>/<file_name>` | image | caption |
| RefCOCO | refer toolkit's `refs(unc).p` + `instances.json`, `<images>/<file_name>` | ref sentence | box text |
| ScienceQA | `problems.json` (pid -> problem), `<images>/<split>/<pid>/<image>` | problem | option letter |
| OCR-VQA | `dataset.json` (id -> book), `<images>/<id>.<any extension>` | question | short answer |

Prompts follow LLaVA-1.5's instruction formats: short-answer VQA ends with
"Answer the question using a single word or phrase."; captions ask "Provide a
one-sentence caption for the provided image."; grounding asks for "the bounding box
coordinate of the region this sentence describes: <sent>" and is answered
`[x1, y1, x2, y2]` normalised to [0, 1] with two decimals; ScienceQA lists its options
"A. ...\\nB. ..." and asks for the letter directly.

Choices made here:
- COCO: a training record holds the image's first caption (annotation order) as the
  answer, so a client's n_k counts images, the unit that evaluation scores; an
  evaluation record holds the first caption as its answer and all captions in
  `references` (CIDEr scores against all of them).
- RefCOCO: one record per referring sentence (a ref has 1-3), in both splits, as the
  standard RefCOCO evaluation scores every sentence.
- Skip policy: what is skipped is counted in `Converted.skipped` (reason -> records):
  `missing_image` (no such file), `unreadable_image` (PIL does not recognise its
  header), `small_image` (narrower or lower than MIN_IMAGE_SIDE = 14 px: below),
  `no_image` (a ScienceQA problem without one; the suite's records need one),
  `no_caption` (a COCO image without captions), `empty_answer`, and `duplicate_id`:
  a question, problem, book, image or ref id that the file lists again. The first
  occurrence is kept and each later one skipped (json alone would keep the last one
  and say nothing). A split left with no record at all is an error, so a wrong image
  folder or split name cannot pass as "everything skipped".
- Image checks read each image file's header only (PIL's lazy open), once per file.
- Malformed input (a missing or mistyped key, a file that is not the expected JSON,
  one that is not UTF-8) raises pilot_hpc.errors.DataError naming the file, the record
  and the key.

How the records become 9 clients (3 seeded shards per dataset, a shared evaluation
split per task) is `pilot_hpc.data.prepare`'s module docstring.
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, UnidentifiedImageError

from pilot_hpc.data import jsonfile
from pilot_hpc.errors import DataError

# records.IMAGE_TOKEN (tests check they agree); not imported, because records pulls in
# torch and datasets, which converting JSON files does not need.
IMAGE_TOKEN = "<image>"
SHORT_ANSWER = "Answer the question using a single word or phrase."
CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."
GROUNDING_PROMPT = "Please provide the bounding box coordinate of the region this sentence describes: "
MC_PROMPT = "Answer with the option's letter from the given choices directly."
OPTION_LETTERS = "ABCDE"  # ScienceQA has at most five choices; mc_accuracy scores A-E
OCRVQA_SPLITS = {"train": 1, "val": 2, "test": 3}  # dataset.json's "split" codes
BOX_FRAMES = ("image", "square")
# Images narrower or lower than MIN_IMAGE_SIDE px are skipped. 14 px is one patch of
# LLaVA-1.5's vision tower (CLIP ViT-L/14): such an image holds less than one patch of
# detail along that side, and the processor's upscaling to 336 px (24 patches) only
# smears those few pixels over all of them. In the benchmarks such files are
# placeholders, not pictures (a 1 x 1 GIF saved where a cover could not be downloaded).
MIN_IMAGE_SIDE = 14
DUPLICATE = "duplicate_id"


def skip_text(skipped: dict[str, int]) -> str:
    """"reason count, ..." in reason order, or "none"."""
    return ", ".join(f"{k} {v}" + (" (the first of each id kept)" if k == DUPLICATE else "")
                     for k, v in sorted(skipped.items())) or "none"


@dataclass
class Converted:
    """One benchmark split as LLaVA records, and what was left out (reason -> records)."""

    source: str
    records: list[dict] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    _ids: set = field(default_factory=set, repr=False)

    def skip(self, reason: str, count: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + count

    def repeated(self, key: str) -> bool:
        """Whether `key` (an item's id in its file) was met before; remembers it."""
        if key in self._ids:
            return True
        self._ids.add(key)
        return False

    def add(self, rid: str, image: str, question: str, answer: str, references: list[str] | None = None) -> None:
        # An empty answer would train on nothing but the end-of-sequence token.
        if not answer.strip():
            self.skip("empty_answer")
            return
        rec = {"id": rid, "image": image,
               "conversations": [{"from": "human", "value": f"{IMAGE_TOKEN}\n{question}"},
                                 {"from": "gpt", "value": answer.strip()}]}
        if references is not None:
            rec["references"] = references
        self.records.append(rec)

    def summary(self) -> str:
        return f"{len(self.records)} records (skipped: {skip_text(self.skipped)})"

    def finish(self, what: str, images: "_Images") -> "Converted":
        if not self.records:
            hint = (f"; is {images.folder} the right image folder?" if self.skipped.get("missing_image") else "")
            raise DataError(f"{self.source}: no usable record for {what} (skipped: "
                            f"{self.skipped or 'none'}){hint}")
        return self


# ----------------------------------------------------------------------- validation


_TYPE_NAMES = {str: "a string", int: "an integer", list: "a list", dict: "an object", float: "a number"}


def _type_name(typ) -> str:
    types = typ if isinstance(typ, tuple) else (typ,)
    return " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)


def _check(value: Any, typ, path: str, where: str) -> Any:
    # bool is an int subclass; a true/false where an id or index belongs is malformed.
    if isinstance(value, bool) or not isinstance(value, typ):
        raise DataError(f"{path}: {where} must be {_type_name(typ)}, got {type(value).__name__} {value!r:.60}")
    return value


def _get(obj: Any, key: str, typ, path: str, where: str) -> Any:
    """obj[key], checked to be of type typ; errors name the file, the record and the key."""
    if not isinstance(obj, dict):
        raise DataError(f"{path}: {where} must be an object, got {type(obj).__name__}")
    if key not in obj:
        raise DataError(f"{path}: {where}: missing key {key!r}")
    return _check(obj[key], typ, path, f"{where}: key {key!r}")


def load_json(path: str, object_pairs_hook=None) -> Any:
    if not os.path.isfile(path):
        raise DataError(f"file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh, object_pairs_hook=object_pairs_hook)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not a valid JSON file ({err})") from None
    except UnicodeDecodeError as err:
        bad = jsonfile.first_bad_byte(path)
        if bad is None:  # the file decoded when read again: say what the codec said
            raise DataError(f"{path}: not UTF-8 text ({err}); {jsonfile.REENCODE}") from None
        inside = bad.json_path()
        raise DataError(f"{path}: not UTF-8 text: {bad.where}{', in ' + inside if inside else ''}; "
                        f"{jsonfile.REENCODE}") from None


def load_json_object(path: str, expected: str) -> list[tuple[str, Any]]:
    """A JSON file whose top level must be an object (`expected` says of what, for the
    error), as its (key, value) pairs in file order: a repeated key comes back as often
    as it is written, where a dict would keep its last value and say nothing."""
    last: list = [None]

    def keep_pairs(items: list) -> dict:
        last[0] = items  # the top-level object is the last one the parser closes
        return dict(items)

    data = load_json(path, keep_pairs)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object of {expected}, got {type(data).__name__}")
    return last[0]


def image_problem(path: str) -> str | None:
    """The skip reason of an image file (module docstring), or None when it is usable.
    Image.open reads the header only; the pixels are decoded by training."""
    if not os.path.isfile(path):
        return "missing_image"
    try:
        with Image.open(path) as img:
            width, height = img.size
    except (UnidentifiedImageError, OSError):
        return "unreadable_image"
    return "small_image" if min(width, height) < MIN_IMAGE_SIDE else None


class _Images:
    """An image folder; remembers each file's verdict (many records share an image)."""

    def __init__(self, folder: str, what: str):
        if not os.path.isdir(folder):
            raise DataError(f"{what} image folder {folder} does not exist")
        self.folder = os.path.abspath(folder)
        self._problem: dict[str, str | None] = {}

    def find(self, *parts: str) -> tuple[str, str | None]:
        """(the file's path, its skip reason or None when it is usable)."""
        path = os.path.join(self.folder, *parts)
        if path not in self._problem:
            self._problem[path] = image_problem(path)
        return path, self._problem[path]


# ----------------------------------------------------------------------- readers


def gqa(questions_path: str, images_dir: str) -> Converted:
    """GQA questions (train_balanced_questions.json, testdev_balanced_questions.json, ...)."""
    data = load_json_object(questions_path, "question id -> question (GQA *_questions.json)")
    images = _Images(images_dir, "GQA")
    out = Converted(questions_path)
    for qid, q in data:
        if out.repeated(qid):
            out.skip(DUPLICATE)
            continue
        where = f"question {qid!r}"
        image_id = _get(q, "imageId", str, questions_path, where)
        question = _get(q, "question", str, questions_path, where)
        answer = _get(q, "answer", str, questions_path, where)
        image, problem = images.find(f"{image_id}.jpg")
        if problem:
            out.skip(problem)
            continue
        out.add(f"gqa-{qid}", image, f"{question}\n{SHORT_ANSWER}", answer)
    return out.finish("GQA questions", images)


def coco_captions(annotations_path: str, images_dir: str, references: bool) -> Converted:
    """COCO caption annotations: one record per image; `references` adds all its captions."""
    data = load_json(annotations_path)
    top = "the top level"
    image_list = _get(data, "images", list, annotations_path, top)
    annotation_list = _get(data, "annotations", list, annotations_path, top)
    captions: dict[Any, list[str]] = {}
    for i, ann in enumerate(annotation_list):
        where = f"annotations[{i}]"
        image_id = _get(ann, "image_id", (int, str), annotations_path, where)
        caption = " ".join(_get(ann, "caption", str, annotations_path, where).split())
        if caption:
            captions.setdefault(image_id, []).append(caption)
    images = _Images(images_dir, "COCO")
    out = Converted(annotations_path)
    for i, img in enumerate(image_list):
        where = f"images[{i}]"
        image_id = _get(img, "id", (int, str), annotations_path, where)
        file_name = _get(img, "file_name", str, annotations_path, where)
        if out.repeated(f"coco-{image_id}"):
            out.skip(DUPLICATE)
            continue
        caps = captions.get(image_id)
        if not caps:
            out.skip("no_caption")
            continue
        image, problem = images.find(file_name)
        if problem:
            out.skip(problem)
            continue
        out.add(f"coco-{image_id}", image, CAPTION_PROMPT, caps[0], caps if references else None)
    return out.finish("COCO captions", images)


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickles lists, dicts, strings and numbers only.

    The refer toolkit ships RefCOCO's refs as a pickle, so that is the form read here,
    and only from a path the user names. Loading any class or function (which is how a
    pickle runs code) is refused: a genuine refs file never needs one.
    """

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refuses to load {module}.{name}: a refs file holds plain data only")


def _text(value: Any) -> Any:
    # refs(unc).p was written by Python 2: its str values and dict keys load as bytes.
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value.decode("latin-1")
    if isinstance(value, dict):
        return {_text(k): _text(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_text(v) for v in value]
    return value


def load_refs(path: str) -> list:
    """The refer toolkit's refs(unc).p (a pickle), or the same list converted to .json."""
    if path.endswith(".json"):
        refs = load_json(path)
    else:
        if not os.path.isfile(path):
            raise DataError(f"file {path} does not exist")
        try:
            with open(path, "rb") as fh:
                refs = _text(_PlainDataUnpickler(fh, encoding="bytes").load())
        # What pickle raises on a damaged or foreign file varies with the damage.
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError,
                AttributeError, OverflowError) as err:
            raise DataError(f"{path}: not a RefCOCO refs pickle ({type(err).__name__}: {err})") from None
    if not isinstance(refs, list):
        raise DataError(f"{path}: expected a list of refs, got {type(refs).__name__}")
    return refs


def box_text(bbox: list, width: float, height: float, frame: str = "image") -> str:
    """COCO [x, y, w, h] pixels -> "[x1, y1, x2, y2]" in [0, 1], two decimals.

    frame "image": x over the width, y over the height. frame "square": over the side
    of the image padded to a square with the padding split evenly (LLaVA-1.5's
    expand2square, the frame of its pad-preprocessed grounding data).
    """
    x, y, w, h = (float(v) for v in bbox)
    if frame == "square":
        side = max(width, height)
        dx, dy = (side - width) // 2, (side - height) // 2  # expand2square's integer offsets
        coords = [(x + dx) / side, (y + dy) / side, (x + w + dx) / side, (y + h + dy) / side]
    else:
        coords = [x / width, y / height, (x + w) / width, (y + h) / height]
    return "[" + ", ".join(f"{min(max(c, 0.0), 1.0):.2f}" for c in coords) + "]"


def refcoco(refs_path: str, instances_path: str, images_dir: str, split: str, box_frame: str = "image") -> Converted:
    """RefCOCO (refer toolkit form): one record per referring sentence of `split`."""
    if box_frame not in BOX_FRAMES:
        raise ValueError(f"box frame must be one of {BOX_FRAMES}, got {box_frame!r}")
    refs = load_refs(refs_path)
    inst = load_json(instances_path)
    top = "the top level"
    sizes: dict[Any, tuple[str, float, float]] = {}
    for i, img in enumerate(_get(inst, "images", list, instances_path, top)):
        where = f"images[{i}]"
        image_id = _get(img, "id", (int, str), instances_path, where)
        dims = [_get(img, k, (int, float), instances_path, where) for k in ("width", "height")]
        if min(dims) <= 0:
            raise DataError(f"{instances_path}: {where}: width and height must be > 0, got {dims}")
        sizes[image_id] = (_get(img, "file_name", str, instances_path, where), *dims)
    boxes: dict[Any, Any] = {}
    for i, ann in enumerate(_get(inst, "annotations", list, instances_path, top)):
        boxes[_get(ann, "id", (int, str), instances_path, f"annotations[{i}]")] = ann
    images = _Images(images_dir, "RefCOCO")
    out = Converted(refs_path)
    splits_seen: set[str] = set()
    for i, ref in enumerate(refs):
        ref_split = _get(ref, "split", str, refs_path, f"ref {i}")
        splits_seen.add(ref_split)
        ref_id = _get(ref, "ref_id", (int, str), refs_path, f"ref {i}")
        repeated = out.repeated(f"refcoco-{ref_id}")  # across splits: the first in the file is kept
        if ref_split != split:
            continue
        where = f"ref {i} (ref_id {ref_id})"
        sentences = _get(ref, "sentences", list, refs_path, where)
        if repeated:
            out.skip(DUPLICATE, len(sentences))
            continue
        ann_id = _get(ref, "ann_id", (int, str), refs_path, where)
        image_id = _get(ref, "image_id", (int, str), refs_path, where)
        if ann_id not in boxes:
            raise DataError(f"{refs_path}: {where}: ann_id {ann_id} is not an annotation of {instances_path}")
        if image_id not in sizes:
            raise DataError(f"{refs_path}: {where}: image_id {image_id} is not an image of {instances_path}")
        bbox = _get(boxes[ann_id], "bbox", list, instances_path, f"annotation {ann_id}")
        if len(bbox) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox) \
                or bbox[2] < 0 or bbox[3] < 0:
            raise DataError(f"{instances_path}: annotation {ann_id}: 'bbox' must be [x, y, w, h] "
                            f"with w, h >= 0, got {bbox!r}")
        file_name, width, height = sizes[image_id]
        answer = box_text(bbox, width, height, box_frame)
        image, problem = images.find(file_name)
        if problem:
            out.skip(problem, len(sentences))
            continue
        for j, s in enumerate(sentences):
            sent = " ".join(_get(s, "sent", str, refs_path, f"{where} sentences[{j}]").split())
            out.add(f"refcoco-{ref_id}-{j}", image, GROUNDING_PROMPT + sent, answer)
    if split not in splits_seen:
        raise DataError(f"{refs_path}: no ref of split {split!r}; splits present: {sorted(splits_seen)}")
    return out.finish(f"split {split!r}", images)


def scienceqa(problems_path: str, images_dir: str, split: str) -> Converted:
    """ScienceQA problems.json: one record per problem of `split` that has an image."""
    data = load_json_object(problems_path, "problem id -> problem")
    images = _Images(images_dir, "ScienceQA")
    out = Converted(problems_path)
    splits_seen: set[str] = set()
    for pid, p in data:
        repeated = out.repeated(pid)  # across splits: the first in the file is kept
        where = f"problem {pid!r}"
        p_split = _get(p, "split", str, problems_path, where)
        splits_seen.add(p_split)
        if p_split != split:
            continue
        if repeated:
            out.skip(DUPLICATE)
            continue
        question = _get(p, "question", str, problems_path, where)
        choices = _get(p, "choices", list, problems_path, where)
        answer = _get(p, "answer", int, problems_path, where)
        for j, c in enumerate(choices):
            _check(c, str, problems_path, f"{where}: choices[{j}]")
        if not 1 <= len(choices) <= len(OPTION_LETTERS):
            raise DataError(f"{problems_path}: {where}: 'choices' must hold 1 to {len(OPTION_LETTERS)} "
                            f"options, got {len(choices)}")
        if not 0 <= answer < len(choices):
            raise DataError(f"{problems_path}: {where}: 'answer' {answer} is not an index of its "
                            f"{len(choices)} choices")
        hint = p.get("hint") or ""
        _check(hint, str, problems_path, f"{where}: key 'hint'")
        image_name = p.get("image")
        if not image_name:  # null: a text-only question
            out.skip("no_image")
            continue
        _check(image_name, str, problems_path, f"{where}: key 'image'")
        image, problem = images.find(p_split, str(pid), image_name)
        if problem:
            out.skip(problem)
            continue
        context = f"Context: {hint.strip()}\n" if hint.strip() else ""
        options = "\n".join(f"{OPTION_LETTERS[j]}. {c}" for j, c in enumerate(choices))
        out.add(f"scienceqa-{pid}", image, f"{context}{question}\n{options}\n{MC_PROMPT}", OPTION_LETTERS[answer])
    if split not in splits_seen:
        raise DataError(f"{problems_path}: no problem of split {split!r}; splits present: {sorted(splits_seen)}")
    return out.finish(f"split {split!r}", images)


def _stem_index(folder: str) -> dict[str, str]:
    """Image file stem -> file name; .jpg wins when an id has several extensions."""
    index: dict[str, str] = {}
    with os.scandir(folder) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            stem, ext = os.path.splitext(entry.name)
            if entry.is_file() and (stem not in index or ext.lower() == ".jpg"):
                index[stem] = entry.name
    return index


def ocrvqa(dataset_path: str, images_dir: str, split: str) -> Converted:
    """OCR-VQA dataset.json: one record per question of the books in `split`."""
    if split not in OCRVQA_SPLITS:
        raise ValueError(f"OCR-VQA split must be one of {sorted(OCRVQA_SPLITS)}, got {split!r}")
    data = load_json_object(dataset_path, "book id -> entry")
    images = _Images(images_dir, "OCR-VQA")
    # The download script keeps each cover's own extension (.jpg, .gif, .png ...).
    names = _stem_index(images.folder)
    out = Converted(dataset_path)
    for book_id, item in data:
        repeated = out.repeated(book_id)  # across splits: the first in the file is kept
        where = f"entry {book_id!r}"
        if _get(item, "split", int, dataset_path, where) != OCRVQA_SPLITS[split]:
            continue
        questions = _get(item, "questions", list, dataset_path, where)
        if repeated:
            out.skip(DUPLICATE, len(questions))
            continue
        answers = _get(item, "answers", list, dataset_path, where)
        if len(questions) != len(answers):
            raise DataError(f"{dataset_path}: {where}: {len(questions)} questions but {len(answers)} answers")
        for j, (q, a) in enumerate(zip(questions, answers)):
            _check(q, str, dataset_path, f"{where}: questions[{j}]")
            _check(a, str, dataset_path, f"{where}: answers[{j}]")
        image, problem = images.find(names[book_id]) if book_id in names else (None, "missing_image")
        if problem:
            out.skip(problem, len(questions))
            continue
        for j, (q, a) in enumerate(zip(questions, answers)):
            out.add(f"ocrvqa-{book_id}-{j}", image, f"{q}\n{SHORT_ANSWER}", a)
    return out.finish(f"split {split!r}", images)
