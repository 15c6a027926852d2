"""The model-family contract: everything pilot_hpc needs to know about one family of
Hugging Face vision-language models, in one object (after torchtitan's ModelSpec).

Why one seam: the rest of pilot_hpc (fl/, train/, metrics/, checkpoint/, the export,
the planner) handles every family alike through a FamilySpec and never names a family's
classes or attributes (tests/unit/test_families.py greps for them). A new family is one
module in this package and one entry in its registry (families/__init__.py).

The contract, per family:
- identity: `name` (what `model.family` selects) and the config.json `model_types` it
  is detected from;
- build and load: `load` (from_pretrained of a local folder), `from_config` (random
  weights, also on the meta device for the planner), `config_from_folder`,
  `reference_config` (the 7B-class shapes the planner falls back to);
- the connector: `get_connector` / `set_connector` (where it sits in the model) and
  `connector_mlp` (the connector as an MLP in the adapter layout below, the module the
  Pilot connector copies into its task, client and cross-task adapters);
- LoRA: `lora_targets` (a regex over module names, the language model's linears only);
- activation checkpointing: `language_model`;
- CT-CLIP: `vision_tower`, `vision_mlps` (where the vision encoder's MLPs sit) and
  `vision_mlp_view` (one of them in the adapter layout);
- prompts and images: `prompt` (the text of one user turn, as the family's chat
  template writes it), `num_image_tokens` (visual tokens per image), `image_processor`
  facts through `image_inputs`;
- shapes for the memory planner: `shape_facts`.

The adapter layout: a module with `linear_1`, `act`, `linear_2` (and, optionally,
`activation_name`), computing linear_2(act(linear_1(x))) over the last dimension. It is
the Pilot connector's own contract (model/connector.py), not a family's: each family
presents its connector MLP that way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ShapeFacts:
    """The sizes the memory planner and the kernel's cost model need."""

    hidden: int  # the language model's
    intermediate: int
    layers: int
    heads: int
    vocab: int
    vision_hidden: int  # the connector's input width
    image_tokens: int  # visual tokens of one image at the planned resolution
    kv_heads: int = 0  # key/value heads (grouped-query attention); 0: as many as heads
    # the connector MLP's hidden width (vision_hidden -> connector_hidden -> hidden); 0: hidden
    connector_hidden: int = 0


@dataclass(frozen=True)
class VisionMLP:
    """Where one MLP of the vision encoder sits, for CT-CLIP: `owner.<attr>`."""

    owner: nn.Module
    attr: str


class FamilySpec:
    """A family's facts and operations (see the module docstring). Subclasses implement
    every method; the defaults here raise, so a missing piece fails loudly."""

    name: str = ""
    model_types: tuple[str, ...] = ()
    # config.json model_type of the vision tower, for CT-CLIP on a bare tower
    vision_model_types: tuple[str, ...] = ()
    display: str = ""  # for messages: "LLaVA-1.5", ...
    example_folder: str = ""  # a Hub name whose download is such a folder

    # -- build and load
    def _classes(self):
        """(config class, model class) of the family's transformers implementation,
        imported when first needed (importing every family's classes costs seconds)."""
        raise NotImplementedError

    def load(self, path: str, dtype: torch.dtype, attn_implementation: str) -> nn.Module:
        return self._classes()[1].from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)

    def from_config(self, config) -> nn.Module:
        return self._classes()[1](config)

    def config_from_folder(self, path: str):
        return self._classes()[0].from_pretrained(path)

    def reference_config(self):
        raise NotImplementedError

    def tiny(self, m, words: list[str]):
        """(config, tokenizer, image processor) of the built-in tiny model of this family:
        the model section's sizes (config.ModelConfig), a word-level tokenizer over
        `words` with the family's special tokens."""
        tokenizer = self.tiny_tokenizer(words)
        return self.tiny_config(m, len(tokenizer), tokenizer), tokenizer, self.tiny_image_processor(m.image_size)

    def tiny_tokenizer(self, words: list[str]):
        raise NotImplementedError

    def tiny_config(self, m, vocab_size: int, tokenizer):
        raise NotImplementedError

    def tiny_image_processor(self, image_size: int):
        raise NotImplementedError

    # -- the connector
    def get_connector(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def set_connector(self, model: nn.Module, module: nn.Module) -> None:
        raise NotImplementedError

    def connector_mlp(self, connector: nn.Module) -> nn.Module:
        raise NotImplementedError

    def stock_connector(self, adapter: nn.Module) -> nn.Module:
        """An adapter (the connector_mlp layout) back as the family's own connector
        module, so that a merged folder loads with transformers alone."""
        raise NotImplementedError

    # -- LoRA, checkpointing, CT-CLIP
    lora_targets: str = ""

    def language_model(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def vision_tower(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def vision_mlps(self, vision_tower: nn.Module) -> list[VisionMLP]:
        raise NotImplementedError

    def vision_mlp_view(self, mlp: nn.Module, vision_tower: nn.Module) -> nn.Module:
        """One of those MLPs in the adapter layout, sharing its weights."""
        raise NotImplementedError

    # -- prompts and images
    def prompt(self, question: str, first: bool, image_tokens: int) -> str:
        """The user turn (the first with its image, expanded to image_tokens placeholders)
        up to where the answer starts, as the family's chat template writes it."""
        raise NotImplementedError

    def num_image_tokens(self, config) -> int:
        """Visual tokens per image (for families whose count varies: at the config's
        planning resolution; image_inputs gives each image's own)."""
        raise NotImplementedError

    # (image processor, image) -> dict of the image's model inputs plus its
    # "num_image_tokens"; None: one [3, S, S] pixel_values per image, a fixed count.
    image_inputs = None
    answer_sep = " "  # what joins a prompt and its answer in the chat template's text

    # tokens whose modality type the model wants as mm_token_type_ids (1: image); () none
    mm_tokens: tuple[str, ...] = ()

    def dataset_options(self, tokenizer, config=None) -> dict:
        """InstructionDataset's family-given arguments (picklable: DataLoader workers).
        config: the model's, for families whose per-image token count depends on it."""
        types = {tokenizer.convert_tokens_to_ids(t): 1 for t in self.mm_tokens} if self.mm_tokens else None
        return {"prompt": self.prompt, "image_inputs": self.image_inputs, "answer_sep": self.answer_sep,
                "mm_token_types": types}

    def tokens_of_image_inputs(self, inputs: dict) -> int:
        return int(inputs["num_image_tokens"])

    # -- the planner
    def shape_facts(self, config) -> ShapeFacts:
        raise NotImplementedError

    # -- the GPU check's reduced-depth round at real width (tools/realscale_round.py)
    def realscale(self, layers: int, vision_layers: int, words: list[str]):
        """(config, tokenizer, image processor, image side): the family's 7B-class
        reference architecture with `layers` LLM and `vision_layers` vision layers, the
        tiny word-level tokenizer over `words` (the model keeps the 7B vocabulary size:
        the tokenizer's ids are a subset), the family's image processor at the real
        patch settings, and the square image side that gives the planner's visual-token
        count."""
        raise NotImplementedError(f"{self.display}: no real-width round is prepared for this family")


def vision_depth(vision_layers: int, feature_layer) -> int:
    """Vision layers for a reduced-depth tower (FamilySpec.realscale) whose features come
    from `feature_layer` (an index into hidden_states, or a list of them): hidden_states
    holds the embeddings, then each layer's output, so index -k (or k) is a layer's
    output, not the embeddings or out of range, only with k layers or more."""
    indexes = [feature_layer] if isinstance(feature_layer, int) else list(feature_layer)
    return max([vision_layers] + [abs(int(i)) for i in indexes])


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
