"""Shared fixtures: where the reference data lives, and small deterministic helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# Property tests draw the same examples on every run by default, so CI cannot turn red on a
# new draw; `HYPOTHESIS_PROFILE=explore ./scripts/test.sh tests/test_fuzz_files.py` draws fresh
# ones (run it when touching parsers or loaders, and pin what it finds as a regression test).
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

# One intra-op thread: the suite runs next to ROS node subprocesses, and OpenMP threads that
# spin against each other on 2 busy cores make small models up to 10x slower.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]

# The ``slow`` marker (pyproject.toml): `./scripts/test.sh -m "not slow"` is the inner loop.
# Slow are the tests that start ROS processes over DDS (tests/ros), the Lightning training
# and evaluation modules, and the core tests measured at > 5 s on a loaded 2-core machine
# (`pytest --durations=40`); a test decorated `@pytest.mark.slow` counts too.
SLOW_MODULES = {
    "ros",  # every DDS test
    "training/test_training.py", "training/test_ddp.py", "training/test_train_crash_safety.py",
    "training/test_learnability.py", "training/test_full_scale_configs.py", "training/test_evaluate.py",
    "training/test_preference.py", "training/test_beam_drop.py",
}
SLOW_TESTS = {
    "test_cli.py::test_directory_run_skips_bad_files_and_completes_the_rest",
    "test_cli.py::test_real_scan_lite_preset_with_render",
    "test_cli.py::test_separate_refinement_checkpoint",
    "test_cli.py::test_single_file_to_npy_with_flags",
    "test_cli.py::test_shipped_model_by_name_and_as_default",
    "test_cli.py::test_directory_render_png_is_the_first_completed_scan",
    "test_checkpoints.py::test_save_and_load_round_trip",
    "test_checkpoints.py::test_a_separate_refinement_checkpoint_published_or_ours",
    "test_completer.py::test_from_checkpoint_takes_a_shipped_name_or_a_path",
    "test_completer.py::test_sampler_runs_the_requested_steps",
    "test_gpu_check.py::test_training_bursts_time_the_shipped_configs_and_write_no_checkpoint",
    "test_gpu_check.py::test_benchmark_without_cuda_says_so_in_one_line",
    "test_startup.py::test_the_ve_sampler_path_never_imports_diffusers",
    "test_startup.py::test_importing_the_pipeline_and_the_cli_imports_nothing_heavy",
    "test_networks.py::test_full_width_published_layout_loads_strict",
    "test_architecture.py::test_no_import_cycle_in_the_core",
    "test_fuzz_files.py::test_odd_model_configs_end_in_checkpoint_error",
    "test_lint.py::test_mypy_is_clean",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    tests = Path(__file__).resolve().parent
    for item in items:
        path = Path(str(item.fspath)).resolve()
        if tests not in path.parents:
            continue
        relative = path.relative_to(tests).as_posix()
        if relative in SLOW_MODULES or relative.split("/")[0] in SLOW_MODULES \
                or f"{relative}::{item.originalname}" in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
SHARED = Path(os.environ.get("LIDAR_SHARED_DIR", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"reference data not found at {SHARED} (set LIDAR_SHARED_DIR)")
    return SHARED


@pytest.fixture(scope="session")
def real_scan_path(shared_dir: Path) -> Path:
    return shared_dir / "data" / "semantickitti_08_000123.ply"
