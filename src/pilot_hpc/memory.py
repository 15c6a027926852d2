"""One client's peak memory, estimated from the config: the planner behind `python -m
pilot_hpc.tools.dryrun --config ... --gpu-mem-gb N` and main's warning before training
on CUDA (both import it from here; tools/memplan.py holds the measurement that
validates its activation model).

Parts of the estimate (torch engine, one process per client):
  weights             every parameter of the built model in its dtype (meta-device build;
                      peft keeps LoRA in float32)
  gradients, AdamW    of the stage that trains more: gradients and AdamW's two moments,
                      each in the parameter's dtype
  activations         what autograd saves for backward, per sample of the micro-batch at
                      data.max_length tokens: the LLM layers (formula below), the LM head's
                      log-softmax, the connector; with train.gradient_checkpointing only
                      every layer's input plus one layer's recompute
  head backward       the logits' gradient (float32 + model dtype) while the head runs backward
  generation          evaluation: the KV cache of train.eval_batch_size prompts of
                      data.max_length + max_new_tokens tokens, one layer's prefill MLP, the
                      gradients the trainer leaves set
The peak is the larger of training and generation. The verdict keeps 10% of the device
for the CUDA context, the allocator's fragmentation and kernel workspaces (an
allowance, not a measurement).

The activation formula counts, per token of one Llama decoder layer with SDPA attention
(hidden h, MLP m, heads a, LoRA rank r on all seven linears, model dtype b bytes, LoRA
path in float32): the two RMSNorms' float32 input copies and inverse norms, q/k/v and the
attention output (b each) and the log-sum-exp (float32 per head), the MLP's gate, up
and product (b each), and per LoRA linear of input width d: dropout's mask and output
in float32 (2 x 4d; one copy 4d without dropout) and the rank-r intermediate (4r).
tools/memplan.py:measure_saved_bytes() counts the same thing on a real model (unique storages that
autograd saves, parameters excluded); tests/unit/test_memplan.py holds the two within
15% at 7B width. Measured 2026-12-01, bf16 on CPU, h 4096, m 11008, r 64, 96 tokens:
426,634 bytes per token per layer (2 layers), the formula 418,184 + 8,450 shared.

Not modelled: the frozen vision tower's forward (no autograd state; transient, ~75 MB at
16 x 577 tokens of CLIP-L), the deepspeed engine's ZeRO sharding of gradients and AdamW
state over a client group (the estimate is one process holding all of it), and a float32
model's aliasing (its float32 copies are no-ops there, so the formula over-counts: it is
validated in bfloat16).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass

import torch

GiB = 2 ** 30
RESERVE = 0.10  # of the device: CUDA context, fragmentation, workspaces (an allowance)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def llava_7b_config():
    """LLaVA-1.5-7B's architecture (the default family's reference shapes)."""
    from pilot_hpc.model import families

    return families.DEFAULT.reference_config()


@dataclass(frozen=True)
class Arch:
    """The sizes the estimate needs."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    vision_hidden: int
    image_tokens: int
    source: str  # where the sizes came from
    kv_heads: int = 0  # key/value heads; 0: as many as heads (no grouped-query attention)
    connector_hidden: int = 0  # the connector MLP's hidden width; 0: hidden

    @property
    def connector_mid(self) -> int:
        return self.connector_hidden or self.hidden

    @property
    def kv_width(self) -> int:
        """The width of one token's keys (or values) in one layer."""
        return (self.kv_heads or self.heads) * (self.hidden // self.heads)


def llava_arch(config, source: str) -> Arch:
    """The planner's sizes of a model config of any supported family (its shape facts)."""
    from pilot_hpc.model import families

    f = families.get_by_config(config).shape_facts(config)
    return Arch(hidden=f.hidden, intermediate=f.intermediate, layers=f.layers, heads=f.heads, vocab=f.vocab,
                vision_hidden=f.vision_hidden, image_tokens=f.image_tokens, source=source, kv_heads=f.kv_heads,
                connector_hidden=f.connector_hidden)


def model_config(cfg):
    """(model config, source): model.path's config.json when there is one (its family's
    config class); the tiny model from the model section when model.path is empty; else
    the family's 7B-class reference architecture."""
    from pilot_hpc.model import families

    m = cfg.model
    if not m.path:
        from pilot_hpc.data import synthetic

        return families.built_in(m.family).tiny(m, synthetic.vocabulary())[0], "the built-in tiny model (model section)"
    spec = families.detect(m.path, m.family)
    if os.path.isfile(os.path.join(m.path, "config.json")):
        return spec.config_from_folder(m.path), os.path.join(m.path, "config.json")
    return spec.reference_config(), f"{spec.display}'s 7B-class architecture ({m.path}/config.json not found)"


def layer_bytes_per_token(h: int, m: int, heads: int, r: int, b: int, lora_dropout: bool = True) -> int:
    """Saved bytes per token of one decoder layer (the formula in the module docstring)."""
    lora_inputs = 6 * h + m  # q, k, v, o, gate, up take h; down takes m
    lora = (2 if lora_dropout else 1) * 4 * lora_inputs + 7 * 4 * r
    norms = 2 * (4 * h + 4)
    attention = 4 * b * h + 4 * heads
    mlp = 3 * b * m
    return lora + norms + attention + mlp


def shared_bytes_per_token(h: int, heads: int, b: int) -> int:
    """Saved once per model: the final RMSNorm (float32 copy and inverse norm) and RoPE's cos/sin."""
    return 4 * h + 4 + 2 * b * (h // heads)


def llm_saved_bytes(a: Arch, tokens: int, r: int, b: int, checkpointing: bool, lora_dropout: bool = True) -> int:
    """Saved activations of the decoder stack for `tokens` tokens (batch x sequence); with
    checkpointing the layer inputs (b x h each) plus one layer's recompute."""
    layer = layer_bytes_per_token(a.hidden, a.intermediate, a.heads, r, b, lora_dropout)
    kept = a.layers * b * a.hidden if checkpointing else a.layers * layer
    extra = layer if checkpointing else 0
    return tokens * (kept + extra + shared_bytes_per_token(a.hidden, a.heads, b))


def kv_cache_bytes(a: Arch, batch: int, tokens: int, b: int) -> int:
    """Generation's cache: keys and values of every layer for batch x tokens, in the model
    dtype; grouped-query attention keeps kv_heads of them, not heads."""
    return 2 * batch * tokens * a.layers * a.kv_width * b


def head_bytes(a: Arch, tokens: int) -> tuple[int, int]:
    """(saved, backward transient) of the LM head and its loss: the float32 log-softmax;
    then the logits' gradient in float32 and in the model dtype (taken as 2 bytes)."""
    return 4 * tokens * a.vocab, (4 + 2) * tokens * a.vocab


def connector_bytes(a: Arch, images: int, b: int, stage: int, num_tasks: int) -> int:
    """Per image token: the input (Cv) and, per adapter MLP, its hidden before and after the
    GELU (2 x C) and its output (N, the LLM's width). Stage 1 runs 2 MLPs, stage 2 (CT-MoA)
    2T - 1. Not measured: at 7B width a few % of the layers' share."""
    mlps = 2 if stage == 1 else 2 * num_tasks - 1
    return images * a.image_tokens * b * (a.vision_hidden + mlps * (2 * a.connector_mid + a.hidden))


@dataclass
class Estimate:
    parts: dict[str, int]  # name -> bytes
    train_peak: int
    eval_peak: int
    micro_batch: int
    checkpointing: bool

    @property
    def peak(self) -> int:
        return max(self.train_peak, self.eval_peak)


_PARAMS: dict[str, dict[str, int]] = {}


def parameter_bytes(cfg, config) -> dict[str, int]:
    """{'total', 'trainable_1', 'trainable_2'}: bytes of all parameters of the built model (on
    the meta device) and of those that train in each stage."""
    from pilot_hpc.model import families
    from pilot_hpc.model.build import DTYPES, PilotModel, attach_pilot, quiet_checkpointing_deprecation

    key = json.dumps([dataclasses.asdict(cfg.model), dataclasses.asdict(cfg.pilot), cfg.tasks,
                      config.to_json_string()], sort_keys=True)
    if key in _PARAMS:  # a 7B meta build takes ~10 s; the advice and the tests ask again
        return _PARAMS[key]
    quiet_checkpointing_deprecation()
    with torch.device("meta"):
        spec = families.get_by_config(config)
        model = spec.from_config(config).to(DTYPES[cfg.model.dtype])
        peft_model, connector = attach_pilot(model, cfg.model, len(cfg.tasks), 0, seed=0, pilot=cfg.pilot,
                                             family=spec)
    pm = PilotModel(peft_model, connector, None, None, 0)
    out = {"total": sum(p.numel() * p.element_size() for p in peft_model.parameters())}
    for stage in (1, 2):
        pm.set_stage(stage)
        out[f"trainable_{stage}"] = sum(p.numel() * p.element_size() for p in peft_model.parameters()
                                        if p.requires_grad)
    _PARAMS[key] = out
    return out


def estimate(cfg, a: Arch, params: dict[str, int], *, checkpointing: bool, accum: int) -> Estimate:
    """Peak bytes of one client for given checkpointing and accumulation (the rest from cfg)."""
    t, b = cfg.train, DTYPE_BYTES[cfg.model.dtype]
    mb = math.ceil(t.batch_size / accum)
    seq = cfg.data.max_length
    tokens = mb * seq
    stage = 1 if params["trainable_1"] >= params["trainable_2"] else 2  # the stage that trains more
    trainable = params[f"trainable_{stage}"]
    saved_head, head_back = head_bytes(a, tokens)
    conn = max(connector_bytes(a, mb, b, s, len(cfg.tasks)) for s in (1, 2))
    parts = {
        "weights (all parameters, frozen and trainable)": params["total"],
        f"gradients (stage {stage})": trainable,
        f"AdamW moments (stage {stage})": 2 * trainable,
        f"LLM activations (micro-batch {mb} x {seq} tokens, checkpointing {'on' if checkpointing else 'off'})":
            llm_saved_bytes(a, tokens, cfg.model.lora_r, b, checkpointing, cfg.model.lora_dropout > 0),
        "LM head log-softmax + its backward": saved_head + head_back,
        "connector activations (the larger stage)": conn,
    }
    train_peak = sum(parts.values())
    eb, gen_len = t.eval_batch_size, seq + t.max_new_tokens
    kv = kv_cache_bytes(a, eb, gen_len, b)
    prefill = 3 * eb * seq * a.intermediate * b
    parts[f"generation KV cache ({eb} x {gen_len} tokens)"] = kv
    parts["generation prefill (one layer's MLP)"] = prefill
    eval_peak = params["total"] + trainable + kv + prefill
    return Estimate(parts, train_peak, eval_peak, mb, checkpointing)


def advise(cfg, a: Arch, params: dict[str, int], budget: int) -> tuple[bool, str]:
    """(fits as configured, what to change). Training: checkpointing first (it keeps the
    micro-batch, and so the device's utilisation, large), then the smallest accumulation
    that fits (the effective batch stays train.batch_size). Generation: the largest
    train.eval_batch_size that fits."""
    t = cfg.train
    now = estimate(cfg, a, params, checkpointing=t.gradient_checkpointing, accum=t.grad_accum_steps)
    if now.peak <= budget:
        return True, "fits as configured"
    tips = []
    if now.train_peak > budget:
        divisors = [d for d in range(t.grad_accum_steps, t.batch_size + 1) if t.batch_size % d == 0]
        found = next(((ckpt, d) for ckpt in (True, False) if ckpt or not t.gradient_checkpointing for d in divisors
                      if estimate(cfg, a, params, checkpointing=ckpt, accum=d).train_peak <= budget), None)
        if found is None:
            return False, ("training does not fit even at micro-batch 1 with checkpointing: use train.engine="
                           "deepspeed with train.offload_optimizer=true, or a device with more memory")
        ckpt, d = found
        tips += (["train.gradient_checkpointing=true"] if ckpt and not t.gradient_checkpointing else []) + \
                ([f"train.grad_accum_steps={d}"] if d != t.grad_accum_steps else [])
    if now.eval_peak > budget:
        eb = next((e for e in range(t.eval_batch_size - 1, 0, -1) if estimate(
            _with_train(cfg, dataclasses.replace(t, eval_batch_size=e)), a, params, checkpointing=True,
            accum=1).eval_peak <= budget), None)
        if eb is None:
            return False, "generation does not fit even at train.eval_batch_size=1: lower data.max_length"
        tips.append(f"train.eval_batch_size={eb}")
    return False, "set " + " ".join(tips)


def _with_train(cfg, train):
    return dataclasses.replace(cfg, train=train)


def report(cfg, gpu_mem_gb: float | None) -> tuple[str, bool]:
    """(the planner's text, fits) for one client of `cfg`."""
    config, source = model_config(cfg)
    a = llava_arch(config, source)
    params = parameter_bytes(cfg, config)
    t = cfg.train
    est = estimate(cfg, a, params, checkpointing=t.gradient_checkpointing, accum=t.grad_accum_steps)
    lines = [f"memory plan of one client: {a.layers}-layer LLM (hidden {a.hidden}, MLP {a.intermediate}, vocab "
             f"{a.vocab}), {a.image_tokens} image tokens, {cfg.model.dtype}, LoRA r={cfg.model.lora_r}; sizes from "
             f"{a.source}",
             f"  batch {t.batch_size} = {t.grad_accum_steps} x micro-batch {est.micro_batch}, data.max_length "
             f"{cfg.data.max_length}, train.gradient_checkpointing {str(t.gradient_checkpointing).lower()}"]
    unit, size = ("GiB", GiB) if est.peak >= GiB else ("MiB", 2 ** 20)
    rows = list(est.parts.items()) + [("peak in training", est.train_peak), ("peak in generation", est.eval_peak),
                                      ("peak of one client", est.peak)]
    lines += [f"  {name + ':':<86}{v / size:>9.2f} {unit}" for name, v in rows]
    fits = True
    if gpu_mem_gb is not None:
        budget = int(gpu_mem_gb * 1e9 * (1 - RESERVE))
        fits, advice = advise(cfg, a, params, budget)
        verdict = "FITS" if fits else "DOES NOT FIT"
        lines.append(f"  {verdict} in {gpu_mem_gb:g} GB ({budget / GiB:.2f} GiB usable after a {RESERVE:.0%} "
                     f"reserve): {advice}")
    return "\n".join(lines), fits


def peak_bytes(cfg) -> int:
    """The estimated peak of one client (main's warning before training on CUDA)."""
    config, source = model_config(cfg)
    a = llava_arch(config, source)
    t = cfg.train
    return estimate(cfg, a, parameter_bytes(cfg, config), checkpointing=t.gradient_checkpointing,
                    accum=t.grad_accum_steps).peak


def cuda_warning(cfg, device) -> str | None:
    """main's check before training on CUDA: a sentence when the estimate exceeds the device."""
    total = torch.cuda.get_device_properties(device).total_memory
    need = peak_bytes(cfg)
    if need <= total:
        return None
    return (f"the memory planner estimates {need / GiB:.1f} GiB per client but {device} has {total / GiB:.1f} GiB: "
            f"expect out-of-memory; `python -m pilot_hpc.tools.dryrun --config ... --gpu-mem-gb "
            f"{total / 1e9:.0f}` names the setting to change")
