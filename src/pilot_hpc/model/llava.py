"""Earlier name of pilot_hpc.model.build (kept so that imports of earlier versions, and
runs' scripts, keep working); the LLaVA-1.5 family itself is model/families/llava.py."""

from pilot_hpc.model.build import (PilotModel, attach_pilot, build_pilot_model, check_master_weights,  # noqa: F401
                                   configure_generation, load_base, num_image_tokens,
                                   quiet_checkpointing_deprecation, tiny_llava_config)
from pilot_hpc.model.families import DTYPES  # noqa: F401
from pilot_hpc.model.families.llava import LORA_TARGETS  # noqa: F401
