"""LLaVA instruction records: load (HF `datasets`, json), validate, batch.

The same loader reads the synthetic FedMIT files and real LLaVA-1.5 data: a JSON list
of records `{"id", "image", "conversations": [{"from": "human", "value": "<image>\\n..."},
{"from": "gpt", "value": "..."}, ...]}` with `image` relative to an image root.

A file, record or image that cannot be used raises pilot_hpc.errors.DataError naming the
file and the record. What the libraries underneath (datasets, PIL, the tokenizer and
the image processor) raise on such input, ValueError and OSError among it, is turned
into a DataError here, at the one place each is met.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from dataclasses import dataclass

import datasets
import torch
from PIL import Image, UnidentifiedImageError

from pilot_hpc.data import jsonfile
from pilot_hpc.errors import DataError

IMAGE_TOKEN = "<image>"
IGNORE_INDEX = -100


@dataclass
class Sample:
    id: str
    image_path: str
    turns: list[tuple[str, str]]  # (human text without <image>, gpt answer)
    # Evaluation splits may carry every reference answer of the benchmark (e.g. COCO's
    # five captions) in an optional "references" list; the gpt turn is the first.
    references: list[str] | None = None
    # Where the record came from ("<file>: record <i> (id <id>)"), for the messages
    # about a sample that cannot be read at run time (data.on_bad_sample).
    where: str = ""
    # An evaluation record's optional "subset" tag (data.eval_subsets), e.g. seen/unseen.
    subset: str | None = None

def _where(path: str, index: int, record_id) -> str:
    rid = f" (id {record_id!r})" if record_id is not None else ""
    return f"{path}: record {index}{rid}"


def _record_error(path: str, index: int, record_id, message: str) -> DataError:
    return DataError(f"{_where(path, index, record_id)}: {message}")


def parse_record(record: dict, path: str, index: int, image_root: str) -> Sample:
    """Checks one record's structure and turns it into a Sample; errors name the record."""
    rid = record.get("id") if isinstance(record, dict) else None
    if not isinstance(record, dict):
        raise _record_error(path, index, None, f"expected an object, got {type(record).__name__}")
    image = record.get("image")
    if not isinstance(image, str) or not image:
        raise _record_error(path, index, rid, "missing 'image' (a path relative to the image root)")
    conv = record.get("conversations")
    if not isinstance(conv, list) or len(conv) < 2 or len(conv) % 2:
        raise _record_error(path, index, rid, "'conversations' must be a list of human/gpt turn pairs")
    turns = []
    for t in range(0, len(conv), 2):
        human, gpt = conv[t], conv[t + 1]
        if not (isinstance(human, dict) and isinstance(gpt, dict)) or \
                human.get("from") != "human" or gpt.get("from") != "gpt":
            raise _record_error(path, index, rid, f"turns {t}-{t + 1} must be from 'human' then 'gpt'")
        q, a = human.get("value"), gpt.get("value")
        if not isinstance(q, str) or not isinstance(a, str):
            raise _record_error(path, index, rid, f"turns {t}-{t + 1} need string 'value' fields")
        if (IMAGE_TOKEN in q) != (t == 0):
            raise _record_error(path, index, rid, f"{IMAGE_TOKEN} must appear in the first human turn only")
        if q.count(IMAGE_TOKEN) > 1:  # one image per record: a second token would have no features
            raise _record_error(path, index, rid, f"{IMAGE_TOKEN} appears {q.count(IMAGE_TOKEN)} times in the "
                                "first human turn; a record has one image, so write it once")
        turns.append((q.replace(IMAGE_TOKEN, "").strip(), a.strip()))
    refs = record.get("references")
    if refs is not None and (not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs)):
        raise _record_error(path, index, rid, "'references' must be a non-empty list of strings")
    full = image if os.path.isabs(image) else os.path.join(image_root, image)
    problem = _image_file_problem(full)
    if problem:
        raise _record_error(path, index, rid, problem)
    subset = record.get("subset")
    if subset is not None and not isinstance(subset, str):
        raise _record_error(path, index, rid, "'subset' must be a string (a name in data.eval_subsets)")
    return Sample(id=str(rid if rid is not None else index), image_path=full, turns=turns, references=refs,
                  where=_where(path, index, rid), subset=subset)


def _image_file_problem(full: str) -> str | None:
    """Why `full` is not a readable regular file, in words, or None when it is one.
    os.path.isfile says False alike for a missing file, a broken symbolic link and a
    link loop, and the fix differs."""
    try:
        st = os.stat(full)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return f"image file {full} is a symbolic-link loop (a link that leads back to itself); " \
                   "point it at the image"
        if os.path.islink(full):
            return f"image file {full} is a broken symbolic link (to {os.readlink(full)}, which does not exist)"
        if err.errno == errno.ENOENT:
            return f"image file {full} does not exist"
        return f"image file {full} cannot be reached: {err.strerror}"
    if not stat.S_ISREG(st.st_mode):
        return f"image file {full} is not a regular file"
    return None


def _check_shape(path: str) -> None:
    """A LLaVA file is a JSON list (JSON Lines, one record per line, also loads). HF's json
    loader takes a lone object as a one-row table: a file holding one record object (or a
    dict of records) would silently become a 1-sample client."""
    with open(path, "rb") as fh:
        head = fh.read(4096).lstrip()
    if head[:1] == b"[" or not head:
        return
    if head[:1] != b"{":
        raise DataError(f"{path}: expected a JSON list of LLaVA records ([{{...}}, ...]), but the file starts "
                        f"with {head[:20]!r}")
    with open(path, encoding="utf-8", errors="replace") as fh:
        text = fh.read()
    try:
        obj, end = json.JSONDecoder().raw_decode(text.lstrip())
    except ValueError:
        return  # not one JSON value: datasets reports the syntax error with its position
    if text.lstrip()[end:].strip():
        return  # more after the first object: JSON Lines
    what = "one record object" if isinstance(obj, dict) and "conversations" in obj else "one JSON object"
    raise DataError(f"{path}: the file holds {what}, not a list of records: write the records as a JSON list "
                    "[{...}, {...}] (or one record per line, JSON Lines)")


def _check_utf8(path: str) -> None:
    """A DataError naming the record that holds the file's first non-UTF-8 byte, if any
    (datasets' own message names neither the record nor the line)."""
    bad = jsonfile.first_bad_byte(path)
    if bad is None:
        return
    text, index, rec = bad.text, None, None
    try:
        if text.lstrip().startswith("["):
            steps = jsonfile.path_at(text, bad.pos, depth=1)
            if steps:
                index = steps[0]
                rec = json.loads(text)[index]
        else:  # JSON Lines: one record per non-blank line
            lines = text.split("\n")
            line = text.count("\n", 0, bad.pos)
            index = sum(1 for earlier in lines[:line] if earlier.strip())
            rec = json.loads(lines[line])
    except ValueError:  # the record's id is only a help; the byte's position is the message
        pass
    rid = rec.get("id") if isinstance(rec, dict) else None
    where = path if index is None else _where(path, index, rid)
    raise DataError(f"{where}: not UTF-8 text: {bad.where}; {jsonfile.REENCODE}")


def load_records(path: str, image_root: str | None = None, cache_dir: str | None = None) -> list[Sample]:
    """Reads a LLaVA-format JSON file through HF datasets and validates every record."""
    if not os.path.isfile(path):
        raise DataError(f"data file {path} does not exist")
    root = image_root or os.path.dirname(os.path.abspath(path))
    _check_shape(path)
    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset("json", data_files=path, split="train", cache_dir=cache_dir,
                                   keep_in_memory=True)
    except datasets.exceptions.DatasetGenerationError as err:
        _check_utf8(path)
        cause = err.__cause__ or err
        raise DataError(f"{path}: not a valid LLaVA JSON file ({type(cause).__name__}: {cause})") from None
    except ValueError as err:  # datasets' way of saying the file has no rows ("[]")
        _check_utf8(path)
        raise DataError(f"{path}: the file holds no records (an empty client shard): {err}") from None
    if len(ds) == 0:
        raise DataError(f"{path}: the file holds no records (an empty client shard)")
    try:
        return [parse_record(rec, path, i, root) for i, rec in enumerate(ds)]
    except UnicodeDecodeError as err:  # pyarrow reads JSON Lines' bad bytes; they fail when a row is read
        _check_utf8(path)
        raise DataError(f"{path}: not UTF-8 text ({err}); {jsonfile.REENCODE}") from None


def load_image(path: str) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"image {path} cannot be decoded: {err}") from None


def pad_to_square(img: Image.Image, mean: tuple[float, ...]) -> Image.Image:
    """LLaVA-1.5's `pad` (its expand2square): the image centred on a square of its longer
    side, filled with the processor's mean colour (image_mean x 255), so the processor's
    resize and centre crop keep the whole image instead of cutting its longer side."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), tuple(int(c * 255) for c in mean))
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


class InstructionDataset(torch.utils.data.Dataset):
    """Samples -> (input_ids, labels, pixel_values); answer tokens are the only labels.

    image_aspect_ratio (data.image_aspect_ratio): crop is the image processor's own
    resize and centre crop; pad pads to a square first (pad_to_square).

    A training sample that cannot be read (its image does not decode, its text is
    refused) comes back as {"unreadable": "<file>: record <i> (id ...): <why>"} instead
    of raising: in a DataLoader worker an exception would reach the engine as a
    traceback text, and the engine, not the dataset, decides (data.on_bad_sample) whether
    to skip it or to stop the round there."""

    def __init__(self, samples: list[Sample], tokenizer, image_processor, num_image_tokens: int,
                 max_length: int, cache_pixels: bool = True, image_aspect_ratio: str = "crop", prompt=None,
                 image_inputs=None, answer_sep: str = " ", mm_token_types: dict[int, int] | None = None):
        if image_aspect_ratio not in ("crop", "pad"):
            raise ValueError(f"data.image_aspect_ratio must be crop or pad, got {image_aspect_ratio!r}")
        self.samples = samples
        self.tok = tokenizer
        self.proc = image_processor
        self.num_image_tokens = num_image_tokens
        self.max_length = max_length
        self.image_aspect_ratio = image_aspect_ratio
        # (question, first turn, visual tokens of the image) -> the user turn as the model
        # family's chat template writes it (FamilySpec.prompt); None: LLaVA-1.5's, the
        # built-in model's.
        self._prompt = prompt
        # (image processor, image) -> (the image's model inputs, its visual-token count),
        # for families whose images yield several tensors and a count that varies per
        # image (FamilySpec.image_inputs); None: one pixel_values tensor per image and
        # num_image_tokens each.
        self._image_inputs = image_inputs
        # What joins a prompt and its answer in the conversation's text (the chat
        # template's: LLaVA-1.5 a space, ChatML templates nothing after "assistant\n").
        self.answer_sep = answer_sep
        # token id -> modality type (1: image), for families whose model wants the
        # processor's mm_token_type_ids beside input_ids (its multimodal RoPE finds the
        # images' positions by them); None: not passed.
        self.mm_token_types = mm_token_types
        self._pixels: dict[int, torch.Tensor] | None = {} if cache_pixels else None

    def __len__(self) -> int:
        return len(self.samples)

    def pixels(self, i: int):
        """The image's model inputs: a [3, S, S] pixel tensor, or with a family's
        image_inputs a dict of tensors whose rows collate by concatenation."""
        if self._pixels is not None and i in self._pixels:
            return self._pixels[i]
        img = load_image(self.samples[i].image_path)
        if self.image_aspect_ratio == "pad":
            img = pad_to_square(img, self.proc.image_mean)
        if self._image_inputs is not None:
            px = self._image_inputs(self.proc, img)
        else:
            px = self.proc(images=[img], return_tensors="pt")["pixel_values"][0]  # [3, S, S]
        if self._pixels is not None:
            self._pixels[i] = px
        return px

    def drop_cached_images(self) -> None:
        """Empties the decoded-image cache (data.cache_images); pixels() decodes again, to
        the same values, when next asked."""
        if self._pixels:
            self._pixels.clear()

    def image_tokens(self, i: int) -> int:
        """Visual tokens of sample i's image: fixed, or the family's count of that image."""
        if self._image_inputs is None:
            return self.num_image_tokens
        return int(self.pixels(i)["num_image_tokens"])

    def prompt(self, question: str, first: bool, image_tokens: int | None = None) -> str:
        if self._prompt is not None:
            return self._prompt(question, first, self.num_image_tokens if image_tokens is None else image_tokens)
        image = IMAGE_TOKEN * self.num_image_tokens + "\n" if first else ""
        return f"USER: {image}{question} ASSISTANT:"

    def encode_train(self, i: int) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        labels: list[int] = []
        for t, (q, a) in enumerate(self.samples[i].turns):
            p, ans = self._encode_turn(i, t, q, a)
            ans = ans + [self.tok.eos_token_id]
            ids += p + ans
            labels += [IGNORE_INDEX] * len(p) + ans
        if len(ids) > self.max_length:
            raise DataError(
                f"sample {self.samples[i].id}: {len(ids)} tokens exceed data.max_length={self.max_length}; "
                "raise data.max_length"
            )
        return ids, labels

    def _encode_turn(self, i: int, t: int, question: str, answer: str) -> tuple[list[int], list[int]]:
        """(prompt ids, answer ids) of turn t, the answer's tokens as the tokenizer splits
        `prompt + " " + answer` in one call, the way LLaVA-1.5 tokenises a whole
        conversation. Tokenised alone, " red" becomes ['▁', '▁red'] under Llama-2's
        Prepend("▁") normaliser: a first token the model never sees before an answer.
        The prompt ids are the prompt tokenised alone, so turn 0's equal encode_prompt's,
        what the model is given at evaluation."""
        prompt = self.prompt(question, t == 0, self.image_tokens(i) if t == 0 else None)
        special = t == 0  # the first turn carries the tokenizer's BOS, as at evaluation
        p = self.tok(prompt, add_special_tokens=special)["input_ids"]
        joint = self.tok(prompt + self.answer_sep + answer, add_special_tokens=special)["input_ids"]
        if joint[:len(p)] == p:
            return p, joint[len(p):]
        # The joint ids differ inside the prompt (a post-processor that appends an end
        # token, a tokenizer whose segmentation looks ahead): take the tokens whose
        # characters start at or after the prompt's end, by a fast tokenizer's offsets.
        # Zero-width tokens there are special tokens the post-processor added, not text.
        where = f"sample {self.samples[i].id}: turn {t}"  # check() and __getitem__ add file and record
        if not getattr(self.tok, "is_fast", False):
            raise DataError(f"{where}: the tokenizer splits the prompt differently when the answer "
                            "follows it, and a slow tokenizer gives no character offsets to find where the "
                            "answer starts; load the model's fast tokenizer (tokenizer.json)")
        enc = self.tok(prompt + self.answer_sep + answer, add_special_tokens=special, return_offsets_mapping=True)
        cut = len(prompt)
        across = [self.tok.convert_ids_to_tokens(tid) for tid, (s, e) in zip(enc["input_ids"], enc["offset_mapping"])
                  if s < cut < e]
        if across:
            raise DataError(f"{where}: the tokenizer joins the end of the prompt and the start of the "
                            f"answer {answer[:30]!r} into one token {across[0]!r}, so the answer's tokens cannot "
                            "be labelled apart from the prompt; change the prompt's last word or the tokenizer")
        return p, [tid for tid, (s, e) in zip(enc["input_ids"], enc["offset_mapping"]) if s >= cut and e > s]

    def encode_prompt(self, i: int) -> list[int]:
        q = self.samples[i].turns[0][0]
        return self.tok(self.prompt(q, True, self.image_tokens(i)), add_special_tokens=True)["input_ids"]

    def answer(self, i: int) -> str:
        return self.samples[i].turns[0][1]

    def references(self, i: int) -> list[str]:
        return self.samples[i].references or [self.answer(i)]

    def _named(self, i: int, err: Exception) -> str:
        return f"{self.samples[i].where or 'sample ' + self.samples[i].id}: {err}"

    # What reading one sample may raise on input it cannot use: this module's DataError
    # (an image that does not decode, max_length exceeded), and the tokenizer's and the
    # image processor's ValueError or OSError on text or pixels they refuse.
    UNREADABLE = (DataError, ValueError, OSError)

    def check(self, i: int, full: bool = True) -> None:
        """Reads sample i as training would (full: tokenised and through the image
        processor; else its image decoded only, cached nowhere); a DataError naming the
        file and record if it cannot be read."""
        try:
            if full:
                self.encode_train(i)
                self.pixels(i)
            else:
                load_image(self.samples[i].image_path)
        except self.UNREADABLE as err:
            raise DataError(self._named(i, err)) from None

    def __getitem__(self, i: int) -> dict:
        try:
            ids, labels = self.encode_train(i)
            pixels = self.pixels(i)
        except self.UNREADABLE as err:  # an undecodable image, text the tokenizer or max_length refuses
            return {"unreadable": self._named(i, err)}
        out = {"input_ids": ids, "labels": labels, "pixel_values": pixels}
        if self.mm_token_types is not None:
            out["mm_token_type_ids"] = token_types(ids, self.mm_token_types)
        return out


def answer_tokens(labels: torch.Tensor) -> int:
    """The tokens LLaVA's (shifted) cross-entropy averages over in a batch's labels."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def collate_train(batch: list[dict], pad_id: int) -> dict:
    """Right padding; padded positions are masked out of attention and loss. Unreadable
    samples (InstructionDataset.__getitem__) are left out and their messages listed
    under "unreadable" (only when there are any; a batch of nothing else is that list
    alone)."""
    unreadable = [b["unreadable"] for b in batch if "unreadable" in b]
    if unreadable:
        batch = [b for b in batch if "unreadable" not in b]
        if not batch:
            return {"unreadable": unreadable}
        return {**collate_train(batch, pad_id), "unreadable": unreadable}
    width = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    types = torch.zeros((len(batch), width), dtype=torch.long) if "mm_token_type_ids" in batch[0] else None
    for r, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[r, :n] = torch.tensor(b["input_ids"])
        labels[r, :n] = torch.tensor(b["labels"])
        mask[r, :n] = 1
        if types is not None:
            types[r, :n] = torch.tensor(b["mm_token_type_ids"])
    out = {"input_ids": ids, "labels": labels, "attention_mask": mask,
           **collate_images([b["pixel_values"] for b in batch])}
    if types is not None:
        out["mm_token_type_ids"] = types
    return out


def token_types(ids: list[int], types: dict[int, int]) -> list[int]:
    """The modality type of each token (0: text), as a processor's mm_token_type_ids."""
    return [types.get(t, 0) for t in ids]


def collate_images(pixels: list) -> dict[str, torch.Tensor]:
    """One batch's image inputs: [3, S, S] tensors stacked into pixel_values, or a
    family's dicts (InstructionDataset.pixels) concatenated key by key along their rows
    (a flattened patch list and one image_grid_thw row per image); their
    num_image_tokens is the dataset's, not a model input."""
    if not isinstance(pixels[0], dict):
        return {"pixel_values": torch.stack(pixels)}
    return {k: torch.cat([p[k] for p in pixels]) for k in pixels[0] if k != "num_image_tokens"}


def collate_prompts(prompts: list[list[int]], pixels: list, pad_id: int,
                    mm_token_types: dict[int, int] | None = None) -> dict[str, torch.Tensor]:
    """Left padding, so that generation continues every row from its last prompt token.
    mm_token_types: InstructionDataset.mm_token_types (then mm_token_type_ids too)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p)
        mask[r, width - len(p):] = 1
    out = {"input_ids": ids, "attention_mask": mask, **collate_images(pixels)}
    if mm_token_types is not None:
        types = torch.zeros_like(ids)
        for r, p in enumerate(prompts):
            types[r, width - len(p):] = torch.tensor(token_types(p, mm_token_types))
        out["mm_token_type_ids"] = types
    return out
