"""The model-family seam (pilot_hpc.model.families): only its package names a family's
classes and attributes; detection from a folder's config.json; each family's training
prompt is its chat template's, token for token."""

from __future__ import annotations

import io
import json
import os
import re
import tokenize

import pytest

from helpers import REPO

SRC = os.path.join(REPO, "src", "pilot_hpc")
SEAM = os.path.join(SRC, "model", "families")

# What only the seam may name: the families' transformers classes and the attributes
# where their parts sit (connector, language model, vision tower, vision MLPs).
FAMILY_NAMES = re.compile(
    r"\b(Llava|LlavaNext|LlavaOnevision|CLIP|Llama|Qwen2VL|Qwen2_5_VL|Qwen2|InternVL|Idefics3|Gemma3|Siglip)"
    r"\w*(Config|Model|ForConditionalGeneration|Processor|ImageProcessor\w*)\b"
    r"|\bmulti_modal_projector\b|\.model\.language_model\b|\.model\.vision_tower\b|\.fc[12]\b"
    r"|\.activation_fn\b|\.visual\.|\.merger\b|\bimage_grid_thw\b|\bimage_newline\b|['\"]USER: "
)

# The layers that handle every family alike, and the entry points and planner above the
# model. tools/ (developer benchmarks at LLaVA-1.5's shapes) and data/records.py's default
# prompt (the built-in model's, used where no family prompt is given) are not checked.
CHECKED = [os.path.join(SRC, d) for d in ("fl", "train", "metrics", "checkpoint")] + [
    os.path.join(SRC, "model", f) for f in ("build.py", "connector.py", "ct_clip.py", "ctmoa.py",
                                            "ctmoa_dispatch.py", "llava.py")] + [
    os.path.join(SRC, f) for f in ("export.py", "generate.py", "memory.py", "main.py")]


def code_of(path: str) -> str:
    """The file's code without comments and docstrings (which may name a family)."""
    with open(path) as fh:
        src = fh.read()
    out, prev = [], tokenize.INDENT
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            continue
        # a string standing alone as a statement: a docstring
        if tok.type == tokenize.STRING and prev in (tokenize.INDENT, tokenize.NEWLINE, tokenize.DEDENT,
                                                    tokenize.NL):
            prev = tok.type
            continue
        if tok.type not in (tokenize.NL, tokenize.COMMENT):
            prev = tok.type
        out.append(tok.string)
    # Tokens joined by spaces; attribute dots rejoined so that `.fc1` reads as written.
    return re.sub(r"\s*\.\s*(?=[A-Za-z_])", ".", " ".join(out))


def python_files(paths):
    for p in paths:
        if os.path.isfile(p):
            yield p
        for dirpath, _, files in os.walk(p):
            yield from (os.path.join(dirpath, f) for f in files if f.endswith(".py"))


def test_the_pattern_finds_the_seams_names():
    """The grep below can fail: inside the seam it finds the names it looks for."""
    hits = {m.group(0) for f in python_files([SEAM]) for m in FAMILY_NAMES.finditer(code_of(f))}
    assert {"multi_modal_projector", "LlavaConfig", ".fc1"} <= hits


def test_code_docstrings_and_comments_are_left_out():
    assert "fc1" not in code_of(os.path.join(SRC, "model", "ct_clip.py"))


def test_only_the_seam_names_a_family():
    found = [f"{os.path.relpath(f, SRC)}: {m.group(0)}" for f in python_files(CHECKED)
             for m in FAMILY_NAMES.finditer(code_of(f))]
    assert not found, "family classes or attributes named outside pilot_hpc.model.families: " + "; ".join(found)


# ------------------------------------------------------------------ detection
def test_family_detected_from_config_json(tmp_path):
    from pilot_hpc.model import families

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    assert families.detect(str(tmp_path)).name == "llava"
    assert families.detect("").name == families.DEFAULT.name  # the built-in model


def test_unknown_model_type_is_a_config_error_unless_overridden(tmp_path):
    from pilot_hpc.config import ConfigError
    from pilot_hpc.model import families

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no_such_vlm"}))
    with pytest.raises(ConfigError, match="model.family"):
        families.detect(str(tmp_path))
    assert families.detect(str(tmp_path), "llava").name == "llava"
    with pytest.raises(ConfigError, match="not a known family"):
        families.detect(str(tmp_path), "no_such_family")


def test_the_built_model_knows_its_family(small_world):
    import torch

    from pilot_hpc.model.build import build_pilot_model

    cfg, _, base = small_world
    pm = build_pilot_model(base, cfg.model, 3, 0, seed=0, device=torch.device("cpu"))
    assert pm.family.name == "llava"
    assert pm.family.get_connector(pm.model) is pm.connector


# ------------------------------------------------------------------ prompts
def test_llava15_prompt_is_its_chat_template_token_for_token(small_world):
    """The training prompt equals llava-hf's chat template rendered by the tokenizer
    (with <image> expanded as LlavaProcessor expands it), and an answer's first label is
    the answer's first token."""
    from transformers import AutoTokenizer

    from pilot_hpc.data.records import IGNORE_INDEX, InstructionDataset, Sample
    from pilot_hpc.model.families.llava import LLAVA15

    cfg, _, base = small_world
    tok = AutoTokenizer.from_pretrained(base)
    n = 9
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is it ?"}]}]
    rendered = tok.apply_chat_template(messages, chat_template=LLAVA15.chat_template, add_generation_prompt=True,
                                       tokenize=False)
    rendered = rendered.replace("<image>", "<image>" * n).rstrip()
    # The template ends the user's text with a space before "ASSISTANT:"; the one-turn
    # prompt is that text exactly.
    assert rendered == LLAVA15.prompt("what color is it ?", True, n)
    ds = InstructionDataset([Sample(id="x", image_path="", turns=[("what color is it ?", "red")])], tok, None, n,
                            200, **LLAVA15.dataset_options(tok))
    ids, labels = ds.encode_train(0)
    assert ids[:len(ds.encode_prompt(0))] == tok(rendered, add_special_tokens=True)["input_ids"]
    first_label = next(label for label in labels if label != IGNORE_INDEX)
    assert first_label == tok("red", add_special_tokens=False)["input_ids"][0]


# ------------------------------------------------------------------ Qwen2.5-VL
@pytest.fixture(scope="module")
def qwen_tiny():
    """A reduced Qwen2.5-VL from its real config classes, its family's tokenizer and
    image processor (tiny: word-level, patch 8)."""
    from pilot_hpc.config import ModelConfig
    from pilot_hpc.data import synthetic
    from pilot_hpc.model.families.qwen_vl import QWEN2_5_VL

    return QWEN2_5_VL.tiny(ModelConfig(), synthetic.vocabulary())


def test_qwen_prompt_is_its_chat_template_token_for_token(qwen_tiny):
    """The training prompt equals tokenizer.apply_chat_template's (with <|image_pad|>
    expanded to the image's tokens, as Qwen2_5_VLProcessor expands it); the first label
    is the answer's first token."""
    from pilot_hpc.data.records import IGNORE_INDEX, InstructionDataset, Sample
    from pilot_hpc.model.families.qwen_vl import QWEN2_5_VL

    _, tok, _ = qwen_tiny
    n, q = 9, "what color is the circle ?"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    rendered = rendered.replace("<|image_pad|>", "<|image_pad|>" * n)
    assert rendered == QWEN2_5_VL.prompt(q, True, n)
    ds = InstructionDataset([Sample(id="x", image_path="", turns=[(q, "red")])], tok, None, n, 200,
                            prompt=QWEN2_5_VL.prompt, answer_sep=QWEN2_5_VL.answer_sep)
    ids, labels = ds.encode_train(0)
    want = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
    image_pad = tok.convert_tokens_to_ids("<|image_pad|>")
    expanded = [t for w in want for t in ([w] * n if w == image_pad else [w])]
    assert ids[:len(expanded)] == expanded
    first = labels.index(next(label for label in labels if label != IGNORE_INDEX))
    assert first == len(expanded) and labels[first] == tok.convert_tokens_to_ids("red")
    assert labels[-1] == tok.convert_tokens_to_ids("<|im_end|>")  # the turn's end, as the template closes it


def test_qwen_images_of_different_sizes_share_a_batch(qwen_tiny):
    """Two image sizes -> different visual-token counts in one batch; the connector sees
    the flattened list with each image's rows (segments), and its difference loss is the
    mean of the per-image losses."""
    import torch
    from PIL import Image

    from pilot_hpc.config import ModelConfig, PilotConfig
    from pilot_hpc.data.records import collate_images
    from pilot_hpc.model.build import attach_pilot
    from pilot_hpc.model.connector import difference_loss
    from pilot_hpc.model.families.qwen_vl import QWEN2_5_VL, qwen_image_inputs

    config, tok, proc = qwen_tiny
    images = [Image.new("RGB", (48, 48), (200, 10, 10)), Image.new("RGB", (64, 32), (10, 200, 10))]
    inputs = [qwen_image_inputs(proc, im) for im in images]
    counts = [x["num_image_tokens"] for x in inputs]
    assert counts[0] != counts[1], counts
    torch.manual_seed(0)
    model = QWEN2_5_VL.from_config(config)
    peft_model, conn = attach_pilot(model, ModelConfig(ctmoa_impl="reference"), 3, 0, seed=0, pilot=PilotConfig(),
                                    family=QWEN2_5_VL)
    conn.set_stage(1)
    prompts = [QWEN2_5_VL.prompt("what ?", True, n) for n in counts]
    enc = tok(prompts, return_tensors="pt", padding=True)
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], **collate_images(inputs)}
    seen = {}
    hook = conn.register_forward_hook(lambda m, args, out: seen.update(h=args[0].detach(), out=out.detach()))
    with torch.no_grad():
        peft_model(**batch)
    hook.remove()
    assert conn.segments == counts and seen["h"].shape[0] == sum(counts)
    h = seen["h"].float()
    x_t, x_s = conn.task_adapter(h), conn.client_adapter(h)
    per_image = [difference_loss(a[None], b[None]) for a, b in zip(x_t.split(counts), x_s.split(counts))]
    assert torch.allclose(conn.aux["diff"], torch.stack(per_image).mean())
    assert not torch.allclose(conn.aux["diff"], difference_loss(x_t[None], x_s[None]))  # not one image


def test_ct_clip_on_a_family_without_two_layer_vision_mlps_is_a_config_error(qwen_tiny):
    from pilot_hpc.config import ConfigError, ModelConfig, PilotConfig
    from pilot_hpc.model.build import attach_pilot
    from pilot_hpc.model.families.qwen_vl import QWEN2_5_VL

    model = QWEN2_5_VL.from_config(qwen_tiny[0])
    with pytest.raises(ConfigError, match="pilot.ct_clip"):
        attach_pilot(model, ModelConfig(), 3, 0, seed=0, pilot=PilotConfig(ct_clip=True), family=QWEN2_5_VL)


@pytest.mark.parametrize("name", sorted(__import__("pilot_hpc.model.families", fromlist=["FAMILIES"]).FAMILIES))
def test_shape_facts_give_the_connector_mlp_the_model_builds(name):
    """The planner's and the kernel plan's connector sizes (vision_hidden -> connector
    hidden -> hidden) are those of the connector MLP the family's model really has."""
    from pilot_hpc.config import ModelConfig
    from pilot_hpc.data import synthetic
    from pilot_hpc.model import families

    spec = families.get(name)
    config = spec.tiny(ModelConfig(), synthetic.vocabulary())[0]
    mlp = spec.connector_mlp(spec.get_connector(spec.from_config(config)))
    facts = spec.shape_facts(config)
    assert (mlp.linear_1.in_features, mlp.linear_1.out_features, mlp.linear_2.out_features) == (
        facts.vision_hidden, facts.connector_hidden or facts.hidden, facts.hidden)


# ------------------------------------------------------------------ InternVL
@pytest.fixture(scope="module")
def internvl_tiny():
    """A reduced InternVL from its real config classes, its family's tokenizer and image
    processor (tiny: word-level, 32-px tiles of 8-px patches, 4 tokens per tile)."""
    from pilot_hpc.config import ModelConfig
    from pilot_hpc.data import synthetic
    from pilot_hpc.model.families.internvl import INTERNVL

    return INTERNVL.tiny(ModelConfig(), synthetic.vocabulary())


def test_internvl_detected_and_its_original_code_folders_refused(tmp_path):
    """The -hf conversions' model_type is this family; the original-code folders
    (InternVLChatModel, model_type internvl_chat) are not, and say so at config time."""
    from pilot_hpc.config import ConfigError
    from pilot_hpc.model import families

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "internvl"}))
    assert families.detect(str(tmp_path)).name == "internvl"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "internvl_chat"}))
    with pytest.raises(ConfigError, match="internvl_chat"):
        families.detect(str(tmp_path))


def test_internvl_prompt_is_its_chat_template_token_for_token(internvl_tiny):
    """The training prompt equals tokenizer.apply_chat_template's with <IMG_CONTEXT>
    expanded by InternVLProcessor's own replace_image_token (the image's tiles, as the
    image processor counts them, times image_seq_length); the first label is the
    answer's first token, the last the turn's <|im_end|>."""
    from types import SimpleNamespace

    from PIL import Image
    from transformers.models.internvl.processing_internvl import InternVLProcessor

    from pilot_hpc.data.records import IGNORE_INDEX, InstructionDataset, Sample
    from pilot_hpc.model.families.internvl import INTERNVL, internvl_image_inputs, tokens_per_tile

    config, tok, proc = internvl_tiny
    q = "what color is the circle ?"
    image = Image.new("RGB", (96, 48), (200, 10, 10))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # The processor itself cannot be built without torchvision (its video processor);
    # its expansion is a method that reads these four attributes.
    fields = SimpleNamespace(start_image_token=tok.start_image_token, end_image_token=tok.end_image_token,
                             image_token=tok.context_image_token, image_seq_length=config.image_seq_length)
    tiles = proc.get_number_of_image_patches(48, 96, {"crop_to_patches": True})
    assert tiles == 3  # a 2 x 1 grid and the thumbnail
    rendered = rendered.replace(tok.context_image_token,
                                InternVLProcessor.replace_image_token(fields, {"num_patches": [tiles]}, 0))
    n = internvl_image_inputs(proc, image, tokens_per_tile(config))["num_image_tokens"]
    assert n == tiles * config.image_seq_length
    assert rendered == INTERNVL.prompt(q, True, n)
    ds = InstructionDataset([Sample(id="x", image_path="", turns=[(q, "red")])], tok, None, n, 200,
                            prompt=INTERNVL.prompt, answer_sep=INTERNVL.answer_sep)
    ids, labels = ds.encode_train(0)
    expanded = tok(rendered, add_special_tokens=True)["input_ids"]
    assert ids[:len(expanded)] == expanded
    first = labels.index(next(label for label in labels if label != IGNORE_INDEX))
    assert first == len(expanded) and labels[first] == tok.convert_tokens_to_ids("red")
    assert labels[-1] == tok.convert_tokens_to_ids("<|im_end|>")


def test_internvl_images_of_different_tile_counts_share_a_batch(internvl_tiny):
    """A square image (2 x 2 tiles and the thumbnail) and a wide one (2 x 1 and the
    thumbnail) in one batch: the connector sees every tile's tokens as one list, learns
    each image's rows from input_ids, and its difference loss is the mean over the
    images of the loss over all of that image's tiles' tokens."""
    import torch
    from PIL import Image

    from pilot_hpc.config import ModelConfig, PilotConfig
    from pilot_hpc.data.records import collate_images
    from pilot_hpc.model.build import attach_pilot
    from pilot_hpc.model.connector import difference_loss
    from pilot_hpc.model.families.internvl import INTERNVL

    config, tok, proc = internvl_tiny
    images = [Image.new("RGB", (48, 48), (200, 10, 10)), Image.new("RGB", (96, 48), (10, 200, 10))]
    image_inputs = INTERNVL.dataset_options(tok, config)["image_inputs"]
    inputs = [image_inputs(proc, im) for im in images]
    counts = [x["num_image_tokens"] for x in inputs]
    assert counts == [5 * 4, 3 * 4]
    torch.manual_seed(0)
    model = INTERNVL.from_config(config)
    peft_model, conn = attach_pilot(model, ModelConfig(ctmoa_impl="reference"), 3, 0, seed=0, pilot=PilotConfig(),
                                    family=INTERNVL)
    assert INTERNVL.get_connector(peft_model) is conn
    conn.set_stage(1)
    prompts = [INTERNVL.prompt("what ?", True, n) for n in counts]
    enc = tok(prompts, return_tensors="pt", padding=True)
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], **collate_images(inputs)}
    assert batch["pixel_values"].shape[0] == 5 + 3
    seen = {}
    hook = conn.register_forward_hook(lambda m, args, out: seen.update(h=args[0].detach(), segments=m.segments))
    with torch.no_grad():
        peft_model(**batch)
    hook.remove()
    assert seen["segments"] == counts and seen["h"].shape[0] == sum(counts)
    assert conn.segments is None  # told for one forward only
    h = seen["h"].float()
    x_t, x_s = conn.task_adapter(h), conn.client_adapter(h)
    per_image = [difference_loss(a[None], b[None]) for a, b in zip(x_t.split(counts), x_s.split(counts))]
    assert torch.allclose(conn.aux["diff"], torch.stack(per_image).mean())
    per_tile = difference_loss(x_t.view(8, 4, -1), x_s.view(8, 4, -1))
    assert not torch.allclose(conn.aux["diff"], per_tile)  # not the tiles one by one


def test_internvl_stock_connector_is_the_projector_again(internvl_tiny):
    """The merged folder's projector: the frozen LayerNorm and an adapter's Linear-GELU-
    Linear as transformers' own module, with its keys, computing what the Pilot
    connector's plain stage computes (both float32: equal to rounding of the reshape)."""
    import copy

    import torch

    from pilot_hpc.config import ModelConfig, PilotConfig
    from pilot_hpc.model.build import attach_pilot
    from pilot_hpc.model.connector import PLAIN
    from pilot_hpc.model.families.internvl import INTERNVL

    config = internvl_tiny[0]
    torch.manual_seed(0)
    model = INTERNVL.from_config(config)
    stock = copy.deepcopy(model.model.multi_modal_projector)
    x = torch.randn(3, 4, stock.layer_norm.normalized_shape[0])
    _, conn = attach_pilot(model, ModelConfig(ctmoa_impl="reference"), 3, 0, seed=0, pilot=PilotConfig(),
                           family=INTERNVL)
    conn.set_stage(PLAIN)
    with torch.no_grad():
        want = stock(x)
        assert torch.allclose(model.model.multi_modal_projector(x), want, atol=1e-6)
        INTERNVL.set_connector(model, INTERNVL.stock_connector(copy.deepcopy(conn.task_adapter)))
        back = model.model.multi_modal_projector
        assert type(back) is type(stock)
        assert sorted(back.state_dict()) == sorted(stock.state_dict())
        assert torch.equal(back(x), want)


def test_internvl_ct_clip_adapts_every_vision_mlp(internvl_tiny):
    """CT-CLIP is offered: InternViT's MLPs are fc1, GELU, fc2; each becomes a connector
    inside its block's layer scale."""
    import torch

    from pilot_hpc.config import ModelConfig, PilotConfig
    from pilot_hpc.model.build import attach_pilot
    from pilot_hpc.model.connector import PilotConnector
    from pilot_hpc.model.families.internvl import INTERNVL

    config = internvl_tiny[0]
    model = INTERNVL.from_config(config)
    attach_pilot(model, ModelConfig(ctmoa_impl="reference"), 3, 0, seed=0, pilot=PilotConfig(ct_clip=True),
                 family=INTERNVL)
    layers = INTERNVL.vision_tower(model).encoder.layer
    assert len(layers) == config.vision_config.num_hidden_layers
    assert all(isinstance(layer.mlp, PilotConnector) and layer.mlp.activation == "gelu" for layer in layers)
    assert all(isinstance(layer.lambda_2, torch.nn.Parameter) for layer in layers)


# ------------------------------------------------------------------ LLaVA-OneVision, LLaVA-NeXT
@pytest.fixture(scope="module", params=["llava_onevision", "llava_next"])
def anyres_tiny(request):
    """(family, config, tokenizer, image processor): a reduced LLaVA-OneVision (SigLIP,
    Qwen2) or LLaVA-NeXT (CLIP, Mistral) from its real config classes, its family's
    tokenizer (word-level, its chat template) and image processor (crops of 48 px, a grid
    of up to 2 x 2 crops)."""
    from pilot_hpc.config import ModelConfig
    from pilot_hpc.data import synthetic
    from pilot_hpc.model import families

    spec = families.get(request.param)
    return (spec, *spec.tiny(ModelConfig(), synthetic.vocabulary()))


def test_anyres_prompt_is_its_chat_template_token_for_token(anyres_tiny):
    """The training prompt equals tokenizer.apply_chat_template's (with <image> expanded
    to the image's tokens, as the family's processor expands it); the first label is the
    answer's first token, the last the tokenizer's EOS (OneVision's <|im_end|>, NeXT's </s>)."""
    from pilot_hpc.data.records import IGNORE_INDEX, InstructionDataset, Sample

    spec, config, tok, _ = anyres_tiny
    n, q = 9, "what color is the circle ?"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered.replace("<image>", "<image>" * n) == spec.prompt(q, True, n)
    assert tok.unk_token_id not in tok(spec.prompt(q, True, n))["input_ids"]  # the template's words known
    ds = InstructionDataset([Sample(id="x", image_path="", turns=[(q, "red")])], tok, None, n, 200,
                            prompt=spec.prompt, answer_sep=spec.answer_sep)
    ids, labels = ds.encode_train(0)
    # As the processor tokenises the rendered text: with the tokenizer's special tokens
    # (NeXT's <s>; OneVision's tokenizer adds none).
    expanded = tok(rendered.replace("<image>", "<image>" * n))["input_ids"]
    assert ids[:len(expanded)] == expanded
    first = labels.index(next(label for label in labels if label != IGNORE_INDEX))
    assert first == len(expanded) and labels[first] == tok.convert_tokens_to_ids("red")
    assert labels[-1] == tok.eos_token_id


def test_anyres_images_of_different_sizes_share_a_batch(anyres_tiny, tmp_path):
    """Three image shapes -> different crop grids and visual-token counts in one batch.
    The processor's count is what the model packs for each image; the connector is told
    each image's crops, and its difference loss is the mean over the images of the loss
    over all of an image's crop tokens (not the loss per crop)."""
    import torch
    from PIL import Image

    from pilot_hpc.config import ModelConfig, PilotConfig
    from pilot_hpc.data.records import collate_images
    from pilot_hpc.model import families
    from pilot_hpc.model.build import attach_pilot
    from pilot_hpc.model.connector import difference_loss

    spec, config, tok, proc = anyres_tiny
    images = [Image.new("RGB", (48, 48), (200, 10, 10)), Image.new("RGB", (96, 48), (10, 200, 10)),
              Image.new("RGB", (40, 90), (10, 10, 200))]
    to_inputs = spec.dataset_options(tok, config)["image_inputs"]
    inputs = [to_inputs(proc, im) for im in images]
    counts = [x["num_image_tokens"] for x in inputs]
    crops = [x["pixel_values"].shape[0] for x in inputs]
    # OneVision's tiny grid has a single crop for a square image; NeXT's, as its real
    # pinpoints, none: the square takes a 1 x 2 grid (as much detail, least padding).
    assert len(set(counts)) == 3 and crops == ([2, 3, 3] if spec.name == "llava_onevision" else [3, 3, 3])
    torch.manual_seed(0)
    model = spec.from_config(config)
    with torch.no_grad():
        packed = model.model.get_image_features(**{k: v for k, v in collate_images(inputs).items()}).pooler_output
    assert [p.shape[0] for p in packed] == counts
    model.save_pretrained(tmp_path)  # detected from its config.json
    assert families.detect(str(tmp_path)) is spec
    peft_model, conn = attach_pilot(model, ModelConfig(ctmoa_impl="reference"), 3, 0, seed=0, pilot=PilotConfig(),
                                    family=spec)
    conn.set_stage(1)
    enc = tok([spec.prompt("what ?", True, n) for n in counts], return_tensors="pt", padding=True)
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], **collate_images(inputs)}
    seen = {}
    hook = conn.register_forward_hook(lambda m, args, out: seen.update(h=args[0].detach()))
    with torch.no_grad():
        peft_model(**batch)
    hook.remove()
    assert conn.segments == crops and seen["h"].shape[0] == sum(crops)
    h = seen["h"].float()
    x_t, x_s = conn.task_adapter(h), conn.client_adapter(h)
    per_image = [difference_loss(a.reshape(1, -1, a.shape[-1]), b.reshape(1, -1, b.shape[-1]))
                 for a, b in zip(x_t.split(crops), x_s.split(crops))]
    assert torch.allclose(conn.aux["diff"], torch.stack(per_image).mean())
    assert not torch.allclose(conn.aux["diff"], difference_loss(x_t, x_s))  # not per crop


def test_anyres_ct_clip_adapts_every_vision_mlp(anyres_tiny):
    """SigLIP's and CLIP's encoder MLPs are two-layer (fc1, GELU-tanh / quick GELU, fc2):
    CT-CLIP puts a connector on each, and the model still runs (stage 2: the eager
    mixture)."""
    import torch
    from PIL import Image

    from pilot_hpc.config import ModelConfig, PilotConfig
    from pilot_hpc.data.records import collate_images
    from pilot_hpc.model.build import attach_pilot
    from pilot_hpc.model.connector import PilotConnector

    spec, config, tok, proc = anyres_tiny
    torch.manual_seed(0)
    model = spec.from_config(config)
    peft_model, conn = attach_pilot(model, ModelConfig(ctmoa_impl="reference"), 3, 0, seed=0,
                                    pilot=PilotConfig(ct_clip=True), family=spec)
    tower = spec.vision_tower(model)
    mlps = [m for m in tower.modules() if isinstance(m, PilotConnector)]
    assert len(mlps) == config.vision_config.num_hidden_layers
    assert all(m.activation == config.vision_config.hidden_act != "gelu" for m in mlps)
    inputs = [spec.dataset_options(tok, config)["image_inputs"](proc, Image.new("RGB", (48, 48)))]
    for m in mlps + [conn]:
        m.set_stage(2)
    enc = tok([spec.prompt("what ?", True, inputs[0]["num_image_tokens"])], return_tensors="pt")
    with torch.no_grad():
        out = peft_model(**enc, **collate_images(inputs))
    assert torch.isfinite(out.logits).all() and all("balance" in m.aux for m in mlps)


def test_llava_next_with_another_template_is_refused(tmp_path):
    """Only the Mistral variant's prompt is written: a NeXT folder with a Llama (Vicuna)
    language model is a ConfigError, not a run on the wrong template."""
    from pilot_hpc.config import ConfigError, ModelConfig
    from pilot_hpc.data import synthetic
    from pilot_hpc.model.families.llava_onevision import LLAVA_NEXT as spec

    config = spec.tiny(ModelConfig(), synthetic.vocabulary())[0]
    other = type(config).from_dict({**config.to_dict(), "text_config": {**config.text_config.to_dict(),
                                                                         "model_type": "llama"}})
    other.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="Mistral variant"):
        spec.load(str(tmp_path), None, "sdpa")
