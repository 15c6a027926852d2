"""The measurement that validates the memory planner's activation model
(pilot_hpc/memory.py): the saved-tensor bytes of a LoRA'd Llama decoder stack, counted
on a real model, next to the planner's formula for the same shapes.
`python -m pilot_hpc.tools.memplan` prints both as JSON (tests/unit/test_memplan.py
and BENCHMARKS.md use the functions).
"""

from __future__ import annotations

import json

import torch

from pilot_hpc.memory import DTYPE_BYTES, Arch, llm_saved_bytes


def measure_saved_bytes(layers: int = 2, seq: int = 96, *, hidden: int = 4096, intermediate: int = 11008,
                        heads: int = 32, lora_r: int = 64, dtype=torch.bfloat16, seed: int = 0) -> dict:
    """Saved-tensor bytes of a LoRA'd Llama decoder stack (inputs_embeds requiring grad,
    as the connector's output does), batch 1: without checkpointing (total and per layer)
    and with non-reentrant checkpointing (forward). Unique storages, parameters excluded.
    Weights are random (seeded): the bytes do not depend on them."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaModel

    from pilot_hpc.model.build import quiet_checkpointing_deprecation

    quiet_checkpointing_deprecation()
    config = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max(seq, 256))
    torch.manual_seed(seed)
    base = LlamaModel(config).to(dtype)
    model = get_peft_model(base, LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.05,
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj"]))
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    layer_mods = list(base.layers)

    def run(checkpointing: bool) -> tuple[int, list[int]]:
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        seen: dict[int, int] = {}
        per_layer = [0] * layers
        where = {"layer": None}
        hooks = []
        for i, mod in enumerate(layer_mods):
            hooks.append(mod.register_forward_pre_hook(lambda _m, _a, i=i: where.__setitem__("layer", i)))
            hooks.append(mod.register_forward_hook(lambda *_: where.__setitem__("layer", None)))

        def pack(t):
            st = t.untyped_storage()
            key = st.data_ptr()
            if key not in params and key not in seen:
                seen[key] = st.nbytes()
                if where["layer"] is not None:
                    per_layer[where["layer"]] += st.nbytes()
            return t

        x = torch.randn(1, seq, hidden, dtype=dtype, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(inputs_embeds=x, use_cache=False).last_hidden_state
        del out
        for h in hooks:
            h.remove()
        if checkpointing:
            model.gradient_checkpointing_disable()
        return sum(seen.values()), per_layer

    total, per_layer = run(False)
    ckpt_forward, _ = run(True)
    return {"layers": layers, "seq": seq, "hidden": hidden, "intermediate": intermediate, "heads": heads,
            "lora_r": lora_r, "dtype": str(dtype).replace("torch.", ""), "saved": total, "per_layer": per_layer,
            # With checkpointing, backward recomputes one layer at a time and that layer
            # saves what it saves without checkpointing: the forward's inputs + the largest layer.
            "saved_checkpointed": ckpt_forward + max(per_layer), "checkpointed_forward": ckpt_forward}


def planner_saved_bytes(m: dict) -> dict:
    """The planner's numbers for the shapes of a measure_saved_bytes() result."""
    a = Arch(hidden=m["hidden"], intermediate=m["intermediate"], layers=m["layers"], heads=m["heads"], vocab=0,
             vision_hidden=0, image_tokens=0, source="measurement shapes")
    b = DTYPE_BYTES[m["dtype"]]
    return {"saved": llm_saved_bytes(a, m["seq"], m["lora_r"], b, False),
            "saved_checkpointed": llm_saved_bytes(a, m["seq"], m["lora_r"], b, True)}


if __name__ == "__main__":  # the measurement, as JSON (tests and BENCHMARKS.md use the functions)
    got = measure_saved_bytes()
    print(json.dumps({"measured": got, "planner": planner_saved_bytes(got)}, indent=1))
