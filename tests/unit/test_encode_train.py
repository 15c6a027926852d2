"""InstructionDataset.encode_train: an answer's labels are its tokens as the tokenizer splits
the whole turn (prompt + " " + answer), as LLaVA-1.5 tokenises a conversation; the prompt
part stays what encode_prompt gives at evaluation."""

from __future__ import annotations

import glob
import os

import pytest
from tokenizers import Tokenizer, models, normalizers, processors
from transformers import AutoTokenizer, LlavaConfig, PreTrainedTokenizerFast

from pilot_hpc.data.records import IGNORE_INDEX, InstructionDataset, Sample, load_records
from pilot_hpc.errors import DataError
from pilot_hpc.model.llava import num_image_tokens

SPECIAL = ["<unk>", "<s>", "</s>", "<image>"]
WORDS = ["▁USER", ":", "▁ASSISTANT", "▁what", "what", "▁color", "▁?", "▁red", "▁blue", "▁and", "▁now", "▁", "\n"]


def llama2_style(words=WORDS, eos_after=False) -> PreTrainedTokenizerFast:
    """A small tokenizer with Llama-2's normaliser (Prepend("▁"), spaces as "▁") over a
    Unigram vocabulary of ▁-words; single letters cost more, so a listed word wins."""
    letters = sorted(set("".join(w for w in words if w not in SPECIAL)) - {"▁"})
    vocab = [(t, 0.0) for t in SPECIAL] + [(w, -1.0) for w in words] + [(c, -5.0) for c in letters]
    core = Tokenizer(models.Unigram(vocab, unk_id=0))
    core.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    single = "<s> $A </s>" if eos_after else "<s> $A"
    core.post_processor = processors.TemplateProcessing(single=single, special_tokens=[("<s>", 1), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   additional_special_tokens=["<image>"])


def dataset(tok, turns, image_tokens=2) -> InstructionDataset:
    sample = Sample(id="s1", image_path="unused.png", turns=turns, where="f.json: record 4 (id 's1')")
    return InstructionDataset([sample], tok, None, image_tokens, max_length=4096)


def labelled(ds, labels) -> list[str]:
    return ds.tok.convert_ids_to_tokens([x for x in labels if x != IGNORE_INDEX])


def test_llama2_style_answer_starts_with_its_first_word_not_a_lone_prefix():
    tok = llama2_style()
    ds = dataset(tok, [("what color ?", "red"), ("now ?", "blue and red")])
    assert tok.convert_ids_to_tokens(tok(" red", add_special_tokens=False)["input_ids"]) == ["▁", "▁red"]  # alone
    ids, labels = ds.encode_train(0)
    assert labelled(ds, labels) == ["▁red", "</s>", "▁blue", "▁and", "▁red", "</s>"]
    # The first turn's prompt is what evaluation gives the model.
    prompt = ds.encode_prompt(0)
    assert ids[:len(prompt)] == prompt and labels[:len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert labels[len(prompt)] == tok.convert_tokens_to_ids("▁red")
    # The whole conversation as the tokenizer splits each turn in one call.
    turn0 = tok(ds.prompt("what color ?", True) + " red")["input_ids"]
    turn1 = tok(ds.prompt("now ?", False) + " blue and red", add_special_tokens=False)["input_ids"]
    assert ids == turn0 + [tok.eos_token_id] + turn1 + [tok.eos_token_id]
    assert len(ids) == len(labels)


def test_offsets_find_the_answer_when_the_prompt_is_not_a_prefix():
    """A post-processor that ends every encoding with </s>: the prompt alone is then no
    prefix of prompt + answer, and the fast tokenizer's offsets place the answer."""
    tok = llama2_style(eos_after=True)
    ds = dataset(tok, [("what color ?", "blue and red")])
    ids, labels = ds.encode_train(0)
    prompt = ds.encode_prompt(0)
    assert prompt[-1] == tok.eos_token_id and ids[:len(prompt)] == prompt
    assert labelled(ds, labels) == ["▁blue", "▁and", "▁red", "</s>"]


def test_a_token_across_prompt_and_answer_is_refused_naming_the_record():
    tok = llama2_style(WORDS + [":▁red"])
    ds = dataset(tok, [("what color ?", "red")])
    with pytest.raises(DataError, match=r"^sample s1: turn 0: the tokenizer joins the end of the prompt and the "
                                         r"start of the answer 'red' into one token ':▁red'"):
        ds.encode_train(0)
    with pytest.raises(DataError, match=r"^f\.json: record 4 \(id 's1'\): sample s1: turn 0: the tokenizer joins"):
        ds.check(0)  # what training's data check and __getitem__ report


def old_encode_train(ds: InstructionDataset, i: int) -> tuple[list[int], list[int]]:
    """encode_train as it was: each answer tokenised alone as " " + answer."""
    ids, labels = [], []
    for t, (q, a) in enumerate(ds.samples[i].turns):
        p = ds.tok(ds.prompt(q, t == 0), add_special_tokens=(t == 0))["input_ids"]
        ans = ds.tok(" " + a, add_special_tokens=False)["input_ids"] + [ds.tok.eos_token_id]
        ids += p + ans
        labels += [IGNORE_INDEX] * len(p) + ans
    return ids, labels


def test_tiny_word_tokenizer_gives_the_same_ids_and_labels_as_before(small_world):
    """The built-in tiny model's tokenizer (as runs load it, from the base model folder)
    on every record of the synthetic world, and on two-turn records made of them."""
    _, folder, base = small_world
    tok = AutoTokenizer.from_pretrained(base)
    files = sorted(glob.glob(os.path.join(folder, "client_*.json"))) + [os.path.join(folder, "pretrain.json")]
    samples = [s for f in files for s in load_records(f)]
    samples += [Sample(id=f"two-{k}", image_path=a.image_path, turns=a.turns + b.turns)
                for k, (a, b) in enumerate(zip(samples[:50], samples[50:100]))]
    ds = InstructionDataset(samples, tok, None, num_image_tokens(LlavaConfig.from_pretrained(base)), max_length=4096)
    assert len(samples) > 200 and {len(s.turns) for s in samples} == {1, 2}
    for i in range(len(samples)):
        assert ds.encode_train(i) == old_encode_train(ds, i), samples[i].id
