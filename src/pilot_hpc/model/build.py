"""Build and load of any family's model, the Pilot connector in place of its connector,
LoRA via peft.

Every family goes through the same path: a local Hugging Face folder (tokenizer, image
processor, weights) loaded with from_pretrained, its family detected from config.json
(or model.family); what differs per family is behind pilot_hpc.model.families. For the
built-in tiny model that folder is made once by pilot_hpc.train.warm_start.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from dataclasses import dataclass

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoImageProcessor, AutoTokenizer

from pilot_hpc.config import ConfigError, ModelConfig, PilotConfig
from pilot_hpc.model import families
from pilot_hpc.model.connector import PilotConnector
from pilot_hpc.model.ct_clip import attach_ct_clip
from pilot_hpc.model.families import DTYPES, FamilySpec

log = logging.getLogger("pilot_hpc.model")

def quiet_checkpointing_deprecation() -> None:
    """Silences transformers 5's FutureWarning for the gradient_checkpointing names (now
    activation checkpointing): peft reads `is_gradient_checkpointing` at every model
    build, per rank, and the memory measurement calls the old enable/disable names.
    Nothing in pilot_hpc can act on the notice; every entry point calls this once."""
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*", category=FutureWarning)


def tiny_llava_config(m: ModelConfig, vocab_size: int, image_token_id: int, pad_id: int):
    """The built-in tiny model's config (a LLaVA-1.5: families/llava.py)."""
    return families.DEFAULT.tiny_config(m, vocab_size, image_token_id=image_token_id, pad_id=pad_id)


def num_image_tokens(config) -> int:
    """Visual tokens per image of a built model's config, by its family."""
    return families.get_by_config(config).num_image_tokens(config)


def load_base(path: str, dtype: str, attn_implementation: str = "sdpa", family: str = ""):
    """(model, tokenizer, image processor, family spec) from a local HF folder of a
    supported family: model.family (`family`) when set, else its config.json's model_type.

    attn_implementation (model.attn_implementation) applies to the LLM and the vision
    tower. sdpa is also what from_pretrained picks by itself for the tiny model (checked
    through config._attn_implementation of both sub-models), so the default gives the
    same results as loading without the argument.

    A folder transformers cannot load (another model's config.json, missing weights, a
    tokenizer it does not know) is bad input, a ConfigError naming the folder: transformers
    reports these as OSError or ValueError, which would otherwise pass for a bug here."""
    if attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError("model.attn_implementation=flash_attention_2 needs the flash-attn package (CUDA, "
                          "bf16/fp16 models), which is not installed: install it or set "
                          "model.attn_implementation=sdpa")
    spec = families.detect(path, family)
    try:
        model = spec.load(path, DTYPES[dtype], attn_implementation)
        tokenizer = AutoTokenizer.from_pretrained(path)
        image_processor = AutoImageProcessor.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"the {spec.display} folder {path} cannot be loaded ({type(err).__name__}: {err}): "
                          f"model.path must be a complete Hugging Face {spec.display} folder (e.g. a download of "
                          f"{spec.example_folder}); the built-in base model's folder under run.cache_dir is "
                          "rebuilt once deleted") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return model, tokenizer, image_processor, spec


def configure_generation(model, tokenizer) -> None:
    gc = model.generation_config
    gc.pad_token_id = tokenizer.pad_token_id
    gc.eos_token_id = tokenizer.eos_token_id
    gc.bos_token_id = tokenizer.bos_token_id
    gc.do_sample = False


@dataclass
class PilotModel:
    """A vision-language model of any family with the Pilot connector and LoRA, shared by
    the clients of one rank."""

    model: torch.nn.Module  # the peft model
    connector: PilotConnector
    tokenizer: object
    image_processor: object
    num_image_tokens: int
    family: FamilySpec = families.DEFAULT

    def prompt(self, question: str, first: bool = True) -> str:
        """One user turn as the family's chat template writes it (the image's tokens expanded)."""
        return self.family.prompt(question, first, self.num_image_tokens)

    def dataset_options(self) -> dict:
        """InstructionDataset's arguments that come from the family (prompt, image inputs)."""
        return self.family.dataset_options(self.tokenizer, families.unwrap(self.model).config)

    def __post_init__(self):
        # CT-CLIP's connectors (one per CLIP encoder MLP), found in the model in layer
        # order; none without pilot.ct_clip.
        self.clip_mlps = [m for m in self.model.modules() if isinstance(m, PilotConnector) and m is not self.connector]

    def pilot_modules(self) -> list[PilotConnector]:
        """Every module with the connector's treatment: the connector, then CT-CLIP's."""
        return [self.connector] + self.clip_mlps

    def set_task(self, task: int) -> None:
        """The task of the client being hosted (its own expert in CT-MoA)."""
        for m in self.pilot_modules():
            m.own_task = task

    def aux(self) -> dict[str, torch.Tensor]:
        """The auxiliary loss terms of the last forward. With CT-CLIP each term is the
        mean over the connector and the CLIP MLPs (so lambda_* keep their meaning)."""
        if not self.clip_mlps:
            return self.connector.aux
        terms: dict[str, list[torch.Tensor]] = {}
        for m in self.pilot_modules():
            for k, v in m.aux.items():
                terms.setdefault(k, []).append(v)
        return {k: torch.stack(v).mean() for k, v in terms.items()}

    def lora_named_parameters(self, adapter: str | None = None) -> list[tuple[str, torch.nn.Parameter]]:
        """Every LoRA parameter (all adapters), or only those of the named peft adapter
        (peft names them `...q_proj.lora_A.<adapter>.weight`; FedDPA has two)."""
        lora = [(n, p) for n, p in self.model.named_parameters() if "lora_" in n]
        if adapter is None:
            return lora
        return [(n, p) for n, p in lora if f".{adapter}." in n.split(".lora_", 1)[-1]]

    def set_stage(self, stage: int) -> None:
        for m in self.pilot_modules():
            m.set_stage(stage)
        for _, p in self.lora_named_parameters():
            p.requires_grad_(stage > 0)

    def trainable_names(self) -> list[str]:
        return [n for n, p in self.model.named_parameters() if p.requires_grad]

    # A client's personal state: the whole connector and its LoRA. Swapped in and out
    # when one rank hosts several clients; the frozen base is shared.
    def state_views(self) -> dict[str, torch.Tensor]:
        """The personal state's tensors themselves, detached, not copied: for reading only
        (hashing it, fl/participation.py:answers_key); get_state is the copy to keep."""
        state = {f"connector.{k}": v.detach() for k, v in self.connector.state_dict().items()}
        for i, m in enumerate(self.clip_mlps):
            state.update({f"ct_clip.{i}.{k}": v.detach() for k, v in m.state_dict().items()})
        state.update({f"lora.{n}": p.detach() for n, p in self.lora_named_parameters()})
        return state

    def get_state(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.state_views().items()}

    def set_state(self, state: dict[str, torch.Tensor]) -> None:
        self.connector.load_state_dict({k[len("connector."):]: v for k, v in state.items()
                                        if k.startswith("connector.")})
        for i, m in enumerate(self.clip_mlps):
            prefix = f"ct_clip.{i}."
            m.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        params = dict(self.lora_named_parameters())
        with torch.no_grad():
            for k, v in state.items():
                if k.startswith("lora."):
                    params[k[len("lora."):]].copy_(v)


def check_master_weights(pm: PilotModel) -> None:
    """Every parameter that can train (connector, LoRA: all adapters) is float32."""
    low = [n for n, p in pm.connector.named_parameters() if p.dtype != torch.float32]
    low += [n for n, p in pm.lora_named_parameters() if p.dtype != torch.float32]
    if low:
        raise RuntimeError(f"trainable parameters must be float32 master weights, but {len(low)} are not "
                           f"(e.g. {low[0]}): the bf16/fp16 path of model/build.py did not cast them")


def build_pilot_model(base_path: str, m: ModelConfig, num_tasks: int, own_task: int, *, seed: int,
                      device: torch.device, pilot=None) -> PilotModel:
    """`pilot`: the config section of Pilot's switches (PilotConfig); None for the defaults."""
    model, tokenizer, image_processor, spec = load_base(base_path, m.dtype, m.attn_implementation, m.family)
    configure_generation(model, tokenizer)
    peft_model, connector = attach_pilot(model, m, num_tasks, own_task, seed=seed, pilot=pilot or PilotConfig(),
                                         family=spec)
    peft_model.to(device)
    pm = PilotModel(peft_model, connector, tokenizer, image_processor, spec.num_image_tokens(model.config), spec)
    check_master_weights(pm)
    pm.set_stage(0)
    return pm


def attach_pilot(model, m: ModelConfig, num_tasks: int, own_task: int, *, seed: int, pilot,
                 family: FamilySpec | None = None):
    """The Pilot connector in place of the family's connector, then LoRA -> (peft model,
    connector). `family`: the model's family (found from its config when None)."""
    spec = family or families.of_model(model)
    connector = PilotConnector(spec.connector_mlp(spec.get_connector(model)), num_tasks, own_task, pilot=pilot,
                               ctmoa_impl=m.ctmoa_impl, seed=seed)
    spec.set_connector(model, connector)
    # Master weights in float32 (a no-op for a float32 model). Every connector weight is
    # trained in some stage or installed from the server's mix; kept in a bf16 model's
    # dtype, AdamW's updates of ~lr = 2e-5 on weights of ~0.02 fall below half a bf16 ulp
    # there (the ulp of 0.02 is 2^-13 = 1.2e-4) and round away. The connector computes
    # in float32 (it casts its input and output at its boundary, connector.py); peft
    # keeps LoRA in float32 on its own (autocast_adapter_dtype), which
    # build_pilot_model checks.
    connector.to(torch.float32)
    if pilot.ct_clip:
        if not spec.vision_model_types:  # the family presents no two-layer vision MLPs
            raise ConfigError(f"pilot.ct_clip=true: {spec.display}'s vision tower has no MLPs CT-CLIP can adapt "
                              "(README, model families); set pilot.ct_clip=false")
        for clip_mlp in attach_ct_clip(spec.vision_tower(model), num_tasks, own_task, pilot=pilot,
                                       ctmoa_impl=m.ctmoa_impl, seed=seed):
            clip_mlp.to(torch.float32)  # master weights, as the connector's
    # The LoRA init draws random A matrices: seed it so every rank builds the same model.
    torch.manual_seed(seed)
    lora = LoraConfig(r=m.lora_r, lora_alpha=m.lora_alpha, lora_dropout=m.lora_dropout,
                      target_modules=spec.lora_targets, bias="none")
    return get_peft_model(model, lora), connector
