"""The registry of model families (base.py: the contract) and their detection from a
folder's config.json."""

from __future__ import annotations

import json
import os

from pilot_hpc.config import ConfigError
from pilot_hpc.model.families.base import DTYPES, FamilySpec, ShapeFacts, VisionMLP, unwrap
from pilot_hpc.model.families.internvl import INTERNVL
from pilot_hpc.model.families.llava import LLAVA15
from pilot_hpc.model.families.llava_onevision import LLAVA_NEXT, LLAVA_ONEVISION
from pilot_hpc.model.families.qwen_vl import QWEN2_5_VL, QWEN2_VL

FAMILIES: dict[str, FamilySpec] = {s.name: s for s in (LLAVA15, QWEN2_5_VL, QWEN2_VL, LLAVA_ONEVISION,
                                                        LLAVA_NEXT, INTERNVL)}
# The built-in tiny model (model.path empty) is a LLaVA-1.5.
DEFAULT = LLAVA15

__all__ = ["DTYPES", "FAMILIES", "FamilySpec", "ShapeFacts", "VisionMLP", "unwrap", "get", "detect", "of_model",
           "of_vision_tower", "get_by_config"]


def built_in(family: str = "") -> FamilySpec:
    """The family of the built-in tiny model: model.family, LLaVA-1.5 when empty."""
    return get(family) if family else DEFAULT


def get(name: str) -> FamilySpec:
    if name not in FAMILIES:
        raise ConfigError(f"model.family={name!r} is not a known family; known: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


def _by_model_type(model_type: str | None) -> FamilySpec | None:
    return next((s for s in FAMILIES.values() if model_type in s.model_types), None)


def detect(path: str, override: str = "") -> FamilySpec:
    """The family of a model folder: model.family when set, else config.json's
    model_type; the built-in tiny model's family when there is no folder."""
    if override:
        return get(override)
    if not path:
        return DEFAULT
    config_file = os.path.join(path, "config.json")
    try:
        with open(config_file) as fh:
            model_type = json.load(fh).get("model_type")
    except (OSError, ValueError):
        return DEFAULT  # no readable config.json: the loader reports the folder itself
    spec = _by_model_type(model_type)
    if spec is None:
        raise ConfigError(f"{config_file}: model_type {model_type!r} is not a supported family (supported model "
                          f"types: {', '.join(t for s in FAMILIES.values() for t in s.model_types)}); set "
                          "model.family to load it as one of them")
    return spec


def of_model(model) -> FamilySpec:
    """The family of a built model (peft-wrapped or not), from its config's model_type."""
    model_type = getattr(unwrap(model).config, "model_type", None)
    spec = _by_model_type(model_type)
    if spec is None:
        raise ValueError(f"{type(unwrap(model)).__name__} (model_type {model_type!r}) is no supported family")
    return spec


def get_by_config(config) -> FamilySpec:
    """The family of a model config (its model_type)."""
    spec = _by_model_type(getattr(config, "model_type", None))
    if spec is None:
        raise ValueError(f"{type(config).__name__} (model_type {getattr(config, 'model_type', None)!r}) is no "
                         "supported family")
    return spec


def of_vision_tower(tower) -> FamilySpec:
    model_type = getattr(tower.config, "model_type", None)
    spec = next((s for s in FAMILIES.values() if model_type in s.vision_model_types), None)
    if spec is None:
        raise ValueError(f"CT-CLIP: vision tower {type(tower).__name__} (model_type {model_type!r}) has no family "
                         "that presents its MLPs")
    return spec
