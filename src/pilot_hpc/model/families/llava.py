"""LLaVA-1.5 (transformers' LlavaForConditionalGeneration: a CLIP vision tower, a
two-layer GELU projector, a Llama language model), the first family of the seam.

Its projector already has the adapter layout (linear_1, act, linear_2), so the Pilot
connector copies it as it is. The vision tower's MLPs (CLIP's fc1, activation_fn, fc2)
are presented in that layout for CT-CLIP.
"""

from __future__ import annotations

from torch import nn

from pilot_hpc.model.families.base import FamilySpec, ShapeFacts, VisionMLP, unwrap

# llava-hf/llava-1.5-7b-hf's chat template (its chat_template.json), which the prompt
# below writes without rendering Jinja: for one user turn with one image and a text,
# `USER: <image>\n{text} ASSISTANT:` (tests/unit/test_families.py renders this template
# with tokenizer.apply_chat_template and compares token for token).
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
IMAGE_TOKEN = "<image>"

# LoRA on every linear layer of the LLM only: CLIP's attention has q/k/v_proj too, and a
# bare name list would put LoRA on the frozen vision tower as well.
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


class CLIPMLPView(nn.Module):
    """A CLIP MLP in the adapter layout (linear_1, act, linear_2), sharing its weights."""

    def __init__(self, mlp: nn.Module, activation_name: str):
        super().__init__()
        self.linear_1, self.act, self.linear_2 = mlp.fc1, mlp.activation_fn, mlp.fc2
        self.activation_name = activation_name

    def forward(self, x):  # x: [B, N, C]
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaLayout(FamilySpec):
    """Where the LLaVA-style models (LLaVA-1.5, -NeXT, -OneVision) keep their parts: the
    projector (linear_1, act, linear_2) and the vision tower and language model under
    `.model`; the vision encoder's MLPs as CLIP's (fc1, act, fc2)."""

    # -- the connector: transformers >= 4.52 keeps the projector under `.model`
    def get_connector(self, model):
        return unwrap(model).model.multi_modal_projector

    def connector_mlp(self, connector):
        return connector  # LlavaMultiModalProjector: linear_1, act, linear_2 already

    def stock_connector(self, adapter):
        return adapter  # a copy of the projector itself

    def language_model(self, model):
        return unwrap(model).model.language_model

    def vision_tower(self, model):
        return unwrap(model).model.vision_tower

    def vision_mlps(self, vision_tower):
        # transformers 5 keeps the encoder on the vision model itself; 4.x under .vision_model.
        layers = getattr(vision_tower, "vision_model", vision_tower).encoder.layers
        return [VisionMLP(layer, "mlp") for layer in layers]

    def vision_mlp_view(self, mlp, vision_tower):
        return CLIPMLPView(mlp, vision_tower.config.hidden_act)


class Llava15(LlavaLayout):
    name = "llava"
    model_types = ("llava",)
    vision_model_types = ("clip_vision_model",)
    display = "LLaVA-1.5"
    example_folder = "llava-hf/llava-1.5-7b-hf"
    lora_targets = LORA_TARGETS
    chat_template = CHAT_TEMPLATE

    def load(self, path, dtype, attn_implementation):
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype,
                                                             attn_implementation=attn_implementation)

    def from_config(self, config):
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration(config)

    def config_from_folder(self, path):
        from transformers import LlavaConfig

        return LlavaConfig.from_pretrained(path)

    def reference_config(self):
        """LLaVA-1.5-7B's architecture (CLIP ViT-L/14-336 and Vicuna-7B v1.5, as in llava-1.5-7b-hf)."""
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
        text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
        return LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000,
                           projector_hidden_act="gelu", vision_feature_layer=-2,
                           vision_feature_select_strategy="default")

    def realscale(self, layers, vision_layers, words):
        tok = self.tiny_tokenizer(words)
        config = self.reference_config()
        config.text_config.num_hidden_layers = layers
        config.vision_config.num_hidden_layers = max(vision_layers, 2)  # features from layer -2
        config.image_token_index = tok.convert_tokens_to_ids(IMAGE_TOKEN)
        config.text_config.pad_token_id = tok.pad_token_id
        side = config.vision_config.image_size
        return config, tok, self.tiny_image_processor(side), side

    def tiny_tokenizer(self, words):
        from pilot_hpc.data.tokenizer import build_word_tokenizer

        return build_word_tokenizer(words)

    def tiny_config(self, m, vocab_size: int, tokenizer=None, *, image_token_id: int | None = None,
                    pad_id: int | None = None):
        """The built-in tiny model's config; every size given explicitly: the defaults
        are CLIP-L and a 7B Llama. The ids from `tokenizer`, or given."""
        if tokenizer is not None:
            image_token_id, pad_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), tokenizer.pad_token_id
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

        vision = CLIPVisionConfig(
            hidden_size=m.vision_hidden, intermediate_size=4 * m.vision_hidden, num_hidden_layers=m.vision_layers,
            num_attention_heads=m.vision_heads, image_size=m.image_size, patch_size=m.patch_size,
            projection_dim=m.vision_hidden,
        )
        text = LlamaConfig(
            vocab_size=vocab_size, hidden_size=m.text_hidden, intermediate_size=m.text_intermediate,
            num_hidden_layers=m.text_layers, num_attention_heads=m.text_heads, num_key_value_heads=m.text_heads,
            max_position_embeddings=256, pad_token_id=pad_id, bos_token_id=2, eos_token_id=3,
            tie_word_embeddings=False,
        )
        return LlavaConfig(
            vision_config=vision, text_config=text, image_token_index=image_token_id,
            vision_feature_select_strategy="default", vision_feature_layer=-2, projector_hidden_act="gelu",
        )

    def tiny_image_processor(self, image_size: int):
        """CLIP's image processor (the PIL variant: no torchvision needed) at the tiny size."""
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        return CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                     crop_size={"height": image_size, "width": image_size})

    def set_connector(self, model, module):
        unwrap(model).model.multi_modal_projector = module

    def prompt(self, question, first, image_tokens):
        # The chat template's text with <image> already expanded to the image's tokens,
        # as LlavaProcessor expands it.
        image = IMAGE_TOKEN * image_tokens + "\n" if first else ""
        return f"USER: {image}{question} ASSISTANT:"

    def num_image_tokens(self, config):
        """Placeholders per image: (image/patch)^2, plus the CLS token with the 'full' strategy."""
        v = config.vision_config
        n = (v.image_size // v.patch_size) ** 2
        return n + (1 if config.vision_feature_select_strategy == "full" else 0)

    def shape_facts(self, config):
        t, v = config.text_config, config.vision_config
        return ShapeFacts(hidden=t.hidden_size, intermediate=t.intermediate_size, layers=t.num_hidden_layers,
                          heads=t.num_attention_heads, kv_heads=getattr(t, "num_key_value_heads", None) or 0,
                          vocab=t.vocab_size, vision_hidden=v.hidden_size,
                          image_tokens=(v.image_size // v.patch_size) ** 2)


LLAVA15 = Llava15()
