"""A tiny LLaVA-1.5-shaped model folder, written by the installed transformers the way a
download of llava-hf/llava-1.5-7b-hf is laid out, for trying the real-data path on a CPU.

    python scripts/tiny_llava_folder.py OUT [--text FILE ...] [--seed 0]

OUT gets what `model.path` needs: config.json + model.safetensors + generation_config.json
(model.save_pretrained) and tokenizer.json, tokenizer_config.json, processor_config.json
(LlavaProcessor.save_pretrained; transformers 5 writes the image processor's settings into
processor_config.json, not preprocessor_config.json).

The shape is LLaVA-1.5's at reduced sizes: a CLIP ViT vision tower with 14 px patches
(56 px images: 16 image tokens instead of 576), features from its second-to-last layer
without the CLS token ("default"), a two-layer GELU projector, a Llama LLM, and a
Llama-2-style tokenizer (Prepend("▁") + spaces as "▁", BPE with byte fallback, <s>
prepended, <image> and <pad> added after the vocabulary, the model's vocabulary padded to
a multiple of 64 as llava-hf's 32064). The BPE is trained with `tokenizers`' trainer on
LLaVA-1.5's prompts and on the --text files (a prepared client file's conversations, or
plain text), so their words are tokens, and on every printable ASCII character; any other
character is spelled in its UTF-8 bytes, as in Llama-2. The weights are random (seeded):
a run on this folder checks the path, not the scores.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import string
import sys

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor,
                          PreTrainedTokenizerFast)

IMAGE_SIZE, PATCH_SIZE = 56, 14  # LLaVA-1.5: 336 and 14 (24 x 24 = 576 image tokens)
# LLaVA-1.5's conversation and the benchmarks' instructions (pilot_hpc.data.benchmarks).
PROMPTS = [
    "USER: <image>\nWhat is this? ASSISTANT: A photo.",
    "Answer the question using a single word or phrase.",
    "Provide a one-sentence caption for the provided image.",
    "Please provide the bounding box coordinate of the region this sentence describes: the dog",
    "Context: a hint.\nWhich one?\nA. yes\nB. no\nAnswer with the option's letter from the given choices directly.",
    "[0.10, 0.25, 0.50, 0.75]",
]


def texts_of(path: str) -> list[str]:
    """Every conversation turn of a LLaVA JSON file, or the lines of any other text file."""
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    try:
        records = json.loads(text)
    except json.JSONDecodeError:
        return text.splitlines()
    if not isinstance(records, list):
        return [text]
    return [turn["value"].replace("<image>", "") for r in records if isinstance(r, dict)
            for turn in r.get("conversations", [])]


def _with_byte_fallback(core: Tokenizer) -> Tokenizer:
    """The trained BPE with Llama-2's byte tokens <0x00>..<0xFF> at ids 3..258 (after
    <unk> <s> </s>), so a character outside the vocabulary becomes its UTF-8 bytes, not
    <unk>; and without the training's pre-tokenizer, as Llama-2's tokenizer.json is."""
    spec = json.loads(core.to_str())
    trained = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    names = [t for t, _ in trained[:3]] + [f"<0x{b:02X}>" for b in range(256)] + [t for t, _ in trained[3:]]
    spec["model"]["vocab"] = {t: i for i, t in enumerate(names)}
    spec["model"]["byte_fallback"] = True
    spec["pre_tokenizer"] = None
    spec["added_tokens"] = [dict(a, id=spec["model"]["vocab"][a["content"]]) for a in spec["added_tokens"]]
    return Tokenizer.from_str(json.dumps(spec))


def llama2_style_tokenizer(texts: list[str], vocab_size: int = 2000) -> PreTrainedTokenizerFast:
    core = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    # Trained on "▁"-prefixed words, so no merge crosses a word boundary, as sentencepiece's
    # split_by_whitespace; used without a pre-tokenizer, as Llama-2's tokenizer.json is.
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    alphabet = [c for c in string.printable if c not in " \t\r\x0b\x0c"] + ["▁"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=alphabet, show_progress=False)
    core.train_from_iterator(texts, trainer)
    core = _with_byte_fallback(core)
    core.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    core.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                      decoders.Strip(" ", 1, 0)])
    bos = core.token_to_id("<s>")
    core.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                        special_tokens=[("<s>", bos)])
    core.add_special_tokens([AddedToken("<image>", normalized=False, special=True),
                             AddedToken("<pad>", normalized=False, special=True)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": "<image>"},
                                   padding_side="left", add_bos_token=True, add_eos_token=False)


def image_processor():
    """LLaVA-1.5's CLIP preprocessing (resize the short side, centre crop, CLIP's mean and
    std) at IMAGE_SIZE; the PIL implementation when torchvision is not installed."""
    kwargs = {"size": {"shortest_edge": IMAGE_SIZE}, "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}}
    if importlib.util.find_spec("torchvision") is not None:
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor(**kwargs)
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(**kwargs)


def llava_config(tokenizer) -> LlavaConfig:
    """Every size explicit: the sub-configs' defaults are CLIP-L and a 7B Llama."""
    vocab = -(-len(tokenizer) // 64) * 64
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                              image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=32, hidden_act="quick_gelu")
    text = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return LlavaConfig(vision_config=vision, text_config=text,
                       image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                       vision_feature_select_strategy="default", vision_feature_layer=-2,
                       projector_hidden_act="gelu", image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2)


def write(out: str, texts: list[str], seed: int = 0) -> None:
    tokenizer = llama2_style_tokenizer(PROMPTS + texts)
    config = llava_config(tokenizer)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = (tokenizer.bos_token_id, tokenizer.eos_token_id,
                                                         tokenizer.pad_token_id)
    model.save_pretrained(out)
    # num_additional_image_tokens=1: CLIP's CLS token, which "default" drops again.
    processor = LlavaProcessor(image_processor=image_processor(), tokenizer=tokenizer, patch_size=PATCH_SIZE,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    processor.save_pretrained(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/tiny_llava_folder.py", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="folder to write (model.path)")
    p.add_argument("--text", nargs="*", default=[], help="LLaVA JSON or text files whose words the tokenizer learns")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = p.parse_args(argv)
    texts = [t for path in args.text for t in texts_of(path)]
    write(args.out, texts, args.seed)
    tok = PreTrainedTokenizerFast.from_pretrained(args.out)
    config = LlavaConfig.from_pretrained(args.out)
    print(f"wrote {os.path.abspath(args.out)}: {', '.join(sorted(os.listdir(args.out)))}")
    print(f"tokenizer: {len(tok)} tokens ({len(texts)} texts learnt); <image> = {config.image_token_index}, "
          f"{(IMAGE_SIZE // PATCH_SIZE) ** 2} image tokens per image ({IMAGE_SIZE} px, patch {PATCH_SIZE})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
