"""The "next:" commands the scripts print (issue 17 items 10-12): shell-quoted, never an upload of a partial
file, and only a command that runs. Each printed command is split the way a shell would (shlex) and compared,
or run as printed.
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import infer
from conftest import REPO_ROOT as REPO, run_script
from common import shell_command

FAST = ["--no-load_in_4bit", "--max_new_tokens", "16"]


def printed_command(stdout: str, marker: str) -> list[str]:
    """The words of the command printed after `marker`, as a shell would split them."""
    line = next(line for line in stdout.splitlines() if marker in line)
    return shlex.split(line.split(marker, 1)[1])


def test_shell_command_quotes_every_word_that_needs_it():
    words = ["python", "infer.py", "--model", "m out/linear", "--input", "data/일상대화요약_test.json", "--x", "it's"]
    assert shlex.split(shell_command(*words)) == words
    plain = shell_command("python", "train.py", "--data", Path("data/prepared"))
    assert plain == "python train.py --data data/prepared"


def test_settings_flags_give_back_the_settings():
    cfg = infer.InferSettings(model="a b", load_in_4bit=False, max_new_tokens=48, metrics=["rouge1"], limit=3)
    words = shlex.split(infer.infer_command(cfg, limit=None))
    assert words[:2] == ["python", "infer.py"]
    parsed = infer.parse_settings(infer.InferSettings, words[2:], "")
    assert parsed == infer.InferSettings(model="a b", load_in_4bit=False, max_new_tokens=48, metrics=["rouge1"])


def test_table_next_command_keeps_the_generation_flags(tmp_path):
    best = {"path": str(tmp_path / "m out" / "checkpoint-60")}
    generation = {"limit": 2, "max_new_tokens": 48, "repetition_penalty": 1.1, "max_seq_length": None,
                  "load_in_4bit": False, "num_samples": 0}
    assert shlex.split(infer.table_next_command(best, generation)) == [
        "python", "infer.py", "--model", best["path"], "--input", "data/일상대화요약_test.json",
        "--max_new_tokens", "48", "--repetition_penalty", "1.1", "--no-load_in_4bit"]


def test_prep_next_command_is_quoted(tmp_path):
    out = tmp_path / "pre pared"
    result = run_script(["prep.py", "--train", REPO / "data/sample/train.json", "--dev", REPO / "data/sample/dev.json",
                         "--test", REPO / "data/sample/test.json", "--out", out], cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert printed_command(result.stdout, "next: ") == ["python", "train.py", "--data", str(out)]


def test_a_limit_run_suggests_the_full_run_not_an_upload(tmp_path, memorized_run):
    model = memorized_run["run"] / "final"
    args = ["--model", str(model), "--input", str(REPO / "data/sample/test.json"), *FAST]
    result = run_script(["infer.py", *args, "--limit", "2"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "upload" not in result.stdout
    command = printed_command(result.stdout, "next: the full run, ")
    assert command[:2] == ["python", "infer.py"] and "--limit" not in command
    full = run_script(command[1:], cwd=tmp_path)
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-3000:]
    assert len(json.loads((tmp_path / "submission.json").read_text(encoding="utf-8"))) == 3
    assert "next: upload submission.json, or score a dev run with python infer.py" in full.stdout


def test_after_num_samples_the_guard_suggests_a_command_that_runs(tmp_path, memorized_run):
    """--regenerate_flagged refuses --num_samples: the suggested command leaves the sampling out and runs."""
    records = memorized_run["records"]
    blank = [{**r, "output": ""} for r in records]
    (tmp_path / "in.json").write_text(json.dumps(blank, ensure_ascii=False), encoding="utf-8")
    result = run_script(["infer.py", "--model", memorized_run["run"] / "final", "--input", "in.json",
                         "--output", "sub out.json", "--no-load_in_4bit", "--max_new_tokens", "12",
                         "--num_samples", "2", "--select_metric", "rouge1"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    command = printed_command(result.stdout, "to regenerate just these (keeping the rest): ")
    assert "--num_samples" not in command and command[command.index("--output") + 1] == "sub out.json"
    retried = run_script(command[1:], cwd=tmp_path)
    assert retried.returncode == 0, retried.stdout[-3000:] + retried.stderr[-3000:]
    assert "--regenerate_flagged: regenerating" in retried.stdout
