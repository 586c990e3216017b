"""prep.py --pseudo_labels (self-distillation): summaries of test dialogues are kept with the flag and dropped as
leaks without it, a summary that is a dev reference is dropped and listed, near-duplicates still go, stats.json and
the stage table count them apart; bad files end in one line. Everything goes through `python prep.py ...`."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

import dedup
import prep
from conftest import REPO_ROOT as REPO, assert_one_line_error, run_script

SAMPLE = REPO / "data" / "sample"
SAMPLE_FLAGS = ["--train", SAMPLE / "train.json", "--dev", SAMPLE / "dev.json", "--test", SAMPLE / "test.json"]


def records(name: str) -> list[dict]:
    raw = json.loads((SAMPLE / name).read_text(encoding="utf-8"))
    return [prep.validate_record(record, index, name)[0] for index, record in enumerate(raw)]


def distill_row(record: dict, summary: str) -> dict:
    """A row as `distill.py distill` writes it for a competition record (its default --format alpaca)."""
    return {"instruction": prep.build_user_text(record), "input": "", "output": summary, "id": record["id"],
            "teacher": "outputs/run/final", "source": "data/sample/test.json"}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def summary_of(record: dict) -> str:
    """A made-up summary naming the record's speakers and keywords: unlike every other one and every reference."""
    speakers = sorted({turn["speaker"] for turn in record["input"]["conversation"]})
    return f"두 화자는 이 대화에서 {', '.join(record['input']['subject_keyword'])}에 대해 이야기했습니다. " + \
        " ".join(f"{s}은 {record['id'][-2:]}번째로 자기 경험을 말했습니다." for s in speakers)


@pytest.fixture(scope="module")
def pseudo_run(tmp_path_factory):
    """Pseudo-labels in both shapes: distill.py distill's JSONL (every test record, one of them twice, a dev record
    with its own reference re-spaced, a dev record with a new summary) and competition JSON (a test record whose
    `output` is a dev reference, a dialogue of no competition file); prep.py runs with them and, as --extra, without."""
    work = tmp_path_factory.mktemp("pseudo")
    test, dev, train = records("test.json"), records("dev.json"), records("train.json")
    rows = [distill_row(r, summary_of(r)) for r in test] + [distill_row(test[0], summary_of(test[0]))]
    respaced = dev[0]["output"].replace(" ", "  ").replace(".", " .")
    rows += [distill_row(dev[0], respaced), distill_row(dev[1], summary_of(dev[1]))]
    distilled = write_jsonl(work / "self.jsonl", rows)
    other = {**train[0], "id": "corpus-2023-0001", "output": summary_of(train[0])}
    predictions = work / "predictions.json"
    predictions.write_text(json.dumps([{**test[1], "output": dev[2]["output"]}, other], ensure_ascii=False),
                           encoding="utf-8")
    flagged = run_script(["prep.py", *SAMPLE_FLAGS, "--pseudo_labels", distilled, predictions, "--out", work / "with"])
    as_extra = run_script(["prep.py", *SAMPLE_FLAGS, "--extra", distilled, "--out", work / "without"])
    return {"work": work, "test": test, "dev": dev, "distilled": str(distilled), "predictions": str(predictions),
            "other": other, "flagged": flagged, "as_extra": as_extra}


def read(run: dict, folder: str, name: str):
    text = (run["work"] / folder / name).read_text(encoding="utf-8")
    return json.loads(text) if name.endswith(".json") else [json.loads(line) for line in text.splitlines()]


def test_test_dialogues_are_kept_with_the_flag_in_the_competition_prompt(pseudo_run):
    assert pseudo_run["flagged"].returncode == 0, pseudo_run["flagged"].stderr
    train = read(pseudo_run, "with", "train.jsonl")
    from_distill = [row for row in train if row["source"] == pseudo_run["distilled"]]
    expected = [(r["id"], prep.build_messages(r), summary_of(r)) for r in pseudo_run["test"] + pseudo_run["dev"][1:2]]
    assert [(row["id"], row["prompt"], row["completion"][0]["content"]) for row in from_distill] == expected
    from_json = [row for row in train if row["source"] == pseudo_run["predictions"]]
    other = pseudo_run["other"]
    assert [(row["id"], row["prompt"], row["completion"][0]["content"]) for row in from_json] == \
        [(other["id"], prep.build_messages(other), other["output"])]


def test_the_same_rows_as_extra_are_dropped_as_leaks(pseudo_run):
    assert pseudo_run["as_extra"].returncode == 0, pseudo_run["as_extra"].stderr
    stats = read(pseudo_run, "without", "stats.json")
    leaked = {leak["matched"] for leak in stats["leaks"] if leak["source"] == pseudo_run["distilled"]}
    assert leaked == {r["id"] for r in pseudo_run["test"]} | {r["id"] for r in pseudo_run["dev"][:2]}
    assert not [row for row in read(pseudo_run, "without", "train.jsonl") if row["source"] == pseudo_run["distilled"]]
    assert "pseudo_labels" not in stats and "dev_reference" not in stats["sources"][pseudo_run["distilled"]]


def test_dev_references_are_dropped_and_listed(pseudo_run):
    stats = read(pseudo_run, "with", "stats.json")
    copies = [(c["source"], c["id"], c["matched"]) for c in stats["pseudo_labels"]["dev_references"]]
    test, dev = pseudo_run["test"], pseudo_run["dev"]
    assert copies == [(pseudo_run["distilled"], dev[0]["id"], dev[0]["id"]),
                      (pseudo_run["predictions"], test[1]["id"], dev[2]["id"])]
    assert all(c["similarity"] >= 0.7 for c in stats["pseudo_labels"]["dev_references"])
    completions = {row["completion"][0]["content"] for row in read(pseudo_run, "with", "train.jsonl")}
    assert dev[2]["output"] not in completions and not any(dev[0]["output"][:20] in text for text in completions)


def test_stats_and_the_stage_table_count_pseudo_labels_apart(pseudo_run):
    stats = read(pseudo_run, "with", "stats.json")
    n_test = len(pseudo_run["test"])
    distilled, predictions = stats["sources"][pseudo_run["distilled"]], stats["sources"][pseudo_run["predictions"]]
    assert distilled == {**dict.fromkeys(distilled, 0), "loaded": n_test + 3, "sampled": n_test + 3, "dev_reference": 1,
                         "duplicate": 1, "kept": n_test + 1}
    assert predictions == {**dict.fromkeys(predictions, 0), "loaded": 2, "sampled": 2, "dev_reference": 1, "kept": 1}
    assert stats["pseudo_labels"]["kept_by_dialogue"] == {"test": n_test, "dev": 1, "train": 0, "other": 1}
    assert list(stats["stage_meaning"]) == list(distilled) and "dev_reference" in stats["stage_meaning"]
    assert stats["rows"]["train"] == sum(source["kept"] for source in stats["sources"].values())
    printed = pseudo_run["flagged"].stdout
    # columns: train.json, self.jsonl, predictions.json
    assert re.search(r"^│ dev_reference +│ +0 │ +1 │ +1 │$", printed, re.M), printed
    assert "summarize dev dialogues" in printed  # one kept row is for a dev record: dev.jsonl's loss is not held out


BAD_FILES = {
    "missing": (None, ["--pseudo_labels", "file not found"]),
    "empty": ("", ["no rows"]),
    "distill rejects (no summary)": ([{"id": "x", "reason": "empty answer"}], ["record 0 (id 'x')", "field 'output'"]),
    "unknown id": ([{"instruction": "[Conversation]\n", "output": "요약", "id": "nope"}],
                   ["record 0 (id 'nope')", "field 'id'"]),
    "empty output record": ([{"id": "c1", "input": {"conversation": [{"speaker": "1", "utterance": "네"}],
                                                    "subject_keyword": ["x"]}, "output": " "}],
                            ["(id 'c1')", "field 'output'"]),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_pseudo_label_files_end_in_one_line(tmp_path, case):
    rows, fragments = BAD_FILES[case]
    path = tmp_path / "labels.jsonl"
    if rows is not None:
        write_jsonl(path, rows) if rows else path.write_text("", encoding="utf-8")
    result = run_script(["prep.py", *SAMPLE_FLAGS, "--pseudo_labels", path, "--out", tmp_path / "out"])
    assert_one_line_error(result, str(path), *fragments)
    assert not (tmp_path / "out").exists()


def test_a_prompt_for_another_dialogue_is_refused(tmp_path):
    test = records("test.json")
    wrong = {**distill_row(test[0], "요약입니다."), "instruction": prep.build_user_text(test[1])}
    path = write_jsonl(tmp_path / "labels.jsonl", [wrong])
    result = run_script(["prep.py", *SAMPLE_FLAGS, "--pseudo_labels", path, "--out", tmp_path / "out"])
    assert_one_line_error(result, str(path), f"(id {test[0]['id']!r})", "field 'instruction'",
                          "does not hold the dialogue")


def test_near_copies_finds_equal_and_near_references_only():
    references = ["두 화자는 이 대화에서 여행 계획과 맛집에 대해 길게 이야기했습니다.",
                  "SD2000001은 고양이를 키우는 이야기를 했습니다."]
    texts = ["두 화자는 이 대화에서, 여행 계획과 맛집에 대해 길게 이야기했습니다!", "전혀 다른 요약: 축구 경기와 응원 이야기를 나눴습니다.",
             "SD2000001은 고양이를 키우는 이야기를 했습니다."]
    matched, similarity = dedup.near_copies(texts, references, 0.7)
    assert matched.tolist() == [0, -1, 1] and similarity[2] == 1.0
    matched, _ = dedup.near_copies(texts[1:2], references, 0.7, same=[(0, 0)])  # compared, but not near
    assert matched.tolist() == [-1]


def test_exempt_rows_skip_the_leak_check_but_not_the_near_duplicate_check():
    dialogue = ["오늘 아침에 공원에서 산책을 하다가 오래된 친구를 우연히 만났어요", "그래서 같이 커피를 마시면서 옛날 이야기를 한참 했어요"]
    row = "\n".join(dialogue)
    matched, _, keep = dedup.leaks_then_near_duplicates([row, row, row], [dialogue], 0.7, exempt=[False, True, True])
    assert matched.tolist() == [0, -1, -1] and keep.tolist() == [False, True, False]
    assert np.array_equal(dedup.leaks_then_near_duplicates([row], [dialogue], 0.7)[0],
                          dedup.leaks_then_near_duplicates([row], [dialogue], 0.7, exempt=[False])[0])
