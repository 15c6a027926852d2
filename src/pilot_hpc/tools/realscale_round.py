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

With --family the planner's estimate takes the round's visual tokens per image, which
the JSON gives beside the family's planned image's (planned_image_tokens); they differ
only where the round's square image cannot have the planned count (InternVL's 4 x 3
tiles: the round's image has 3 x 3 and the thumbnail).

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


def plan(args, config, arch, m: ModelConfig, seq: int, device, engine_accum: bool):
    """(the planner's config for these shapes, accumulation, its estimate): the paper's
    settings at this sequence length, with the smallest accumulation that fits the device."""
    def config_for(accum: int):
        return load_config(None, [f"model.dtype={m.dtype}", f"model.lora_r={m.lora_r}", f"model.lora_alpha={m.lora_alpha}",
                                  f"data.max_length={seq}", f"train.batch_size={args.batch}", "train.eval_batch_size=1",
                                  "train.max_new_tokens=1", "train.gradient_checkpointing=true",
                                  f"train.grad_accum_steps={accum}", f"train.max_steps={args.steps}",
                                  "train.lr_stage1=2e-5"])

    cfg, accum = config_for(1), 1
    for d in range(1, args.batch + 1):
        if args.batch % d == 0:
            accum = d
            if args.tiny or memory.estimate(cfg, arch, memory.parameter_bytes(cfg, config), checkpointing=True,
                                             accum=d).train_peak <= 0.9 * torch.cuda.get_device_properties(
                                                 device).total_memory:
                break
    accum = accum if engine_accum else 1
    cfg = config_for(accum)
    return cfg, accum, memory.estimate(cfg, arch, memory.parameter_bytes(cfg, config), checkpointing=True, accum=accum)


def llava_setup(args, dtype: str):
    """The default round: LLaVA-1.5 at 7B width from build_config, random ids as samples."""
    config = build_config(args.tiny, args.layers, args.vision_layers)
    image_tokens = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    data = RandomSamples(args.batch * args.steps, image_tokens, config.image_token_index, args.text_tokens,
                         config.text_config.vocab_size, config.vision_config.image_size)
    return config, data, image_tokens, 1 + image_tokens + args.text_tokens, 0


def family_setup(args, dtype: str, workdir: str):
    """--family: the family's 7B-class architecture at reduced depth (FamilySpec.realscale;
    with --tiny its built-in tiny model), and samples through the family's own data path:
    random images of the planned side through its image processor, random words of the
    synthetic vocabulary through its chat template (InstructionDataset, as a run's)."""
    import numpy as np
    from PIL import Image

    from pilot_hpc.data import synthetic
    from pilot_hpc.data.records import InstructionDataset, Sample
    from pilot_hpc.model import families

    spec = families.get(args.family)
    words = synthetic.vocabulary()
    if args.tiny:
        m = ModelConfig(family=args.family)
        (config, tok, proc), side = spec.tiny(m, words), m.image_size
    else:
        config, tok, proc, side = spec.realscale(args.layers, args.vision_layers, words)
    rng = np.random.default_rng(0)
    plain = [w for w in words if w.isalpha()]
    # A few random images, shared round-robin: the shapes, not the pixels, set the cost,
    # and encoding a large PNG per sample (InternVL's 1344 px) would eat the check's time.
    paths = [os.path.join(workdir, f"image_{i}.png") for i in range(min(4, args.batch * args.steps))]
    for path in paths:
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(path)
    samples = []
    for i in range(args.batch * args.steps):
        answer = max(1, args.text_tokens // 4)
        samples.append(Sample(id=str(i), image_path=paths[i % len(paths)],
                              turns=[(" ".join(rng.choice(plain, args.text_tokens - answer)),
                                      " ".join(rng.choice(plain, answer)))]))
    options = spec.dataset_options(tok, config)
    image_tokens = spec.num_image_tokens(config)
    if options["image_inputs"] is not None:  # a count that follows the image: this side's
        image_tokens = spec.tokens_of_image_inputs(options["image_inputs"](proc, Image.open(paths[0])))
    data = InstructionDataset(samples, tok, proc, image_tokens, 4 * (image_tokens + args.text_tokens) + 64,
                              **options)
    seq = len(data[0]["input_ids"])
    return config, data, image_tokens, seq, tok.pad_token_id


def useful_flops(model, data, micro_batch: int, pad_id: int, device) -> int:
    """FLOPs of one forward and backward of a micro-batch with nothing recomputed
    (torch.utils.flop_counter, checkpointing off for the count): the forward, the
    activation gradients and the trainable weights' gradients (the frozen weights get
    none). Attention's matmuls count as the counter sees them."""
    from torch.utils.flop_counter import FlopCounterMode

    from pilot_hpc.data.records import collate_train

    batch = collate_train([data[i] for i in range(micro_batch)], pad_id)
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    was = getattr(model, "is_gradient_checkpointing", False)
    if was:
        model.gradient_checkpointing_disable()
    counter = FlopCounterMode(display=False)
    with counter:
        model(**{k: v for k, v in batch.items() if k != "unreadable"}).loss.backward()
    model.zero_grad(set_to_none=True)
    if was:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return counter.get_total_flops()


def run(args) -> dict:
    import tempfile

    from pilot_hpc.model import families
    from pilot_hpc.model.build import PilotModel, attach_pilot, quiet_checkpointing_deprecation
    from pilot_hpc.progress import resident_bytes
    from pilot_hpc.train.engines import train_steps
    from pilot_hpc.train.spec import Hooks, TrainSpec

    quiet_checkpointing_deprecation()
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = "float32" if args.tiny else "bfloat16"
    workdir = tempfile.mkdtemp(prefix="realscale-")
    if args.family:
        config, data, image_tokens, seq, pad_id = family_setup(args, dtype, workdir)
    else:
        config, data, image_tokens, seq, pad_id = llava_setup(args, dtype)
    spec = families.get_by_config(config)
    # The planner's sizes for the round's own shapes: its per-image visual tokens are the
    # round's image's, which differ from the family's planned image where a square image
    # cannot have that count (InternVL: FamilySpec.realscale).
    planned = memory.llava_arch(config, "built from config by realscale_round")
    arch = dataclasses.replace(planned, image_tokens=image_tokens)
    m = ModelConfig(lora_r=8 if args.tiny else 64, lora_alpha=16 if args.tiny else 128, lora_dropout=0.05,
                    dtype=dtype)
    fields = {f.name for f in dataclasses.fields(TrainSpec)}
    engine_ckpt, engine_accum = "gradient_checkpointing" in fields, "grad_accum_steps" in fields
    cfg, accum, est = plan(args, config, arch, m, seq, device, engine_accum)

    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with device:
            model = spec.from_config(config)
    finally:
        torch.set_default_dtype(old)
    peft_model, connector = attach_pilot(model, m, 3, 0, seed=0, pilot=PilotConfig(), family=spec)
    peft_model.to(device)
    pm = PilotModel(peft_model, connector, None, None, image_tokens, spec)
    pm.set_stage(1)
    config.text_config.use_cache = False  # training: no KV cache (and no notice about it per step)
    if not engine_ckpt:
        peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tspec = TrainSpec.for_round(cfg.train, stage=1, seed=0)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    stamps: list[float] = []

    def progress(step, terms):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stamps.append(time.perf_counter())

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    res = train_steps(peft_model, data, params, tspec, pad_id=pad_id, device=device,
                      hooks=Hooks(aux_loss=lambda: {k: 0.1 * v for k, v in connector.aux.items()}, progress=progress))
    # Steady state: from the end of the first step (warm-up, kernel selection) to the last.
    steady = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else res.seconds
    out = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (--tiny)",
        "family": spec.name, "tiny": args.tiny, "llm_layers": arch.layers, "hidden": arch.hidden,
        "vision_layers": args.vision_layers,
        "image_tokens": image_tokens, "planned_image_tokens": planned.image_tokens, "tokens_per_sample": seq,
        "batch": args.batch, "micro_batch": est.micro_batch,
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
    # MFU: useful FLOPs per step (a micro-batch's count times the batch's micro-batches) over
    # the step's time and the device's dense bf16 peak (none on CPU).
    flops = useful_flops(peft_model, data, min(est.micro_batch, len(data)), pad_id, device)
    out["useful_flops_per_step"] = flops * args.batch / min(est.micro_batch, len(data))
    out["useful_tflops_per_s"] = out["useful_flops_per_step"] / steady / 1e12
    peak = peak_tflops(out["device"], getattr(torch, dtype))
    out["mfu"] = None if peak is None else out["useful_tflops_per_s"] / peak
    return out


def peak_tflops(device_name: str, dtype: torch.dtype) -> float | None:
    """The device's dense peak (TFLOP/s) in `dtype`, as the kernel benchmark reads it."""
    try:
        from pilot_hpc_kernels.benchmark_ctmoa import peak_tflops as peak
    except ImportError:
        return None
    return peak(device_name, dtype)


def planned_note(r: dict) -> str:
    """The family's planned image's visual tokens, where the round's image has others."""
    planned = r.get("planned_image_tokens", r["image_tokens"])
    return "" if planned == r["image_tokens"] else f"; planned image: {planned}"


def markdown(r: dict) -> str:
    gib = 2 ** 30
    measured = (f"torch.cuda.max_memory_allocated {r['peak_allocated_bytes'] / gib:.2f} GiB"
                if "peak_allocated_bytes" in r else f"resident set {r['resident_bytes'] / gib:.2f} GiB (CPU)")
    rows = [("device", r["device"]),
            ("model", f"{r['family']}, {'reduced width (--tiny)' if r['tiny'] else '7B-class width'}, {r['llm_layers']} LLM layers (hidden {r['hidden']}), {r['vision_layers']} "
                      f"vision layers, {r['dtype']}, LoRA r {r['lora_r']}, stage 1"),
            ("shapes", f"batch {r['batch']} = {r['grad_accum_steps']} x micro-batch {r['micro_batch']}, "
                       f"{r['tokens_per_sample']} tokens per sample ({r['image_tokens']} image{planned_note(r)})"),
            ("checkpointing", r["checkpointing"]), ("accumulation", r["accumulation"]),
            ("steps", f"{r['steps']} ({r['seconds_per_step']:.3f} s per step after the first)"),
            ("throughput", f"{r['samples_per_s']:.2f} samples/s, {r['tokens_per_s']:.0f} tokens/s"),
            ("useful compute", f"{r['useful_tflops_per_s']:.2f} TFLOP/s (forward, activation and trainable-weight "
                               "gradients, nothing recomputed); MFU "
                               + ("n/a (no peak known for this device)" if r["mfu"] is None else f"{r['mfu']:.1%}")),
            ("peak memory", measured),
            ("planner's training peak", f"{r['planner_train_peak_bytes'] / gib:.2f} GiB")]
    body = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"# Real-scale client round\n\n| | |\n|---|---|\n{body}\n"


def prepared_families() -> list[str]:
    """The families whose FamilySpec prepares a real-width round (FamilySpec.realscale)."""
    from pilot_hpc.model import families

    return [name for name, spec in families.FAMILIES.items()
            if type(spec).realscale is not families.FamilySpec.realscale]


def run_all(a) -> int:
    """--family all: one round per prepared family, one after the other, into one JSON
    (a list) and one Markdown table (the GPU check brings back few files)."""
    import gc

    results = []
    for name in prepared_families():
        print(f"realscale_round: {name} ...", flush=True)
        try:
            results.append(run(argparse.Namespace(**{**vars(a), "family": name})))
        except Exception as err:  # one family's failure must not hide the others' numbers
            results.append({"family": name, "error": f"{type(err).__name__}: {err}", "finite": False})
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "realscale_families.json"), "w") as fh:
        jsonout.dump(results, fh, indent=1)
    gib = 2 ** 30
    rows = ["| family | LLM layers x hidden | tokens per sample (image) | batch = accum x micro | tokens/s | "
            "useful TFLOP/s | MFU | peak memory GiB | planner's training peak GiB |",
            "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['family']} | failed: {r['error'][:200]} | | | | | | | |")
            continue
        peak = r.get("peak_allocated_bytes", r.get("resident_bytes", 0)) / gib
        mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
        rows.append(f"| {r['family']} | {r['llm_layers']} x {r['hidden']} | {r['tokens_per_sample']} "
                    f"({r['image_tokens']}{planned_note(r)}) | {r['batch']} = {r['grad_accum_steps']} x {r['micro_batch']} | "
                    f"{r['tokens_per_s']:.0f} | {r['useful_tflops_per_s']:.2f} | {mfu} | {peak:.2f} | "
                    f"{r['planner_train_peak_bytes'] / gib:.2f} |")
    done = next((r for r in results if "device" in r), {"device": "?", "dtype": "?", "lora_r": "?", "tiny": a.tiny})
    width = "reduced widths (--tiny)" if done["tiny"] else "7B-class widths"
    text = (f"# Real-width client round per family\n\nDevice: {done['device']}. Stage 1, reduced depth, {width}, "
            f"{done['dtype']}, LoRA r {done['lora_r']}, activation checkpointing; MFU = useful FLOPs (forward, "
            "activation and trainable-weight gradients; nothing recomputed) per second over the device's dense "
            "bf16 peak.\n\n"
            + "\n".join(rows) + "\n")
    with open(os.path.join(a.out, "realscale_families.md"), "w") as fh:
        fh.write(text)
    print(text)
    return 0 if all(r["finite"] for r in results) else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pilot_hpc.tools.realscale_round", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder for realscale_round.json and .md")
    ap.add_argument("--tiny", action="store_true", help="2 layers at reduced width, 2 steps, on CPU")
    ap.add_argument("--layers", type=int, default=2, help="LLM layers (LLaVA-1.5-7B has 32)")
    ap.add_argument("--vision-layers", type=int, default=2, help="CLIP layers (ViT-L has 24; >= 2)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--text-tokens", type=int, default=100)
    ap.add_argument("--family", default="", help="a model family (model/families): its 7B-class widths at reduced "
                                                 "depth through its own data path; 'all': every family that "
                                                 "prepares one; default: LLaVA-1.5 with random ids")
    a = ap.parse_args(argv)
    if a.tiny:
        a.steps, a.batch, a.text_tokens = min(a.steps, 2), min(a.batch, 4), min(a.text_tokens, 16)
    elif not torch.cuda.is_available():
        print("realscale_round: no CUDA device visible; run it on a GPU node, or with --tiny on CPU")
        return 2
    if a.family == "all":
        return run_all(a)
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
