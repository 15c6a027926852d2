"""LLaVA-OneVision (transformers' LlavaOnevisionForConditionalGeneration: a SigLIP vision
tower, the two-layer GELU projector `model.multi_modal_projector`, a Qwen2 language
model) and LLaVA-NeXT (LlavaNextForConditionalGeneration: CLIP, the same projector, a
Mistral language model in the variant whose template is written here), which share the
any-resolution path.

Any resolution: the image processor cuts each image into a base crop (the whole image
resized) and a grid of crops chosen among `image_grid_pinpoints` by the image's size;
the vision tower and the projector run on every crop ([crops, tokens per crop, Cv], all
images' crops one after another), then the model unpads the grid crops' features to the
image's aspect ratio, appends `image_newline` to each row and packs them behind the base
crop. The number of visual tokens therefore varies per image; it is the processor's own
count (`_get_number_of_features`), which the model checks against the features it packs.

Pilot's connector here (docs/method.md, "Other model families"): the projector is the two-layer
perceptron the connector copies; it mixes per token of every crop, and the difference
loss is taken per image over all of that image's crop tokens, told the images' crop
counts from `image_sizes` where the model computes its image features.

CT-CLIP: SigLIP's and CLIP's encoder MLPs are two-layer (fc1, activation, fc2), so each
becomes a connector (their tanh-approximated or quick GELU mixes in eager PyTorch).
"""

from __future__ import annotations

import importlib
import types
from dataclasses import dataclass

from torch import nn

from pilot_hpc.model.families.base import ShapeFacts, unwrap, vision_depth
from pilot_hpc.model.families.llava import LlavaLayout

# llava-hf/llava-onevision-qwen2-7b-ov-hf's chat template (its chat_template.json), for the
# tiny model's tokenizer; a real folder brings its own. Each turn opens with
# "<|im_start|>role ", its images, then "\n" + text, and closes with "<|im_end|>" (no
# newline); the generation prompt is "<|im_start|>assistant\n".
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{ '<|im_end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
IMAGE_TOKEN = "<image>"
SPECIAL = ["<|endoftext|>", "<unk>", "<|im_start|>", "<|im_end|>", IMAGE_TOKEN, "<video>"]
TEMPLATE_WORDS = ["user", "assistant"]

# LoRA on the language model's linears only: SigLIP's attention has q/k/v_proj too.
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
# The planner's image: one crop's side (384 px at 7B; NeXT's 336), the smallest
# any-resolution grid (a base crop and one grid crop's features: NeXT's 1 x 2 grid unpads
# to one crop for a square image); larger images yield up to about ten crops' tokens.
PLAN_GRID = 1


@dataclass(frozen=True)
class AnyResImages:
    """(image processor, image) -> the image's model inputs and its visual-token count,
    by the family's processor class's own count. Frozen and module-level: picklable for
    DataLoader workers.

    processor: "onevision" or "next"; crop_side: patches per crop side; select: the
    config's vision_feature_select_strategy; aspect: OneVision's vision_aspect_ratio."""

    processor: str
    crop_side: int
    patch_size: int
    select: str
    aspect: str = "anyres_max_9"

    def __call__(self, image_processor, image) -> dict:
        out = image_processor(images=[image], return_tensors="pt")
        pixels, sizes = out["pixel_values"][0], out["image_sizes"]  # [crops, 3, S, S], [1, 2]
        orig_h, orig_w = (int(v) for v in sizes[0])
        return {"pixel_values": pixels, "image_sizes": sizes,
                "num_image_tokens": self.count(image_processor, orig_h, orig_w, *pixels.shape[-2:])}

    def count(self, image_processor, orig_h: int, orig_w: int, height: int, width: int) -> int:
        """The processor's count (its _get_number_of_features, which needs no tokenizer:
        the processor is made without running its constructor)."""
        if self.processor == "onevision":
            from transformers import LlavaOnevisionProcessor

            counter = LlavaOnevisionProcessor.__new__(LlavaOnevisionProcessor)
            counter.num_image_tokens, counter.vision_aspect_ratio = self.crop_side ** 2, self.aspect
        else:
            from transformers import LlavaNextProcessor

            counter = LlavaNextProcessor.__new__(LlavaNextProcessor)
            counter.patch_size = self.patch_size
            counter.num_additional_image_tokens = 1 if self.select == "default" else 0  # CLIP's CLS
        counter.image_processor = image_processor
        n = counter._get_number_of_features(orig_h, orig_w, int(height), int(width))
        return n - 1 if self.select == "default" else n


def _image_features(multimodal: nn.Module, pixel_values, image_sizes, vision_feature_layer=None,
                    vision_feature_select_strategy=None, **kwargs):
    """The multimodal model's get_image_features, after telling the connector how many
    crops each image has (its rows of the projector's input), as the model computes them
    from image_sizes. Bound to the model as an instance attribute: generate() calls
    get_image_features itself before the first forward, so a forward hook would miss it;
    the vision tower, which runs inside, is never told image_sizes."""
    mlp = multimodal.multi_modal_projector
    if hasattr(mlp, "segments"):
        modeling = importlib.import_module(type(multimodal).__module__)
        config = multimodal.config
        # OneVision gives the images of a multi-image sample one crop each (never here:
        # one image per sample, batch_num_images None).
        many = kwargs.get("batch_num_images")
        cut = [True] * len(image_sizes) if many is None else [n == 1 for n in many for _ in range(n)]
        mlp.segments = [modeling.image_size_to_num_patches(image_size=s, grid_pinpoints=config.image_grid_pinpoints,
                                                           patch_size=config.vision_config.image_size) if c else 1
                        for s, c in zip(image_sizes, cut)]
    return type(multimodal).get_image_features(multimodal, pixel_values, image_sizes,
                                               vision_feature_layer=vision_feature_layer,
                                               vision_feature_select_strategy=vision_feature_select_strategy, **kwargs)


class LlavaOnevision(LlavaLayout):
    name = "llava_onevision"
    model_types = ("llava_onevision",)
    vision_model_types = ("siglip_vision_model",)
    display = "LLaVA-OneVision"
    example_folder = "llava-hf/llava-onevision-qwen2-7b-ov-hf"
    lora_targets = LORA_TARGETS
    chat_template = CHAT_TEMPLATE
    answer_sep = ""  # the answer follows "<|im_start|>assistant\n" directly
    processor_kind = "onevision"

    def _classes(self):
        from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

        return LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    def reference_config(self):
        """llava-onevision-qwen2-7b-ov-hf's architecture (its config.json): SigLIP
        so400m/14 at 384 px (the config class's defaults), Qwen2-7B."""
        text = dict(model_type="qwen2", vocab_size=152128, hidden_size=3584, intermediate_size=18944,
                    num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                    max_position_embeddings=32768, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
        return self._classes()[0](text_config=text, image_token_index=151646, video_token_index=151647)

    # -- the tiny model
    def tiny_tokenizer(self, words: list[str]):
        """A word-level tokenizer with the family's special tokens and chat template."""
        from pilot_hpc.data.tokenizer import build_chatml_word_tokenizer

        return build_chatml_word_tokenizer(words, SPECIAL, TEMPLATE_WORDS, CHAT_TEMPLATE)

    def _tiny_grid(self, side: int) -> list[list[int]]:
        """The real pinpoints' pattern (multiples of the crop, here up to 2 x 2)."""
        return [[side * a, side * b] for a in (1, 2) for b in (1, 2)]

    def tiny_config(self, m, vocab_size: int, tokenizer):
        """A reduced model from the real config classes: the model section's widths and
        depths, crops of model.image_size pixels, a 2 x 2 any-resolution grid at most."""
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL}
        vision = dict(model_type="siglip_vision_model", hidden_size=m.vision_hidden,
                      intermediate_size=4 * m.vision_hidden, num_hidden_layers=m.vision_layers,
                      num_attention_heads=m.vision_heads, image_size=m.image_size, patch_size=m.patch_size,
                      vision_use_head=False)
        text = dict(model_type="qwen2", vocab_size=vocab_size, hidden_size=m.text_hidden,
                    intermediate_size=m.text_intermediate, num_hidden_layers=m.text_layers,
                    num_attention_heads=m.text_heads, num_key_value_heads=m.text_heads, max_position_embeddings=512,
                    bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                    tie_word_embeddings=False)
        return self._classes()[0](vision_config=vision, text_config=text, image_token_index=ids[IMAGE_TOKEN],
                                  video_token_index=ids["<video>"], image_grid_pinpoints=self._tiny_grid(m.image_size),
                                  tie_word_embeddings=False)

    def tiny_image_processor(self, image_size: int):
        return self._image_processor(image_size, self._tiny_grid(image_size))

    def _image_processor(self, side: int, pinpoints: list[list[int]]):
        """The family's image processor (the PIL variant) at crops of `side` pixels, SigLIP's
        normalisation as the real folder's preprocessor_config.json has it."""
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil,
        )

        return LlavaOnevisionImageProcessorPil(size={"height": side, "width": side}, image_grid_pinpoints=pinpoints,
                                               image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])

    # -- the GPU check's real-width round
    def realscale(self, layers, vision_layers, words):
        tok = self.tiny_tokenizer(words)
        config = self.reference_config()
        config.text_config.num_hidden_layers = layers
        v = config.vision_config
        # the projector reads hidden_states[vision_feature_layer]: that many layers at least
        v.num_hidden_layers = vision_depth(vision_layers, config.vision_feature_layer)
        self._set_token_ids(config, tok)
        # One crop a side is the planner's image (num_image_tokens): a base crop and a
        # 1 x 1 grid for OneVision, the 1 x 2 grid unpadded to one crop's features for NeXT.
        side = v.image_size
        return config, tok, self._image_processor(side, config.image_grid_pinpoints), side

    def _set_token_ids(self, config, tok) -> None:
        """The special tokens' ids of the word-level tokenizer, set as tiny_config does."""
        ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL}
        config.image_token_index, config.video_token_index = ids[IMAGE_TOKEN], ids["<video>"]
        t = config.text_config
        t.bos_token_id, t.eos_token_id, t.pad_token_id = None, ids["<|im_end|>"], ids["<|endoftext|>"]

    # -- images
    def anyres_images(self, config) -> AnyResImages:
        v = config.vision_config
        return AnyResImages(self.processor_kind, v.image_size // v.patch_size, v.patch_size,
                            config.vision_feature_select_strategy,
                            getattr(config, "vision_aspect_ratio", "anyres_max_9"))

    def dataset_options(self, tokenizer, config=None) -> dict:
        if config is None:
            raise ValueError(f"{self.display}: the images' token counts need the model's config")
        return {**super().dataset_options(tokenizer, config), "image_inputs": self.anyres_images(config)}

    # -- the connector: the projector, as LLaVA-1.5's
    def set_connector(self, model, module):
        multimodal = unwrap(model).model
        multimodal.multi_modal_projector = module
        # a bound method: deepcopy (the export's merged copy) binds it to the copy
        multimodal.get_image_features = types.MethodType(_image_features, multimodal)

    # -- prompts
    def prompt(self, question, first, image_tokens):
        if not first:  # after the previous answer's <|im_end|>
            return f"<|im_start|>user \n{question}<|im_end|><|im_start|>assistant\n"
        return f"<|im_start|>user {IMAGE_TOKEN * image_tokens}\n{question}<|im_end|><|im_start|>assistant\n"

    def num_image_tokens(self, config):
        """Visual tokens of a square image one grid crop wide (the planner's image):
        the base crop, the grid crop, one image_newline per row."""
        v = config.vision_config
        side = v.image_size // v.patch_size
        return side * side + (PLAN_GRID * side) * (PLAN_GRID * side + 1)

    def shape_facts(self, config):
        t, v = config.text_config, config.vision_config
        return ShapeFacts(hidden=t.hidden_size, intermediate=t.intermediate_size, layers=t.num_hidden_layers,
                          heads=t.num_attention_heads, vocab=t.vocab_size, vision_hidden=v.hidden_size,
                          kv_heads=getattr(t, "num_key_value_heads", None) or t.num_attention_heads,
                          image_tokens=self.num_image_tokens(config))


# llava-hf/llava-v1.6-mistral-7b-hf's chat template (its chat_template.json): a user turn
# is "[INST] ", "<image>\n" per image, the text, " [/INST]"; an assistant turn " " + text
# + "</s> ". It has no generation prompt: the prompt ends with " [/INST]".
NEXT_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<<SYS>>\n' + message['content'][0]['text'] + '\n<</SYS>>\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{ ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'][0]['text'] + '</s> ' }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)


class LlavaNext(LlavaOnevision):
    """LLaVA-NeXT (v1.6): the same projector and any-resolution packing (without
    OneVision's cap on the unpadded grid), a CLIP tower whose CLS token the 'default'
    strategy drops, the Mistral variant's language model and [INST] prompts (its chat
    template); the Vicuna and Hermes-Yi variants are refused at load."""

    name = "llava_next"
    model_types = ("llava_next",)
    # CLIP, as LLaVA-1.5's: CT-CLIP finds that family's (identical) MLP layout first.
    vision_model_types = ("clip_vision_model",)
    display = "LLaVA-NeXT"
    example_folder = "llava-hf/llava-v1.6-mistral-7b-hf"
    chat_template = NEXT_CHAT_TEMPLATE
    answer_sep = " "  # the template's " " + answer
    processor_kind = "next"

    def _classes(self):
        from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

        return LlavaNextConfig, LlavaNextForConditionalGeneration

    def load(self, path, dtype, attn_implementation):
        # The prompt is Mistral's template; the Vicuna and Hermes-Yi variants write others.
        text = self.config_from_folder(path).text_config.model_type
        if text != "mistral":
            from pilot_hpc.config import ConfigError

            raise ConfigError(f"{path}: a LLaVA-NeXT with a {text} language model; pilot_hpc writes the prompts of "
                              "the Mistral variant's chat template only (llava-v1.6-mistral-7b-hf)")
        return super().load(path, dtype, attn_implementation)

    def reference_config(self):
        """llava-v1.6-mistral-7b-hf's architecture (its config.json): CLIP ViT-L/14 at
        336 px, Mistral-7B-Instruct-v0.2."""
        vision = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                      num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
        text = dict(model_type="mistral", vocab_size=32064, hidden_size=4096, intermediate_size=14336,
                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                    max_position_embeddings=32768, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
        return self._classes()[0](vision_config=vision, text_config=text, image_token_index=32000,
                                  image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]])

    def tiny_tokenizer(self, words: list[str]):
        """LLaVA-1.5's word-level tokenizer (<s> first, </s> the EOS) with the template's
        [INST] markers as whole tokens, and the template."""
        from pilot_hpc.data.tokenizer import build_word_tokenizer

        tok = build_word_tokenizer(words)
        tok.add_tokens(["[INST]", "[/INST]"])
        tok.chat_template = NEXT_CHAT_TEMPLATE
        return tok

    def _tiny_grid(self, side: int) -> list[list[int]]:
        """The real pinpoints' pattern (no single-crop grid), here up to 2 x 2 crops."""
        return [[side, 2 * side], [2 * side, side], [2 * side, 2 * side]]

    def tiny_config(self, m, vocab_size: int, tokenizer):
        vision = dict(model_type="clip_vision_model", hidden_size=m.vision_hidden,
                      intermediate_size=4 * m.vision_hidden, num_hidden_layers=m.vision_layers,
                      num_attention_heads=m.vision_heads, image_size=m.image_size, patch_size=m.patch_size,
                      projection_dim=m.vision_hidden)
        text = dict(model_type="mistral", vocab_size=vocab_size, hidden_size=m.text_hidden,
                    intermediate_size=m.text_intermediate, num_hidden_layers=m.text_layers,
                    num_attention_heads=m.text_heads, num_key_value_heads=m.text_heads, max_position_embeddings=512,
                    pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
        return self._classes()[0](vision_config=vision, text_config=text,
                                  image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                                  image_grid_pinpoints=self._tiny_grid(m.image_size), tie_word_embeddings=False)

    def _image_processor(self, side: int, pinpoints: list[list[int]]):
        """Crops of `side` pixels (size and crop_size as llava-v1.6-mistral-7b-hf's
        preprocessor_config.json has them), CLIP's normalisation (the class defaults)."""
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

        return LlavaNextImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                                          image_grid_pinpoints=pinpoints)

    def _set_token_ids(self, config, tok) -> None:
        config.image_token_index = tok.convert_tokens_to_ids(IMAGE_TOKEN)
        t = config.text_config
        t.pad_token_id, t.bos_token_id, t.eos_token_id = tok.pad_token_id, tok.bos_token_id, tok.eos_token_id

    def prompt(self, question, first, image_tokens):
        image = (IMAGE_TOKEN * image_tokens + "\n") if first else ""
        return f"[INST] {image}{question} [/INST]"


LLAVA_ONEVISION = LlavaOnevision()
LLAVA_NEXT = LlavaNext()
