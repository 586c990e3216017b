"""What the scripts share about the machine they run on: the Python and torch check (README Install),
the filter for known-harmless library log lines, and the mode of the files they write atomically."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import common
from conftest import OFFLINE_ENV, REPO_ROOT as REPO, VLLM_PYTHON, assert_one_line_error, run_script

SAMPLE = REPO / "data" / "sample"


# ------------------------------------------------------------------------------------------------
# Python >= 3.11 and torch >= 2.4, < 2.15
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("python, torch, needs_torch, fragments", [
    ((3, 10, 12), "2.5.1+cu124", True, ["Python 3.10 is too old", "uv venv -p 3.11", "Colab's Python 3.12"]),
    ((3, 11, 7), "2.3.1+cu121", True, ["torch 2.3.1+cu121 is too old", "bitsandbytes needs torch >= 2.4", "--index-url https://download.pytorch.org/whl/"]),
    ((3, 12, 0), "2.15.0", True, ["torch 2.15.0 is too new", "torch < 2.15"]),
    ((3, 11, 0), None, True, ["torch is not installed", "--index-url https://download.pytorch.org/whl/"]),
])
def test_environment_problems_name_the_fix(python, torch, needs_torch, fragments):
    message = "; ".join(common.environment_problems(python, torch, needs_torch))
    for fragment in fragments:
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize("python, torch, needs_torch", [
    ((3, 11, 7), "2.13.0", True), ((3, 12, 3), "2.4.0+cu121", True), ((3, 11, 0), "2.14.1+cpu", True),
    ((3, 11, 7), None, False), ((3, 11, 7), "2.1.0", False),  # an HTTP teacher or --score loads no torch
])
def test_supported_environments_pass(python, torch, needs_torch):
    assert common.environment_problems(python, torch, needs_torch) == []


def test_both_problems_are_reported_at_once():
    assert len(common.environment_problems((3, 10), "2.2.0", True)) == 2


def fake_installed_torch(root: Path, version: str) -> dict[str, str]:
    """An environment whose package metadata says torch `version` is installed (shadowing the real one)."""
    dist_info = root / "site" / f"torch-{version}.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n", encoding="utf-8")
    return {"PYTHONPATH": str(root / "site")}


@pytest.mark.parametrize("args", [
    ["train.py", "--data", "prepared"],
    ["infer.py", "--input", str(SAMPLE / "test.json"), "--output", "submission.json"],
    ["distill.py", "magpie", "--model", "some/model", "--output", "magpie.jsonl"],
    ["distill.py", "distill", "--input", str(SAMPLE / "train.json"), "--teacher_url", "local", "--teacher_model", "some/model",
     "--output", "teacher.jsonl"],
    ["distill.py", "rewrite", "--input", str(SAMPLE / "train.json"), "--teacher_url", "local",
     "--teacher_model", "some/model", "--output", "rewritten.json"],
    ["prep.py", "--check_env"],
])
def test_old_torch_is_refused_in_one_line_before_anything_runs(tmp_path, args):
    result = run_script(args, cwd=tmp_path, env=fake_installed_torch(tmp_path, "2.3.1+cu121"), timeout=120)
    assert_one_line_error(result, "torch 2.3.1+cu121 is too old", "bitsandbytes needs torch >= 2.4",
                          "--index-url https://download.pytorch.org/whl/")
    assert [p.name for p in tmp_path.iterdir()] == ["site"]  # nothing written


def test_check_env_passes_here_and_score_mode_needs_no_torch(tmp_path):
    result = run_script(["prep.py", "--check_env"], cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"ok: Python {sys.version.split()[0]} and torch ")
    assert list(tmp_path.iterdir()) == []
    scored = run_script(["infer.py", "--score", str(SAMPLE / "dev.json"), "--ref", str(SAMPLE / "dev.json"), "--metrics", "rouge1",
                         "--scores_file", "scores.json"], cwd=tmp_path, env=fake_installed_torch(tmp_path, "2.3.1+cu121"), timeout=120)
    assert scored.returncode == 0, scored.stderr


# ------------------------------------------------------------------------------------------------
# Known-harmless library noise is hidden; everything else those loggers say still shows
# ------------------------------------------------------------------------------------------------

_IMPORT_AND_LOG = """
import importlib.util, logging, sys, warnings
sys.path.insert(0, sys.argv[1])
import common
common.filter_known_noise()
import unsloth, torchao, bitsandbytes  # on CPU these imports log the known noise
for name, prefixes in common.KNOWN_HARMLESS_LOGS.items():
    if importlib.util.find_spec(name.split(".")[0]) is None:
        continue  # vllm lives in .venv-vllm: test_vllm_noise_filters_still_match_vllm checks its filters there
    source = open(importlib.util.find_spec(name).origin, encoding="utf-8").read()
    for prefix in prefixes:
        print(f"{name} still logs {prefix!r}: {prefix in source}")
for name in common.KNOWN_HARMLESS_LOGS:
    logging.getLogger(name).warning("a real problem reported by %s", name)
warnings.warn("a real UserWarning")
"""


def test_known_noise_is_hidden_and_real_warnings_still_show():
    result = subprocess.run([sys.executable, "-c", _IMPORT_AND_LOG, str(REPO)], env={**os.environ, **OFFLINE_ENV},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "is an Enum subclass" not in result.stderr and "Failed to load" not in result.stderr
    for name in common.KNOWN_HARMLESS_LOGS:
        assert f"a real problem reported by {name}" in result.stderr
    assert "UserWarning: a real UserWarning" in result.stderr
    checked = [line for line in result.stdout.splitlines() if " still logs " in line]  # unsloth prints its banner too
    assert len(checked) == sum(len(prefixes) for name, prefixes in common.KNOWN_HARMLESS_LOGS.items()
                               if not name.startswith("vllm"))
    assert all(line.endswith(": True") for line in checked), checked  # each filter still matches its library's message


def test_vllm_noise_filters_still_match_vllm():
    """The vllm entries of KNOWN_HARMLESS_LOGS against the vLLM that .venv-vllm holds (the default venv has none)."""
    names = {name: prefixes for name, prefixes in common.KNOWN_HARMLESS_LOGS.items() if name.startswith("vllm")}
    code = ("import importlib.util, json, sys\n"
            "for name, prefixes in json.loads(sys.argv[1]).items():\n"
            "    source = open(importlib.util.find_spec(name).origin, encoding='utf-8').read()\n"
            "    print(*(prefix in source for prefix in prefixes))\n")
    result = subprocess.run([str(VLLM_PYTHON), "-c", code, json.dumps(names)], capture_output=True, text=True, timeout=300)
    assert names and result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True"] * sum(map(len, names.values())), result.stdout


def test_train_console_shows_no_known_noise(memorized_run):
    stderr = memorized_run["result"].stderr
    assert "is an Enum subclass" not in stderr and "Failed to load" not in stderr


# ------------------------------------------------------------------------------------------------
# Files written atomically get the mode a plain open() would give (0644 under the usual umask)
# ------------------------------------------------------------------------------------------------

def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_atomic_write_follows_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        target = tmp_path / "out.json"
        common.write_text_atomic(target, "[]\n")
        common.write_text_atomic(target, "[1]\n")  # replacing a file too
    finally:
        os.umask(previous)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    assert target.read_text(encoding="utf-8") == "[1]\n"


def test_safetensors_files_get_the_usual_mode(tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    previous = os.umask(0o022)
    try:
        (tmp_path / "adapter").mkdir()
        save_file({"w": np.zeros(2, dtype=np.float32)}, str(tmp_path / "adapter" / "adapter_model.safetensors"))
        assert (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_mode & 0o777 == 0o600  # the library's own doing
        common.give_usual_file_modes(tmp_path / "adapter")
    finally:
        os.umask(previous)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_mode & 0o777 == 0o644


def test_score_file_is_0644_under_the_usual_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        result = run_script(["infer.py", "--score", str(SAMPLE / "dev.json"), "--ref", str(SAMPLE / "dev.json"), "--metrics", "rouge1",
                             "--scores_file", "scores.json"], cwd=tmp_path, timeout=120)
    finally:
        os.umask(previous)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "scores.json").read_text(encoding="utf-8"))["means"]["rouge1"] == 1.0
    assert (tmp_path / "scores.json").stat().st_mode & 0o777 == 0o644


def test_train_final_files_have_the_usual_mode(memorized_run):
    """run_config.json (written atomically) and the adapter (safetensors writes through a 0600 temp file)."""
    modes = {p.name: p.stat().st_mode & 0o777 for p in (memorized_run["run"] / "final").iterdir()}
    assert {"run_config.json", "adapter_model.safetensors"} <= set(modes)
    assert set(modes.values()) == {0o666 & ~current_umask()}, modes
