"""The whole-run checks of test_family_runs.py for LLaVA-OneVision and LLaVA-NeXT (the
any-resolution families), in a file of their own so that a second test worker runs them."""

import pytest

from test_family_runs import (make_family_runs, test_exported_client_answers_as_its_predictions,  # noqa: F401
                              test_merged_fedavg_folder_loads_with_transformers_alone,
                              test_w3_through_model_path_equals_the_preempted_and_resumed_w1)

FAMILIES = ["llava_onevision", "llava_next"]

family_runs = pytest.fixture(scope="module", params=FAMILIES, name="family_runs")(make_family_runs)
