"""`distill.py magpie` through its real command line on the tiny Gemma 2 taught a few chat turns
(`chatty_model_dir` in conftest.py). Its text is garbage-ish, so the tests check shapes, resume and
the filters, and that the output feeds `prep.py --extra`."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import run_script

FAST = ["--no-load_in_4bit", "--instruction_max_new_tokens", "24", "--max_new_tokens", "24", "--batch_size", "4"]
REJECT_REASONS = ("empty instruction", "truncated instruction", "near-duplicate instruction", "empty answer", "truncated answer")


def run(*args: str):
    return run_script(["distill.py", *args])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def magpie_runs(chatty_model_dir, tmp_path_factory) -> dict:
    """Run 1 samples 4 pairs; run 2 (same output, --n 6, greedy instructions) must add only pairs 4
    and 5, and greedy decoding writes the same instruction twice, so pair 5 must be filtered."""
    out = tmp_path_factory.mktemp("magpie") / "magpie.jsonl"
    common = ["magpie", "--model", str(chatty_model_dir), "--output", str(out), *FAST]
    first = run(*common, "--n", "4", "--temperature", "1.0", "--seed", "0")
    assert first.returncode == 0, first.stderr
    after_first = out.read_text(encoding="utf-8") if out.exists() else ""
    rejects_first = read_jsonl(out.with_suffix(".rejects.jsonl"))
    second = run(*common, "--n", "6", "--temperature", "0")
    assert second.returncode == 0, second.stderr
    return {"out": out, "after_first": after_first, "rejects_first": rejects_first, "second": second}


def test_rows_are_alpaca_pairs_and_every_pair_is_accounted_for(magpie_runs, chatty_model_dir):
    out = magpie_runs["out"]
    rows, rejects = read_jsonl(out), read_jsonl(out.with_suffix(".rejects.jsonl"))
    assert sorted(r["id"] for r in rows + rejects) == [f"magpie-{i:06d}" for i in range(6)]
    assert rows, "the taught model should keep at least one pair"
    for row in rows:
        assert set(row) == {"instruction", "input", "output", "id", "model"}
        assert row["instruction"].strip() and row["output"].strip() and row["input"] == ""
        assert row["model"] == str(chatty_model_dir)
    for reject in rejects:
        assert reject["reason"].startswith(REJECT_REASONS), reject


def test_resume_adds_only_the_missing_pairs(magpie_runs):
    out = magpie_runs["out"]
    assert out.read_text(encoding="utf-8").startswith(magpie_runs["after_first"]), "the first run's rows were rewritten"
    first_ids = {r["id"] for r in read_jsonl(out)[: magpie_runs["after_first"].count("\n")]} | {r["id"] for r in magpie_runs["rejects_first"]}
    assert first_ids == {f"magpie-{i:06d}" for i in range(4)}
    assert "0 already done" not in magpie_runs["second"].stdout and "4 already done" in magpie_runs["second"].stdout
    # stdout is a pipe (as under nohup or Colab's !python): one plain line per batch of pairs, none per generate() call.
    progress = re.findall(r"^pairs: (\d)/2 \(\d+%\), [\d.]+ items/s, ETA \w+, kept \d+, rejected \d+$", magpie_runs["second"].stdout, re.M)
    assert progress == ["2"] and "generating:" not in magpie_runs["second"].stdout, magpie_runs["second"].stdout


def test_greedy_instructions_are_filtered_as_near_duplicates(magpie_runs):
    rejects = {r["id"]: r["reason"] for r in read_jsonl(magpie_runs["out"].with_suffix(".rejects.jsonl"))}
    assert rejects.get("magpie-000005", "").startswith("near-duplicate"), rejects


def test_a_finished_run_loads_no_model(magpie_runs, chatty_model_dir):
    again = run("magpie", "--model", str(chatty_model_dir), "--output", str(magpie_runs["out"]), *FAST, "--n", "6")
    assert again.returncode == 0, again.stderr
    assert "6 already done" in again.stdout and "Unsloth" not in again.stdout + again.stderr


def test_output_feeds_prep_extra(magpie_runs, tmp_path):
    rows = read_jsonl(magpie_runs["out"])
    result = run_script(["prep.py", "--train", "data/sample/train.json", "--dev", "data/sample/dev.json",
                         "--test", "data/sample/test.json", "--extra", str(magpie_runs["out"]),
                         "--out", str(tmp_path / "prepared")])
    assert result.returncode == 0, result.stderr
    train = read_jsonl(tmp_path / "prepared" / "train.jsonl")
    from_magpie = [row for row in train if row["source"] == str(magpie_runs["out"])]
    assert 1 <= len(from_magpie) <= len(rows)
    assert {row["prompt"][0]["content"] for row in from_magpie} <= {row["instruction"] for row in rows}
