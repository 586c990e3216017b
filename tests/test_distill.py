"""`distill.py distill` end to end against a real OpenAI-style HTTP server on 127.0.0.1.

The server is scripted per row (normal answers, 429s, 500s, a reply slower than the timeout, an
empty answer, a refusal, a stall) and counts the requests it gets for every row, so the tests can
prove what was retried and that a resumed run never asks again for a finished row.
"""
from __future__ import annotations

import collections
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import distill
import prep
from conftest import REPO_ROOT as REPO

TOPIC = re.compile(r"위 (topic-\d+) 주제")


class TeacherServer:
    """Chat completions on 127.0.0.1:<free port>. `plans[key]` lists what to do on the 1st, 2nd, ...
    request for a row (the last entry repeats); the row key is its topic keyword in the prompt."""

    def __init__(self, slow_seconds: float = 2.0):
        self.plans: dict[str, list[str]] = {}
        self.default_plan = ["ok"]
        self.answers: dict[str, str] = {}  # a row's own answer instead of answer_for(key)
        self.requests: collections.Counter = collections.Counter()
        self.token_params: collections.Counter = collections.Counter()  # which answer-length field each request carried
        self.rejected_token_param: str | None = None  # answered with OpenAI's 400, as its newer models do for max_tokens
        self.authorization: set[str] = set()
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.slow_seconds = slow_seconds
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def _behaviour(self, key: str) -> str:
        with self.lock:
            attempt = self.requests[key]
            self.requests[key] += 1
            plan = self.plans.get(key, self.default_plan)
            return plan[min(attempt, len(plan) - 1)]

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _send(self, status: int, body: dict, headers: dict | None = None) -> None:
                data = json.dumps(body, ensure_ascii=False).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for name, value in (headers or {}).items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout or killed): exactly what some tests provoke

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.authorization.add(self.headers.get("Authorization", ""))
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                key = TOPIC.search(body["messages"][-1]["content"]).group(1)
                with server.lock:
                    server.token_params.update(name for name in ("max_tokens", "max_completion_tokens") if name in body)
                if server.rejected_token_param in body:
                    name = server.rejected_token_param
                    return self._send(400, {"error": {
                        "message": f"Unsupported parameter: '{name}' is not supported with this model. Use 'max_completion_tokens' instead.",
                        "type": "invalid_request_error", "param": name, "code": "unsupported_parameter"}})
                behaviour = server._behaviour(key)
                if behaviour == "429":
                    return self._send(429, {"error": {"message": "rate limited"}}, {"Retry-After": "0"})
                if behaviour == "500":
                    return self._send(500, {"error": {"message": "boom"}})
                if behaviour == "401":
                    return self._send(401, {"error": {"message": "invalid api key"}})
                if behaviour == "slow":
                    time.sleep(server.slow_seconds)
                if behaviour == "stall":
                    server.release.wait(60)
                message = {"role": "assistant", "content": server.answers.get(key) or answer_for(key)}
                if behaviour == "empty":
                    message["content"] = "  \n"
                if behaviour == "refuse":
                    message = {"role": "assistant", "content": None, "refusal": "I can't help with that."}
                choice = {"index": 0, "message": message, "finish_reason": "stop"}
                self._send(200, {"id": f"chatcmpl-{key}", "object": "chat.completion", "created": 0, "model": body["model"], "choices": [choice]})

        return Handler


def answer_for(key: str) -> str:
    return f"두 화자는 이 대화에서 {key}에 대해 말했습니다."


@pytest.fixture
def server():
    teacher = TeacherServer()
    yield teacher
    teacher.close()


def make_input(path: Path, n: int) -> list[dict]:
    """n competition records (sample conversations) with ids row-NN and one keyword topic-NN each."""
    sample = json.loads((REPO / "data/sample/train.json").read_text(encoding="utf-8"))
    records = []
    for i in range(n):
        record = json.loads(json.dumps(sample[i % len(sample)]))
        record["id"] = f"row-{i:02d}"
        record["input"]["subject_keyword"] = [f"topic-{i:02d}"]
        records.append(record)
    path.write_text(json.dumps(records, ensure_ascii=False, indent=4), encoding="utf-8")
    return records


def local_env(**extra: str) -> dict:
    """The test's environment without proxies, so requests to 127.0.0.1 never leave the machine."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(NO_PROXY="127.0.0.1,localhost", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", **extra)
    return env


def distill_command(input_path: Path, out: Path, url: str, *extra: str) -> list[str]:
    return [
        sys.executable, str(REPO / "distill.py"), "distill", "--input", str(input_path), "--output", str(out),
        "--teacher_url", url, "--teacher_model", "test-teacher", "--backoff_base", "0.05", "--backoff_max", "0.2", *extra,
    ]


def run(command: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, env=local_env(**env), capture_output=True, text=True, timeout=180)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


def kill_after_rows(command: list[str], rows_file: Path, rows: int) -> None:
    """Run `command` and SIGKILL it (no chance to clean up) once `rows_file` holds `rows` JSON lines."""
    process = subprocess.Popen(command, cwd=REPO, env=local_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(read_jsonl(rows_file)) < rows:
            assert process.poll() is None and time.monotonic() < deadline, f"never wrote the first {rows} rows"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()


def test_retries_rejects_and_exact_output(tmp_path, server):
    records = make_input(tmp_path / "in.json", 8)
    server.plans = {
        "topic-01": ["429", "429", "ok"],
        "topic-02": ["500", "ok"],
        "topic-03": ["slow", "ok"],
        "topic-04": ["empty"],
        "topic-05": ["refuse"],
    }
    out = tmp_path / "teacher.jsonl"
    result = run(distill_command(tmp_path / "in.json", out, server.url, "--concurrency", "4", "--request_timeout", "0.5"))
    assert result.returncode == 0, result.stderr

    rows = read_jsonl(out)
    good = {f"row-{i:02d}" for i in (0, 1, 2, 3, 6, 7)}
    assert sorted(row["id"] for row in rows) == sorted(good)
    by_id = {record["id"]: record for record in records}
    for row in rows:
        key = by_id[row["id"]]["input"]["subject_keyword"][0]
        assert row == {
            "instruction": prep.build_user_text(by_id[row["id"]]), "input": "", "output": answer_for(key),
            "id": row["id"], "teacher": "test-teacher", "source": str(tmp_path / "in.json"),
        }
    rejects = {row["id"]: row["reason"] for row in read_jsonl(tmp_path / "teacher.rejects.jsonl")}
    assert rejects.keys() == {"row-04", "row-05"}
    # stdout is a pipe, as under nohup or Colab's !python: a plain progress line per finished row (8 rows: 5% < 1 row).
    progress = re.findall(r"^teacher answers: (\d)/8 \(\d+%\), [\d.]+ items/s, ETA \w+, ok \d · rejected \d · failed 0$", result.stdout, re.M)
    assert progress == [str(n) for n in range(1, 9)], result.stdout
    assert rejects["row-04"] == "empty answer"
    assert rejects["row-05"].startswith("refused")
    assert server.requests["topic-01"] == 3 and server.requests["topic-02"] == 2 and server.requests["topic-03"] == 2
    assert all(server.requests[f"topic-{i:02d}"] == 1 for i in (0, 4, 5, 6, 7))

    requests_before = sum(server.requests.values())
    again = run(distill_command(tmp_path / "in.json", out, server.url))
    assert again.returncode == 0, again.stderr
    assert sum(server.requests.values()) == requests_before, "a finished or rejected row was requested again"
    assert len(read_jsonl(out)) == 6


def test_a_server_that_wants_max_completion_tokens(tmp_path, server):
    """Newer OpenAI models answer 400 to max_tokens: the row is sent again with max_completion_tokens,
    which the rest of the run keeps; --max_tokens_param sends the right field from the start."""
    make_input(tmp_path / "in.json", 6)
    server.rejected_token_param = "max_tokens"
    result = run(distill_command(tmp_path / "in.json", tmp_path / "auto.jsonl", server.url, "--concurrency", "2"))
    assert result.returncode == 0, result.stderr
    assert sorted(row["id"] for row in read_jsonl(tmp_path / "auto.jsonl")) == [f"row-{i:02d}" for i in range(6)]
    assert 1 <= server.token_params["max_tokens"] <= 2, server.token_params  # only the rows in flight before the switch
    assert server.token_params["max_completion_tokens"] == 6
    assert "pass --max_tokens_param max_completion_tokens" in result.stdout

    server.token_params.clear()
    explicit = run(distill_command(tmp_path / "in.json", tmp_path / "explicit.jsonl", server.url, "--max_tokens_param", "max_completion_tokens"))
    assert explicit.returncode == 0 and len(read_jsonl(tmp_path / "explicit.jsonl")) == 6
    assert server.token_params == {"max_completion_tokens": 6}

    forced = run(distill_command(tmp_path / "in.json", tmp_path / "forced.jsonl", server.url, "--max_tokens_param", "max_tokens"))
    assert forced.returncode == 0 and not (tmp_path / "forced.jsonl").exists()
    assert {row["reason"][:15] for row in read_jsonl(tmp_path / "forced.rejects.jsonl")} == {"HTTP 400: {\"err"}


def test_api_key_is_sent_from_the_named_variable(tmp_path, server):
    make_input(tmp_path / "in.json", 1)
    result = run(distill_command(tmp_path / "in.json", tmp_path / "o.jsonl", server.url, "--api_key_env", "TEST_TEACHER_KEY"), TEST_TEACHER_KEY="sekret")
    assert result.returncode == 0, result.stderr
    assert server.authorization == {"Bearer sekret"}


def test_kill_mid_run_then_resume_never_rerequests_finished_rows(tmp_path, server):
    make_input(tmp_path / "in.json", 8)
    server.plans = {f"topic-{i:02d}": ["stall", "ok"] for i in range(4, 8)}
    out = tmp_path / "teacher.jsonl"
    kill_after_rows(distill_command(tmp_path / "in.json", out, server.url, "--concurrency", "2"), out, 4)
    # Two requests run at once, so the first four rows may land in either order.
    assert sorted(row["id"] for row in read_jsonl(out)) == [f"row-{i:02d}" for i in range(4)]
    in_flight = {key for key, count in server.requests.items() if key >= "topic-04"}
    server.release.set()

    result = run(distill_command(tmp_path / "in.json", out, server.url, "--concurrency", "2"))
    assert result.returncode == 0, result.stderr
    assert sorted(row["id"] for row in read_jsonl(out)) == [f"row-{i:02d}" for i in range(8)]
    assert all(server.requests[f"topic-{i:02d}"] == 1 for i in range(4)), "a finished row was requested again"
    assert in_flight, "the kill should have caught rows in flight"
    assert all(server.requests[key] == 2 for key in in_flight)


def test_stops_after_a_run_of_failures_keeping_finished_rows(tmp_path, server):
    make_input(tmp_path / "in.json", 10)
    server.default_plan = ["500"]
    server.plans = {"topic-00": ["ok"], "topic-01": ["ok"]}
    out = tmp_path / "teacher.jsonl"
    result = run(distill_command(tmp_path / "in.json", out, server.url, "--concurrency", "1", "--max_retries", "2", "--max_consecutive_failures", "3"))
    assert result.returncode == 2
    assert "stopped after 3 rows in a row failed" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert [row["id"] for row in read_jsonl(out)] == ["row-00", "row-01"]
    assert not (tmp_path / "teacher.rejects.jsonl").exists()
    assert [server.requests[f"topic-{i:02d}"] for i in range(2, 6)] == [3, 3, 3, 0]


def test_wrong_api_key_is_one_line_error(tmp_path, server):
    make_input(tmp_path / "in.json", 2)
    server.default_plan = ["401"]
    result = run(distill_command(tmp_path / "in.json", tmp_path / "o.jsonl", server.url))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "HTTP 401" in result.stderr and "OPENAI_API_KEY" in result.stderr


def test_local_teacher_and_output_feeds_prep_extra(tmp_path, chatty_model_dir):
    """--teacher_url local on the tiny model taught CHATTY_TURNS, from a competition file and a
    prompt-only source at once; then the same command resumes to nothing and prep reads the output."""
    from conftest import CHATTY_TURNS

    make_input(tmp_path / "comp.json", 2)
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps({"id": f"q{i}", "question": q}, ensure_ascii=False) + "\n" for i, (q, _) in enumerate(CHATTY_TURNS)), encoding="utf-8")
    out = tmp_path / "local.jsonl"
    command = [sys.executable, str(REPO / "distill.py"), "distill", "--input", str(tmp_path / "comp.json"), str(questions), "--output", str(out),
               "--teacher_url", "local", "--teacher_model", str(chatty_model_dir), "--no-load_in_4bit", "--max_new_tokens", "24", "--batch_size", "3"]
    result = subprocess.run(command, cwd=REPO, env=local_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    rows, rejects = read_jsonl(out), read_jsonl(tmp_path / "local.rejects.jsonl")
    assert sorted(r["id"] for r in rows + rejects) == ["q0", "q1", "q2", "q3", "row-00", "row-01"]
    assert re.search(r"^generating: 6/6 \(100%\), [\d.]+ items/s, ETA 0s, [\d.]+ tok/s$", result.stdout, re.M), result.stdout
    assert {r["id"] for r in rows} & {"q0", "q1", "q2", "q3"}, "the taught questions should get answers"
    for row in rows:
        assert set(row) == {"instruction", "input", "output", "id", "teacher", "source"} and row["output"].strip()
        assert row["teacher"] == str(chatty_model_dir)

    again = subprocess.run(command, cwd=REPO, env=local_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "6 already done" in again.stdout and "Unsloth" not in again.stdout + again.stderr

    prepared = subprocess.run([sys.executable, str(REPO / "prep.py"), "--train", "data/sample/train.json", "--dev", "data/sample/dev.json",
                               "--test", "data/sample/test.json", "--extra", str(out),
                               "--out", str(tmp_path / "prepared")],
                              cwd=REPO, env=local_env(), capture_output=True, text=True, timeout=600)
    assert prepared.returncode == 0, prepared.stderr
    train = read_jsonl(tmp_path / "prepared" / "train.jsonl")
    assert {row["completion"][0]["content"] for row in train if row["source"] == str(out)} <= {row["output"] for row in rows}


def test_http_output_feeds_prep_extra(tmp_path, server):
    make_input(tmp_path / "in.json", 3)
    out = tmp_path / "teacher.jsonl"
    assert run(distill_command(tmp_path / "in.json", out, server.url, "--format", "prompt_completion")).returncode == 0
    prepared = run([sys.executable, str(REPO / "prep.py"), "--train", "data/sample/train.json",
                    "--dev", "data/sample/dev.json", "--test", "data/sample/test.json",
                    "--extra", str(out), "--out", str(tmp_path / "p")])
    assert prepared.returncode == 0, prepared.stderr
    from_teacher = [row for row in read_jsonl(tmp_path / "p" / "train.jsonl") if row["source"] == str(out)]
    assert sorted(row["completion"][0]["content"] for row in from_teacher) == sorted(answer_for(f"topic-{i:02d}") for i in range(3))


def test_summaries_of_the_test_file_feed_prep_pseudo_labels(tmp_path, server):
    """Over a test file (no outputs) the next command is --pseudo_labels, and it keeps what --extra drops as leaks."""
    test = [{key: value for key, value in r.items() if key != "output"} for r in make_input(tmp_path / "test.json", 3)]
    (tmp_path / "test.json").write_text(json.dumps(test, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "self.jsonl"
    result = run(distill_command(tmp_path / "test.json", out, server.url))
    assert result.returncode == 0, result.stderr
    assert f"next: python prep.py --pseudo_labels {out}" in result.stdout
    sample = ["--train", "data/sample/train.json", "--dev", "data/sample/dev.json", "--test", str(tmp_path / "test.json")]
    for flag, folder in (("--pseudo_labels", "with"), ("--extra", "without")):
        prepared = run([sys.executable, str(REPO / "prep.py"), *sample, flag, str(out), "--out", str(tmp_path / folder)])
        assert prepared.returncode == 0, prepared.stderr
    kept = [row for row in read_jsonl(tmp_path / "with" / "train.jsonl") if row["source"] == str(out)]
    assert sorted((row["id"], row["prompt"], row["completion"][0]["content"]) for row in kept) == \
        [(r["id"], prep.build_messages(r), answer_for(r["input"]["subject_keyword"][0])) for r in test]  # any order
    assert not [row for row in read_jsonl(tmp_path / "without" / "train.jsonl") if row["source"] == str(out)]


def test_next_flag_for_the_answers():
    assert distill.prep_flag([str(REPO / "data/sample/test.json")]) == "--pseudo_labels"
    assert distill.prep_flag([str(REPO / "data/sample/train.json")]) == "--extra"
    assert distill.prep_flag([str(REPO / "data/sample/test.json"), str(REPO / "data/sample/extra_alpaca.json")]) == "--extra"


def test_truncated_last_line_from_a_crash_is_dropped(tmp_path):
    out = tmp_path / "o.jsonl"
    out.write_text('{"id": "a", "output": "x"}\n{"id": "b", "outp', encoding="utf-8")
    assert distill.read_done_ids(out) == {"a"}
    assert out.read_text(encoding="utf-8") == '{"id": "a", "output": "x"}\n'


def test_backoff_and_retry_after():
    import random

    rng = random.Random(0)
    delays = [distill.backoff_delay(attempt, 1.0, 60.0, None, rng) for attempt in (1, 2, 3, 8)]
    assert 0.5 <= delays[0] <= 1.0 and 1.0 <= delays[1] <= 2.0 and 2.0 <= delays[2] <= 4.0 and 30.0 <= delays[3] <= 60.0
    assert distill.backoff_delay(3, 1.0, 60.0, 7.0, rng) == 7.0
    assert distill.parse_retry_after("3") == 3.0 and distill.parse_retry_after(None) is None and distill.parse_retry_after("soon") is None


def test_answer_judging():
    ok = {"choices": [{"message": {"role": "assistant", "content": " 요약 \n"}, "finish_reason": "stop"}]}
    assert distill.answer_from_completion(ok) == "요약"
    cut = {"choices": [{"message": {"content": "요약"}, "finish_reason": "length"}]}
    for bad, reason in ((cut, "truncated"), ({"choices": []}, "no choices"), ({"choices": [{"message": {"content": "죄송하지만 도와드릴 수 없습니다."}}]}, "refused")):
        with pytest.raises(distill.RowRejected, match=reason):
            distill.answer_from_completion(bad)
