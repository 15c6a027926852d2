"""Training benchmarks for BENCHMARKS.md: (a) the data-wait fraction of a training step
reading real JPEG files, DataLoader workers 0 against 2; (b) saved-activation bytes per
sample at 7B width with and without checkpointing, next to the memory planner.

    python -m pilot_hpc.tools.bench_train --out BENCHMARKS.md [--steps 6] [--batch 4]

It replaces its own section of --out (between its markers) or appends one.

(a) reads its batches through the engines' own input pipeline
(pilot_hpc.train.loader.micro_batch_stream, on the training thread or in data.num_workers
processes) over InstructionDataset items (cache_images off: every item decodes its JPEG
and runs the CLIP image processor), and times the wait for each batch against the step
(forward, backward, AdamW) of a mid-size LLaVA-shaped model with the Pilot connector and
LoRA in stage 1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

from pilot_hpc import jsonout
from pilot_hpc import memory
from pilot_hpc.tools import memplan

START, END = "<!-- bench_train: start -->", "<!-- bench_train: end -->"


def machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            name = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} CPU cores visible, torch {torch.__version__}, no GPU"


def write_jpegs(folder: str, n: int, seed: int = 0) -> list[str]:
    """n photo-sized (640 x 480) JPEGs: smooth colour fields plus noise, so decoding costs
    what a real photo's does rather than a flat image's."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:480, 0:640]
    paths = []
    for i in range(n):
        base = np.stack([np.sin(xx / rng.uniform(20, 80) + c) * np.cos(yy / rng.uniform(20, 80)) for c in range(3)], -1)
        img = ((base + 1) * 100 + rng.normal(0, 20, base.shape)).clip(0, 255).astype(np.uint8)
        path = os.path.join(folder, f"img_{i:03d}.jpg")
        Image.fromarray(img).save(path, quality=90)
        paths.append(path)
    return paths


def build(vision_layers: int, text_layers: int):
    """(peft model, connector, dataset maker, pad id): CLIP-B/16-like tower at 336 px (441
    image tokens) and a small Llama, the synthetic world's word tokenizer."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, \
        LlavaForConditionalGeneration

    from pilot_hpc.config import ModelConfig, PilotConfig
    from pilot_hpc.data import synthetic
    from pilot_hpc.data.tokenizer import build_word_tokenizer
    from pilot_hpc.model.build import attach_pilot, num_image_tokens

    tok = build_word_tokenizer(synthetic.vocabulary())
    vision = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=vision_layers,
                              num_attention_heads=12, image_size=336, patch_size=16, projection_dim=512)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=512, intermediate_size=1376, num_hidden_layers=text_layers,
                       num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024,
                       pad_token_id=tok.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                         projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    peft_model, connector = attach_pilot(model, ModelConfig(lora_r=8, lora_alpha=16), 3, 0, seed=0,
                                         pilot=PilotConfig())
    processor = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    return peft_model, connector, tok, processor, num_image_tokens(config)


def data_wait(args) -> list[dict]:
    from pilot_hpc.data.records import InstructionDataset, Sample
    from pilot_hpc.model.build import PilotModel
    from pilot_hpc.train.loader import close_loaders, micro_batch_stream

    torch.set_num_threads(1)  # run.threads_per_rank's default: one training thread per rank
    peft_model, connector, tok, processor, image_tokens = build(args.vision_layers, args.text_layers)
    pm = PilotModel(peft_model, connector, tok, processor, image_tokens)
    pm.set_stage(1)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        paths = write_jpegs(folder, args.batch * (args.steps + 1))
        samples = [Sample(id=str(i), image_path=p, turns=[("what color is the object at the top left ?", "red")])
                   for i, p in enumerate(paths)]
        ds = InstructionDataset(samples, tok, processor, image_tokens, max_length=image_tokens + 64, cache_pixels=False)
        plan = [list(range(i * args.batch, (i + 1) * args.batch)) for i in range(args.steps + 1)]
        for workers in (0, 2):
            waits, steps = [], []
            it = micro_batch_stream(ds, plan, pad_id=tok.pad_token_id, num_workers=workers,
                                    device=torch.device("cpu"))
            peft_model.train()
            for i in range(args.steps + 1):
                t0 = time.perf_counter()
                batch = next(it)
                t1 = time.perf_counter()
                out = peft_model(**batch)
                loss = out.loss + sum(0.1 * v for v in connector.aux.values())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                t2 = time.perf_counter()
                if i > 0:  # the first batch also starts the workers
                    waits.append(t1 - t0)
                    steps.append(t2 - t1)
            it.close()
            close_loaders()
            wait, step = sum(waits), sum(steps)
            rows.append({"num_workers": workers, "steps": len(steps), "wait_s": wait, "compute_s": step,
                         "wait_fraction": wait / (wait + step), "step_s": (wait + step) / len(steps)})
    return rows


def activations(args) -> dict:
    got = memplan.measure_saved_bytes(layers=2, seq=args.seq)
    return {"measured": got, "planner": memplan.planner_saved_bytes(got)}


def markdown(wait_rows: list[dict], act: dict, args, seconds: float) -> str:
    m, p = act["measured"], act["planner"]
    mib = 2 ** 20
    lines = [START, "# Training benchmarks: data wait and saved activations", "",
             f"`python -m pilot_hpc.tools.bench_train --out BENCHMARKS.md --steps {args.steps} --batch {args.batch} "
             f"--seq {args.seq}` ({seconds:.0f} s), one run, on: {machine()}. The machine's 2 cores were shared "
             "with other jobs while it ran: ratios from one run, not absolute speeds.", "",
             "## Data wait of a training step (the engines' input pipeline, real JPEG files)", "",
             f"CLIP-B/16-like tower ({args.vision_layers} layers, hidden 768, 336 px: 441 image tokens), a "
             f"{args.text_layers}-layer Llama (hidden 512), Pilot connector + LoRA r 8, stage 1, float32, batch "
             f"{args.batch}, one training thread; every item decodes a 640 x 480 JPEG and runs the CLIP image "
             "processor (no image cache). Wait: time blocked on the next batch; step: forward + backward + AdamW; "
             "the first step (worker start-up) left out. Batches come through `train.loader.micro_batch_stream`, "
             "as the engines read them (`data.num_workers` worker processes, or the training thread for 0).", "",
             "| num_workers | steps | wait (s) | step compute (s) | wait fraction |", "|---|---|---|---|---|"]
    lines += [f"| {r['num_workers']} | {r['steps']} | {r['wait_s']:.2f} | {r['compute_s']:.2f} | "
              f"{100 * r['wait_fraction']:.1f}% |" for r in wait_rows]
    w0, w2 = (next(r for r in wait_rows if r["num_workers"] == n) for n in (0, 2))
    lines += ["", f"Two workers cut the wait per step from {w0['wait_s'] / w0['steps']:.3f} s to "
              f"{w2['wait_s'] / w2['steps']:.3f} s; the step's compute took {w2['compute_s'] / w0['compute_s']:.2f}x "
              "as long with them (they decode on the same cores as the training thread). On this CPU the model's "
              "step dominates either way; on a GPU the step is far shorter and the same data cost is a larger "
              "fraction, which this table does not measure."]
    lines += ["", "## Saved activations per sample at LLaVA-7B width", "",
              f"{m['layers']} decoder layers of hidden {m['hidden']}, MLP {m['intermediate']}, {m['heads']} heads, "
              f"LoRA r {m['lora_r']} (dropout 0.05) on all seven linears, {m['dtype']} on CPU, one sample of "
              f"{m['seq']} tokens, SDPA attention. Measured: unique storages autograd saves (parameters excluded), "
              "via torch.autograd.graph.saved_tensors_hooks; with checkpointing, the forward's saved tensors plus "
              "the largest layer's (what backward's recompute of one layer saves again).", "",
              "| | measured (MiB) | planner (MiB) | planner / measured |", "|---|---|---|---|",
              f"| without checkpointing | {m['saved'] / mib:.2f} | {p['saved'] / mib:.2f} | "
              f"{p['saved'] / m['saved']:.3f} |",
              f"| with checkpointing | {m['saved_checkpointed'] / mib:.2f} | {p['saved_checkpointed'] / mib:.2f} | "
              f"{p['saved_checkpointed'] / m['saved_checkpointed']:.3f} |",
              "", f"Measured per layer without checkpointing: {', '.join(f'{b / mib:.2f}' for b in m['per_layer'])} "
              "MiB (the first also holds RoPE's cos/sin).", "",
              "At LLaVA-1.5-7B's 32 layers the planner's formula gives, per sample of 677 tokens (576 image + "
              f"100 text + BOS): {memory.llm_saved_bytes(_arch7b(), 677, 64, 2, False) / 2**30:.2f} GiB without "
              f"checkpointing, {memory.llm_saved_bytes(_arch7b(), 677, 64, 2, True) / 2**30:.2f} GiB with "
              "(an estimate from the validated formula, not a measurement at 32 layers).", END]
    return "\n".join(lines) + "\n"


def _arch7b() -> memory.Arch:
    return memory.llava_arch(memory.llava_7b_config(), "LLaVA-1.5-7B")


def write_section(path: str, text: str) -> None:
    old = open(path).read() if os.path.isfile(path) else ""
    if START in old and END in old:
        new = old[:old.index(START)] + text.rstrip("\n") + old[old.index(END) + len(END):]
    else:
        new = old.rstrip("\n") + ("\n\n" if old else "") + text
    with open(path, "w") as fh:
        fh.write(new)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pilot_hpc.tools.bench_train", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="Markdown file whose bench_train section is replaced (or appended)")
    ap.add_argument("--json", default=None, help="also write the raw numbers here")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--vision-layers", type=int, default=2)
    ap.add_argument("--text-layers", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128, help="tokens of the 7B-width activation measurement")
    ap.add_argument("--from-json", default=None, help="render the numbers of an earlier --json instead of measuring")
    a = ap.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    t0 = time.perf_counter()
    if a.from_json:  # re-render a run's numbers (its --json) without measuring again
        with open(a.from_json) as fh:
            raw = json.load(fh)
        wait_rows, act, seconds = raw["data_wait"], raw["activations"], raw["seconds"]
    else:
        wait_rows = data_wait(a)
        act = activations(a)
        seconds = time.perf_counter() - t0
    text = markdown(wait_rows, act, a, seconds)
    if a.json:
        with open(a.json, "w") as fh:
            jsonout.dump({"data_wait": wait_rows, "activations": act, "seconds": seconds}, fh, indent=1)
    if a.out:
        write_section(a.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
