"""One short client round at LLaVA-1.5-7B width on the GPU: throughput and peak memory
next to the memory planner's estimate for the same shapes (scripts/gpu_check.py calls it).

    python -m pilot_hpc.tools.realscale_round --out DIR [--layers 2] [--steps 12] [--batch 16]
    python -m pilot_hpc.tools.realscale_round --out DIR --tiny     # CPU, seconds (the unit test)

The model is built from config with random weights on the device: CLIP ViT-L/14-336
width (hidden 1024, 16 heads, 576 image tokens) and a Llama of hidden 4096, MLP 11008,
32 heads, vocab 32064, both at reduced depth; then the Pilot connector and LoRA r 64
(pilot_hpc.model.build.attach_pilot) in stage 1. Samples are random ids: 576 image
tokens and --text-tokens text tokens, the last quarter of them the answer. Training goes
through pilot_hpc.train.engines.train_steps with the planner's checkpointing and
accumulation; where this version's TrainSpec has no checkpointing switch it is set on
the model here (non-reentrant), and without an accumulation switch the engine takes the
whole batch at once: the JSON says which, and the planner's estimate uses the same.

Writes DIR/realscale_round.json and DIR/realscale_round.md. Exit 2 without CUDA (unless --tiny).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import torch

from pilot_hpc import jsonout, memory
from pilot_hpc.config import ModelConfig, PilotConfig, load_config

IMAGE_TOKEN = 32000  # LLaVA-1.5's <image> id (vocab 32064)


def build_config(tiny: bool, layers: int, vision_layers: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    if tiny:
        vision = CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=56, patch_size=14, projection_dim=64)
        text = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
        image_token = 500
    else:
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=vision_layers,
                                  num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
        text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                           num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
        image_token = IMAGE_TOKEN
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token,
                       projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default")


class RandomSamples(torch.utils.data.Dataset):
    """Random LLaVA training samples: the image placeholders, then text; the last quarter is the answer."""

    def __init__(self, n: int, image_tokens: int, image_token: int, text_tokens: int, vocab: int, image_size: int,
                 seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.items = []
        answer = max(1, text_tokens // 4)
        for _ in range(n):
            text = torch.randint(3, min(image_token, vocab), (text_tokens,), generator=gen).tolist()
            ids = [1] + [image_token] * image_tokens + text
            labels = [-100] * (len(ids) - answer) + text[-answer:]
            self.items.append({"input_ids": ids, "labels": labels,
                               "pixel_values": torch.randn(3, image_size, image_size, generator=gen)})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def run(args) -> dict:
    from transformers import LlavaForConditionalGeneration

    from pilot_hpc.model.build import PilotModel, attach_pilot, num_image_tokens, quiet_checkpointing_deprecation
    from pilot_hpc.progress import resident_bytes
    from pilot_hpc.train.engines import train_steps
    from pilot_hpc.train.spec import Hooks, TrainSpec

    quiet_checkpointing_deprecation()
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = "float32" if args.tiny else "bfloat16"
    config = build_config(args.tiny, args.layers, args.vision_layers)
    arch = memory.llava_arch(config, "built from config by realscale_round")
    image_tokens = num_image_tokens(config)
    seq = 1 + image_tokens + args.text_tokens
    m = ModelConfig(lora_r=8 if args.tiny else 64, lora_alpha=16 if args.tiny else 128, lora_dropout=0.05,
                    dtype=dtype)
    # The planner's config for these shapes: the paper's settings at this sequence length.
    cfg = load_config(None, [f"model.dtype={dtype}", f"model.lora_r={m.lora_r}", f"model.lora_alpha={m.lora_alpha}",
                             f"data.max_length={seq}", f"train.batch_size={args.batch}", "train.eval_batch_size=1",
                             "train.max_new_tokens=1", "train.gradient_checkpointing=true"])
    accum = 1
    for d in range(1, args.batch + 1):  # the planner's accumulation: the smallest that fits the device
        if args.batch % d == 0:
            accum = d
            if args.tiny or memory.estimate(cfg, arch, memory.parameter_bytes(cfg, config), checkpointing=True,
                                             accum=d).train_peak <= 0.9 * torch.cuda.get_device_properties(
                                                 device).total_memory:
                break
    fields = {f.name for f in dataclasses.fields(TrainSpec)}
    engine_ckpt, engine_accum = "gradient_checkpointing" in fields, "grad_accum_steps" in fields
    accum = accum if engine_accum else 1
    cfg = load_config(None, [f"model.dtype={dtype}", f"model.lora_r={m.lora_r}", f"model.lora_alpha={m.lora_alpha}",
                             f"data.max_length={seq}", f"train.batch_size={args.batch}", "train.eval_batch_size=1",
                             "train.max_new_tokens=1", "train.gradient_checkpointing=true",
                             f"train.grad_accum_steps={accum}", f"train.max_steps={args.steps}", "train.lr_stage1=2e-5"])
    est = memory.estimate(cfg, arch, memory.parameter_bytes(cfg, config), checkpointing=True, accum=accum)

    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with device:
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(old)
    peft_model, connector = attach_pilot(model, m, 3, 0, seed=0, pilot=PilotConfig())
    peft_model.to(device)
    pm = PilotModel(peft_model, connector, None, None, image_tokens)
    pm.set_stage(1)
    config.text_config.use_cache = False  # training: no KV cache (and no notice about it per step)
    if not engine_ckpt:
        peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    data = RandomSamples(args.batch * args.steps, image_tokens, config.image_token_index, args.text_tokens,
                         config.text_config.vocab_size, config.vision_config.image_size)
    spec = TrainSpec.for_round(cfg.train, stage=1, seed=0)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    stamps: list[float] = []

    def progress(step, terms):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stamps.append(time.perf_counter())

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    res = train_steps(peft_model, data, params, spec, pad_id=0, device=device,
                      hooks=Hooks(aux_loss=lambda: {k: 0.1 * v for k, v in connector.aux.items()}, progress=progress))
    # Steady state: from the end of the first step (warm-up, kernel selection) to the last.
    steady = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else res.seconds
    out = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (--tiny)",
        "tiny": args.tiny, "llm_layers": arch.layers, "hidden": arch.hidden, "vision_layers": args.vision_layers,
        "image_tokens": image_tokens, "tokens_per_sample": seq, "batch": args.batch, "micro_batch": est.micro_batch,
        "grad_accum_steps": accum, "dtype": dtype, "lora_r": m.lora_r, "steps": res.steps,
        "checkpointing": "engine (TrainSpec)" if engine_ckpt else "set on the model (this TrainSpec has no switch)",
        "accumulation": "engine" if engine_accum else "none (this TrainSpec has no switch): whole batch at once",
        "losses": res.losses, "finite": res.finite, "seconds": res.seconds, "seconds_per_step": steady,
        "samples_per_s": args.batch / steady, "tokens_per_s": args.batch * seq / steady,
        "planner_train_peak_bytes": est.train_peak, "planner_parts": est.parts,
    }
    if device.type == "cuda":
        out["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    else:
        out["resident_bytes"] = resident_bytes()
    return out


def markdown(r: dict) -> str:
    gib = 2 ** 30
    measured = (f"torch.cuda.max_memory_allocated {r['peak_allocated_bytes'] / gib:.2f} GiB"
                if "peak_allocated_bytes" in r else f"resident set {r['resident_bytes'] / gib:.2f} GiB (CPU)")
    rows = [("device", r["device"]),
            ("model", f"{'reduced width (--tiny)' if r['tiny'] else 'LLaVA-7B width'}, {r['llm_layers']} LLM layers (hidden {r['hidden']}), {r['vision_layers']} "
                      f"vision layers, {r['dtype']}, LoRA r {r['lora_r']}, stage 1"),
            ("shapes", f"batch {r['batch']} = {r['grad_accum_steps']} x micro-batch {r['micro_batch']}, "
                       f"{r['tokens_per_sample']} tokens per sample ({r['image_tokens']} image)"),
            ("checkpointing", r["checkpointing"]), ("accumulation", r["accumulation"]),
            ("steps", f"{r['steps']} ({r['seconds_per_step']:.3f} s per step after the first)"),
            ("throughput", f"{r['samples_per_s']:.2f} samples/s, {r['tokens_per_s']:.0f} tokens/s"),
            ("peak memory", measured),
            ("planner's training peak", f"{r['planner_train_peak_bytes'] / gib:.2f} GiB")]
    body = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"# Real-scale client round\n\n| | |\n|---|---|\n{body}\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pilot_hpc.tools.realscale_round", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder for realscale_round.json and .md")
    ap.add_argument("--tiny", action="store_true", help="2 layers at reduced width, 2 steps, on CPU")
    ap.add_argument("--layers", type=int, default=2, help="LLM layers (LLaVA-1.5-7B has 32)")
    ap.add_argument("--vision-layers", type=int, default=2, help="CLIP layers (ViT-L has 24; >= 2)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--text-tokens", type=int, default=100)
    a = ap.parse_args(argv)
    if a.tiny:
        a.steps, a.batch, a.text_tokens = min(a.steps, 2), min(a.batch, 4), min(a.text_tokens, 16)
    elif not torch.cuda.is_available():
        print("realscale_round: no CUDA device visible; run it on a GPU node, or with --tiny on CPU")
        return 2
    result = run(a)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "realscale_round.json"), "w") as fh:
        jsonout.dump(result, fh, indent=1)
    text = markdown(result)
    with open(os.path.join(a.out, "realscale_round.md"), "w") as fh:
        fh.write(text)
    print(text)
    return 0 if result["finite"] else 1


if __name__ == "__main__":
    sys.exit(main())
