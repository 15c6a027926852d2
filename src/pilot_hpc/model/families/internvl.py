"""HF-native InternVL (transformers' InternVLForConditionalGeneration, InternVL3-*-hf
folders): an InternViT vision tower over 448-px tiles, a pixel shuffle (2 x 2
neighbouring patches into one token of 4V channels), the projector
`model.multi_modal_projector` (LayerNorm(4V), Linear, GELU, Linear) and a Qwen2
language model.

Pilot's connector here (docs/method.md, "Families"): the projector's Linear-GELU-Linear
is the two-layer perceptron the Pilot connector replaces; its LayerNorm stays frozen and
shared in front of it (as Qwen's merger norm). The projector gets every tile of a batch
as [tiles, tokens per tile, 4V]; the connector sees them as one flattened token list
(every image's tiles one after another), mixes per token and takes the difference loss
per image over all of that image's tiles' tokens. Which rows belong to which image is
read from input_ids (each sample's count of image-context tokens) by a hook on the
model, since the pixel tensor alone does not say where one image's tiles end.

Images become tiles through the family's image processor (GotOcr2ImageProcessor, the
PIL variant when torchvision is absent): crop_to_patches picks the tile grid closest to
the image's aspect ratio (1 to max_patches tiles, plus a thumbnail when more than one),
so the number of tiles, and of visual tokens (tokens per tile each), varies per image.

CT-CLIP is offered: the vision blocks' MLPs are two-layer (fc1, GELU, fc2). Each block
scales its MLP's output by a frozen layer scale (lambda_2) before the residual; the
CT-CLIP connector replaces the MLP inside that scaling, which stays as it is.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from pilot_hpc.model.families.base import FamilySpec, ShapeFacts, VisionMLP, unwrap, vision_depth
from pilot_hpc.model.families.llava import CLIPMLPView

# InternVL3-*-hf's chat template (chat_template.json of the converted folders), used for
# the tiny model's tokenizer; a real folder brings its own. The processor expands each
# <IMG_CONTEXT> to <img>, tokens-per-tile x tiles <IMG_CONTEXT>, </img>; the prompt
# below writes that text for one user turn without rendering Jinja.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)
IMAGE_START, IMAGE_CONTEXT, IMAGE_END = "<img>", "<IMG_CONTEXT>", "</img>"
SPECIAL = ["<|endoftext|>", "<unk>", "<|im_start|>", "<|im_end|>", IMAGE_START, IMAGE_END, IMAGE_CONTEXT, "<video>"]
# The tokenizer attributes InternVLProcessor reads (the converted folders' tokenizer_config).
EXTRA_SPECIAL = {"start_image_token": IMAGE_START, "end_image_token": IMAGE_END,
                 "context_image_token": IMAGE_CONTEXT, "video_token": "<video>"}
TEMPLATE_WORDS = ["user", "assistant"]

# LoRA on the language model's linears only: the vision attention has q/k/v_proj too.
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
# The tiny model: 32-px tiles of 8-px patches, so 2 x 2 tokens per tile after the pixel
# shuffle; the synthetic 48 x 48 images become a 2 x 2 grid plus the thumbnail.
TINY_TILE, TINY_PATCH, TINY_MAX_TILES = 32, 8, 4
# InternVL3-*-hf's preprocessor_config.json normalisation
IMAGE_MEAN, IMAGE_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
# The planner's image: InternVL3's image processor default, max_patches 12, plus the
# thumbnail; a 4:3 photo (COCO, GQA) takes all of them (a 4 x 3 grid).
PLAN_TILES = 12 + 1
# The real-width round's image (realscale): the contract's square image cannot take the
# planner's 4 x 3 grid, since crop_to_patches keeps the aspect ratio (a square gets 1 x 1,
# 2 x 2 or 3 x 3 tiles). It takes the square grid nearest the planner's, 3 x 3 tiles and
# the thumbnail (10 tiles, 2,560 tokens at 7B; a side over 950 px picks it), at three
# tiles a side; tools/realscale_round.py plans for the round's own count.
ROUND_GRID = 3


class ProjectorMLPView(nn.Module):
    """The projector's Linear, activation, Linear (without its LayerNorm) in the adapter
    layout, sharing its weights."""

    def __init__(self, projector: nn.Module, activation_name: str):
        super().__init__()
        self.linear_1, self.act, self.linear_2 = projector.linear_1, projector.act, projector.linear_2
        # "gelu": ACT2FN's exact (erf) GELU, the one the CT-MoA kernel computes
        self.activation_name = activation_name

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


class NormThenConnector(nn.Module):
    """The projector with its MLP replaced: the frozen LayerNorm, then the connector
    (`mlp`) on the flattened token list of all tiles, back to [tiles, tokens, C]."""

    def __init__(self, layer_norm: nn.Module, mlp: nn.Module):
        super().__init__()
        self.layer_norm, self.mlp = layer_norm, mlp

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:  # [tiles, n, 4V]
        tiles, n, width = image_features.shape
        out = self.mlp(self.layer_norm(image_features).reshape(tiles * n, width))
        return out.reshape(tiles, n, out.shape[-1])


def _tell_segments(model: nn.Module, args, kwargs) -> None:
    """Forward pre-hook of the multimodal model: the connector learns how many visual
    tokens each image of this forward has. Every sample carries one image, whose tokens
    are that row's image-context tokens; rows without any carry none."""
    pixel_values = kwargs.get("pixel_values", args[1] if len(args) > 1 else None)
    ids = kwargs.get("input_ids", args[0] if args else None)
    segments = None
    if pixel_values is not None and ids is not None:
        segments = [c for c in (ids == model.config.image_token_id).sum(-1).tolist() if c]
    model.multi_modal_projector.mlp.segments = segments


def _forget_segments(model: nn.Module, args, output) -> None:
    """Forward hook: the counts hold for that forward only. generate() runs the image
    encoder on its own before the first forward (transformers 5), where the connector
    then sees one list without boundaries: its output is the same, only the difference
    loss, unused when generating, is taken over the list as one image."""
    model.multi_modal_projector.mlp.segments = None


def internvl_image_inputs(processor, image, tokens_per_tile: int) -> dict:
    """One image through the family's image processor, tiled as InternVLProcessor asks
    (crop_to_patches, its default): the tiles' pixels and the image's visual-token
    count (tiles x tokens per tile)."""
    out = processor(images=[image], crop_to_patches=True, return_tensors="pt")
    tiles = int(out["num_patches"][0])
    return {"pixel_values": out["pixel_values"], "num_image_tokens": tiles * tokens_per_tile}


def tokens_per_tile(config) -> int:
    """Visual tokens of one tile: (tile / patch)^2 patches, shuffled by downsample_ratio."""
    v = config.vision_config
    side = v.image_size[0] // v.patch_size[0]
    return int(side * config.downsample_ratio) ** 2


class InternVL(FamilySpec):
    name = "internvl"
    model_types = ("internvl",)
    vision_model_types = ("internvl_vision",)
    display = "InternVL"
    example_folder = "OpenGVLab/InternVL3-8B-hf"
    lora_targets = LORA_TARGETS
    chat_template = CHAT_TEMPLATE
    answer_sep = ""  # the answer follows "<|im_start|>assistant\n" directly

    def _classes(self):
        from transformers import InternVLConfig, InternVLForConditionalGeneration

        return InternVLConfig, InternVLForConditionalGeneration

    def reference_config(self):
        """InternVL3-8B-hf's architecture (its config.json): InternViT-300M at 448 px and
        a Qwen2.5-7B language model."""
        vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      image_size=[448, 448], patch_size=[14, 14], hidden_act="gelu", attention_bias=True,
                      norm_type="layer_norm", layer_scale_init_value=0.1, use_mean_pooling=True)
        text = dict(model_type="qwen2", vocab_size=151674, hidden_size=3584, intermediate_size=18944,
                    num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                    max_position_embeddings=32768, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                    tie_word_embeddings=False)
        return self._classes()[0](vision_config=vision, text_config=text, image_token_id=151667,
                                  image_seq_length=256, downsample_ratio=0.5, projector_hidden_act="gelu",
                                  vision_feature_layer=-1, vision_feature_select_strategy="default",
                                  tie_word_embeddings=False)

    def tiny_config(self, m, vocab_size: int, tokenizer):
        """A reduced model from the real config classes: the model section's widths and
        depths, 32-px tiles of 8-px patches (4 visual tokens per tile)."""
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL}
        vision = dict(hidden_size=m.vision_hidden, intermediate_size=2 * m.vision_hidden,
                      num_hidden_layers=m.vision_layers, num_attention_heads=m.vision_heads,
                      image_size=[TINY_TILE, TINY_TILE], patch_size=[TINY_PATCH, TINY_PATCH], hidden_act="gelu",
                      attention_bias=True, use_mean_pooling=True)
        text = dict(model_type="qwen2", vocab_size=vocab_size, hidden_size=m.text_hidden,
                    intermediate_size=m.text_intermediate, num_hidden_layers=m.text_layers,
                    num_attention_heads=m.text_heads, num_key_value_heads=m.text_heads, max_position_embeddings=512,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, bos_token_id=None,
                    eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=False)
        per_tile = (TINY_TILE // TINY_PATCH // 2) ** 2
        return self._classes()[0](vision_config=vision, text_config=text, image_token_id=ids[IMAGE_CONTEXT],
                                  image_seq_length=per_tile, downsample_ratio=0.5, projector_hidden_act="gelu",
                                  tie_word_embeddings=False)

    def realscale(self, layers, vision_layers, words):
        tok = self.tiny_tokenizer(words)
        config = self.reference_config()
        config.text_config.num_hidden_layers = layers
        v = config.vision_config
        v.num_hidden_layers = vision_depth(vision_layers, config.vision_feature_layer)
        ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL}
        config.image_token_id = ids[IMAGE_CONTEXT]
        config.text_config.eos_token_id, config.text_config.pad_token_id = ids["<|im_end|>"], ids["<|endoftext|>"]
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

        tile = v.image_size[0]
        proc = GotOcr2ImageProcessorPil(size={"height": tile, "width": tile}, crop_to_patches=True, min_patches=1,
                                        max_patches=PLAN_TILES - 1, image_mean=IMAGE_MEAN, image_std=IMAGE_STD)
        return config, tok, proc, ROUND_GRID * tile

    def tiny_tokenizer(self, words: list[str]):
        """A word-level tokenizer with the family's special tokens and chat template."""
        from pilot_hpc.data.tokenizer import build_chatml_word_tokenizer

        return build_chatml_word_tokenizer(words, SPECIAL, TEMPLATE_WORDS, CHAT_TEMPLATE, EXTRA_SPECIAL)

    def tiny_image_processor(self, image_size: int):
        """The family's image processor at the tiny tile: up to 4 tiles of 32 x 32 pixels
        (plus the thumbnail), ImageNet's mean and std as InternVL's."""
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

        return GotOcr2ImageProcessorPil(size={"height": TINY_TILE, "width": TINY_TILE}, crop_to_patches=True,
                                        min_patches=1, max_patches=TINY_MAX_TILES,
                                        image_mean=IMAGE_MEAN, image_std=IMAGE_STD)

    def dataset_options(self, tokenizer, config=None) -> dict:
        options = super().dataset_options(tokenizer)
        if config is None:
            raise ValueError("InternVL's visual tokens per tile come from the model config: pass it")
        options["image_inputs"] = functools.partial(internvl_image_inputs, tokens_per_tile=tokens_per_tile(config))
        return options

    # -- the connector: the projector's MLP behind its LayerNorm
    def get_connector(self, model):
        projector = unwrap(model).model.multi_modal_projector
        return projector.mlp if isinstance(projector, NormThenConnector) else projector

    def set_connector(self, model, module):
        inner = unwrap(model).model
        projector = inner.multi_modal_projector
        if isinstance(module, ProjectorMLPView):  # stock_connector's: the family's own projector
            from transformers.models.internvl.modeling_internvl import InternVLMultiModalProjector

            with torch.device("meta"):  # every submodule is replaced below
                stock = InternVLMultiModalProjector(inner.config)
            stock.layer_norm, stock.linear_1, stock.act, stock.linear_2 = (
                projector.layer_norm, module.linear_1, module.act, module.linear_2)
            inner.multi_modal_projector = stock
            return
        inner.multi_modal_projector = NormThenConnector(projector.layer_norm, module)
        if not getattr(inner, "_pilot_segments_hook", False):
            inner.register_forward_pre_hook(_tell_segments, with_kwargs=True)
            inner.register_forward_hook(_forget_segments)
            inner._pilot_segments_hook = True

    def connector_mlp(self, connector):
        # The CT-MoA kernel computes exact GELU; any other activation (projector_hidden_act)
        # is named as its class so that the connector mixes through the modules instead.
        act = connector.act
        exact = type(act).__name__ == "GELUActivation" or isinstance(act, nn.GELU) and act.approximate == "none"
        return ProjectorMLPView(connector, "gelu" if exact else type(act).__name__)

    def stock_connector(self, adapter):
        return ProjectorMLPView(adapter, getattr(adapter, "activation_name", "gelu"))

    def language_model(self, model):
        return unwrap(model).model.language_model

    def vision_tower(self, model):
        return unwrap(model).model.vision_tower

    def vision_mlps(self, vision_tower):
        return [VisionMLP(layer, "mlp") for layer in vision_tower.encoder.layer]

    def vision_mlp_view(self, mlp, vision_tower):
        return CLIPMLPView(mlp, vision_tower.config.hidden_act)  # the same fc1, activation_fn, fc2 names

    def prompt(self, question, first, image_tokens):
        if not first:  # after the previous answer's <|im_end|>
            return f"\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
        image = IMAGE_START + IMAGE_CONTEXT * image_tokens + IMAGE_END
        return f"<|im_start|>user\n{image}\n{question}<|im_end|>\n<|im_start|>assistant\n"

    def num_image_tokens(self, config):
        """Visual tokens of one tile; an image at the tile's size (448 x 448 at 7B) is one
        tile, so also that image's count (image_inputs gives each image's own)."""
        return tokens_per_tile(config)

    def shape_facts(self, config):
        t, v = config.text_config, config.vision_config
        return ShapeFacts(hidden=t.hidden_size, intermediate=t.intermediate_size, layers=t.num_hidden_layers,
                          heads=t.num_attention_heads, vocab=t.vocab_size,
                          kv_heads=getattr(t, "num_key_value_heads", None) or t.num_attention_heads,
                          vision_hidden=v.hidden_size * int(1 / config.downsample_ratio) ** 2,
                          image_tokens=PLAN_TILES * tokens_per_tile(config))


INTERNVL = InternVL()
