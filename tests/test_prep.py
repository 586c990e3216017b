"""prep.py: the prompt, validation, augmentation shapes, near-duplicates and leaks, length policy, and the real CLI.

Pure functions are called directly; everything a user sees (outputs, stats, errors, exit codes,
untouched --out on failure) goes through `python prep.py ...` in a subprocess.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

import prep
from conftest import REPO_ROOT as REPO, assert_one_line_error, run_script
from common import UserError

SAMPLE = REPO / "data" / "sample"
OUT_FILES = ("train.jsonl", "dev.jsonl", "stats.json", "lengths.png")


def run_prep(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return run_script(["prep.py", *args], cwd=cwd, timeout=300)


def record(rid: str = "r1", conversation=None, keywords=("여행",), output: str = "요약입니다.") -> dict:
    conversation = conversation or [{"speaker": "SD2000001", "utterance": "안녕하세요"}, {"speaker": "SD2000002", "utterance": "반가워요"}]
    return {"id": rid, "input": {"conversation": conversation, "subject_keyword": list(keywords)}, "output": output}


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ------------------------------------------------------------------------------------------------
# The prompt
# ------------------------------------------------------------------------------------------------

def test_prompt_is_the_baselines_byte_for_byte():
    rec = record(conversation=[
        {"speaker": "SD2000268", "utterance": "아까 누나가 한 명 있다고 하셨는데"},
        {"speaker": "SD2000266", "utterance": "다들 알던 것처럼 ..."},
    ], keywords=("누나", "자매", "형", "남동생", "부모님"))
    expected = (
        "[Conversation]\n"
        "화자SD2000268: 아까 누나가 한 명 있다고 하셨는데\n"
        "화자SD2000266: 다들 알던 것처럼 ...\n"
        "\n"
        "[Question]\n"
        "위 누나, 자매, 형, 남동생, 부모님 주제에 대한 대화를 요약해주세요."
    )
    assert prep.build_messages(rec) == [{"role": "user", "content": expected}]
    with_system = prep.build_user_text(rec, system_prompt=True)
    assert with_system == prep.BASELINE_SYSTEM_PROMPT + "\n\n" + expected


def test_int_speaker_and_plain_string_keyword(tmp_path):
    raw = {"id": "spec-example", "input": {"conversation": [{"speaker": 1, "utterance": "어제 캠핑 갔어요"}, {"speaker": 2, "utterance": "좋았겠네요"}],
                                           "subject_keyword": "캠핑"}, "output": "캠핑 이야기"}
    records, dropped = prep.load_competition_file(write_json(tmp_path / "spec.json", [raw]))
    text = prep.build_user_text(records[0])
    assert "화자1: 어제 캠핑 갔어요\n화자2: 좋았겠네요" in text
    assert text.endswith("위 캠핑 주제에 대한 대화를 요약해주세요.")  # not "캠, 핑"
    assert dropped == 0


def test_bom_crlf_and_empty_utterances(tmp_path):
    rec = record(conversation=[{"speaker": "A", "utterance": "하나"}, {"speaker": "B", "utterance": "  "}, {"speaker": "A", "utterance": "둘"}])
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([rec], ensure_ascii=False, indent=2).replace("\n", "\r\n").encode("utf-8"))
    records, dropped = prep.load_competition_file(path)
    assert dropped == 1
    assert [t["utterance"] for t in records[0]["input"]["conversation"]] == ["하나", "둘"]


# ------------------------------------------------------------------------------------------------
# Validation: one message per broken field, naming file, index, id and field
# ------------------------------------------------------------------------------------------------

def _broken(change) -> dict:
    rec = record("bad-7")
    change(rec)
    return rec


@pytest.mark.parametrize("make, field", [
    (lambda: _broken(lambda r: r.pop("id")), "'id'"),
    (lambda: _broken(lambda r: r.update(id=5)), "'id'"),
    (lambda: _broken(lambda r: r.pop("input")), "'input'"),
    (lambda: _broken(lambda r: r["input"].update(conversation=[])), "'input.conversation'"),
    (lambda: _broken(lambda r: r["input"].update(conversation="hello")), "'input.conversation'"),
    (lambda: _broken(lambda r: r["input"]["conversation"].append("just text")), "'input.conversation[2]'"),
    (lambda: _broken(lambda r: r["input"]["conversation"][1].update(speaker=None)), "'input.conversation[1].speaker'"),
    (lambda: _broken(lambda r: r["input"]["conversation"][1].update(speaker=True)), "'input.conversation[1].speaker'"),
    (lambda: _broken(lambda r: r["input"]["conversation"][0].update(utterance=3)), "'input.conversation[0].utterance'"),
    (lambda: _broken(lambda r: r["input"].update(subject_keyword=[1, 2])), "'input.subject_keyword'"),
    (lambda: _broken(lambda r: r["input"].update(subject_keyword=[])), "'input.subject_keyword'"),
    (lambda: _broken(lambda r: r.update(output=None)), "'output'"),
    (lambda: "not an object", "expected an object"),
])
def test_each_broken_field_is_named(tmp_path, make, field):
    path = write_json(tmp_path / "broken.json", [record("ok-0"), make()])
    with pytest.raises(UserError) as err:
        prep.load_competition_file(path)
    message = str(err.value)
    assert str(path) in message and "record 1" in message and field in message
    if field != "expected an object" and "'id'" not in field:
        assert "'bad-7'" in message


# ------------------------------------------------------------------------------------------------
# Augmentation shapes
# ------------------------------------------------------------------------------------------------

U, A = "user", "assistant"


@pytest.mark.parametrize("row, expected", [
    ({"instruction": "요약해", "input": "긴 글", "output": "짧은 글"}, [(U, "요약해\n\n긴 글"), (A, "짧은 글")]),
    ({"instruction": "인사해", "input": "", "output": "안녕"}, [(U, "인사해"), (A, "안녕")]),
    ({"instruction": "질문", "response": "답"}, [(U, "질문"), (A, "답")]),
    ({"prompt": "질문", "response": "답"}, [(U, "질문"), (A, "답")]),
    ({"prompt": "질문", "completion": "답"}, [(U, "질문"), (A, "답")]),
    ({"question": "질문", "answer": "답"}, [(U, "질문"), (A, "답")]),
    ({"questions": ["q1", "q2"], "references": ["a1", None]}, [(U, "q1"), (A, "a1")]),
    ({"messages": [{"role": "system", "content": "규칙"}, {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                   {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]},
     [(U, "규칙\n\nq1"), (A, "a1"), (U, "q2"), (A, "a2")]),
    ({"conversations": [{"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"}, {"from": "human", "value": "q2"}]},
     [(U, "q1"), (A, "a1")]),
    (record(), [(U, prep.build_user_text(record())), (A, "요약입니다.")]),
])
def test_each_augmentation_shape(row, expected):
    messages = prep.row_messages(row, prep.detect_shape(row), system_prompt=False)
    assert [(m["role"], m["content"]) for m in messages] == expected


@pytest.mark.parametrize("row", [
    {"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]},  # starts with the assistant
    {"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    {"instruction": "질문", "output": "  "},
    {"messages": [{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}]},
    {"id": "c", "input": {"conversation": [{"speaker": "A"}], "subject_keyword": ["k"]}, "output": "요약"},  # competition shape, no utterance
])
def test_unusable_rows_are_skipped_not_fatal(row):
    assert prep.row_messages(row, prep.detect_shape(row), system_prompt=False) is None


def test_local_json_jsonl_parquet_give_the_same_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": "질문 하나", "response": "답 하나"}, {"prompt": "질문 둘", "response": "답 둘"}]
    write_json(tmp_path / "x.json", rows)
    (tmp_path / "x.jsonl").write_text("\ufeff" + "\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\r\n\r\n", encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "x.parquet")
    for name in ("x.json", "x.jsonl", "x.parquet"):
        assert prep.load_extra_rows(str(tmp_path / name)) == rows


def test_unknown_shape_names_the_columns_found():
    with pytest.raises(UserError) as err:
        prep.extra_rows("weird.jsonl", [(0, {"text": "a", "label": 1})], False, dict.fromkeys(prep.STAGES, 0))
    assert "weird.jsonl: row 0" in str(err.value) and "found columns: label, text" in str(err.value)


# ------------------------------------------------------------------------------------------------
# The length policy (--clean_inputs and --unify_targets rules: tests/test_targets.py)
# ------------------------------------------------------------------------------------------------

def test_length_cut_drops_middle_utterances_and_keeps_question_and_summary():
    turns = [{"speaker": "SD2000001" if i % 2 else "SD2000002", "utterance": f"{i:02d}번째 발화입니다 " + "가" * 40} for i in range(30)]
    rec = record("long", turns, keywords=("여행", "음식"), output="이 대화에서 화자들은 여행과 음식에 대해 말했습니다.")
    cfg = prep.PrepSettings(max_seq_length=700)
    full = prep.fit_competition_record(rec, "t", prep.PrepSettings(), None)[0]
    row, n_cut = prep.fit_competition_record(rec, "t", cfg, None)
    assert full.tokens > 700 >= row.tokens and n_cut > 0
    prompt = row.prompt[0]["content"]
    kept = [line for line in prompt.splitlines() if line.startswith("화자")]
    assert len(kept) == 30 - n_cut
    numbers = [int(line.split(": ")[1][:2]) for line in kept]
    assert numbers[0] == 0 and numbers[-1] == 29  # opening and end stay ...
    missing = sorted(set(range(30)) - set(numbers))
    assert missing == list(range(missing[0], missing[0] + n_cut)) and abs((missing[0] + missing[-1]) / 2 - 14.5) <= 1  # ... the middle goes
    assert prompt.startswith("[Conversation]\n") and prompt.endswith("\n\n[Question]\n위 여행, 음식 주제에 대한 대화를 요약해주세요.")
    assert row.completion == [{"role": "assistant", "content": rec["output"]}]
    one_fewer = prep.competition_row(prep.drop_middle_utterances(rec, n_cut - 1), "t", False)
    assert prep.count_tokens(None, [one_fewer.prompt + one_fewer.completion])[0] > 700  # the cut was minimal


def test_summary_too_long_for_any_cut_is_dropped():
    rec = record("huge", output="요약" * 500)
    assert prep.fit_competition_record(rec, "t", prep.PrepSettings(max_seq_length=200), None) == (None, 0)


# ------------------------------------------------------------------------------------------------
# The command line, end to end
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sample_run(tmp_path_factory):
    """One full run on data/sample plus augmentation files, shared by the end-to-end checks."""
    work = tmp_path_factory.mktemp("prep_e2e")
    dev = json.loads((SAMPLE / "dev.json").read_text(encoding="utf-8"))
    test = json.loads((SAMPLE / "test.json").read_text(encoding="utf-8"))
    leaky = [
        {**dev[0], "id": "distilled-from-dev", "output": "선생님 모델이 쓴 요약"},  # a dev dialogue, competition shape
        {"instruction": "다음 대화를 요약해 주세요.", "input": "\n".join(t["utterance"] for t in test[1]["input"]["conversation"]), "output": "요약"},
        {"instruction": "김치찌개 끓이는 법을 알려 주세요.", "input": "", "output": "김치와 돼지고기를 볶고 물을 부어 끓입니다."},
        {"instruction": "김치찌개 끓이는 법을 알려 주세요!!", "input": "", "output": "김치와 돼지고기를 볶고, 물을 부어 끓입니다."},
    ]
    extra = write_json(work / "extra_leaky.json", leaky)
    args = ["--train", str(SAMPLE / "train.json"), "--dev", str(SAMPLE / "dev.json"), "--test", str(SAMPLE / "test.json"),
            "--extra", str(SAMPLE / "extra_alpaca.json"), str(SAMPLE / "extra_sharegpt.jsonl"), str(extra)]
    first = run_prep(*args, "--out", str(work / "out1"))
    second = run_prep(*args, "--out", str(work / "out2"))
    return {"work": work, "first": first, "second": second, "out": work / "out1", "extra": str(extra)}


def test_e2e_rows_are_trl_prompt_completion(sample_run):
    assert sample_run["first"].returncode == 0, sample_run["first"].stderr
    out = sample_run["out"]
    assert sorted(p.name for p in out.iterdir()) == sorted(OUT_FILES)
    assert f"next: python train.py --data {out}" in sample_run["first"].stdout
    train = read_jsonl(out / "train.jsonl")
    raw = json.loads((SAMPLE / "train.json").read_text(encoding="utf-8"))
    competition = [row for row in train if row["source"] == str(SAMPLE / "train.json")]
    assert [row["id"] for row in competition] == [r["id"] for r in raw]
    for row, rec in zip(competition, raw):
        assert list(row) == ["id", "source", "prompt", "completion"]
        assert row["prompt"] == [{"role": "user", "content": prep.build_user_text(rec)}]
        assert row["completion"] == [{"role": "assistant", "content": rec["output"]}]
    dev = read_jsonl(out / "dev.jsonl")
    assert [row["id"] for row in dev] == [r["id"] for r in json.loads((SAMPLE / "dev.json").read_text(encoding="utf-8"))]
    multi_turn = next(row for row in train if row["source"].endswith("extra_sharegpt.jsonl"))
    assert [m["role"] for m in multi_turn["prompt"]] == ["user", "assistant", "user"]
    assert (out / "lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_e2e_stats_count_leaks_duplicates_and_unusable_rows(sample_run):
    stats = json.loads((sample_run["out"] / "stats.json").read_text(encoding="utf-8"))
    leaky = stats["sources"][sample_run["extra"]]
    assert leaky["loaded"] == 4 and leaky["leak"] == 2 and leaky["duplicate"] == 1 and leaky["kept"] == 1
    assert stats["sources"][str(SAMPLE / "extra_alpaca.json")]["duplicate"] == 1
    assert stats["sources"][str(SAMPLE / "extra_sharegpt.jsonl")]["unusable"] == 1
    assert stats["rows"]["train"] == sum(s["kept"] for s in stats["sources"].values())
    assert stats["lengths"]["summary_chars"]["max"] > 0
    train_ids = {row["id"] for row in read_jsonl(sample_run["out"] / "train.jsonl")}
    assert f"{sample_run['extra']}:0" not in train_ids and f"{sample_run['extra']}:1" not in train_ids
    printed = sample_run["first"].stdout
    assert "rows per source and stage" in printed and "leak" in printed


def test_e2e_is_byte_identical_on_rerun(sample_run):
    assert sample_run["second"].returncode == 0
    work = sample_run["work"]
    for name in OUT_FILES:
        assert (work / "out1" / name).read_bytes() == (work / "out2" / name).read_bytes(), name


def test_e2e_clean_inputs_train_on_dev_limit(tmp_path):
    result = run_prep("--train", str(SAMPLE / "train.json"), "--dev", str(SAMPLE / "dev.json"), "--out", str(tmp_path / "o"),
                      "--clean_inputs", "--train_on_dev", "--limit", "5", "--system_prompt")
    assert result.returncode == 0, result.stderr
    train = read_jsonl(tmp_path / "o" / "train.jsonl")
    assert len(train) == 5 + 3
    assert {row["source"] for row in train[5:]} == {str(SAMPLE / "dev.json")}
    assert read_jsonl(tmp_path / "o" / "dev.jsonl") == [], "dev trained on is no held-out eval set"
    texts = [row["prompt"][0]["content"] for row in train]
    assert all(t.startswith(prep.BASELINE_SYSTEM_PROMPT + "\n\n[Conversation]\n") for t in texts)
    assert not any("어~" in t or "음~" in t for t in texts)
    stats = json.loads((tmp_path / "o" / "stats.json").read_text(encoding="utf-8"))
    assert stats["clean_inputs"] is True and stats["clean_inputs_effect"]["chars_saved"] > 0
    assert stats["system_prompt"] is True  # read by train.py, carried to inference


def test_e2e_exact_lengths_with_the_model_tokenizer(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))

    def n_tokens(messages: list[dict]) -> int:
        return len(tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"])

    raw = json.loads((SAMPLE / "train.json").read_text(encoding="utf-8"))
    full = sorted(n_tokens(prep.build_messages(r) + [{"role": "assistant", "content": r["output"]}]) for r in raw)
    limit = full[len(full) // 2] - 1  # about half the rows must lose utterances
    result = run_prep("--train", str(SAMPLE / "train.json"), "--dev", str(SAMPLE / "dev.json"), "--out", str(tmp_path / "o"),
                      "--tokenizer", str(tiny_model_dir), "--max_seq_length", str(limit),
                      "--test", str(SAMPLE / "test.json"), "--extra", str(SAMPLE / "extra_alpaca.json"))
    assert result.returncode == 0, result.stderr
    stats = json.loads((tmp_path / "o" / "stats.json").read_text(encoding="utf-8"))
    assert stats["length_counting"].startswith("tokenizer ")
    assert stats["sources"][str(SAMPLE / "train.json")]["cut"] >= len(full) // 2
    rows = read_jsonl(tmp_path / "o" / "train.jsonl") + read_jsonl(tmp_path / "o" / "dev.jsonl")
    assert max(n_tokens(row["prompt"] + row["completion"]) for row in rows) <= limit
    by_id = {r["id"]: r for r in raw} | {r["id"]: r for r in json.loads((SAMPLE / "dev.json").read_text(encoding="utf-8"))}
    cut = [row["id"] for row in rows if row["id"] in by_id and row["prompt"][0]["content"] != prep.build_user_text(by_id[row["id"]])]
    assert sorted(stats["cut_ids"]) == sorted(cut) and len(cut) > 3
    more = f" and {len(cut) - 3} more (all in stats.json)"
    assert f"competition rows cut: {len(cut)} (" in result.stdout
    assert "utterances dropped from the middle): " + ", ".join(stats["cut_ids"][:3]) + more + "\n" in result.stdout
    for row in rows:
        if row["id"] in by_id:
            assert row["prompt"][0]["content"].endswith(prep.build_user_text(by_id[row["id"]]).split("\n\n[Question]")[1])
            assert row["completion"][0]["content"] == by_id[row["id"]]["output"]


def cache_as_hub_model(hf_home: Path, repo_id: str, files_from: Path) -> None:
    """Lay out `files_from`'s files except the weights the way huggingface_hub caches a downloaded repo."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for path in files_from.iterdir():
        if path.suffix != ".safetensors":
            (snapshot / path.name).write_bytes(path.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40, encoding="utf-8")


@pytest.mark.parametrize("flags", [["--tokenizer", "unsloth/gemma-2-9b-it-bnb-4bit"], []])
def test_readme_tokenizer_loads_offline_from_the_cache_without_weights(tmp_path, tiny_model_dir, flags):
    """README's quick start passes --tokenizer unsloth/gemma-2-9b-it-bnb-4bit: prep needs its tokenizer
    files and config.json (AutoTokenizer reads the model type there), no weights, and runs offline from
    the cache; without the flag the cached tokenizer is found too."""
    cache_as_hub_model(tmp_path / "hf", "unsloth/gemma-2-9b-it-bnb-4bit", tiny_model_dir)
    result = run_script(["prep.py", "--train", SAMPLE / "train.json", "--dev", SAMPLE / "dev.json", "--out", tmp_path / "o", *flags],
                        env={"HF_HOME": str(tmp_path / "hf")}, timeout=300)
    assert result.returncode == 0, result.stderr
    stats = json.loads((tmp_path / "o" / "stats.json").read_text(encoding="utf-8"))
    assert stats["length_counting"] == "tokenizer unsloth/gemma-2-9b-it-bnb-4bit with its chat template"


# ------------------------------------------------------------------------------------------------
# The leak check through the command line: every layout of an evaluation dialogue is dropped
# ------------------------------------------------------------------------------------------------

def _utterances(record: dict) -> list[str]:
    return [turn["utterance"] for turn in record["input"]["conversation"]]


def leak_layouts(dev: list[dict], test: list[dict]) -> dict[str, dict]:
    """One augmentation row per layout issue 8 names, each carrying a different dev/test dialogue."""
    return {
        "speaker_id_lines": {"instruction": "다음 대화를 요약해 주세요.", "output": "요약",
                             "input": "\n".join(f"{t['speaker']}: {t['utterance']}" for t in test[0]["input"]["conversation"])},
        "letter_lines": {"messages": [{"role": "user", "content": "\n".join(f"{'AB'[k % 2]}: {u}" for k, u in enumerate(_utterances(dev[1])))},
                                      {"role": "assistant", "content": "두 사람은 여가에 대해 이야기했다."}]},
        "one_paragraph": {"instruction": "아래 글을 세 문장으로 줄이세요.", "input": " ".join(_utterances(test[2])), "output": "요약"},
        "half_dialogue": {"prompt": "대화의 앞부분입니다. 다음에 올 말을 써 주세요: " + " ".join(_utterances(dev[2])[:3]), "response": "그렇군요."},
        "sharegpt_turns": {"conversations": [{"from": ("human", "gpt")[k % 2], "value": u} for k, u in enumerate(_utterances(test[1]))]},
        "separators_and_instruction": {"question": "당신은 대화 분석가입니다. 다음은 두 사람의 대화입니다 ==> " + " // ".join(_utterances(dev[0]))
                                       + " <== 두 사람의 관계를 추측하고 근거를 대세요.", "answer": "친구 사이로 보입니다."},
    }


def unrelated_rows(train: list[dict]) -> dict[str, dict]:
    """Dialogues of the same kind in the same layouts, just not from dev or test."""
    return {
        "train_speaker_id_lines": {"instruction": "다음 대화를 요약해 주세요.", "output": "요약",
                                   "input": "\n".join(f"{t['speaker']}: {t['utterance']}" for t in train[0]["input"]["conversation"])},
        "train_paragraph": {"instruction": "아래 글을 세 문장으로 줄이세요.", "input": " ".join(_utterances(train[1])), "output": "요약"},
        "train_sharegpt_turns": {"conversations": [{"from": ("human", "gpt")[k % 2], "value": u} for k, u in enumerate(_utterances(train[2]))]},
        "recipe": {"instruction": "김치찌개 끓이는 법을 알려 주세요.", "input": "", "output": "김치와 돼지고기를 볶고 물을 부어 끓입니다."},
    }


@pytest.fixture(scope="module")
def leak_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("leaks")
    dev, test, train = (json.loads((SAMPLE / f"{name}.json").read_text(encoding="utf-8")) for name in ("dev", "test", "train"))
    rows = leak_layouts(dev, test) | unrelated_rows(train)
    extra = write_json(work / "layouts.json", list(rows.values()))
    result = run_prep("--train", str(SAMPLE / "train.json"), "--dev", str(SAMPLE / "dev.json"), "--test", str(SAMPLE / "test.json"),
                      "--extra", str(extra), "--out", str(work / "out"))
    assert result.returncode == 0, result.stderr
    kept = {row["id"] for row in read_jsonl(work / "out" / "train.jsonl")}
    stats = json.loads((work / "out" / "stats.json").read_text(encoding="utf-8"))["sources"][str(extra)]
    return {"kept": {name for k, name in enumerate(rows) if f"{extra}:{k}" in kept}, "stats": stats}


@pytest.mark.parametrize("layout", ["speaker_id_lines", "letter_lines", "one_paragraph", "half_dialogue", "sharegpt_turns", "separators_and_instruction"])
def test_leak_is_dropped_whatever_the_layout(leak_run, layout):
    assert layout not in leak_run["kept"]


def test_unrelated_dialogues_and_rows_survive_the_leak_check(leak_run):
    assert leak_run["kept"] == {"train_speaker_id_lines", "train_paragraph", "train_sharegpt_turns", "recipe"}
    assert leak_run["stats"]["leak"] == 6 and leak_run["stats"]["duplicate"] == 0


def grammar_records(talks: list[list[str]], split: str) -> list[dict]:
    return [record(f"grammar-{split}-{k:06d}", [{"speaker": f"SD20000{k % 2}", "utterance": u} for u in talk],
                   output="요약입니다." if split == "dev" else "") for k, talk in enumerate(talks)]


@pytest.fixture(scope="module")
def grammar_leak_run(tmp_path_factory):
    """Dev and test files of phrase-grammar talk; 300 unrelated rows from the same grammar; one leak per layout,
    each of another dev/test dialogue, and LLaMA-Factory `conversation` rows, a leak among them."""
    import random

    import daily_talk

    work, rng = tmp_path_factory.mktemp("grammar"), random.Random(15)
    dev = grammar_records([daily_talk.dialogue(rng, rng.randint(10, 20)) for _ in range(6)], "dev")
    test = grammar_records([daily_talk.dialogue(rng, rng.randint(10, 20)) for _ in range(6)], "test")
    held_out = dev + test
    leaks = [(r["id"], daily_talk.leak_texts(_utterances(r), rng)[layout])
             for r, layout in zip(held_out[::2], daily_talk.LAYOUTS)]
    rows = [{"instruction": "다음을 읽고 답하세요.", "input": text, "output": "네."} for _, text in leaks]
    rows.append({"conversation": [{"role": "user", "content": "\n".join(_utterances(test[5]))},
                                  {"role": "assistant", "content": "요약"}]})
    rows.append({"conversation": [{"role": "system", "content": "친절하게"}, {"role": "user", "content": "안녕하세요 반가워요"},
                                  {"role": "assistant", "content": "네 안녕하세요 무엇을 도와드릴까요"}]})
    rows += [{"instruction": "대화를 요약하세요.", "input": daily_talk.unrelated_text(rng, k), "output": "요약"}
             for k in range(300)]
    files = {name: write_json(work / f"{name}.json", data)
             for name, data in (("dev", dev), ("test", test), ("extra", rows))}
    result = run_prep("--train", str(SAMPLE / "train.json"), "--dev", str(files["dev"]), "--test", str(files["test"]),
                      "--extra", str(files["extra"]), "--out", str(work / "out"))
    assert result.returncode == 0, result.stderr
    expected = [{"source": str(files["extra"]), "row": k, "matched": rid} for k, (rid, _) in enumerate(leaks)]
    expected.append({"source": str(files["extra"]), "row": len(leaks), "matched": test[5]["id"]})
    return {"result": result, "stats": json.loads((work / "out" / "stats.json").read_text(encoding="utf-8")),
            "train": read_jsonl(work / "out" / "train.jsonl"), "extra": str(files["extra"]), "expected": expected}


def test_every_dropped_row_is_listed_with_the_dialogue_it_carries(grammar_leak_run):
    """Issue 17 item 15: stats.json lists every dropped row (source, row, dev/test id, share); the console names
    the first ones; rows of the same phrase grammar, none of their talk, stay (at most 2% go)."""
    leaks = grammar_leak_run["stats"]["leaks"]
    expected = grammar_leak_run["expected"]
    assert [{k: leak[k] for k in ("source", "row", "matched")} for leak in leaks[:len(expected)]] == expected
    assert all(leak["share"] >= 0.3 for leak in leaks)
    unrelated_dropped = leaks[len(expected):]
    assert len(unrelated_dropped) <= 6, unrelated_dropped
    assert grammar_leak_run["stats"]["sources"][grammar_leak_run["extra"]]["leak"] == len(leaks)
    first = leaks[0]
    assert (f"removed {len(leaks)} rows carrying a dev/test dialogue: {first['source']} row 0 = {first['matched']} "
            f"({first['share']:.0%}), ") in grammar_leak_run["result"].stdout


def test_llama_factory_conversation_rows_are_read(grammar_leak_run):
    row_id = f"{grammar_leak_run['extra']}:{len(grammar_leak_run['expected'])}"
    rows = [row for row in grammar_leak_run["train"] if row["id"] == row_id]
    assert [(m["role"], m["content"]) for row in rows for m in row["prompt"] + row["completion"]] == [
        ("user", "친절하게\n\n안녕하세요 반가워요"), ("assistant", "네 안녕하세요 무엇을 도와드릴까요")]


# ------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, --out untouched
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def user_out(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.jsonl").write_text("the user's previous output\n", encoding="utf-8")
    (out / "notes.txt").write_text("keep me", encoding="utf-8")
    return out


def assert_untouched(out: Path) -> None:
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "train.jsonl"]
    assert (out / "train.jsonl").read_text(encoding="utf-8") == "the user's previous output\n"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".out.")]  # no staging left behind


def _dup_ids(path: Path) -> Path:
    return write_json(path, [record("same"), record("other"), record("same")])


@pytest.mark.parametrize("make_train, fragments", [
    (lambda d: d / "missing.json", ["missing.json", "file not found"]),
    (lambda d: (d / "bad.json").write_text("[{", encoding="utf-8") and d / "bad.json", ["bad.json", "not valid JSON", "line 1"]),
    (lambda d: write_json(d / "obj.json", {"data": []}), ["obj.json", "expected a JSON list", "dict"]),
    (lambda d: _dup_ids(d / "dup.json"), ["dup.json", "record 2", "'same'", "field 'id'"]),
    (lambda d: write_json(d / "field.json", [record("x", keywords=())]), ["field.json", "record 0", "'x'", "input.subject_keyword"]),
])
def test_bad_competition_file(tmp_path, user_out, make_train, fragments):
    train = make_train(tmp_path)
    result = run_prep("--train", str(train), "--dev", str(SAMPLE / "dev.json"), "--out", str(user_out))
    assert_one_line_error(result, *fragments)
    assert_untouched(user_out)


@pytest.mark.parametrize("train, dev, flags, fragments", [
    ([], None, [], ["train.json", "no records"]),
    (json.loads((SAMPLE / "test.json").read_text(encoding="utf-8")), None, [], ["train.json", "every record's 'output' is empty", "test file"]),
    ([record("t1"), record("t2", output="  ")], None, [], ["train.json", "record 1", "'t2'", "field 'output' is empty"]),
    ([record("t1")], [record("d1"), record("d2", output="")], [], ["dev.json", "record 1", "'d2'", "field 'output' is empty"]),
    ([record("t1")], [], [], ["dev.json", "no records", "--dev needs the competition dev file"]),  # issue 17 item 14
    ([record("t1")], [record("d1"), {k: v for k, v in record("d2").items() if k != "output"}], [],
     ["dev.json", "record 1", "'d2'", "field 'output' is missing"]),
    ([{k: v for k, v in record("t1").items() if k != "output"}], None, [], ["train.json", "every record's 'output' is missing"]),
    ([record("t1", output="요약" * 500)], [record("d1")], ["--max_seq_length", "200"], ["no training rows left", "--max_seq_length 200"]),
])
def test_empty_training_data_is_refused(tmp_path, user_out, train, dev, flags, fragments):
    train_path = write_json(tmp_path / "train.json", train)
    dev_path = write_json(tmp_path / "dev.json", dev) if dev is not None else SAMPLE / "dev.json"
    result = run_prep("--train", str(train_path), "--dev", str(dev_path), "--out", str(user_out), *flags)
    assert_one_line_error(result, *fragments)
    assert_untouched(user_out)


def test_unknown_extra_shape_and_unknown_source(tmp_path, user_out):
    weird = tmp_path / "weird.jsonl"
    weird.write_text('{"text": "hello", "label": 1}\n', encoding="utf-8")
    base = ["--train", str(SAMPLE / "train.json"), "--dev", str(SAMPLE / "dev.json"),
            "--test", str(SAMPLE / "test.json"), "--out", str(user_out)]
    assert_one_line_error(run_prep(*base, "--extra", str(weird)), "weird.jsonl", "unknown shape", "label, text")
    assert_untouched(user_out)
    assert_one_line_error(run_prep(*base, "--extra", "some-owner/no-such-dataset"), "some-owner/no-such-dataset", "Hugging Face Hub")
    assert_untouched(user_out)


def test_extra_jsonl_that_is_not_utf8_is_one_line(tmp_path, user_out):
    cp949 = tmp_path / "cp949.jsonl"
    cp949.write_bytes('{"instruction": "요약해 줘", "input": "", "output": "요약"}\n'.encode("cp949"))
    result = run_prep("--train", str(SAMPLE / "train.json"), "--dev", str(SAMPLE / "dev.json"),
                      "--test", str(SAMPLE / "test.json"), "--out", str(user_out), "--extra", str(cp949))
    assert_one_line_error(result, "cp949.jsonl", "not UTF-8 text", "at byte")
    assert_untouched(user_out)


def competition_files_in(folder: Path) -> Path:
    """The sample files under the official names in folder/data, where prep.py looks by default."""
    (folder / "data").mkdir(parents=True)
    for name in ("train", "dev", "test"):
        (folder / "data" / f"일상대화요약_{name}.json").write_bytes((SAMPLE / f"{name}.json").read_bytes())
    return folder


def test_default_test_file_keeps_test_dialogues_out_of_augmentation(tmp_path):
    """Issue 17 item 13: without --test, data/일상대화요약_test.json (the documented path) is checked."""
    work = competition_files_in(tmp_path / "kit")
    test = json.loads((SAMPLE / "test.json").read_text(encoding="utf-8"))
    extra = write_json(tmp_path / "public.json",
                       [{"instruction": "요약해 주세요", "input": " ".join(_utterances(r)), "output": "요약"} for r in test])
    result = run_prep("--extra", str(extra), "--out", "o", cwd=work)
    assert result.returncode == 0, result.stderr
    stats = json.loads((work / "o" / "stats.json").read_text(encoding="utf-8"))
    assert stats["sources"][str(extra)]["leak"] == len(test)
    assert stats["leak_check_dialogues"] == {"dev": 3, "test": len(test)}

    (work / "data" / "일상대화요약_test.json").unlink()
    assert_one_line_error(run_prep("--extra", str(extra), "--out", "o2", cwd=work),
                          "--test data/일상대화요약_test.json: file not found", "--test none")
    assert not (work / "o2").exists()
    result = run_prep("--extra", str(extra), "--test", "none", "--out", "o3", cwd=work)
    assert result.returncode == 0, result.stderr
    assert "--test none: NO TEST DIALOGUES CHECKED" in result.stdout
    assert json.loads((work / "o3" / "stats.json").read_text(encoding="utf-8"))["leak_check_dialogues"]["test"] == 0
    assert run_prep("--out", "o4", cwd=work).returncode == 0, "without --extra the test file is not needed"


def test_no_flags_without_the_competition_files_says_where_to_get_them(tmp_path):
    result = run_prep(cwd=tmp_path)
    assert_one_line_error(result, "data/일상대화요약_train.json", "file not found", "data/sample/train.json")
    assert not (tmp_path / "data").exists()
