"""`distill.py rewrite` against the loopback OpenAI-style teacher of test_distill.py: a rewrite is kept only where it
passes the guard against the original, the output is the input's JSON with those outputs replaced, a finished run
asks the teacher nothing, and a run killed mid-way resumes without asking again for what was answered."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import distill
import targets
from conftest import REPO_ROOT as REPO, assert_one_line_error
from test_distill import TeacherServer, kill_after_rows, make_input, read_jsonl, run


@pytest.fixture
def server():
    teacher = TeacherServer()
    yield teacher
    teacher.close()


def rewrite_command(input_path: Path, out: Path, url: str, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "distill.py"), "rewrite", "--input", str(input_path), "--output", str(out),
            "--teacher_url", url, "--teacher_model", "test-teacher", "--backoff_base", "0.05", "--backoff_max", "0.2",
            *extra]


def faithful(record: dict) -> str:
    """A rewrite that passes: the unified form of the original."""
    return targets.unify_target(record["output"], targets.speakers_in_order(record))[0]


def test_kept_rejected_and_resumed(tmp_path, server):
    records = make_input(tmp_path / "in.json", 5)
    for record in records:  # every original a little off the style, so a faithful rewrite differs from it
        record["output"] = record["output"].replace("두 화자는 이 대화에서", "이 대화에서 화자들은")
    (tmp_path / "in.json").write_text(json.dumps(records, ensure_ascii=False, indent=4), encoding="utf-8")
    first, second = targets.speakers_in_order(records[2])
    server.answers = {
        "topic-00": faithful(records[0]),
        "topic-01": "두 화자는 이 대화에서 날씨에 대해 말했습니다.",  # unrelated and far too short
        "topic-02": faithful(records[2]).replace(f"{second}", "상대방"),  # drops a speaker id
        "topic-04": faithful(records[4]) + " " + faithful(records[4]),  # doubled: too long
    }
    server.plans = {"topic-03": ["refuse"]}
    out = tmp_path / "rewritten.json"
    result = run(rewrite_command(tmp_path / "in.json", out, server.url))
    assert result.returncode == 0, result.stdout + result.stderr

    rewritten = json.loads(out.read_text(encoding="utf-8"))
    assert [r["id"] for r in rewritten] == [r["id"] for r in records]
    assert [r["input"] for r in rewritten] == [r["input"] for r in records], "inputs unchanged"
    assert [r["output"] for r in rewritten] == [faithful(records[0])] + [r["output"] for r in records[1:]]
    report = json.loads((tmp_path / "rewritten.report.json").read_text(encoding="utf-8"))
    assert report["kept"] == 1 and report["not_kept"] == 4
    items = {item["id"]: item for item in report["items"]}
    assert items["row-00"]["kept"] and items["row-00"]["agreement"]["rouge1"] > 0.9
    assert any(reason.startswith("rouge1 ") for reason in items["row-01"]["reasons"])
    assert any(reason.startswith("length -") for reason in items["row-01"]["reasons"])
    assert items["row-02"]["reasons"] == [f"speaker id missing: {second}"]
    assert items["row-03"]["reasons"] == ["teacher: refused: I can't help with that."]
    assert len(items["row-04"]["reasons"]) == 1 and items["row-04"]["reasons"][0].startswith("length +10")
    # row-01 fails three ways
    assert report["not_kept_by_reason"] == {"length": 2, "rouge1": 1, "speaker": 2, "teacher": 1}
    assert "bertscore" in report["guard"]["skipped"], "no BERTScore model offline: ROUGE-1 alone guards"
    assert "kept 1 of 5 rewrites" in result.stdout

    before = dict(server.requests)
    again = run(rewrite_command(tmp_path / "in.json", tmp_path / "rewritten.json", server.url))
    assert again.returncode == 0, again.stderr
    assert dict(server.requests) == before, "a finished run asks the teacher nothing"
    assert json.loads(out.read_text(encoding="utf-8")) == rewritten


def test_kill_mid_run_then_resume(tmp_path, server):
    records = make_input(tmp_path / "in.json", 6)
    server.answers = {f"topic-{i:02d}": faithful(r) for i, r in enumerate(records)}
    server.plans = {f"topic-{i:02d}": ["stall", "ok"] for i in range(3, 6)}
    out = tmp_path / "rewritten.json"
    answers = tmp_path / "rewritten.answers.jsonl"
    kill_after_rows(rewrite_command(tmp_path / "in.json", out, server.url, "--concurrency", "2"), answers, 3)
    assert not out.exists(), "no output until every record is answered"
    in_flight = {key for key, count in server.requests.items() if key >= "topic-03"}
    server.release.set()

    result = run(rewrite_command(tmp_path / "in.json", out, server.url, "--concurrency", "2"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert all(server.requests[f"topic-{i:02d}"] == 1 for i in range(3)), "an answered record was asked again"
    assert in_flight and all(server.requests[key] == 2 for key in in_flight)
    rewritten = json.loads(out.read_text(encoding="utf-8"))
    assert [r["output"] for r in rewritten] == [faithful(r) for r in records]


def test_input_without_outputs_is_refused(tmp_path, server):
    result = run(rewrite_command(REPO / "data/sample/test.json", tmp_path / "out.json", server.url))
    assert_one_line_error(result, "data/sample/test.json: record 0 (id 'nikluge-", "field 'output' is empty")
    assert not (tmp_path / "out.json").exists() and sum(server.requests.values()) == 0


def test_rewrite_guard():
    speakers = ["SD2000010", "SD2000025"]
    original = "두 화자는 여행을 말했습니다. SD2000010은 갔습니다. SD2000025는 왔습니다."
    assert distill.rewrite_problems(original, original, speakers, {"rouge1": 1.0}, 0.5, 0.3) == []
    assert distill.rewrite_problems(original, original, speakers, {"rouge1": 0.4, "bertscore": 0.9}, 0.5, 0.3) == [
        "rouge1 0.400 < 0.5"]
    shorter = original[: int(len(original) * 0.6)]
    assert distill.rewrite_problems(original, shorter, speakers, {}, 0.5, 0.3) == [
        "length -40% (limit ±30%)", "speaker id missing: SD2000025"]


def test_local_teacher(tmp_path, chatty_model_dir):
    """--teacher_url local runs the rewrite through generate.py's engine: the tiny chatty model's answers are no
    summaries, so the guard keeps every original, and the report says why."""
    make_input(tmp_path / "in.json", 3)
    out = tmp_path / "rewritten.json"
    result = run(rewrite_command(tmp_path / "in.json", out, "local", "--teacher_model", str(chatty_model_dir),
                                 "--no-load_in_4bit", "--max_new_tokens", "24", "--batch_size", "3"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = json.loads((tmp_path / "in.json").read_text(encoding="utf-8"))
    assert json.loads(out.read_text(encoding="utf-8")) == records
    report = json.loads((tmp_path / "rewritten.report.json").read_text(encoding="utf-8"))
    assert report["kept"] == 0 and report["not_kept"] == 3
    assert all(item["reasons"] for item in report["items"])
    answered = read_jsonl(tmp_path / "rewritten.answers.jsonl") + read_jsonl(tmp_path / "rewritten.rejects.jsonl")
    assert sorted(row["id"] for row in answered) == ["row-00", "row-01", "row-02"]
