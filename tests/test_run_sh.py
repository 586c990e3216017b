"""`bash run.sh`, the one command for the main job, through its real command line: the smoke chain (tiny model,
CPU) end to end, a second run that skips what is finished, a run after an interruption that continues, the
default run's refusal on a machine without a GPU, and a bad argument. This is how CI runs the smoke chain.

Each run works in a copy of the repository (no .venv, no outputs, no competition files) and uses the test's own
Python through PYTHON=..., so no environment is built here.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT, SAMPLE_DIR

SMOKE_STAGES = ["(1/6) data", "(2/6) environment", "(3/6) prep", "(4/6) train", "(5/6) checkpoint table on dev",
                "(6/6) submission"]
COMPETITION_NAMES = {"train": "일상대화요약_train.json", "dev": "일상대화요약_dev.json", "test": "일상대화요약_test.json"}


def ignore_for_copy(directory: str, names: list[str]) -> set[str]:
    """What a fresh clone lacks: environments, run outputs, caches and the untracked competition files."""
    skipped = {".git", "outputs", "__pycache__", ".pytest_cache", "unsloth_compiled_cache"}
    skipped |= {name for name in names if name.startswith(".venv")}  # .venv, .venv-tests, .venv-vllm
    if Path(directory).resolve() == REPO_ROOT / "data":
        skipped |= {name for name in names if name.endswith((".json", ".jsonl"))} | {"prepared"}
    return skipped & set(names)


def run_sh(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "run.sh", *args], cwd=repo, env={**os.environ, "PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=1800)


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]


def ran(stdout: str, script: str) -> list[str]:
    """The commands run.sh printed before running them ("$ python script ...")."""
    return [line for line in stdout.splitlines() if line.startswith("$ ") and f" {script} " in line]


def assert_stages(stdout: str) -> None:
    """Every stage's rule, in order, then the closing one."""
    positions = [stdout.find(f"run.sh {stage} ===") for stage in SMOKE_STAGES + ["done"]]
    assert -1 not in positions and positions == sorted(positions), positions


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    copy = tmp_path_factory.mktemp("clone") / "dcs"
    shutil.copytree(REPO_ROOT, copy, ignore=ignore_for_copy, symlinks=True)
    return copy


@pytest.fixture(scope="module")
def first_smoke(repo) -> subprocess.CompletedProcess:
    result = run_sh(repo, "--smoke")
    assert_ok(result)
    return result


def read_submission(repo: Path) -> list[dict]:
    return json.loads((repo / "outputs/smoke/submission.json").read_text(encoding="utf-8"))


def test_unknown_argument_is_one_line(repo):
    result = run_sh(repo, "--bogus")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == ["error: unknown argument '--bogus': bash run.sh [--smoke] [--help]"]


def test_help_names_both_commands(repo):
    result = run_sh(repo, "--help")
    assert result.returncode == 0
    assert "bash run.sh --smoke" in result.stdout and "PYTHON=python bash run.sh" in result.stdout
    assert not (repo / "outputs").exists()


def test_smoke_chain_writes_a_submission(repo, first_smoke):
    out = first_smoke.stdout
    assert_stages(out)
    assert "no competition files in data/" in out and "using " + sys.executable + " as it is" in out
    assert "requirements.txt: every pinned package is installed" in out
    # The chain ran each script, with the smoke settings, into outputs/smoke/ only.
    assert [line.endswith(" outputs/smoke/tiny_model") for line in ran(out, "tests/tiny_model.py")] == [True]
    train_runs = ran(out, "train.py")
    assert [" --data outputs/smoke/prepared --output_dir outputs/smoke/run " in line for line in train_runs] == [True]
    infer_runs = ran(out, "infer.py")
    assert len(infer_runs) == 2 and " --model outputs/smoke/run --input data/sample/dev.json " in infer_runs[0]
    assert sorted(path.name for path in (repo / "outputs").iterdir()) == ["smoke"]
    table = json.loads((repo / "outputs/smoke/dev/dev_pred.checkpoints.json").read_text(encoding="utf-8"))
    assert [row["checkpoint"] for row in table["rows"]] == ["checkpoint-6", "checkpoint-8", "final"]
    best = next(row for row in table["rows"] if row["checkpoint"] == table["best"])
    from_best = f" --model {best['path']} --input data/sample/test.json --output outputs/smoke/submission.json "
    assert from_best in infer_runs[1]
    # The file to upload: the test list in order, every summary filled.
    test_records = json.loads((SAMPLE_DIR / "test.json").read_text(encoding="utf-8"))
    submission = read_submission(repo)
    assert [r["id"] for r in submission] == [r["id"] for r in test_records]
    assert all(r["output"].strip() for r in submission)
    assert out.rstrip().splitlines()[-1].startswith("next: the install and the chain work; on the GPU machine")


def test_second_run_skips_finished_stages(repo, first_smoke):
    submission = repo / "outputs/smoke/submission.json"
    before = (submission.read_bytes(), submission.stat().st_mtime_ns)
    result = run_sh(repo, "--smoke")
    assert_ok(result)
    out = result.stdout
    assert_stages(out)
    assert "outputs/smoke/tiny_model: built by an earlier run; kept" in out
    assert "outputs/smoke/run/final: finished by an earlier run; kept" in out
    assert not ran(out, "train.py")
    assert "checkpoint-6: finished by an earlier run" in out and "checkpoint-8: finished by an earlier run" in out
    assert "outputs/smoke/submission.json: written from" in out and "by an earlier run; kept" in out
    assert (submission.read_bytes(), submission.stat().st_mtime_ns) == before


def test_run_after_an_interruption_continues(repo, first_smoke):
    """As if killed after the last checkpoint: no final/, no submission. With competition files in data/ the smoke
    run also validates them (here: the sample under the competition names)."""
    shutil.rmtree(repo / "outputs/smoke/run/final")
    (repo / "outputs/smoke/submission.json").unlink()
    for split, name in COMPETITION_NAMES.items():
        shutil.copy(SAMPLE_DIR / f"{split}.json", repo / "data" / name)
    try:
        result = run_sh(repo, "--smoke")
    finally:
        for name in COMPETITION_NAMES.values():
            (repo / "data" / name).unlink()
    assert_ok(result)
    out = result.stdout
    assert "checking the competition files with prep.py" in out and "no competition files" not in out
    assert "Resuming from outputs/smoke/run/checkpoint-8" in out
    assert "checkpoint-6: finished by an earlier run" in out
    test_ids = [r["id"] for r in json.loads((SAMPLE_DIR / "test.json").read_text(encoding="utf-8"))]
    assert [r["id"] for r in read_submission(repo)] == test_ids


def test_default_run_without_a_gpu_says_so(repo):
    """The real run starts like the smoke one (sample data when data/ has no competition files) and stops in one
    line at the environment check: this machine has no GPU for Gemma 2 9B."""
    result = run_sh(repo)
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert "no competition files in data/" in result.stdout and "running on data/sample" in result.stdout
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: torch in {sys.executable} sees no GPU: training Gemma 2 9B needs one"), last
    assert last.endswith("bash run.sh --smoke runs the chain on CPU"), last
    assert "Traceback" not in result.stdout + result.stderr
    assert not (repo / "outputs/sample").exists()


def test_old_python_is_refused_before_a_venv_is_made(repo, tmp_path):
    """Without PYTHON and .venv, run.sh makes .venv from python3: one that is too old is refused in one line first."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    fake_python = fake_bin / "python3"
    # Answers like a Python 3.10 would to the two questions run.sh asks it: its version, and whether it is >= 3.11.
    fake_python.write_text('#!/bin/sh\nif [ "$1" = --version ]; then echo "Python 3.10.12"; exit 0; fi\nexit 1\n')
    fake_python.chmod(0o755)
    env = {key: value for key, value in os.environ.items() if key != "PYTHON"}
    result = subprocess.run(["bash", "run.sh", "--smoke"], cwd=repo, env={**env, "PATH": f"{fake_bin}:{env['PATH']}"},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: Python 3.10.12 is too old: trl 1.15 and matplotlib 3.11.2 need Python >= 3.11; make .venv with one "
        "(python3.11 -m venv --system-site-packages .venv; README Install) and run bash run.sh again"]
    assert not (repo / ".venv").exists()


def test_some_competition_files_but_not_all_is_one_line(repo):
    (repo / "data" / COMPETITION_NAMES["train"]).write_bytes((SAMPLE_DIR / "train.json").read_bytes())
    try:
        result = run_sh(repo)
    finally:
        (repo / "data" / COMPETITION_NAMES["train"]).unlink()
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: data/ holds data/일상대화요약_train.json but not data/일상대화요약_dev.json data/일상대화요약_test.json: "
        "put all three competition files there"]
