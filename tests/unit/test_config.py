"""Config schema, YAML overlay, overrides, and the one-message failures before training."""


import pytest

from helpers import SMOKE
from pilot_hpc.config import ConfigError, check_world, load_config, result_differences


def test_smoke_config_loads_with_overrides():
    cfg = load_config(SMOKE, ["fl.rounds=2", "run.output_dir=/tmp/x", "train.lr_stage1=1e-3",
                              "fl.client_tasks=[vqa, vqa, caption]", "fl.num_clients=3", "pilot.top_m=2",
                              "fl.task_metrics={vqa: vqa_accuracy, caption: cider}"])
    assert cfg.fl.rounds == 2 and cfg.run.output_dir == "/tmp/x"
    assert cfg.train.lr_stage1 == pytest.approx(1e-3)
    assert cfg.tasks == ["vqa", "caption"]


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        load_config(SMOKE, ["fl.bogus=1"])
    assert "fl.bogus" in str(err.value) and "strategy" in str(err.value) and "rounds" in str(err.value)


def test_unknown_section_lists_valid_sections():
    with pytest.raises(ConfigError, match="valid sections"):
        load_config(None, ["nope.x=1"])


def test_top_m_must_be_below_num_clients():
    with pytest.raises(ConfigError, match=r"M = 9.*K = fl.num_clients \(9\)"):
        load_config(SMOKE, ["pilot.top_m=9"])


def test_client_tasks_must_match_num_clients_and_known_tasks():
    with pytest.raises(ConfigError, match="8 entries but fl.num_clients is 9"):
        load_config(SMOKE, ["fl.client_tasks=[vqa, vqa, vqa, caption, caption, caption, grounding, grounding]"])
    with pytest.raises(ConfigError, match="unknown task"):
        load_config(None, ["fl.num_clients=2", "pilot.top_m=1", "fl.client_tasks=[vqa, ocr]"])


def test_a_task_with_no_client_is_rejected():
    with pytest.raises(ConfigError, match=r"\['grounding'\] in fl.task_metrics have no client"):
        load_config(None, ["fl.num_clients=3", "pilot.top_m=1", "fl.client_tasks=[vqa, vqa, caption]"])


def test_task_metrics_are_checked():
    with pytest.raises(ConfigError, match="fl.task_metrics.vqa must be one of vqa_accuracy, cider"):
        load_config(None, ["fl.task_metrics={vqa: bleu, caption: cider, grounding: iou@0.5}"])
    with pytest.raises(ConfigError, match="synthetic draws only the tasks"):
        load_config(None, ["fl.num_clients=2", "pilot.top_m=1", "fl.client_tasks=[gqa, coco]",
                           "fl.task_metrics={gqa: vqa_accuracy, coco: cider}"])


def test_wrong_types_are_named():
    with pytest.raises(ConfigError, match="fl.rounds must be an integer"):
        load_config(SMOKE, ["fl.rounds=three"])
    with pytest.raises(ConfigError, match="fl.client_tasks must be a list"):
        load_config(SMOKE, ["fl.client_tasks=vqa"])


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(SMOKE, ["rounds=3"])


def test_world_checks():
    cfg = load_config(SMOKE)
    check_world(cfg, 9)
    check_world(cfg, 2)  # 9 clients over 2 ranks: 4 + 5, allowed by default
    with pytest.raises(ConfigError, match="every host must have a client"):
        check_world(cfg, 10)
    even = load_config(SMOKE, ["fl.require_even_ranks=true"])
    with pytest.raises(ConfigError, match="do not divide over 2 client hosts"):
        check_world(even, 2)
    groups = load_config(SMOKE, ["run.ranks_per_client=2", "train.engine=deepspeed"])
    check_world(groups, 4)  # 2 client hosts of 2 ranks
    with pytest.raises(ConfigError, match="do not split into client groups"):
        check_world(groups, 3)
    with pytest.raises(ConfigError, match="start at most 18 ranks"):
        check_world(groups, 20)
    with pytest.raises(ConfigError, match="set train.engine=deepspeed"):
        load_config(SMOKE, ["run.ranks_per_client=2"])
    with pytest.raises(ConfigError, match="train.zero_stage"):
        load_config(SMOKE, ["train.zero_stage=3"])


def test_missing_file_and_llava_json_without_model_path(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "none.yaml"))
    with pytest.raises(ConfigError, match="needs model.path"):
        load_config(SMOKE, ["data.kind=llava_json"])


def test_hash_changes_with_values():
    assert load_config(SMOKE).hash() == load_config(SMOKE).hash()
    assert load_config(SMOKE).hash() != load_config(SMOKE, ["pilot.top_m=5"]).hash()




def test_several_config_files_stack_in_order(tmp_path):
    """prepare's overlay.yaml on a paper config: both apply, the later file's keys win
    (before, argparse kept only the last --config and the defaults filled the rest)."""
    from pilot_hpc.main import parse_args

    base = tmp_path / "paper.yaml"
    base.write_text("run: {device: auto}\ndata: {max_length: 700, kind: synthetic}\nfl: {rounds: 5}\n")
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("fl: {rounds: 2}\n")
    args = parse_args(["--config", str(base), "--config", str(overlay), "train.max_steps=3"])
    cfg = load_config(args.config, args.overrides)
    assert (cfg.run.device, cfg.data.max_length, cfg.fl.rounds, cfg.train.max_steps) == ("auto", 700, 2, 3)


def test_errors_blame_where_the_key_came_from(tmp_path):
    with pytest.raises(ConfigError, match=r"^override 'fl.bogus=1': unknown key fl.bogus"):
        load_config(SMOKE, ["fl.bogus=1"])
    with pytest.raises(ConfigError, match=r"^override 'fl.rounds=two': fl.rounds must be an integer"):
        load_config(SMOKE, ["fl.rounds=two"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("fl: {bogus: 1}\n")
    with pytest.raises(ConfigError, match=rf"^{bad}: unknown key fl.bogus"):
        load_config([SMOKE, str(bad)])
    with pytest.raises(ConfigError, match="is a directory: --config takes a YAML file"):
        load_config(str(tmp_path))


def test_an_unknown_strategy_is_a_config_error_listing_the_registered_ones():
    with pytest.raises(ConfigError, match=r"fl.strategy must be one of pilot, fedavg, .*got 'fedavgg'"):
        load_config(SMOKE, ["fl.strategy=fedavgg"])


def test_the_strategy_choices_are_the_registered_strategies():
    import typing

    from pilot_hpc.config import FLConfig
    from pilot_hpc.fl.strategies import REGISTRY

    assert set(typing.get_args(typing.get_type_hints(FLConfig)["strategy"])) == set(REGISTRY)


def test_fedadam_tau_must_be_positive_and_weighting_is_a_choice():
    with pytest.raises(ConfigError, match=r"fedadam.tau must be > 0, got 0.0"):
        load_config(SMOKE, ["fl.strategy=fedadam", "fedadam.tau=0"])
    with pytest.raises(ConfigError, match="fedadam.weighting must be one of samples, uniform; got 'equal'"):
        load_config(SMOKE, ["fedadam.weighting=equal"])
    assert load_config(SMOKE).fedadam.weighting == "samples"
    assert load_config(SMOKE, ["fedadam.weighting=uniform"]).fedadam.weighting == "uniform"


def test_a_key_missing_from_an_older_config_counts_as_its_default():
    """A checkpoint whose config lacks fedadam.weighting resumes with the default, and is
    refused (the key named) when the new config sets it to something else."""
    old = load_config(SMOKE).to_dict()
    del old["fedadam"]["weighting"]
    assert result_differences(old, load_config(SMOKE).to_dict()) == []
    assert result_differences(old, load_config(SMOKE, ["fedadam.weighting=uniform"]).to_dict()) == [
        "fedadam.weighting: 'samples' -> 'uniform'"]
    old["pilot"]["top_m"] = 5  # a real difference is still listed, the missing key is not
    assert result_differences(old, load_config(SMOKE).to_dict()) == ["pilot.top_m: 5 -> 6"]


def test_a_key_added_later_leaves_the_hashes_of_older_runs_alone_at_its_default():
    """config.UNHASHED_AT_DEFAULT: a key at its listed default (fedadam.weighting=samples,
    train.lr_baseline=0, ...) hashes as a config without it, so the runs recorded without
    it stay finished for launch and tools/study; any other value (uniform, a rate) does not."""
    import hashlib
    import json

    from pilot_hpc.config import UNHASHED_AT_DEFAULT, result_fields

    def old_hashes(cfg):
        d = cfg.to_dict()
        for key in UNHASHED_AT_DEFAULT:
            section, name = key.split(".")
            del d[section][name]
            if not d[section]:  # a section added later, every key at its default: older configs lack it
                del d[section]
        return [hashlib.sha256(json.dumps(x, sort_keys=True).encode()).hexdigest()[:16]
                for x in (d, result_fields(d))]

    for extra in ([], ["fl.strategy=fedadam", "fedadam.tau=0.01"]):
        cfg = load_config(SMOKE, extra)
        assert [cfg.hash(), cfg.result_hash()] == old_hashes(cfg)
    # The smoke config's hashes as commit cb6aeb1 computed them: the pins every later key,
    # at its default, must leave alone (finished runs and checkpoints carry these).
    assert [load_config(SMOKE).hash(), load_config(SMOKE).result_hash()] == ["68b9c3d80e098286", "27d0ea47429ab66a"]
    for change in ("fedadam.weighting=uniform", "train.lr_baseline=1e-4"):
        changed = load_config(SMOKE, [change])
        assert changed.hash() != load_config(SMOKE).hash()
        assert changed.result_hash() != load_config(SMOKE).result_hash()
        assert changed.hash() not in old_hashes(changed)


def test_the_bad_input_errors_share_one_base_and_none_is_a_value_error():
    """main exits 2 on BadInput only: a library's ValueError (or a slip in this code) must
    not pass for the user's mistake. The old homes of the names still export them."""
    from pilot_hpc import errors
    from pilot_hpc.checkpoint import CheckpointError
    from pilot_hpc.config import ConfigError
    from pilot_hpc.export import ExportError

    assert (ConfigError, CheckpointError, ExportError) == (errors.ConfigError, errors.CheckpointError,
                                                           errors.ExportError)
    for cls in (ConfigError, CheckpointError, ExportError, errors.DataError):
        assert issubclass(cls, errors.BadInput) and not issubclass(cls, ValueError), cls
