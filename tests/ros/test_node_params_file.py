"""A missing or malformed ``--params-file`` is a start-up failure like any other (issue 28,
item 5): one ``FATAL ... cannot start:`` line and exit status 2, not rcl's error line and a
traceback."""

from __future__ import annotations

from pathlib import Path

from ros_helpers import start_node


def test_missing_or_malformed_params_file_is_one_line_and_exit_2(domain_id: int, tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    malformed = tmp_path / "malformed.yaml"
    malformed.write_text("completion_node:\n  ros__parameters:\n    - [unclosed\n")
    not_params = tmp_path / "not_params.yaml"
    not_params.write_text("[a, b]: 1\n")  # valid YAML, not a parameter file
    cases = [(missing, f"--params-file {missing}: no such file"),
             (tmp_path, f"--params-file {tmp_path}: not a file"),
             (malformed, f"Couldn't parse params file: '--params-file {malformed}'"),
             (not_params, f"Couldn't parse params file: '--params-file {not_params}'")]
    procs = [start_node(domain_id, {}, params_file=path) for path, _ in cases]  # all at once: interpreter start-up
    for (path, expected), proc in zip(cases, procs, strict=True):
        code = proc.wait(120)
        lines = [line for line in proc.lines if line.strip()]
        assert code == 2, f"{path}: exit status {code}\n{proc.output}"
        assert len(lines) == 1, f"{path}: expected one line\n{proc.output}"
        assert "FATAL" in lines[0] and "cannot start:" in lines[0] and expected in lines[0], lines[0]
        assert "rcl/arguments.c" not in lines[0] and "Traceback" not in proc.output
