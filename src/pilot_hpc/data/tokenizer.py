"""A word-level tokenizer for the built-in tiny LLaVA, built locally with `tokenizers`.

Real checkpoints bring their own tokenizer (AutoTokenizer from model.path); this one
exists so that the demo and the tests need no download. Numbers such as "0.31" stay
one token, so a box is 9 tokens: [ x1 , y1 , x2 , y2 ].
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]


def _word_level(vocab: dict[str, int]) -> Tokenizer:
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        # Split punctuation off words but keep decimals whole ("0.31," -> "0.31", ",").
        pre_tokenizers.Split(Regex(r"\d+\.\d+|[\[\],.?:]"), behavior="isolated"),
    ])
    return core


def build_word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIAL + [w for w in words if w not in SPECIAL])}
    core = _word_level(vocab)
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        additional_special_tokens=["<image>"],
    )
    return tok


def build_chatml_word_tokenizer(words: list[str], special: list[str], template_words: list[str], chat_template: str,
                                extra_special_tokens: dict | None = None) -> PreTrainedTokenizerFast:
    """The same word-level scheme for the ChatML families (Qwen-VL, OneVision, InternVL):
    `special` starts with <|endoftext|> (the pad) and <unk>; <|im_end|> is the EOS; no BOS;
    the template's words are whole tokens, then `words`."""
    vocab = {}
    for w in special + template_words + list(words):
        vocab.setdefault(w, len(vocab))
    extra = {"extra_special_tokens": extra_special_tokens} if extra_special_tokens else {}
    tok = PreTrainedTokenizerFast(tokenizer_object=_word_level(vocab), pad_token="<|endoftext|>", unk_token="<unk>",
                                  eos_token="<|im_end|>", additional_special_tokens=special[2:], **extra)
    tok.chat_template = chat_template
    return tok
