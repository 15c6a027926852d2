"""Qwen2.5-VL and Qwen2-VL (transformers' Qwen2_5_VLForConditionalGeneration and
Qwen2VLForConditionalGeneration): a ViT over dynamic-resolution patches, the merger
(`model.visual.merger`: a norm, then an MLP over each 2 x 2 group of patches) and a
Qwen2 language model with multimodal RoPE.

Pilot's connector here (docs/method.md, "Families"): the merger's MLP (Linear, GELU,
Linear; 4Cv -> 4Cv -> C) is the two-layer perceptron the Pilot connector replaces; the
merger's norm stays frozen and shared in front of it. The vision tower hands the merger
one flattened token list for all images of a batch (no batch dimension; an image's
tokens are contiguous), so the connector mixes per token on that list and takes the
difference loss per image over that image's tokens, told the images' sizes by a hook on
the vision tower that reads `image_grid_thw`.

Images become patches through the family's own image processor (the PIL variant when
torchvision is absent: transformers picks it), each with its own grid (t, h, w) and
t*h*w / merge^2 visual tokens, so the count varies per image within one batch.

CT-CLIP is not offered: the vision blocks' MLPs are gated (SiLU(gate) * up -> down),
not the two-layer perceptron the connector's adapters copy.
"""

from __future__ import annotations

from torch import nn

from pilot_hpc.model.families.base import FamilySpec, ShapeFacts, unwrap

# Qwen2-VL-7B-Instruct's / Qwen2.5-VL-7B-Instruct's chat template (chat_template.json),
# used for the tiny model's tokenizer; a real folder brings its own. The prompt below
# writes its text for one user turn without rendering Jinja.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
SPECIAL = ["<|endoftext|>", "<unk>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|image_pad|>", "<|video_pad|>"]
TEMPLATE_WORDS = ["system", "user", "assistant", "You", "are", "a", "helpful", "assistant", "."]

# LoRA on the language model's linears only: the vision blocks have gate/up/down_proj too.
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
PLAN_IMAGE_SIDE = 448  # the planner's image (pixels per side): 256 visual tokens at patch 14


class MergerMLPView(nn.Module):
    """The merger's MLP (nn.Sequential: Linear, GELU, Linear) in the adapter layout."""

    activation_name = "gelu"  # nn.GELU(): the exact (erf) GELU the CT-MoA kernel computes

    def __init__(self, mlp: nn.Sequential):
        super().__init__()
        self.linear_1, self.act, self.linear_2 = mlp[0], mlp[1], mlp[2]

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


def _tell_segments(visual: nn.Module, args, kwargs) -> None:
    """Forward pre-hook of the vision tower: the connector in the merger learns how many
    merged tokens each image of this forward has (its rows of the flattened list)."""
    grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
    mlp = visual.merger.mlp
    if hasattr(mlp, "segments"):
        mlp.segments = None if grid is None else (grid.prod(-1) // visual.spatial_merge_size ** 2).tolist()


def qwen_image_inputs(processor, image) -> dict:
    """One image through the family's image processor: its patches, its grid and its
    visual-token count (grid t*h*w over the 2 x 2 merge)."""
    out = processor(images=[image], return_tensors="pt")
    grid = out["image_grid_thw"]  # [1, 3]
    return {"pixel_values": out["pixel_values"], "image_grid_thw": grid,
            "num_image_tokens": int(grid.prod()) // processor.merge_size ** 2}


class Qwen25VL(FamilySpec):
    name = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    display = "Qwen2.5-VL"
    example_folder = "Qwen/Qwen2.5-VL-7B-Instruct"
    lora_targets = LORA_TARGETS
    chat_template = CHAT_TEMPLATE
    image_inputs = staticmethod(qwen_image_inputs)
    answer_sep = ""  # the answer follows "<|im_start|>assistant\n" directly
    # The multimodal RoPE places image tokens on a (t, h, w) grid only where
    # mm_token_type_ids (the processor's output beside input_ids) marks them; without
    # it Qwen2.5-VL silently gives them text positions and Qwen2-VL refuses.
    mm_tokens = ("<|image_pad|>",)

    def _classes(self):
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    def reference_config(self):
        """Qwen2.5-VL-7B-Instruct's architecture (its config.json)."""
        config_class = self._classes()[0]
        vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                      fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu", tokens_per_second=2)
        text = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                    num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})
        return config_class(vision_config=vision, text_config=text)

    def tiny_config(self, m, vocab_size: int, tokenizer):
        """A reduced model from the real config classes: the model section's widths and
        depths, patch 8 so that the tiny images give a few tokens."""
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL}
        head_dim = m.text_hidden // m.text_heads
        quarter = head_dim // 2 // 4  # mrope sections (t, h, w) summing to head_dim / 2
        vision = self._tiny_vision(m)
        text = dict(vocab_size=vocab_size, hidden_size=m.text_hidden, intermediate_size=m.text_intermediate,
                    num_hidden_layers=m.text_layers, num_attention_heads=m.text_heads,
                    num_key_value_heads=m.text_heads, max_position_embeddings=512,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                     "mrope_section": [head_dim // 2 - 2 * quarter, quarter, quarter]},
                    bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
        return self._classes()[0](vision_config=vision, text_config=text, image_token_id=ids["<|image_pad|>"],
                                  video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                                  vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)

    def _tiny_vision(self, m):
        return dict(depth=m.vision_layers, hidden_size=m.vision_hidden, intermediate_size=2 * m.vision_hidden,
                    num_heads=m.vision_heads, out_hidden_size=m.text_hidden, patch_size=8, spatial_merge_size=2,
                    temporal_patch_size=2, window_size=32, fullatt_block_indexes=[m.vision_layers - 1])

    def _vision_width(self, v) -> int:
        return v.hidden_size

    def tiny_tokenizer(self, words: list[str]):
        """A word-level tokenizer with the family's special tokens and chat template."""
        from pilot_hpc.data.tokenizer import build_chatml_word_tokenizer

        return build_chatml_word_tokenizer(words, SPECIAL, TEMPLATE_WORDS, CHAT_TEMPLATE)

    def realscale(self, layers, vision_layers, words):
        tok = self.tiny_tokenizer(words)
        config = self.reference_config()
        config.text_config.num_hidden_layers = layers
        v = config.vision_config
        v.depth = vision_layers
        if getattr(v, "fullatt_block_indexes", None):  # Qwen2.5-VL: the last block attends globally
            v.fullatt_block_indexes = [vision_layers - 1]
        ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL}
        config.image_token_id, config.video_token_id = ids["<|image_pad|>"], ids["<|video_pad|>"]
        config.vision_start_token_id, config.vision_end_token_id = ids["<|vision_start|>"], ids["<|vision_end|>"]
        config.text_config.eos_token_id, config.text_config.pad_token_id = ids["<|im_end|>"], ids["<|endoftext|>"]
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        side = PLAN_IMAGE_SIDE  # 448 px at patch 14, merge 2: 256 visual tokens
        proc = Qwen2VLImageProcessorPil(patch_size=v.patch_size, merge_size=v.spatial_merge_size,
                                        temporal_patch_size=v.temporal_patch_size,
                                        size={"shortest_edge": side * side, "longest_edge": side * side})
        return config, tok, proc, side

    def tiny_image_processor(self, image_size: int):
        """The family's image processor at the tiny model's patch 8: images are resized
        to multiples of 16 between 32 x 32 and 64 x 64 pixels."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        return Qwen2VLImageProcessorPil(patch_size=8, merge_size=2, temporal_patch_size=2,
                                        size={"shortest_edge": 32 * 32, "longest_edge": 64 * 64})

    # -- the connector: the merger's MLP
    def get_connector(self, model):
        return unwrap(model).model.visual.merger.mlp

    def set_connector(self, model, module):
        visual = unwrap(model).model.visual
        visual.merger.mlp = module
        if not getattr(visual, "_pilot_segments_hook", False):
            visual.register_forward_pre_hook(_tell_segments, with_kwargs=True)
            visual._pilot_segments_hook = True

    def connector_mlp(self, connector):
        return MergerMLPView(connector)

    def stock_connector(self, adapter):
        return nn.Sequential(adapter.linear_1, adapter.act, adapter.linear_2)  # keys mlp.0 / mlp.2, as saved

    def language_model(self, model):
        return unwrap(model).model.language_model

    def vision_tower(self, model):
        return unwrap(model).model.visual

    def vision_mlps(self, vision_tower):
        raise ValueError(f"{self.display}: CT-CLIP needs two-layer vision MLPs; this tower's are gated")

    def prompt(self, question, first, image_tokens):
        if not first:  # after the previous answer's <|im_end|>
            return f"\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
        image = "<|vision_start|>" + "<|image_pad|>" * image_tokens + "<|vision_end|>"
        return f"{SYSTEM}<|im_start|>user\n{image}{question}<|im_end|>\n<|im_start|>assistant\n"

    def num_image_tokens(self, config):
        v = config.vision_config
        side = PLAN_IMAGE_SIDE // (v.patch_size * v.spatial_merge_size)
        return side * side

    def shape_facts(self, config):
        t, v = config.text_config, config.vision_config
        return ShapeFacts(hidden=t.hidden_size, intermediate=t.intermediate_size, layers=t.num_hidden_layers,
                          heads=t.num_attention_heads, kv_heads=getattr(t, "num_key_value_heads", None) or 0,
                          vocab=t.vocab_size,
                          vision_hidden=self._vision_width(v) * v.spatial_merge_size ** 2,
                          connector_hidden=self._vision_width(v) * v.spatial_merge_size ** 2,
                          image_tokens=self.num_image_tokens(config))


class Qwen2VL(Qwen25VL):
    """Qwen2-VL: the same merger (LayerNorm instead of RMSNorm in front of the MLP), the
    same prompts, image processor and language model; its vision config names the
    tower's width embed_dim (hidden_size is the language model's)."""

    name = "qwen2_vl"
    model_types = ("qwen2_vl",)
    display = "Qwen2-VL"
    example_folder = "Qwen/Qwen2-VL-7B-Instruct"

    def _classes(self):
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        return Qwen2VLConfig, Qwen2VLForConditionalGeneration

    def reference_config(self):
        """Qwen2-VL-7B-Instruct's architecture (its config.json)."""
        vision = dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, hidden_act="quick_gelu")
        text = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                    num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})
        return self._classes()[0](vision_config=vision, text_config=text)

    def _tiny_vision(self, m):
        return dict(depth=m.vision_layers, embed_dim=m.vision_hidden, hidden_size=m.text_hidden,
                    num_heads=m.vision_heads, mlp_ratio=2, patch_size=8, spatial_merge_size=2, temporal_patch_size=2)

    def _vision_width(self, v) -> int:
        return v.embed_dim


QWEN2_5_VL = Qwen25VL()
QWEN2_VL = Qwen2VL()
