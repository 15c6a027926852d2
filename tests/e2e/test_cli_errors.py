"""The CLI with a bad config: one message, exit 2, nothing trained or written."""

import pytest

from helpers import SMOKE, run_main


@pytest.mark.parametrize("override,message", [
    ("fl.bogus=1", "unknown key fl.bogus"),
    ("pilot.top_m=9", "must satisfy 1 <= M < K"),
])
def test_cli_rejects_bad_config_before_training(tmp_path, override, message):
    out = tmp_path / "out"
    proc = run_main(["--config", SMOKE, f"run.output_dir={out}", f"run.cache_dir={tmp_path}", override], timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert proc.stderr.count("config error") == 1
    assert not out.exists()  # nothing trained, nothing written
