"""Benchmark converters and the prepare CLI on tiny fixtures in each benchmark's shipped format
(tests/official_formats.py writes them)."""

from __future__ import annotations

import collections
import json
import os
import pickle

import numpy as np
import pytest
import yaml

from helpers import REPO
from official_formats import (REFS, dump_json, make_coco, make_gqa, make_ocrvqa, make_refcoco, make_scienceqa,
                              py2_pickle)
from pilot_hpc.config import load_config
from pilot_hpc.data import benchmarks as bm
from pilot_hpc.data import prepare
from pilot_hpc.data.records import IMAGE_TOKEN, load_records
from pilot_hpc.errors import DataError

SHORT = "\nAnswer the question using a single word or phrase."


def _question(rec):
    return rec["conversations"][0]["value"]


def _answer(rec):
    return rec["conversations"][1]["value"]


# ------------------------------------------------------------------ readers


def test_image_token_agrees_with_records():
    assert bm.IMAGE_TOKEN == IMAGE_TOKEN


def test_gqa(tmp_path):
    f = make_gqa(tmp_path)
    train = bm.gqa(f["train"], f["images"])
    assert len(train.records) == 7 and train.skipped == {"missing_image": 1}
    rec = train.records[0]
    assert rec["id"] == "gqa-000" and _question(rec) == f"{IMAGE_TOKEN}\nWhat is item 0?{SHORT}"
    assert _answer(rec) == "thing0" and rec["image"] == os.path.join(os.path.abspath(f["images"]), "n1.jpg")
    held_out = bm.gqa(f["eval"], f["images"])
    assert [_answer(r) for r in held_out.records] == ["no", "left", "blue"] and held_out.skipped == {}


def test_coco_first_caption_for_training_all_for_evaluation(tmp_path):
    f = make_coco(tmp_path)
    train = bm.coco_captions(f["train"], f["images"], references=False)
    assert [r["id"] for r in train.records] == ["coco-1", "coco-2", "coco-3", "coco-4"]
    assert train.skipped == {"no_caption": 1, "missing_image": 1}
    rec = train.records[0]
    assert _question(rec) == f"{IMAGE_TOKEN}\nProvide a one-sentence caption for the provided image."
    assert _answer(rec) == "A photo 1, caption 0." and "references" not in rec  # whitespace collapsed
    held_out = bm.coco_captions(f["eval"], f["eval_images"], references=True)
    assert held_out.records[1]["references"] == [f"A photo 8, caption {k}." for k in range(3)]
    assert _answer(held_out.records[1]) == "A photo 8, caption 0."


def test_refcoco_boxes_hand_computed(tmp_path):
    f = make_refcoco(tmp_path)
    train = bm.refcoco(f["refs"], f["instances"], f["images"], "train")
    # Image 100 (200 x 100), bbox [20, 10, 50, 40]: x 20/200, 70/200; y 10/100, 50/100.
    # Image 101 (50 x 80), bbox [5, 8, 20, 40]: x 5/50, 25/50; y 8/80, 48/80.
    # Image 103 (40 x 20), bbox [4, 2, 10, 10]: x 4/40, 14/40; y 2/20, 12/20.
    got = {r["id"]: (_question(r), _answer(r)) for r in train.records}
    prompt = f"{IMAGE_TOKEN}\nPlease provide the bounding box coordinate of the region this sentence describes: "
    assert got == {"refcoco-0-0": (prompt + "left man", "[0.10, 0.10, 0.35, 0.50]"),
                   "refcoco-0-1": (prompt + "guy on the left", "[0.10, 0.10, 0.35, 0.50]"),
                   "refcoco-1-0": (prompt + "tall dog", "[0.10, 0.10, 0.50, 0.60]"),
                   "refcoco-2-0": (prompt + "man again", "[0.10, 0.10, 0.35, 0.50]"),
                   "refcoco-5-0": (prompt + "red ball", "[0.10, 0.10, 0.35, 0.60]")}
    assert train.skipped == {"missing_image": 2}  # ref 4's two sentences
    val = bm.refcoco(f["refs"], f["instances"], f["images"], "val")
    assert [(r["id"], _answer(r)) for r in val.records] == [("refcoco-3-0", "[0.10, 0.10, 0.50, 0.60]")]
    # Padded to a 200 x 200 square, 50 px above: y (10 + 50)/200, (50 + 50)/200.
    square = bm.refcoco(f["refs"], f["instances"], f["images"], "train", box_frame="square")
    assert _answer(square.records[0]) == "[0.10, 0.30, 0.35, 0.50]"
    # The same refs converted to JSON give the same records.
    as_json = dump_json(tmp_path / "refs.json", REFS)
    assert bm.refcoco(as_json, f["instances"], f["images"], "train").records == train.records


def test_refcoco_python2_pickle_and_refused_classes(tmp_path):
    # refs(unc).p comes from Python 2: its str keys and values load as bytes.
    f = make_refcoco(tmp_path)
    with open(f["refs"], "wb") as fh:
        refs = REFS[:3] + [dict(REFS[3], sentences=[{"sent": "the caf\u00e9 dog"}])]
        fh.write(b"\x80\x02" + py2_pickle(refs) + b".")
    assert len(bm.refcoco(f["refs"], f["instances"], f["images"], "train").records) == 4
    val = bm.refcoco(f["refs"], f["instances"], f["images"], "val").records
    assert _question(val[0]).endswith("describes: the caf\u00e9 dog")  # UTF-8 bytes decoded
    evil = tmp_path / "evil.p"
    evil.write_bytes(pickle.dumps([collections.OrderedDict(a=1)], protocol=2))
    with pytest.raises(DataError, match=r"evil\.p: not a RefCOCO refs pickle.*refuses to load collections"):
        bm.load_refs(str(evil))
    garbage = tmp_path / "garbage.p"
    garbage.write_bytes(b"\x80\x02not a pickle")
    with pytest.raises(DataError, match=r"garbage\.p: not a RefCOCO refs pickle"):
        bm.load_refs(str(garbage))


def test_scienceqa_letters_prompt_and_no_image_count(tmp_path):
    f = make_scienceqa(tmp_path)
    train = bm.scienceqa(f["problems"], f["images"], "train")
    assert [(r["id"], _answer(r)) for r in train.records] == [
        ("scienceqa-1", "B"), ("scienceqa-2", "B"), ("scienceqa-4", "E"), ("scienceqa-5", "A")]
    assert train.skipped == {"no_image": 1}
    assert _question(train.records[0]) == (f"{IMAGE_TOKEN}\nContext: A hint.\nWhich animal?\nA. cat\nB. dog\nC. fish\n"
                                           "Answer with the option's letter from the given choices directly.")
    assert _question(train.records[1]).startswith(f"{IMAGE_TOKEN}\nWhich is hot?\nA. ice\nB. fire\n")  # no hint
    assert train.records[0]["image"].endswith(os.path.join("images", "train", "1", "image.png"))
    test = bm.scienceqa(f["problems"], f["images"], "test")
    assert [_answer(r) for r in test.records] == ["A"]


def test_ocrvqa_any_extension_and_missing_covers(tmp_path):
    f = make_ocrvqa(tmp_path)
    train = bm.ocrvqa(f["dataset"], f["images"], "train")
    assert [r["id"] for r in train.records] == ["ocrvqa-b1-0", "ocrvqa-b1-1", "ocrvqa-b2-0", "ocrvqa-b2-1",
                                                 "ocrvqa-b3-0"]
    assert train.records[2]["image"].endswith("b2.gif") and train.records[4]["image"].endswith("b3.png")
    assert _question(train.records[1]) == f"{IMAGE_TOKEN}\nQ1 of this book?{SHORT}"
    assert _answer(train.records[1]) == "ans 1"
    assert train.skipped == {"missing_image": 3}  # b5's three questions
    assert [r["id"] for r in bm.ocrvqa(f["dataset"], f["images"], "test").records] == ["ocrvqa-b4-0", "ocrvqa-b4-1"]


def test_repeated_ids_keep_the_first_and_small_images_are_skipped(tmp_path):
    g = make_gqa(tmp_path, trouble=True)
    gqa = bm.gqa(g["train"], g["images"])
    assert gqa.skipped == {"missing_image": 1, "small_image": 3, "duplicate_id": 2}  # 1 x 1 twice, 13 x 40 once
    first = gqa.records[0]
    assert (first["id"], _answer(first), os.path.basename(first["image"])) == ("gqa-000", "thing0", "n1.jpg")
    assert gqa.records[-1]["id"] == "gqa-203"  # 14 x 14: kept
    assert "duplicate_id 2 (the first of each id kept), missing_image 1, small_image 3" in gqa.summary()
    c = make_coco(tmp_path, trouble=True)
    coco = bm.coco_captions(c["train"], c["images"], references=False)
    assert coco.skipped == {"no_caption": 1, "missing_image": 1, "small_image": 1, "duplicate_id": 1}
    assert [os.path.basename(r["image"]) for r in coco.records][0] == "000000000001.jpg"
    r = make_refcoco(tmp_path, trouble=True)
    ref = bm.refcoco(r["refs"], r["instances"], r["images"], "train")
    assert ref.skipped == {"missing_image": 2, "small_image": 1, "duplicate_id": 2}  # ref 0 again: 2 sentences
    assert [_question(x).split(": ")[-1] for x in ref.records if x["id"].startswith("refcoco-0-")] == \
        ["left man", "guy on the left"]
    s = make_scienceqa(tmp_path, trouble=True)
    sqa = bm.scienceqa(s["problems"], s["images"], "train")
    assert sqa.skipped == {"no_image": 1, "small_image": 1, "duplicate_id": 1}
    assert [(x["id"], _answer(x)) for x in sqa.records][1] == ("scienceqa-2", "B")
    o = make_ocrvqa(tmp_path, trouble=True)
    ocr = bm.ocrvqa(o["dataset"], o["images"], "train")
    assert ocr.skipped == {"missing_image": 3, "small_image": 2, "duplicate_id": 3}  # b1 again: 3 questions
    assert [x["id"] for x in ocr.records][:2] == ["ocrvqa-b1-0", "ocrvqa-b1-1"]


def test_unreadable_image_header_is_counted(tmp_path):
    f = make_gqa(tmp_path)
    with open(f"{f['images']}/n2.jpg", "wb") as fh:
        fh.write(b"<html>not found</html>")
    assert bm.gqa(f["train"], f["images"]).skipped == {"missing_image": 1, "unreadable_image": 2}


def test_non_utf8_benchmark_file_names_the_entry(tmp_path):
    f = make_gqa(tmp_path)
    text = open(f["eval"]).read().replace("Which side?", "Which c\u00f4t\u00e9?")
    path = tmp_path / "questions_latin1.json"
    path.write_bytes(text.encode("latin-1"))
    offset = text.encode("latin-1").index(b"\xf4")
    with pytest.raises(DataError, match=rf"questions_latin1\.json: not UTF-8 text: byte 0xf4 at byte offset "
                                         rf"{offset} \(line 1, column {offset + 1}\), in \['t2'\]\['question'\]; "
                                         r"JSON files are UTF-8"):
        bm.gqa(str(path), f["images"])


# ------------------------------------------------------------------ errors


def test_missing_or_malformed_keys_name_file_record_and_key(tmp_path):
    f = make_gqa(tmp_path)
    data = json.load(open(f["eval"]))
    del data["t2"]["answer"]
    bad = dump_json(tmp_path / "bad_questions.json", data)
    with pytest.raises(DataError, match=r"bad_questions\.json: question 't2': missing key 'answer'"):
        bm.gqa(bad, f["images"])
    s = make_scienceqa(tmp_path)
    problems = json.load(open(s["problems"]))
    problems["2"]["answer"] = 2
    with pytest.raises(DataError, match=r"problems_bad\.json: problem '2': 'answer' 2 is not an index of its 2"):
        bm.scienceqa(dump_json(tmp_path / "problems_bad.json", problems), s["images"], "train")
    problems["2"]["answer"] = "B"
    with pytest.raises(DataError, match=r"problem '2': key 'answer' must be an integer, got str"):
        bm.scienceqa(dump_json(tmp_path / "problems_bad.json", problems), s["images"], "train")
    o = make_ocrvqa(tmp_path)
    books = json.load(open(o["dataset"]))
    books["b2"]["answers"].pop()
    with pytest.raises(DataError, match=r"ds\.json: entry 'b2': 2 questions but 1 answers"):
        bm.ocrvqa(dump_json(tmp_path / "ds.json", books), o["images"], "train")
    r = make_refcoco(tmp_path)
    inst = json.load(open(r["instances"]))
    inst["annotations"][1]["bbox"] = [1, 2, 3]
    with pytest.raises(DataError, match=r"inst\.json: annotation 1001: 'bbox' must be \[x, y, w, h\]"):
        bm.refcoco(r["refs"], dump_json(tmp_path / "inst.json", inst), r["images"], "train")
    del inst["annotations"][1]
    with pytest.raises(DataError, match=r"ref 1 \(ref_id 1\): ann_id 1001 is not an annotation of"):
        bm.refcoco(r["refs"], dump_json(tmp_path / "inst.json", inst), r["images"], "train")


def test_malformed_files_and_wrong_folders(tmp_path):
    broken = tmp_path / "captions.json"
    broken.write_text('{"images": [')
    with pytest.raises(DataError, match=r"captions\.json: not a valid JSON file"):
        bm.coco_captions(str(broken), str(tmp_path), references=False)
    listing = dump_json(tmp_path / "listing.json", [{"question": "q"}])
    with pytest.raises(DataError, match=r"listing\.json: expected a JSON object of question id"):
        bm.gqa(listing, str(tmp_path))
    with pytest.raises(DataError, match=r"listing\.json: the top level must be an object"):
        bm.coco_captions(listing, str(tmp_path), references=False)
    with pytest.raises(DataError, match=r"file .*nothing\.json does not exist"):
        bm.gqa(str(tmp_path / "nothing.json"), str(tmp_path))
    f = make_gqa(tmp_path)
    with pytest.raises(DataError, match=r"GQA image folder .*nowhere does not exist"):
        bm.gqa(f["train"], str(tmp_path / "nowhere"))
    # Every image missing is an error (a wrong folder), not an empty client.
    with pytest.raises(DataError, match=r"no usable record.*missing_image.*right image folder"):
        bm.gqa(f["train"], str(tmp_path))
    s = make_scienceqa(tmp_path)
    with pytest.raises(DataError, match=r"no problem of split 'minival'; splits present: \['test', 'train', 'val'\]"):
        bm.scienceqa(s["problems"], s["images"], "minival")


# ------------------------------------------------------------------ split rule


@pytest.mark.parametrize("n", [3, 10, 11, 12, 100])
def test_split_shards_disjoint_equal_seeded_and_covering(n):
    shards = prepare.split_shards(n, 3, seed=7)
    sizes = [len(s) for s in shards]
    assert sizes == [n // 3 + (i < n % 3) for i in range(3)]  # remainder to the first shards
    flat = np.concatenate(shards)
    assert sorted(flat.tolist()) == list(range(n))  # disjoint and covering
    assert all(np.array_equal(a, b) for a, b in zip(shards, prepare.split_shards(n, 3, seed=7)))
    perm = np.random.default_rng(7).permutation(n)  # the documented rule, by hand
    assert np.array_equal(shards[0], np.sort(perm[:sizes[0]]))
    if n >= 10:
        assert any(not np.array_equal(a, b) for a, b in zip(shards, prepare.split_shards(n, 3, seed=8)))


def test_train_max_caps_each_shard_and_eval_subset():
    capped = prepare.split_shards(100, 3, seed=0, per_shard_max=5)
    assert [len(s) for s in capped] == [5, 5, 5] and len(set(np.concatenate(capped).tolist())) == 15
    assert [len(s) for s in prepare.split_shards(10, 3, seed=0, per_shard_max=50)] == [4, 3, 3]
    sub = prepare.eval_subset(50, 8, seed=3)
    assert len(sub) == 8 and len(set(sub.tolist())) == 8 and list(sub) == sorted(sub)
    assert np.array_equal(sub, prepare.eval_subset(50, 8, seed=3))
    assert np.array_equal(prepare.eval_subset(5, 8, seed=3), np.arange(5))


def _images_with_records(seed=0, count=40, most=5):
    """Image names of the records of `count` images with 1..most records each, interleaved."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, most + 1, size=count)
    images = [f"img{k}" for k, size in enumerate(sizes) for _ in range(size)]
    return [images[i] for i in rng.permutation(len(images))], int(sizes.max())


def test_split_by_image_keeps_each_image_in_one_balanced_seeded_shard():
    images, most = _images_with_records()
    n = len(images)
    shards = prepare.split_by_image(images, 3, seed=5)
    assert sorted(np.concatenate(shards).tolist()) == list(range(n))  # disjoint and covering
    owner = {images[i]: k for k, shard in enumerate(shards) for i in shard}
    assert all(owner[images[i]] == k for k, shard in enumerate(shards) for i in shard)
    assert all(abs(len(shard) - n / 3) <= most for shard in shards)
    assert all(np.array_equal(a, b) for a, b in zip(shards, prepare.split_by_image(images, 3, seed=5)))
    assert any(not np.array_equal(a, b) for a, b in zip(shards, prepare.split_by_image(images, 3, seed=6)))
    # The documented rule by hand: permuted images, cuts nearest the question rule's bounds.
    distinct = list(dict.fromkeys(images))
    perm = np.random.default_rng(5).permutation(len(distinct))
    counts = np.cumsum([0] + [images.count(distinct[p]) for p in perm])
    bounds = [n // 3 + (n % 3 > 0), 2 * (n // 3) + min(2, n % 3)]
    cuts = [0] + [int(np.argmin(np.abs(counts - b))) for b in bounds] + [len(distinct)]
    for k in range(3):
        mine = {distinct[p] for p in perm[cuts[k]:cuts[k + 1]]}
        assert shards[k].tolist() == [i for i, image in enumerate(images) if image in mine]


def test_split_by_image_with_train_max_and_uneven_images():
    images, _ = _images_with_records(seed=1)
    capped = prepare.split_by_image(images, 3, seed=2, per_shard_max=7)
    assert [len(s) for s in capped] == [7, 7, 7]
    owner = {images[i]: k for k, shard in enumerate(capped) for i in shard}
    assert all(owner[images[i]] == k for k, shard in enumerate(capped) for i in shard)
    # The documented rule by hand: images dealt out in permuted order, 7 records or more
    # to a shard, then its first 7 records, image by image.
    distinct = list(dict.fromkeys(images))
    perm = np.random.default_rng(2).permutation(len(distinct))
    want = [[]]
    for p in perm:
        if len(want) == 3 and len(want[-1]) >= 7:
            break
        if len(want[-1]) >= 7:
            want.append([])
        want[-1] += [i for i, image in enumerate(images) if image == distinct[p]]
    assert [s.tolist() for s in capped] == [sorted(w[:7]) for w in want]
    # Every shard gets an image even when one image holds most records.
    lopsided = ["a"] + ["b"] + ["c"] * 100
    assert [s.tolist() for s in sorted(prepare.split_by_image(lopsided, 3, seed=0), key=len)] == \
        [[0], [1], list(range(2, 102))]
    with pytest.raises(DataError, match="5 records show 2 distinct images, too few for 3 client shards by image"):
        prepare.split_by_image(["a", "b", "a", "b", "a"], 3, seed=0)


@pytest.mark.parametrize("n,cap", [(3, None), (10, None), (11, None), (100, None), (100, 5), (10, 50)])
def test_split_by_image_with_one_record_per_image_is_the_question_rule(n, cap):
    by_image = prepare.split_by_image([f"i{j}" for j in range(n)], 3, seed=4, per_shard_max=cap)
    by_question = prepare.split_shards(n, 3, seed=4, per_shard_max=cap)
    assert [s.tolist() for s in by_image] == [s.tolist() for s in by_question]


# ------------------------------------------------------------------ CLI and configs


def _visual_argv(tmp_path, out, trouble=False):
    g, c, r = make_gqa(tmp_path, trouble), make_coco(tmp_path, trouble), make_refcoco(tmp_path, trouble=trouble)
    return ["--scenario", "visual", "--out", str(out), "--seed", "3",
            "--gqa-questions-train", g["train"], "--gqa-questions-eval", g["eval"], "--gqa-images", g["images"],
            "--coco-train", c["train"], "--coco-eval", c["eval"], "--coco-images", c["images"],
            "--coco-eval-images", c["eval_images"],
            "--refcoco-refs", r["refs"], "--refcoco-instances", r["instances"], "--refcoco-images", r["images"],
            "--refcoco-eval-split", "val"]


def test_prepare_visual_end_to_end(tmp_path, capsys):
    out = tmp_path / "fedmit_visual"
    assert prepare.main(_visual_argv(tmp_path, out) + ["--eval-max", "2"]) == 0
    printed = capsys.readouterr().out
    assert "gqa: train 7 records (skipped: missing_image 1); eval" in printed
    # A client's line has its own counts only: the dataset's skips are counted before the split.
    assert "client 00 [gqa]: 2 train records, 2 eval records\n" in printed
    assert "client 08 [refcoco]: 3 train records, 1 eval records" in printed
    overlay = yaml.safe_load(open(out / "overlay.yaml"))
    assert overlay["fl"] == {"num_clients": 9, "client_tasks": ["gqa"] * 3 + ["coco"] * 3 + ["refcoco"] * 3,
                             "task_metrics": {"gqa": "vqa_accuracy", "coco": "cider", "refcoco": "iou@0.5"}}
    assert overlay["data"]["kind"] == "llava_json"
    assert overlay["data"]["train_files"][4] == str(out / "client_04_train.json")
    samples = {}
    for k in range(9):
        for part in ("train", "eval"):
            samples[k, part] = load_records(str(out / f"client_{k:02d}_{part}.json"), cache_dir=str(tmp_path / "hf"))
    ids = {k: [s.id for s in samples[k, "train"]] for k in range(9)}
    # GQA's 7 usable questions on 3 images (3, 2 and 2 questions): one image per client,
    # disjoint and covering, in file order.
    assert sorted(len(ids[k]) for k in range(3)) == [2, 2, 3]
    assert all(len({s.image_path for s in samples[k, "train"]}) == 1 for k in range(3))
    assert sorted(ids[0] + ids[1] + ids[2]) == [f"gqa-{i:03d}" for i in range(7)]
    assert all(ids[k] == sorted(ids[k]) for k in range(3))
    assert sorted(ids[6] + ids[7] + ids[8]) == ["refcoco-0-0", "refcoco-0-1", "refcoco-1-0", "refcoco-2-0",
                                                "refcoco-5-0"]
    # The three clients of a task share one evaluation subset (--eval-max 2 of GQA's 3).
    assert [s.id for s in samples[0, "eval"]] == [s.id for s in samples[2, "eval"]] and len(samples[0, "eval"]) == 2
    assert samples[3, "eval"][0].references == [f"A photo 7, caption {k}." for k in range(3)]
    assert samples[7, "eval"][0].turns[0][1] == "[0.10, 0.10, 0.50, 0.60]"
    assert os.path.isabs(samples[0, "train"][0].image_path)
    # Same files and seed: the same bytes.
    again = tmp_path / "again"
    assert prepare.main(_visual_argv(tmp_path, again) + ["--eval-max", "2"]) == 0
    assert all((out / n).read_bytes() == (again / n).read_bytes() for n in os.listdir(out) if n.endswith(".json"))
    # The overlay merges into the shipped config and validates.
    cfg = load_config(os.path.join(REPO, "configs", "fedmit_visual_9client.yaml"),
                      [f"data.{k}={json.dumps(v)}" for k, v in overlay["data"].items()])
    assert cfg.data.train_files == overlay["data"]["train_files"]


def _vqa_argv(tmp_path, out, trouble=False):
    s, g, o = make_scienceqa(tmp_path, trouble), make_gqa(tmp_path, trouble), make_ocrvqa(tmp_path, trouble)
    return ["--scenario", "vqa", "--out", str(out), "--seed", "3",
            "--scienceqa-problems", s["problems"], "--scienceqa-images", s["images"],
            "--gqa-questions-train", g["train"], "--gqa-questions-eval", g["eval"], "--gqa-images", g["images"],
            "--ocrvqa-dataset", o["dataset"], "--ocrvqa-images", o["images"]]


SKIP_REPORTS = {  # the trouble fixtures' training splits, as prepare prints them
    "gqa": "train 8 records (skipped: duplicate_id 2 (the first of each id kept), missing_image 1, small_image 3)",
    "coco": "train 4 records (skipped: duplicate_id 1 (the first of each id kept), missing_image 1, no_caption 1, "
            "small_image 1)",
    "refcoco": "train 5 records (skipped: duplicate_id 2 (the first of each id kept), missing_image 2, "
               "small_image 1)",
    "scienceqa": "train 4 records (skipped: duplicate_id 1 (the first of each id kept), no_image 1, small_image 1)",
    "ocrvqa": "train 5 records (skipped: duplicate_id 3 (the first of each id kept), missing_image 3, "
              "small_image 2)",
}


def _train_files(out) -> list[list[dict]]:
    return [json.load(open(out / f"client_{k:02d}_train.json")) for k in range(9)]


@pytest.mark.parametrize("scenario", ["visual", "vqa"])
def test_prepare_official_formats_counts_skips_and_shards_by_image(tmp_path, capsys, scenario):
    """python -m pilot_hpc.data.prepare's main on every benchmark's own file format, with
    repeated ids and too-small images: both counted in the report; no image in two
    clients' training files; --shard-by question gives the record-by-record shards."""
    argv_for = _visual_argv if scenario == "visual" else _vqa_argv
    out = tmp_path / "by_image"
    assert prepare.main(argv_for(tmp_path, out, trouble=True)) == 0
    printed = capsys.readouterr().out
    tasks = prepare.SCENARIOS[scenario]
    for task in tasks:
        assert f"{task}: {SKIP_REPORTS[task]};" in printed
    clients = _train_files(out)
    for t, task in enumerate(tasks):
        mine = clients[3 * t:3 * t + 3]
        images = [{r["image"] for r in c} for c in mine]
        assert all(not (images[a] & images[b]) for a in range(3) for b in range(a + 1, 3)), task
        assert sum(len(c) for c in mine) == int(SKIP_REPORTS[task].split()[1])
    gqa = clients[3 * tasks.index("gqa"):3 * tasks.index("gqa") + 3]
    first = next(r for c in gqa for r in c if r["id"] == "gqa-000")
    assert _answer(first) == "thing0"  # the file's first entry of a repeated id

    flat = tmp_path / "by_question"
    argv = argv_for(tmp_path, flat, trouble=True) + ["--shard-by", "question"]
    assert prepare.main(argv) == 0
    args = prepare.parser().parse_args(argv)
    clients = _train_files(flat)
    shared = 0
    for t, task in enumerate(tasks):
        records = prepare.convert(task, args, "train").records
        n = len(records)
        perm = np.random.default_rng(3).permutation(n)  # the question rule, by hand
        sizes = [n // 3 + (k < n % 3) for k in range(3)]
        bounds = np.cumsum([0] + sizes)
        for k in range(3):
            want = [records[i]["id"] for i in sorted(perm[bounds[k]:bounds[k + 1]])]
            assert [r["id"] for r in clients[3 * t + k]] == want, (task, k)
        images = [{r["image"] for r in c} for c in clients[3 * t:3 * t + 3]]
        shared += sum(len(images[a] & images[b]) for a in range(3) for b in range(a + 1, 3))
    assert shared > 0  # what sharding by image prevents does happen on these files


def test_prepare_too_few_images_to_shard_by_image(tmp_path, capsys):
    argv = _visual_argv(tmp_path, tmp_path / "out")
    refs = [r for r in REFS if r["image_id"] != 103]  # two images left in the training split
    r = make_refcoco(tmp_path / "two", refs=refs)
    argv[argv.index("--refcoco-refs") + 1] = r["refs"]
    argv[argv.index("--refcoco-images") + 1] = r["images"]
    argv[argv.index("--refcoco-instances") + 1] = r["instances"]
    assert prepare.main(argv) == 2
    assert "refs(unc).p: 4 records show 2 distinct images, too few for 3 client shards by image; " \
           "--shard-by question splits by record instead" in capsys.readouterr().err
    assert prepare.main(argv + ["--shard-by", "question"]) == 0


def test_prepare_vqa_end_to_end(tmp_path, capsys):
    s, g, o = make_scienceqa(tmp_path), make_gqa(tmp_path), make_ocrvqa(tmp_path)
    out = tmp_path / "fedmit_vqa"
    argv = ["--scenario", "vqa", "--out", str(out), "--train-max", "1",
            "--scienceqa-problems", s["problems"], "--scienceqa-images", s["images"],
            "--gqa-questions-train", g["train"], "--gqa-questions-eval", g["eval"], "--gqa-images", g["images"],
            "--ocrvqa-dataset", o["dataset"], "--ocrvqa-images", o["images"]]
    assert prepare.main(argv) == 0
    printed = capsys.readouterr().out
    assert "client 00 [scienceqa]: 1 train records, 1 eval records\n" in printed and "no_image 1" in printed
    overlay = yaml.safe_load(open(out / "overlay.yaml"))
    assert overlay["fl"]["task_metrics"] == {"scienceqa": "mc_accuracy", "gqa": "vqa_accuracy",
                                             "ocrvqa": "vqa_accuracy"}
    for k in range(9):
        for part in ("train", "eval"):
            recs = load_records(str(out / f"client_{k:02d}_{part}.json"), cache_dir=str(tmp_path / "hf"))
            assert len(recs) == (1 if part == "train" else {0: 1, 1: 3, 2: 2}[k // 3])


def test_prepare_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        prepare.main(["--scenario", "vqa", "--out", str(tmp_path), "--gqa-images", "x"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "scenario vqa needs --scienceqa-problems --scienceqa-images --gqa-questions-train" in err
    argv = _visual_argv(tmp_path, tmp_path / "out")
    argv[argv.index("--coco-train") + 1] = dump_json(tmp_path / "cap.json", {"images": [{"id": 1}], "annotations": []})
    assert prepare.main(argv) == 2
    assert "cap.json: images[0]: missing key 'file_name'" in capsys.readouterr().err
    assert not (tmp_path / "out" / "overlay.yaml").exists()  # nothing written on bad input


@pytest.mark.parametrize("scenario", sorted(prepare.SCENARIOS))
def test_shipped_configs_validate_and_match_prepare(scenario):
    cfg = load_config(os.path.join(REPO, "configs", f"fedmit_{scenario}_9client.yaml"))
    tasks = prepare.SCENARIOS[scenario]
    assert cfg.tasks == list(tasks) and cfg.fl.task_metrics == {t: prepare.TASK_METRICS[t] for t in tasks}
    assert cfg.fl.client_tasks == [t for t in tasks for _ in range(3)]
    assert cfg.data.train_files == [f"data/fedmit_{scenario}/client_{k:02d}_train.json" for k in range(9)]
    assert cfg.data.eval_files == [f"data/fedmit_{scenario}/client_{k:02d}_eval.json" for k in range(9)]
    assert (cfg.model.lora_r, cfg.model.lora_alpha, cfg.train.lr_stage1, cfg.train.lr_stage2, cfg.pilot.top_m) == \
        (64, 128, 2e-5, 4e-5, 6)
    assert (cfg.model.dtype, cfg.run.device, cfg.data.kind) == ("bfloat16", "cuda", "llava_json")


def test_scienceqa_examples_name_the_download_scripts_image_folder():
    """ScienceQA's tools/download.sh unpacks the images into data/scienceqa/images, beside
    data/scienceqa/problems.json: the examples in prepare's docstring and the config say so."""
    import re

    texts = {"prepare.py": prepare.__doc__,
             "fedmit_vqa_9client.yaml": open(os.path.join(REPO, "configs", "fedmit_vqa_9client.yaml")).read()}
    for name, text in texts.items():
        problems = re.search(r"--scienceqa-problems (\S+)", text).group(1)
        images = re.search(r"--scienceqa-images (\S+)", text).group(1)
        assert problems.endswith("data/scienceqa/problems.json"), name
        assert images == os.path.dirname(problems) + "/images", name
