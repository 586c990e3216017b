"""targets.py: --clean_inputs for utterances, the --unify_targets rules (each one on crafted references, the ones
that must be left alone, and a check that every rule only moves, drops or re-spells what it names), and the
structured target layout with its way back to prose. prep.py's use of them is tested through its command line."""
from __future__ import annotations

import difflib
import json
import re
import unicodedata

import pytest

import targets
from conftest import REPO_ROOT, assert_one_line_error

SAMPLE = REPO_ROOT / "data" / "sample"
A, B = "SD2000010", "SD2000025"  # 10 reads 십 (consonant: 은 이 과 을), 25 reads 오 (vowel: 는 가 와 를)
SPEAKERS = [A, B]
PARTS = f"{A}은 여행을 좋아한다고 말했습니다. {B}는 대만에 가겠다고 말했습니다."
UNIFIED = f"두 화자는 이 대화에서 여행에 대해 말했습니다. {PARTS}"


def sample_records() -> list[dict]:
    return [r for name in ("train", "dev") for r in json.loads((SAMPLE / f"{name}.json").read_text(encoding="utf-8"))]


def record(output: str, speakers=(A, B)) -> dict:
    turns = [{"speaker": s, "utterance": "네"} for s in speakers]
    return {"id": "r1", "input": {"conversation": turns, "subject_keyword": ["여행"]}, "output": output}


# ------------------------------------------------------------------------------------------------
# --clean_inputs (utterances)
# ------------------------------------------------------------------------------------------------

def test_clean_utterance():
    assert targets.clean_utterance("어~ 그 그 사람이 xx에서 음~~ 왔어요 좋죠~") == "그 사람이 에서 왔어요 좋죠~"
    assert targets.clean_utterance("box xxx taxi") == "box taxi"


@pytest.mark.parametrize("said, cleaned", [
    ("무슨 무슨 얘기를 했는지 하나 하나 따로 따로 계속 계속 물어봤어요", "무슨 무슨 얘기를 했는지 하나 하나 따로 따로 계속 계속 물어봤어요"),
    ("이제 이제 저는 저는 그 그 그 사람을 만났어요", "이제 저는 그 사람을 만났어요"),  # stutters go, whatever their length
    ("계속 계속 계속 걸었어요", "계속 계속 걸었어요"),  # a reduplication stays doubled, not tripled
    ("네 네 네", "네"),
])
def test_clean_inputs_keeps_reduplication_and_drops_stutters(said, cleaned):
    assert targets.clean_utterance(said) == cleaned


def test_clean_record_drops_an_utterance_only_when_nothing_is_left():
    rec = record("요약", ("A", "B", "A"))
    for turn, said in zip(rec["input"]["conversation"], ("어~ 음~ xx", "네 네", "따로 따로 가요")):
        turn["utterance"] = said
    cleaned, saved, dropped = targets.clean_record(rec)
    assert [t["utterance"] for t in cleaned["input"]["conversation"]] == ["네", "따로 따로 가요"]
    assert dropped == 1 and saved == len("어~ 음~ xx") + len(" 네")


# ------------------------------------------------------------------------------------------------
# --unify_targets: every opening variant, each rule, and what must be left alone
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("opening", [
    "두 화자는 이 대화에서",  # already unified
    "이 대화에서 화자들은",
    "이 대화에서 두 화자는",
    f"이 대화에서 화자 {A}과 화자 {B}는",
    f"이 대화에서 화자{A}와 화자{B}은",  # no space, particles wrong
    f"이 대화에서 {A}과 {B}는",
    f"{A}과 {B}는",
    f"{A}과 {B}는 이 대화에서",
    f"두 화자 {A}과 {B}는",
    "두 사람은",
    "두 사람은 이 대화에서",
    "화자들은",
    "화자들은 이 대화에서",
    "이 대화에서는 화자들이",
])
def test_every_opening_variant_becomes_one(opening):
    text, _, problems = targets.unify_target(f"{opening} 여행에 대해 말했습니다. {PARTS}", SPEAKERS)
    assert text == UNIFIED
    assert problems == []


@pytest.mark.parametrize("before, after, rules", [
    (f"이 대화에서 화자들은 여행에 대해 말했습니다. 화자 {A}은 여행을 좋아한다고 말했습니다. 화자{B}는 대만에 가겠다고 말했습니다.",
     UNIFIED, ["speaker_prefix", "opening"]),
    (UNIFIED.replace(f"{A}은", f"{A}는").replace(f"{B}는", f"{B}은"), UNIFIED, ["particles"]),
    (f"{UNIFIED[:-1]} {A}과는 {B}를 만났고 {B}와 {A}을 도왔습니다.".replace(f"{A}과는", f"{A}와는"),
     f"{UNIFIED[:-1]} {A}과는 {B}를 만났고 {B}와 {A}을 도왔습니다.", ["particles"]),
    (UNIFIED.replace(f"{A}은", f"S{A}은"), UNIFIED, ["ssd_typo"]),
    (UNIFIED.replace(f"{A}은", "SD2000019은"), UNIFIED, ["speaker_id_typo"]),  # one digit off
    (UNIFIED.replace(f"{B}는", "SD20000250는"), UNIFIED, ["speaker_id_typo"]),  # an extra digit
    (UNIFIED.replace("대화에서", "대화에서 대화에서").replace("대만에", "그리고 그리고 대만에"),
     UNIFIED.replace("대만에", "그리고 대만에"), ["doubled_word"]),
    (f"두 화자는 이 대화에서 여행에 대해 말했습니다. 화자 화자 {PARTS}", UNIFIED, ["doubled_word", "speaker_prefix"]),
    (UNIFIED + " " + f"{B}는 대만에 가겠다고 말했습니다.", UNIFIED, ["repeated_sentence"]),
    (UNIFIED.replace("말했습니다. ", "말했습니다."), UNIFIED, ["period_space"]),
    (UNIFIED.replace("여행에", "여\x00행에").replace(" 대만", "\n대만") + "\u200b", UNIFIED,
     ["control_characters"]),
    ("  " + UNIFIED.replace(" ", "  ", 3), UNIFIED, ["spaces"]),
    (UNIFIED[:-1], UNIFIED, ["final_period"]),
    (f"두 화자는 이 대화에서 여행에 대해 말했습니다. {B}는 대만에 가겠다고 말했습니다. {A}은 여행을 좋아한다고 말했습니다.",
     UNIFIED, ["speaker_order"]),
    (UNIFIED.replace(f"{A}은", f"{A}이").replace(f"{B}는", f"{B}이"), UNIFIED, ["part_topic"]),
])
def test_each_rule_on_crafted_references(before, after, rules):
    text, changed_by, problems = targets.unify_target(before, SPEAKERS)
    assert (text, changed_by, problems) == (after, rules, [])


@pytest.mark.parametrize("text, problems", [
    (UNIFIED, []),
    (PARTS, ["no_overall_sentence"]),  # no overall sentence is invented
    (f"오늘 두 화자는 여행에 대해 말했습니다. {PARTS}", ["unrecognized_opening"]),
    (UNIFIED.replace(f"{A}은", "SD2000015는"), ["unknown_speaker_id"]),  # one edit from both speakers
    (UNIFIED.replace(f"{A}은", "SD2000777은"), ["unknown_speaker_id"]),  # near neither
    (UNIFIED.replace("여행을", "하나 하나 여행을"), []),  # reduplication is meant
    (UNIFIED.replace("여행을", f"{A}이라고 부르는 여행을"), []),  # longer endings than a particle stay as written
    (UNIFIED.replace("말했습니다.", "1.5배 말했습니다.", 1), []),  # a decimal point is no sentence end
])
def test_what_is_left_alone(text, problems):
    unified, _, found = targets.unify_target(text, SPEAKERS)
    assert unified == text
    assert found == problems


def test_a_wrong_id_is_fixed_before_its_particle_and_its_part_is_placed():
    text = "이 대화에서 화자들은 여행에 대해 말했습니다. SD20000250은 대만에 가겠다고 말했습니다. SSD2000010는 여행을 좋아한다고 말했습니다"
    assert targets.unify_target(text, SPEAKERS)[0] == UNIFIED


# ------------------------------------------------------------------------------------------------
# The meaning is kept: each rule, run in turn as unify_target runs them, only moves, drops or
# re-spells what it names. Checked independently of the rules' own regular expressions.
# ------------------------------------------------------------------------------------------------

def visible(text: str) -> str:
    return "".join(c for c in text if not c.isspace() and unicodedata.category(c) not in ("Cc", "Cf"))


def sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?]) ", text) if s]


def word_ops(before: str, after: str) -> list[tuple[list[str], list[str]]]:
    old, new = before.split(), after.split()
    matcher = difflib.SequenceMatcher(a=old, b=new, autojunk=False)
    return [(old[i1:i2], new[j1:j2]) for op, i1, i2, j1, j2 in matcher.get_opcodes() if op != "equal"]


def id_and_rest(word: str) -> tuple[str, str]:
    match = re.match(r"(SD\d+)(.*)", word)
    assert match, word
    return match[1], match[2]


def levenshtein(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        diagonal, row[0] = row[0], i
        for j, char_b in enumerate(b, 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (char_a != char_b))
    return row[-1]


def check_particles(before: str, after: str) -> None:
    for old, new in word_ops(before, after):
        assert len(old) == len(new)
        for old_word, new_word in zip(old, new):
            (old_id, old_rest), (new_id, new_rest) = id_and_rest(old_word), id_and_rest(new_word)
            assert old_id == new_id and old_rest[1:] == new_rest[1:]
            pair = {old_rest[0], new_rest[0]}
            assert pair in ({"은", "는"}, {"이", "가"}, {"과", "와"}, {"을", "를"})
            assert (new_rest[0] in "은이과을") == (new_id[-1] in "013678")


def check_ids(before: str, after: str, speakers: list[str]) -> None:
    for old, new in word_ops(before, after):
        assert len(old) == len(new)
        for old_word, new_word in zip(old, new):
            (old_id, old_rest), (new_id, new_rest) = id_and_rest(old_word), id_and_rest(new_word)
            assert old_id not in speakers and new_id in speakers and old_rest == new_rest
            assert levenshtein(old_id, new_id) == 1


def check_opening(before: str, after: str) -> None:
    head = targets.UNIFIED_OPENING.split()
    new = after.split()
    assert new[:len(head)] == head
    rest = new[len(head):]
    old = before.split()
    assert old[len(old) - len(rest):] == rest, "the rest of the summary is word for word"
    dropped = old[:len(old) - len(rest)]
    group_words = {"이", "대화에서", "대화에서는", "두", "화자는", "화자가", "화자들은", "화자들이", "사람은", "사람이", "화자"}
    assert all(w in group_words or re.fullmatch(r"SD\d+[은는이가과와]", w) for w in dropped), dropped


def check_rule(name: str, before: str, after: str, speakers: list[str]) -> None:
    if name == "control_characters":
        assert visible(before) == visible(after) and not any(unicodedata.category(c) == "Cc" for c in after)
    elif name in ("spaces", "period_space"):
        assert visible(before) == visible(after) and "".join(before.split()) == "".join(after.split())
    elif name == "final_period":
        assert after == before + "."
    elif name in ("ssd_typo", "speaker_prefix"):
        deleted = [before[i1:i2] for op, i1, i2, _, _ in
                   difflib.SequenceMatcher(a=before, b=after, autojunk=False).get_opcodes() if op != "equal"]
        allowed = ("S",) if name == "ssd_typo" else ("화자", "화자 ", " 화자")
        assert len(before) - len(after) == sum(map(len, deleted)) and all(d in allowed for d in deleted)
    elif name == "doubled_word":
        for old, new in word_ops(before, after):
            assert not new and all(w in before.split() for w in old)
            assert all(f"{w} {w}" in before for w in old)
    elif name == "speaker_id_typo":
        check_ids(before, after, speakers)
    elif name == "repeated_sentence":
        assert sentences(after) == list(dict.fromkeys(sentences(before)))
    elif name == "opening":
        check_opening(before, after)
    elif name == "speaker_order":
        assert sorted(sentences(before)) == sorted(sentences(after)) and sentences(before) != sentences(after)
    elif name == "particles":
        check_particles(before, after)
    elif name == "part_topic":  # a part's opening id + 이/가 becomes the same id + 은/는, nothing else changes
        for old, new in word_ops(before, after):
            assert len(old) == len(new)
            for (old_id, old_rest), (new_id, new_rest) in zip(map(id_and_rest, old), map(id_and_rest, new)):
                assert old_id == new_id and old_rest in ("이", "가") and new_rest in ("은", "는")
                assert (new_rest == "은") == (new_id[-1] in "013678")
    else:
        raise AssertionError(f"no meaning check for rule {name}: write one")


def crafted_references() -> list[str]:
    texts = [f"{opening} 여행에 대해 말했습니다. {PARTS}" for opening in (
        "이 대화에서 화자들은", f"이 대화에서 화자 {A}와 화자 {B}은", f"{A}과 {B}는", "두 사람은", "화자들은")]
    texts += [
        "\t이 대화에서 화자들은  여행에 대해 말했습니다.화자 화자 SSD2000019는 여행을 좋아한다고 말했습니다.\x07 "
        "SD20000250은 대만에 가겠다고 말했습니다. SD20000250은 대만에 가겠다고 말했습니다",
        f"두 화자는 이 대화에서 여행에 대해 말했습니다. {B}은 대만에 가겠다고 말했습니다. 그리고 그리고 {A}를 만났습니다. "
        f"{A}는 {B}과 하나 하나 말했습니다. {B}가 다시 말했습니다. {A}이라고 불렀습니다",
    ]
    return texts


def test_every_rule_only_moves_drops_or_respells_what_it_names():
    cases = [(text, SPEAKERS) for text in crafted_references()]
    cases += [(r["output"], targets.speakers_in_order(r)) for r in sample_records()]
    applied = set()
    for text, speakers in cases:
        for name, rule, _ in targets.TARGET_RULES:
            new_text = rule(text, speakers)
            if new_text != text:
                check_rule(name, text, new_text, speakers)
                applied.add(name)
            text = new_text
    assert applied == {name for name, _, _ in targets.TARGET_RULES}, "every rule was exercised"


def test_unifying_twice_changes_nothing_more():
    for text in crafted_references() + [r["output"] for r in sample_records()]:
        once = targets.unify_target(text, SPEAKERS)[0]
        assert targets.unify_target(once, SPEAKERS) == (once, [], targets.target_problems(once, SPEAKERS))


def test_unify_records_reports_ids_per_rule_and_problems():
    records = [record(f"이 대화에서 화자들은 여행에 대해 말했습니다. {PARTS}"), record(PARTS), record(UNIFIED)]
    for index, rec in enumerate(records):
        rec["id"] = f"r{index}"
    unified, report, changes = targets.unify_records(records)
    assert [r["output"] for r in unified] == [UNIFIED, PARTS, UNIFIED]
    assert report["rules"]["opening"] == {"count": 1, "ids": ["r0"]}
    assert report["left_as_is"]["no_overall_sentence"] == {"count": 1, "ids": ["r1"]}
    assert report["changed"] == 1 and changes == [("r0", records[0]["output"], UNIFIED)]
    assert records[0]["output"] != UNIFIED, "the input records are not modified"


# ------------------------------------------------------------------------------------------------
# prep.py --unify_targets / --show_changes through the real command line
# ------------------------------------------------------------------------------------------------

def noisy_train_file(tmp_path) -> str:
    """The sample train file with label noise of every kind the rules repair, and one summary they cannot."""
    records = json.loads((SAMPLE / "train.json").read_text(encoding="utf-8"))
    first, second = (targets.speakers_in_order(records[k]) for k in (0, 1))
    records[0]["output"] = records[0]["output"].replace(f"{first[0]}은", f"화자 S{first[0]}는").replace(". ", ".", 1)
    records[1]["output"] = f"{second[1]}은 형이 있다고 말했습니다. {second[0]}는 누나가 있다고 말했습니다."
    path = tmp_path / "train_noisy.json"
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return str(path)


def test_e2e_unify_targets_rewrites_train_targets_only_and_counts_each_rule(tmp_path, run_script):
    train = noisy_train_file(tmp_path)
    out = tmp_path / "out"
    result = run_script(["prep.py", "--train", train, "--dev", str(SAMPLE / "dev.json"), "--out", str(out),
                         "--unify_targets"], timeout=300)
    assert result.returncode == 0, result.stderr
    raw = json.loads(open(train, encoding="utf-8").read())
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    expected = [targets.unify_target(r["output"], targets.speakers_in_order(r))[0] for r in raw]
    assert [row["completion"][0]["content"] for row in rows] == expected
    assert rows[0]["completion"][0]["content"].startswith("두 화자는 이 대화에서 해외여행에 대해 말했습니다. SD2000010은 ")
    dev = json.loads((SAMPLE / "dev.json").read_text(encoding="utf-8"))
    dev_rows = [json.loads(line) for line in (out / "dev.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [row["completion"][0]["content"] for row in dev_rows] == [r["output"] for r in dev], "dev keeps its refs"
    effect = json.loads((out / "stats.json").read_text(encoding="utf-8"))["unify_targets_effect"]
    openings = [r["id"] for r in raw[2:] if r["output"].startswith("이 대화에서 화자들은")]
    assert effect["rules"]["opening"] == {"count": len(openings), "ids": openings}
    assert effect["rules"]["ssd_typo"]["ids"] == effect["rules"]["speaker_prefix"]["ids"] == [raw[0]["id"]]
    assert effect["rules"]["period_space"]["ids"] == effect["rules"]["particles"]["ids"][:1] == [raw[0]["id"]]
    assert effect["rules"]["speaker_order"]["ids"] == [raw[1]["id"]]
    assert effect["left_as_is"]["no_overall_sentence"] == {"count": 1, "ids": [raw[1]["id"]]}
    assert f"left as is, no_overall_sentence: 1: {raw[1]['id']}" in result.stdout


def test_e2e_show_changes_prints_pairs_and_writes_nothing(tmp_path, run_script):
    out = tmp_path / "out"
    result = run_script(["prep.py", "--train", noisy_train_file(tmp_path), "--dev", str(SAMPLE / "dev.json"),
                         "--out", str(out), "--unify_targets", "--show_changes", "2"], timeout=300)
    assert result.returncode == 0, result.stderr
    assert not out.exists()
    shown = [line for line in result.stdout.splitlines() if line.startswith("nikluge-")]
    assert len(shown) == 2
    assert "두 화자는 이 대화에서" in result.stdout and "training targets changed (" in result.stdout
    assert "next: python train.py" not in result.stdout


@pytest.mark.parametrize("flag, value, expected", [("--show_changes", "0", "at least 1"),
                                                  ("--target_format", "markdown", "prose or structured")])
def test_e2e_impossible_target_setting_is_one_line(tmp_path, run_script, flag, value, expected):
    result = run_script(["prep.py", "--train", str(SAMPLE / "train.json"), "--dev", str(SAMPLE / "dev.json"),
                         "--out", str(tmp_path / "out"), flag, value], timeout=120)
    assert_one_line_error(result, f"{flag} {value}", expected)
    assert not (tmp_path / "out").exists()


def test_show_changes_marks_dropped_and_added_words():
    from rich.text import Text

    before, after = "이 대화에서 화자들은 [b]운동에 대해 말했습니다.", "두 화자는 이 대화에서 [b]운동에 대해 말했습니다."
    old, new = (Text.from_markup(markup) for markup in targets.diff_markup(before, after))
    assert (old.plain, new.plain) == (before, after), "user text is never read as markup"
    assert [old.plain[s.start:s.end] for s in old.spans] == ["화자들은"]
    assert [new.plain[s.start:s.end] for s in new.spans] == ["두 화자는"]


# ------------------------------------------------------------------------------------------------
# --target_format structured: the layout, the exact way back, and malformed generations
# ------------------------------------------------------------------------------------------------

def test_structured_layout():
    text = f"{UNIFIED} 그리고 여행 앱을 추천했습니다."
    assert targets.to_structured(text, SPEAKERS) == (
        "## 전반적인 요약\n두 화자는 이 대화에서 여행에 대해 말했습니다.\n\n"
        f"## {A} 요약\n- {A}은 여행을 좋아한다고 말했습니다.\n\n"
        f"## {B} 요약\n- {B}는 대만에 가겠다고 말했습니다.\n- 그리고 여행 앱을 추천했습니다."
    )


def test_structured_round_trip_gives_every_unified_sample_target_exactly():
    records = sample_records()
    for rec in records:
        speakers = targets.speakers_in_order(rec)
        unified = targets.unify_target(rec["output"], speakers)[0]
        structured = targets.to_structured(unified, speakers)
        assert structured.startswith("## 전반적인 요약\n") and f"## {speakers[0]} 요약\n- " in structured
        assert structured.index(f"## {speakers[0]} 요약") < structured.index(f"## {speakers[1]} 요약")
        assert targets.flatten_structured(structured) == (unified, True)
    assert len(records) == 11


def test_round_trip_without_an_overall_sentence():
    assert targets.flatten_structured(targets.to_structured(PARTS, SPEAKERS)) == (PARTS, True)


@pytest.mark.parametrize("generated, prose", [
    ("두 화자는 여행에 대해 말했습니다.", "두 화자는 여행에 대해 말했습니다."),  # prose from a structured model
    (f"## 전반적인 요약\n두 화자는 말했습니다.\n## {A} 요약\n{A}은 갔습니다.", f"두 화자는 말했습니다. {A}은 갔습니다."),  # no bullet
    (f"## 전반적인 요약\n두 화자는 말했습니다.\n## {A} 요약\n- {A}은 갔습니다.\n## {B} 요약",
     f"두 화자는 말했습니다. {A}은 갔습니다."),  # a section cut off by the token limit
    (f"## 전반적인 요약\n두 화자는 말했습니다.\n### 화자별\n* {A}은 갔습니다.\n• {B}는 왔습니다.\n1. 끝입니다.",
     f"두 화자는 말했습니다. {A}은 갔습니다. {B}는 왔습니다. 끝입니다."),
    (f"## {A} 요약\n- {A}은 갔습니다. - 그리고 ## 왔습니다.\n- ", f"{A}은 갔습니다. 그리고 왔습니다."),
    ("", ""),
])
def test_malformed_generations_are_flattened_and_marked(generated, prose):
    flat, well_formed = targets.flatten_structured(generated)
    assert (flat, well_formed) == (prose, False)
    assert "#" not in flat and "- " not in flat


def test_e2e_structured_targets_and_prompt(tmp_path, run_script):
    out = tmp_path / "out"
    result = run_script(["prep.py", "--train", str(SAMPLE / "train.json"), "--dev", str(SAMPLE / "dev.json"),
                         "--out", str(out), "--unify_targets", "--target_format", "structured"], timeout=300)
    assert result.returncode == 0, result.stderr
    records = {r["id"]: r for r in sample_records()}
    for name in ("train.jsonl", "dev.jsonl"):  # dev.jsonl too: its eval loss is on what the model is asked to write
        for line in (out / name).read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            rec = records[row["id"]]
            assert row["prompt"][0]["content"].endswith("요약해주세요.\n" + targets.STRUCTURED_INSTRUCTION)
            structured = row["completion"][0]["content"]
            assert structured.startswith("## 전반적인 요약\n")
            expected = rec["output"]
            if name == "train.jsonl":
                expected = targets.unify_target(expected, targets.speakers_in_order(rec))[0]
            assert targets.flatten_structured(structured) == (expected, True)
    assert json.loads((out / "stats.json").read_text(encoding="utf-8"))["target_format"] == "structured"
    import score  # the output guard's length band is measured on the prose the guard will see

    unified = [targets.unify_target(r["output"], targets.speakers_in_order(r))[0] for r in sample_records()[:8]]
    assert score.training_summary_lengths(out) == [len(text) for text in unified]


def test_infer_flattens_and_flags_malformed_structure():
    import progress

    assert progress.as_prose(f"## {A} 요약\n- {A}은 갔습니다.", "structured") == {"output": f"{A}은 갔습니다."}
    assert progress.as_prose(f"{A}은 갔습니다.", "structured") == {"output": f"{A}은 갔습니다.", "malformed_structure": True}
    assert progress.as_prose("## 그대로", "prose") == {"output": "## 그대로"}, "a prose model's text is not touched"
    guard = {"flags": {"a": [], "b": ["long: 900 chars > 800"], "c": []}, "flagged": ["b"]}
    progress.flag_malformed_structure(guard, ["c"])
    assert guard["flagged"] == ["b", "c"] and guard["flags"]["c"] == ["structure: not the trained sections (flattened)"]


def test_e2e_structured_model_writes_prose(tmp_path, tiny_model_dir, run_script):
    """prep.py --unify_targets --target_format structured -> train.py memorizes 4 rows -> infer.py: the model writes
    the sections, and the submission and the scores get them back as the unified prose; a partial file of a prose
    model is refused in one line."""
    from conftest import MEMORIZE_FLAGS, MEMORIZE_ROWS

    prepared, four = tmp_path / "prepared", tmp_path / "four"
    result = run_script(["prep.py", "--train", SAMPLE / "train.json", "--dev", SAMPLE / "dev.json", "--out", prepared,
                         "--tokenizer", tiny_model_dir, "--max_seq_length", "1024", "--unify_targets",
                         "--target_format", "structured"], timeout=300)
    assert result.returncode == 0, result.stderr
    four.mkdir()
    lines = (prepared / "train.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)[:MEMORIZE_ROWS]
    (four / "train.jsonl").write_text("".join(lines), encoding="utf-8")
    for name in ("dev.jsonl", "stats.json"):
        (four / name).write_bytes((prepared / name).read_bytes())
    result = run_script(["train.py", "--model", tiny_model_dir, "--data", four, "--output_dir", tmp_path / "run",
                         *MEMORIZE_FLAGS], cwd=tmp_path, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    final = tmp_path / "run" / "final"
    assert json.loads((final / "run_config.json").read_text(encoding="utf-8"))["target_format"] == "structured"

    ids = [json.loads(line)["id"] for line in lines]
    records = [r for r in sample_records() if r["id"] in ids]
    (tmp_path / "memorized.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    stale = tmp_path / "memorized_pred.json.partial.jsonl"
    stale.write_text(json.dumps({"fingerprint": {"target_format": "prose"}}) + "\n", encoding="utf-8")
    result = run_script(["infer.py", "--model", final, "--input", "memorized.json", "--max_new_tokens", "256",
                         "--no-load_in_4bit"], cwd=tmp_path, timeout=900)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: {stale.name}: holds summaries of a --target_format prose"), error
    stale.unlink()
    result = run_script(["infer.py", "--model", final, "--input", "memorized.json", "--max_new_tokens", "256",
                         "--no-load_in_4bit", "--batch_size", "4"], cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    predictions = [r["output"] for r in json.loads((tmp_path / "memorized_pred.json").read_text(encoding="utf-8"))]
    assert predictions == [targets.unify_target(r["output"], targets.speakers_in_order(r))[0] for r in records]
    scores = json.loads((tmp_path / "scores.json").read_text(encoding="utf-8"))
    assert scores["guard"]["flagged"] == []


def test_e2e_unparsed_generations_are_flattened_and_flagged(tmp_path, chatty_model_dir, run_script):
    """A model whose run says structured but that writes plain chat text (the tiny chatty model): every summary
    reaches the submission as prose, and the output guard flags each one as not the trained sections."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(chatty_model_dir, model)
    (model / "run_config.json").write_text(json.dumps({"target_format": "structured"}), encoding="utf-8")
    result = run_script(["infer.py", "--model", model, "--input", SAMPLE / "test.json", "--output", "submission.json",
                         "--max_new_tokens", "24", "--no-load_in_4bit"], cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    outputs = [r["output"] for r in json.loads((tmp_path / "submission.json").read_text(encoding="utf-8"))]
    assert all(text and "#" not in text and "- " not in text for text in outputs)
    guard = json.loads((tmp_path / "submission.guard.json").read_text(encoding="utf-8"))
    assert all("structure: not the trained sections (flattened)" in item["guard"] for item in guard["items"])
    assert len(guard["guard"]["flagged"]) == len(outputs) == 3


def test_e2e_score_flattens_a_prediction_file_with_sections(tmp_path, run_script):
    """--score on a structured model's raw text scores the prose it stands for (the same ROUGE-1 as the prose)."""
    dev = json.loads((SAMPLE / "dev.json").read_text(encoding="utf-8"))
    raw = [{**r, "output": targets.to_structured(r["output"], targets.speakers_in_order(r))} for r in dev]
    (tmp_path / "raw.json").write_text(json.dumps(raw, ensure_ascii=False), encoding="utf-8")
    result = run_script(["infer.py", "--score", "raw.json", "--ref", SAMPLE / "dev.json", "--metrics", "rouge1",
                         "--scores_file", "scores.json"], cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "raw.json: 3 predictions hold ## headings or - bullets; flattened to prose" in result.stdout
    scores = json.loads((tmp_path / "scores.json").read_text(encoding="utf-8"))
    assert scores["means"]["rouge1"] == pytest.approx(1.0)


def test_merge_refuses_adapters_of_both_target_formats(tmp_path, run_script):
    from test_checkpoints import fake_adapter

    prose, structured = fake_adapter(tmp_path / "prose", 8), fake_adapter(tmp_path / "structured", 8)
    config = json.loads((structured / "run_config.json").read_text(encoding="utf-8"))
    (structured / "run_config.json").write_text(json.dumps({**config, "target_format": "structured"}), encoding="utf-8")
    result = run_script(["train.py", "merge", "--adapters", prose, structured, "--output_dir", tmp_path / "out"],
                        cwd=tmp_path)
    assert_one_line_error(result, "trained with different prompts (target_format differs)")
    assert not (tmp_path / "out").exists()
