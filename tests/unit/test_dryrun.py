"""The 7B dry run on the meta device: counts from the real transformers/peft modules."""

from pilot_hpc.tools.dryrun import report


def test_llava_7b_counts_match_the_architecture():
    text = report(64, 128, 3, 9, "bfloat16")
    cv, c, inter, layers, r = 1024, 4096, 11008, 32, 64
    adapter = cv * c + c + c * c + c  # Linear(1024, 4096) + Linear(4096, 4096), biases
    lora = layers * (4 * r * (c + c) + 2 * r * (c + inter) + r * (inter + c))
    assert f"{adapter:,}" in text and f"{lora:,}" in text
    assert f"sent per client per round:        {adapter + lora:>14,}" in text
    assert f"stage 1: trainable {2 * adapter + lora:>14,}" in text
    assert f"stage 2: trainable {3 * adapter + 3 * cv + lora:>14,}" in text  # own + 2 cross + router
    clip_mlps = 24 * (1024 * 4096 + 4096 + 4096 * 1024 + 1024)  # CLIP ViT-L/14's MLPs, one copy
    assert f"(+{clip_mlps:,};" in text  # CT-CLIP sends one more copy: the paper's +0.2B
    assert f"activated by CLIP's mixtures +{5 * clip_mlps + 24 * 3 * 1024:,}" in text


def test_planner_cli_fit_and_no_fit(capsys):
    import os

    from helpers import REPO
    from pilot_hpc.tools.dryrun import main

    visual = os.path.join(REPO, "configs", "fedmit_visual_9client.yaml")
    assert main(["--config", visual, "--gpu-mem-gb", "40"]) == 0
    out = capsys.readouterr().out
    assert "FITS in 40 GB" in out and "checkpointing on" in out
    assert main(["--config", visual, "--gpu-mem-gb", "40", "train.gradient_checkpointing=false",
                 "train.grad_accum_steps=1"]) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT in 40 GB" in out and "set train.gradient_checkpointing=true" in out
    assert main(["--config", visual, "train.grad_accum_steps=0"]) == 2  # a bad value: the config's message


def test_kernel_plan_at_a_family_connector(capsys):
    """dryrun --config prints the CT-MoA kernel's GEMMs at the config's connector: Qwen2.5-VL-7B's
    merger MLP (5120 -> 5120 -> 3584) for the planned micro-batch, and each Triton launch's
    tile count is the ceil-division of its GEMM's output by the tile."""
    import os
    import re

    from helpers import REPO
    from pilot_hpc.tools.dryrun import main

    assert main(["--config", os.path.join(REPO, "configs", "qwen2_5_vl_7b_visual_9client.yaml"), "--gpu-mem-gb",
                 "40"]) == 0
    out = capsys.readouterr().out
    mb = int(re.search(r"micro-batch (\d+),", out).group(1))
    m = mb * 256  # 448-px planning images: 256 visual tokens each
    assert f"5 MLPs 5120 -> 5120 -> 3584, bfloat16), one micro-batch of {mb} image(s)" in out
    rows = {r.split()[0] + ("" if r.split()[1][0].isdigit() else " " + r.split()[1]): r
            for r in out.splitlines() if re.match(r"  (up|down|bwd|router|torch)", r)}
    assert f"{m} x 3584 x {3 * 5120}" in rows["down mix"] and f"{m} x 5120 x 5120" in rows["up"]
    assert f"{m} x 5120 x 3584" in rows["bwd D"]
    for name in ("up", "down mix", "bwd D"):
        bm, bn = map(int, re.search(r"(\d+) x (\d+) x \d+, \d+, \d+", rows[name]).groups())
        n = int(re.search(r"\d+ x (\d+) x \d+", rows[name]).group(1))
        assert f" {-(-m // bm) * -(-n // bn):,} " in rows[name]
