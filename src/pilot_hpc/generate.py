"""Inference with an exported client (any folder `python -m pilot_hpc.export` wrote):

  python -m pilot_hpc.generate --model DIR --image IMG --prompt "what color is the circle ?"
  python -m pilot_hpc.generate --model DIR --data FILE.json --out ANSWERS.jsonl [--image-root ROOT]

Greedy by default, with the prompt template of training and evaluation
("USER: <image x N>\\n{prompt} ASSISTANT:"). Batch mode reads a LLaVA-format JSON file
(image paths relative to its folder unless --image-root is given), answers the first
human turn of every record and writes one line per record, {"id", "prediction"}, in the
file's order, with the batch size and answer length the run's evaluation used (so the
answers equal that client's predictions file). Exit codes: 0, 2 bad input.
"""

from __future__ import annotations

import argparse
import os
import sys

from pilot_hpc import jsonout

EXIT_BAD_INPUT = 2


def load(folder: str, device: str):
    from pilot_hpc.export import load_client

    return load_client(folder, device=device)


def dataset_of(model, samples: list):
    """The samples as the run's evaluation reads them: its prompt template, image
    processing (data.image_aspect_ratio) and token limit."""
    from pilot_hpc.data.records import InstructionDataset

    gen = model.pilot_export["generation"]
    family = getattr(model, "pilot_family", None)
    options = {} if family is None else family.dataset_options(model.tokenizer, model.config)
    return InstructionDataset(samples, model.tokenizer, model.image_processor, gen["num_image_tokens"],
                              gen["max_length"], cache_pixels=False,
                              image_aspect_ratio=gen.get("image_aspect_ratio", "crop"), **options)


def answer_one(model, image_path: str, prompt: str, max_new_tokens: int, device: str, sample: bool = False,
               temperature: float = 1.0) -> str:
    import torch

    from pilot_hpc.data.records import IMAGE_TOKEN, Sample, collate_prompts

    ds = dataset_of(model, [Sample(id="prompt", image_path=image_path,
                                   turns=[(prompt.replace(IMAGE_TOKEN, "").strip(), "")])])
    batch = collate_prompts([ds.encode_prompt(0)], [ds.pixels(0)], model.tokenizer.pad_token_id, ds.mm_token_types)
    batch = {k: v.to(device) for k, v in batch.items()}
    extra = {"do_sample": True, "temperature": temperature} if sample else {"do_sample": False}
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, **extra)
    return model.tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def answer_file(model, data: str, image_root: str | None, batch_size: int, max_new_tokens: int,
                device: str) -> list[dict]:
    import torch

    from pilot_hpc.data.records import load_records
    from pilot_hpc.metrics.generation import generate_answers

    samples = load_records(data, image_root)
    dataset = dataset_of(model, samples)
    answers = generate_answers(model, model.tokenizer, dataset, batch_size, max_new_tokens, torch.device(device))
    return [{"id": s.id, "prediction": a} for s, a in zip(samples, answers)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pilot_hpc.generate", description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a folder written by python -m pilot_hpc.export")
    ap.add_argument("--image", help="one image (with --prompt)")
    ap.add_argument("--prompt", help="the question about --image")
    ap.add_argument("--data", help="a LLaVA-format JSON file (batch mode, with --out)")
    ap.add_argument("--out", help="answers as JSON lines: {id, prediction} per record")
    ap.add_argument("--image-root", default=None, help="folder the records' image paths are relative to "
                                                        "(default: the data file's folder)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: the run's train.max_new_tokens")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the run's train.eval_batch_size")
    ap.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    single, batch = args.image is not None or args.prompt is not None, args.data is not None or args.out is not None
    if single == batch or (single and not (args.image and args.prompt)) or (batch and not (args.data and args.out)):
        ap.error("give either --image and --prompt, or --data and --out")
    from pilot_hpc.errors import BadInput, DataError
    from pilot_hpc.export import quiet

    quiet()
    try:
        model = load(args.model, args.device)
        gen = model.pilot_export["generation"]
        max_new = args.max_new_tokens or gen["max_new_tokens"]
        if single:
            if not os.path.isfile(args.image):
                raise DataError(f"image {args.image} does not exist")
            print(answer_one(model, args.image, args.prompt, max_new, args.device, args.sample, args.temperature))
            return 0
        rows = answer_file(model, args.data, args.image_root, args.batch_size or gen["batch_size"], max_new,
                           args.device)
    except (BadInput, OSError) as err:  # OSError: a file or folder named on the command line
        print(f"pilot_hpc.generate: error: {err}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as fh:
        for row in rows:
            fh.write(jsonout.dumps(row) + "\n")
    os.replace(tmp, args.out)
    print(f"wrote {len(rows)} answers to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
