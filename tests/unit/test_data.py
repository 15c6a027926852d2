"""Synthetic FedMIT and the LLaVA-format loader: round trip and clear errors on bad input."""

import json
import os

import pytest
from PIL import Image

from pilot_hpc.data import synthetic
from pilot_hpc.data.records import load_image, load_records, parse_record
from pilot_hpc.errors import DataError


def test_synthetic_files_are_llava_format_and_answers_match_images(small_world):
    _, folder, _ = small_world
    train, evals = synthetic.client_files(folder, 3)
    with open(train[2]) as fh:
        raw = json.load(fh)
    rec = raw[0]
    assert set(rec) >= {"id", "image", "conversations"}
    assert rec["conversations"][0]["from"] == "human" and rec["conversations"][0]["value"].startswith("<image>\n")
    samples = load_records(train[2])
    assert len(samples) == len(raw)
    # Grounding answers are boxes; the drawn pixels inside the box are the shape's colour.
    s = samples[0]
    box = [float(v) for v in s.turns[0][1].strip("[]").split(",")]
    color = s.turns[0][0].split()[5]  # "give the box of the <color> <shape> ."
    img = Image.open(s.image_path).convert("RGB")
    size = img.size[0]
    cx, cy = int((box[0] + box[2]) / 2 * size), int((box[1] + box[3]) / 2 * size) + 1
    assert img.getpixel((cx, cy)) == synthetic.COLORS[color]
    assert all(0.0 <= v <= 1.0 for v in box) and box[0] < box[2] and box[1] < box[3]


def test_vocabulary_covers_every_generated_word(small_world):
    _, folder, _ = small_world
    vocab = set(synthetic.vocabulary())
    for name in ("pretrain.json", "client_00_train.json", "client_02_eval.json"):
        for rec in json.load(open(os.path.join(folder, name))):
            for turn in rec["conversations"]:
                text = turn["value"].replace("<image>\n", "").replace("[", "[ ").replace("]", " ]").replace(",", " ,")
                assert set(text.split()) <= vocab, text


def test_client_sizes_differ_and_are_seeded():
    a = synthetic.client_train_sizes(9, 100, 200, seed=0)
    assert a == synthetic.client_train_sizes(9, 100, 200, seed=0)
    assert len(set(a)) > 1 and all(100 <= n <= 200 for n in a)


def _write(path, records):
    with open(path, "w") as fh:
        json.dump(records, fh)


def _record(image="img.png", **kw):
    rec = {"id": "r1", "image": image,
           "conversations": [{"from": "human", "value": "<image>\nwhat color ?"}, {"from": "gpt", "value": "red"}]}
    rec.update(kw)
    return rec


def test_missing_image_names_file_and_record(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "img.png")
    path = tmp_path / "data.json"
    _write(path, [_record(), _record(image="gone.png", id="r2")])
    with pytest.raises(DataError) as err:
        load_records(str(path))
    msg = str(err.value)
    assert str(path) in msg and "record 1" in msg and "'r2'" in msg and "gone.png" in msg


def test_malformed_json_names_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"id": "r1", "image": "a.png", "conversations": [}')
    with pytest.raises(DataError, match=r"broken.json: not a valid LLaVA JSON file"):
        load_records(str(path))


def test_malformed_record_names_the_problem(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "img.png")
    bad_roles = _record(conversations=[{"from": "gpt", "value": "x"}, {"from": "human", "value": "<image>\ny"}])
    with pytest.raises(DataError, match=r"record 0 \(id 'r1'\): turns 0-1 must be from 'human' then 'gpt'"):
        parse_record(bad_roles, "f.json", 0, str(tmp_path))
    with pytest.raises(DataError, match="missing 'image'"):
        parse_record({"id": "x", "conversations": []}, "f.json", 3, str(tmp_path))
    no_image_token = _record(conversations=[{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}])
    with pytest.raises(DataError, match="<image> must appear in the first human turn"):
        parse_record(no_image_token, "f.json", 0, str(tmp_path))


def test_empty_shard_and_undecodable_image(tmp_path):
    path = tmp_path / "empty.json"
    _write(path, [])
    with pytest.raises(DataError, match="empty client shard"):
        load_records(str(path))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot be decoded"):
        load_image(str(bad))


def test_symlink_loop_and_broken_link_are_named_as_such(tmp_path):
    os.symlink("loop_b.png", tmp_path / "loop_a.png")
    os.symlink("loop_a.png", tmp_path / "loop_b.png")
    os.symlink("nowhere.png", tmp_path / "broken.png")
    with pytest.raises(DataError, match=r"f\.json: record 2 \(id 'r1'\): image file .*loop_a\.png is a "
                                         r"symbolic-link loop"):
        parse_record(_record(image="loop_a.png"), "f.json", 2, str(tmp_path))
    with pytest.raises(DataError, match=r"record 3 \(id 'r1'\): image file .*broken\.png is a broken symbolic "
                                         r"link \(to nowhere\.png, which does not exist\)"):
        parse_record(_record(image="broken.png"), "f.json", 3, str(tmp_path))
    with pytest.raises(DataError, match=r"image file .*gone\.png does not exist"):
        parse_record(_record(image="gone.png"), "f.json", 3, str(tmp_path))


@pytest.mark.parametrize("lines", [False, True], ids=["json_list", "json_lines"])
def test_non_utf8_file_names_the_record_and_the_byte(tmp_path, lines):
    Image.new("RGB", (4, 4)).save(tmp_path / "img.png")
    records = [_record(id="r0"), _record(id="r1"), _record(id="r2", conversations=[
        {"from": "human", "value": "<image>\nwhat colour is the caf\u00e9 ?"}, {"from": "gpt", "value": "red"}])]
    if lines:
        text = json.dumps(records[0]) + "\n\n" + "\n".join(json.dumps(r, ensure_ascii=False) for r in records[1:])
    else:
        text = json.dumps(records[:2])[:-1] + ",\n " + json.dumps(records[2], ensure_ascii=False) + "]"
    path = tmp_path / "latin1.json"
    path.write_bytes(text.encode("latin-1"))  # the é as one byte, 0xe9: not UTF-8
    offset = text.encode("latin-1").index(b"\xe9")
    line = 4 if lines else 2
    with pytest.raises(DataError) as err:
        load_records(str(path), cache_dir=str(tmp_path / "hf"))
    assert f"latin1.json: record 2 (id 'r2'): not UTF-8 text: byte 0xe9 at byte offset {offset} (line {line}, " \
        in str(err.value) and "re-encode" in str(err.value)
