"""Text rules for dialogues and summaries: `--clean_inputs` for utterances, `--unify_targets` for training
targets, and the structured target layout (`--target_format structured`) with its way back to prose.

prep.py applies them (python prep.py --unify_targets --show_changes 5 previews the target rules), infer.py
flattens structured generations. Pure text functions, and nothing of ours is imported: prep.py
imports this file, so it must not import prep.py back.
"""
from __future__ import annotations

import re
from typing import Callable

# ---------------------------------------------------------------------------------------------
# --clean_inputs: fillers, masks and stutters out of utterances
# ---------------------------------------------------------------------------------------------

# Fillers are a filler syllable run ending in "~" standing as its own word; "좋죠~" is left alone.
_FILLER = re.compile(r"(?<!\S)(?:어|음|아|으|흠|에|그|저|뭐|응|오)+~+[.,]?(?!\S)")
_MASK = re.compile(r"(?<![A-Za-z])[xX]{2,}(?![A-Za-z])")
_WORD_REPEAT = re.compile(r"(?<!\S)(\S+)(?:\s+\1)+(?!\S)")
# Words Korean doubles on purpose ("무슨 무슨 얘기" 'all sorts of talk', "하나 하나" 'one by one',
# "따로 따로" 'each separately', "계속 계속" 'on and on'): the pair carries meaning, so --clean_inputs
# keeps it. Every other doubled word is a stutter ("그 그", "이제 이제", "저는 저는") and goes.
REDUPLICATED_WORDS = frozenset({
    "무슨", "하나", "하나씩", "따로", "계속", "가끔", "조금", "조금씩", "천천히", "빨리", "얼른", "어서", "자주",
    "많이", "너무", "정말", "진짜", "아주", "여러", "구석", "군데", "차근", "하루", "오래", "살금", "대충", "띄엄",
    "골고루", "차례", "가지", "사이", "곳",
})
_SPACES = re.compile(r"\s+")


def clean_utterance(text: str) -> str:
    """`--clean_inputs`: drop fillers ("어~", "음~"), `xx` masks and stuttered word repeats ("그 그 사람"),
    keeping Korean reduplication ("무슨 무슨", "하나 하나": see REDUPLICATED_WORDS)."""
    text = _FILLER.sub(" ", text)
    text = _MASK.sub(" ", text)
    text = _WORD_REPEAT.sub(collapse_word_repeat, text)
    return _SPACES.sub(" ", text).strip()


def collapse_word_repeat(match: re.Match) -> str:
    """A stutter ("그 그", "이제 이제 이제") becomes one word; a reduplication stays doubled, never tripled."""
    word = match[1]
    return f"{word} {word}" if word in REDUPLICATED_WORDS else word


def clean_record(record: dict) -> tuple[dict, int, int]:
    """Clean every utterance; returns (record, characters saved, utterances left empty and dropped)."""
    turns, saved = [], 0
    for turn in record["input"]["conversation"]:
        cleaned = clean_utterance(turn["utterance"])
        saved += len(turn["utterance"]) - len(cleaned)
        if cleaned:
            turns.append({**turn, "utterance": cleaned})
    dropped = len(record["input"]["conversation"]) - len(turns)
    if not turns:  # a conversation of nothing but fillers keeps its original text rather than vanish
        return record, 0, 0
    return {**record, "input": {**record["input"], "conversation": turns}}, saved, dropped


def clean_records(records: list[dict]) -> tuple[list[dict], dict[str, int]]:
    """--clean_inputs on every record: (cleaned records, characters before and saved, utterances dropped)."""
    effect = {"chars_before": 0, "chars_saved": 0, "utterances_dropped": 0}
    cleaned = []
    for record in records:
        effect["chars_before"] += sum(len(turn["utterance"]) for turn in record["input"]["conversation"])
        new_record, saved, dropped = clean_record(record)
        effect["chars_saved"] += saved
        effect["utterances_dropped"] += dropped
        cleaned.append(new_record)
    return cleaned, effect


def drop_middle_utterances(record: dict, count: int) -> dict:
    """Remove `count` utterances from the middle of the conversation: its opening and its end stay."""
    turns = record["input"]["conversation"]
    start = (len(turns) - count) // 2
    kept = turns[:start] + turns[start + count:]
    return {**record, "input": {**record["input"], "conversation": kept}}


def fewest_middle_cuts(record: dict, fits: Callable[[dict], bool]) -> int | None:
    """Fewest middle utterances drop_middle_utterances must remove for `fits` to hold (binary search: fewer cuts
    never fit where more do not); None when no cut that leaves one utterance fits."""
    low, high, best = 1, len(record["input"]["conversation"]) - 1, None
    while low <= high:
        middle = (low + high) // 2
        if fits(drop_middle_utterances(record, middle)):
            best, high = middle, middle - 1
        else:
            low = middle + 1
    return best


# ---------------------------------------------------------------------------------------------
# Speakers and sentences of a reference summary
# ---------------------------------------------------------------------------------------------

SPEAKER_ID = re.compile(r"(?<![A-Za-z])SD\d+")
# A speaker id's particle follows the Korean reading of its last digit: 영 일 삼 육 칠 팔 end in a
# consonant (은 이 과 을), 이 사 오 구 in a vowel (는 가 와 를).
CONSONANT_FINAL_DIGITS = frozenset("013678")
AFTER_VOWEL = {"은": "는", "이": "가", "과": "와", "을": "를"}  # a particle -> its form after a vowel
AFTER_CONSONANT = {vowel: consonant for consonant, vowel in AFTER_VOWEL.items()}  # -> its form after a consonant
# What may follow an id and count as "the id's particle": the four pairs, and 과/와 with 는/도/의 after
# them ("SD2000012와는"). Anything longer ("SD2000010이라고") is left alone.
_ID_WITH_SUFFIX = re.compile(r"(?<![A-Za-z])(SD\d+)([가-힣]+)")
_PARTICLE_SUFFIXES = frozenset(AFTER_VOWEL) | frozenset(AFTER_CONSONANT) | {
    f"{p}{tail}" for p in ("과", "와") for tail in ("는", "도", "의")}
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def speakers_in_order(record: dict) -> list[str]:
    """The conversation's speakers in the order they first speak."""
    return list(dict.fromkeys(turn["speaker"] for turn in record["input"]["conversation"]))


def particle_for(speaker: str, particle: str) -> str:
    """The form of `particle` (either spelling) that follows `speaker`'s id when read aloud."""
    if speaker[-1:] in CONSONANT_FINAL_DIGITS:
        return AFTER_CONSONANT.get(particle, particle)
    if speaker[-1:].isdigit():
        return AFTER_VOWEL.get(particle, particle)
    return particle  # not an id read as digits: leave it as written


def split_sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


def sentence_speaker(sentence: str, speakers: list[str]) -> str | None:
    """The speaker whose part this sentence opens ("SD2000010은 ..."), or None."""
    match = _ID_WITH_SUFFIX.match(sentence)
    return match[1] if match and match[1] in speakers else None


def split_parts(text: str, speakers: list[str]) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """(overall sentences, [(speaker, sentences)]): a sentence opening with a speaker's id starts that speaker's
    part; the sentences after it belong to it until another part starts. Parts stay in the text's order."""
    overall: list[str] = []
    parts: list[tuple[str, list[str]]] = []
    for sentence in split_sentences(text):
        speaker = sentence_speaker(sentence, speakers)
        if speaker is not None:
            parts.append((speaker, [sentence]))
        elif parts:
            parts[-1][1].append(sentence)
        else:
            overall.append(sentence)
    return overall, parts


def edit_distance_is_one(a: str, b: str) -> bool:
    """One substitution, insertion or deletion apart ("SD2000012" vs "SD2000013" or "SD20000012")."""
    if abs(len(a) - len(b)) > 1 or a == b:
        return False
    if len(a) == len(b):
        return sum(x != y for x, y in zip(a, b)) == 1
    short, long = sorted((a, b), key=len)
    return any(long[:k] + long[k + 1:] == short for k in range(len(long)))


# ---------------------------------------------------------------------------------------------
# --unify_targets: one rule per function, (text, speakers) -> text; each only moves, drops or
# re-spells what it names (tests/test_targets.py checks that on crafted references and the sample)
# ---------------------------------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f\u200b-\u200f\u2028\u2029\ufeff]")
_LINE_BREAKS = re.compile(r"[\t\n\v\f\r]")


def remove_control_characters(text: str, speakers: list[str]) -> str:
    """Invisible characters go; tabs and line breaks become spaces (a summary is one paragraph)."""
    return _LINE_BREAKS.sub(" ", _CONTROL.sub("", text))


def normalize_spaces(text: str, speakers: list[str]) -> str:
    return _SPACES.sub(" ", text).strip()


_PERIOD_WITHOUT_SPACE = re.compile(r"(?<=[가-힣])([.!?])(?=[가-힣A-Za-z])")


def space_after_period(text: str, speakers: list[str]) -> str:
    """"말했습니다.SD2000011은" -> "말했습니다. SD2000011은"; a decimal point ("1.5") is no sentence end."""
    return _PERIOD_WITHOUT_SPACE.sub(r"\1 ", text)


def add_final_period(text: str, speakers: list[str]) -> str:
    return text if not text or text.endswith((".", "!", "?")) else text + "."


def fix_ssd_typo(text: str, speakers: list[str]) -> str:
    return re.sub(r"(?<![A-Za-z])S+SD(?=\d)", "SD", text)


def collapse_doubled_words(text: str, speakers: list[str]) -> str:
    """"대화에서 대화에서" -> "대화에서"; Korean reduplication ("하나 하나") is meant and stays."""
    return _WORD_REPEAT.sub(collapse_word_repeat, text)


def drop_speaker_prefix(text: str, speakers: list[str]) -> str:
    """"화자 SD2000001" / "화자SD2000001" -> "SD2000001"."""
    return re.sub(r"화자\s?(?=SD\d)", "", text)


def unknown_ids(text: str, speakers: list[str]) -> list[str]:
    return sorted({m[0] for m in SPEAKER_ID.finditer(text) if m[0] not in speakers})


def fix_speaker_id_typo(text: str, speakers: list[str]) -> str:
    """An id that is no speaker of the conversation but one edit from exactly one speaker becomes that speaker;
    an id near none or both stays (unify_target reports it)."""
    def replace(match: re.Match) -> str:
        near = [s for s in speakers if edit_distance_is_one(match[0], s)]
        return near[0] if match[0] not in speakers and len(near) == 1 else match[0]

    return SPEAKER_ID.sub(replace, text)


def drop_repeated_sentences(text: str, speakers: list[str]) -> str:
    return " ".join(dict.fromkeys(split_sentences(text)))


UNIFIED_OPENING = "두 화자는 이 대화에서 "
_IN_THIS_TALK = r"(?:이 대화에서(?:는)? )"
_PAIR = r"SD\d+(?:과|와) SD\d+(?:은|는|이|가)"
_GROUP = r"(?:두 화자(?:는|가)|화자들(?:은|이)|두 사람(?:은|이)|두 (?:화자 )?" + _PAIR + "|" + _PAIR + ")"
_OPENING = re.compile(rf"^{_IN_THIS_TALK}?{_GROUP} {_IN_THIS_TALK}?")


def unify_opening(text: str, speakers: list[str]) -> str:
    """The overall sentence opens "두 화자는 이 대화에서 …" whichever of the variants (이 대화에서 화자들은, 두 사람은,
    SDa와 SDb는, …) it had; the rest of the sentence stays word for word. A summary without one is left alone."""
    return _OPENING.sub(UNIFIED_OPENING, text, count=1)


def order_speaker_parts(text: str, speakers: list[str]) -> str:
    """Each speaker's part, in the order the speakers first speak; a speaker's scattered parts join up."""
    overall, parts = split_parts(text, speakers)
    ordered = [s for speaker in speakers for part, sentences in parts if part == speaker for s in sentences]
    return " ".join(overall + ordered)


def topic_particle_on_parts(text: str, speakers: list[str]) -> str:
    """A speaker's part opens with the id and the topic particle: "SD2000010이 …" -> "SD2000010은 …" (only a bare 이/가;
    "SD2000010이라고" and the like stay)."""
    def retopic(sentence: str) -> str:
        match = _ID_WITH_SUFFIX.match(sentence)
        if sentence_speaker(sentence, speakers) is None or match[2] not in ("이", "가"):
            return sentence
        return match[1] + particle_for(match[1], "은") + sentence[match.end():]

    return " ".join(retopic(sentence) for sentence in split_sentences(text))


def agree_particles(text: str, speakers: list[str]) -> str:
    """Every particle on a speaker id (은/는, 이/가, 과/와, 을/를) follows the id's last digit."""
    def replace(match: re.Match) -> str:
        speaker, suffix = match[1], match[2]
        if suffix not in _PARTICLE_SUFFIXES:
            return match[0]
        return speaker + particle_for(speaker, suffix[0]) + suffix[1:]

    return _ID_WITH_SUFFIX.sub(replace, text)


# (name, rule, what it does): applied in this order, which matters: ids are repaired before the
# opening and the parts are found by them, and sentences are split only once their periods are spaced.
TargetRule = Callable[[str, list[str]], str]
TARGET_RULES: tuple[tuple[str, TargetRule, str], ...] = (
    ("control_characters", remove_control_characters, "control/invisible characters removed, line breaks -> space"),
    ("spaces", normalize_spaces, "runs of spaces collapsed, ends trimmed"),
    ("period_space", space_after_period, "a space after each sentence-ending period"),
    ("final_period", add_final_period, "a period at the end"),
    ("ssd_typo", fix_ssd_typo, "SSD… -> SD…"),
    ("doubled_word", collapse_doubled_words, "an accidentally doubled word collapsed (reduplication kept)"),
    ("speaker_prefix", drop_speaker_prefix, "화자 SD… / 화자SD… -> SD…"),
    ("speaker_id_typo", fix_speaker_id_typo, "an id one edit from exactly one speaker -> that speaker"),
    ("repeated_sentence", drop_repeated_sentences, "a repeated sentence dropped"),
    ("opening", unify_opening, "the overall sentence opens 두 화자는 이 대화에서"),
    ("speaker_order", order_speaker_parts, "speakers' parts in the order they first speak"),
    ("part_topic", topic_particle_on_parts, "a speaker's part opens with the id and 은/는, not 이/가"),
    ("particles", agree_particles, "particles on ids follow the id's last digit (은/는, 이/가, 과/와, 을/를)"),
)
RULE_HELP = {name: help_text for name, _, help_text in TARGET_RULES}
# What unify_target cannot repair and leaves for a person or `distill.py rewrite`.
PROBLEM_HELP = {
    "no_overall_sentence": "the summary starts with a speaker's part: no overall sentence was invented",
    "unrecognized_opening": "the first sentence is neither a known opening nor a speaker's part: left as written",
    "unknown_speaker_id": "an id that is no speaker of the conversation and not one edit from exactly one",
}


def target_problems(text: str, speakers: list[str]) -> list[str]:
    """What is still wrong with a unified target (keys of PROBLEM_HELP)."""
    problems = []
    first = (split_sentences(text) or [""])[0]
    if sentence_speaker(first, speakers) is not None:
        problems.append("no_overall_sentence")
    elif not first.startswith(UNIFIED_OPENING):
        problems.append("unrecognized_opening")
    if unknown_ids(text, speakers):
        problems.append("unknown_speaker_id")
    return problems


def unify_target(text: str, speakers: list[str]) -> tuple[str, list[str], list[str]]:
    """(unified text, names of the rules that changed it, problems left). Running it twice changes nothing more."""
    changed_by = []
    for name, rule, _ in TARGET_RULES:
        new_text = rule(text, speakers)
        if new_text != text:
            changed_by.append(name)
        text = new_text
    return text, changed_by, target_problems(text, speakers)


# ---------------------------------------------------------------------------------------------
# --target_format structured: sections a model keeps apart more easily, and back to prose
# ---------------------------------------------------------------------------------------------

TARGET_FORMATS = ("prose", "structured")
OVERALL_HEADING = "## 전반적인 요약"
_SPEAKER_HEADING = re.compile(r"^## (\S+) 요약$")
_BULLET = "- "
STRUCTURED_INSTRUCTION = (
    "다음 형식으로 답해주세요: 첫 줄에 '## 전반적인 요약'과 대화 전체를 요약한 문장, 그다음 화자마다 발화 순서대로 "
    "'## 화자ID 요약' 제목 아래 그 화자의 요약을 '- '로 시작하는 한 문장씩."
)


def to_structured(text: str, speakers: list[str]) -> str:
    """A prose target as `## 전반적인 요약` / `## SDa 요약` / `## SDb 요약` sections, each speaker's sentences as
    `- ` lines. flatten_structured gives the prose back exactly when its sentences are single-spaced."""
    overall, parts = split_parts(text, speakers)
    sections = [f"{OVERALL_HEADING}\n{' '.join(overall)}"] if overall else []
    sections += [f"## {speaker} 요약\n" + "\n".join(_BULLET + s for s in sentences) for speaker, sentences in parts]
    return "\n\n".join(sections)


def format_target(record: dict, target_format: str) -> str:
    """A competition record's summary as a training target in `target_format` (one of TARGET_FORMATS)."""
    if target_format == "structured":
        return to_structured(record["output"], speakers_in_order(record))
    return record["output"]


def parse_structured(text: str) -> list[str] | None:
    """The sentences of a well-formed structured text in order, or None when it is not one: an optional overall
    section of plain lines, then speaker sections of `- ` lines only, every section non-empty."""
    pieces, section, section_sizes = [], None, []
    for line in (line.strip() for line in text.strip().splitlines()):
        if not line:
            continue
        if line == OVERALL_HEADING and section is None:
            section = "overall"
        elif _SPEAKER_HEADING.match(line):
            section = "speaker"
        elif section == "overall" and not line.startswith(("#", _BULLET)):
            pieces.append(line)
        elif section == "speaker" and line.startswith(_BULLET) and line[len(_BULLET):].strip():
            pieces.append(line[len(_BULLET):].strip())
        else:
            return None
        if line.startswith("## "):
            section_sizes.append(0)
        else:
            section_sizes[-1] += 1
    return pieces if section_sizes and all(section_sizes) else None


def looks_structured(text: str) -> bool:
    """Whether a text has heading or bullet lines (a structured model's output, well-formed or not)."""
    return bool(re.search(r"^\s*(?:#|[-*•]\s)", text, re.MULTILINE))


_MARKUP_LINE = re.compile(r"^\s*(?:#+[^\n]*|[-*•]\s*|\d+[.)]\s+)", re.MULTILINE)


def flatten_structured(text: str) -> tuple[str, bool]:
    """(one prose paragraph, whether `text` was well-formed structured text). Malformed text is flattened all the
    same: heading lines dropped, bullet marks removed, so no "##" or "- " reaches a submission."""
    pieces = parse_structured(text)
    if pieces is not None:
        return " ".join(pieces), True
    prose = _MARKUP_LINE.sub(lambda m: "" if m[0].lstrip().startswith("#") else " ", text)
    prose = re.sub(r"#+", " ", prose)
    prose = re.sub(r"(?:^|(?<=\s))-\s", " ", prose)
    return normalize_spaces(prose, []), False


# ---------------------------------------------------------------------------------------------
# prep.py's --unify_targets stage and its --show_changes preview
# ---------------------------------------------------------------------------------------------

def name_ids(ids: list[str], shown: int = 3) -> str:
    """': a, b, c and 4 more' for a console line; '' when there are none."""
    if not ids:
        return ""
    from rich.markup import escape  # ids are user text: a "[...]" in one is not console markup

    more = f" and {len(ids) - shown} more (all in stats.json)" if len(ids) > shown else ""
    return ": " + escape(", ".join(ids[:shown])) + more


def unify_records(records: list[dict]) -> tuple[list[dict], dict, list[tuple[str, str, str]]]:
    """(records with unified `output`, the stats.json report: ids per rule and per problem left,
    [(id, before, after)] for every target that changed)."""
    by_rule: dict[str, list[str]] = {name: [] for name in RULE_HELP}
    by_problem: dict[str, list[str]] = {name: [] for name in PROBLEM_HELP}
    unified, changes = [], []
    for record in records:
        text, changed_by, problems = unify_target(record["output"], speakers_in_order(record))
        for name in changed_by:
            by_rule[name].append(record["id"])
        for name in problems:
            by_problem[name].append(record["id"])
        if text != record["output"]:
            changes.append((record["id"], record["output"], text))
        unified.append({**record, "output": text})
    report = {
        "targets": len(records),
        "changed": len(changes),
        "rules": {name: {"count": len(ids), "ids": ids} for name, ids in by_rule.items()},
        "left_as_is": {name: {"count": len(ids), "ids": ids} for name, ids in by_problem.items()},
        "rule_meaning": RULE_HELP,
        "left_as_is_meaning": PROBLEM_HELP,
    }
    return unified, report, changes


def target_change_lines(report: dict, changes: list[tuple[str, str, str]], show: int) -> list[str]:
    """What prep.py prints, as rich markup: `show` word diffs, then the count per rule and what was left as is."""
    from rich.markup import escape

    lines = []
    for record_id, before, after in changes[:show]:
        old, new = diff_markup(before, after)
        lines.append(f"[bold]{escape(record_id)}[/bold]\n- {old}\n+ {new}\n")
    rules = ", ".join(f"{name} {entry['count']}" for name, entry in report["rules"].items() if entry["count"])
    lines.append(f"{report['changed']} of {report['targets']} training targets changed ({rules or 'no rule applied'})")
    for name, entry in report["left_as_is"].items():
        if entry["count"]:
            lines.append(f"[yellow]left as is, {name}: {entry['count']}{name_ids(entry['ids'])} "
                         f"({PROBLEM_HELP[name]})[/yellow]")
    return lines


def diff_markup(before: str, after: str) -> tuple[str, str]:
    """The pair as rich markup, word by word: in `before` the dropped words red, in `after` the added words green.
    Two whole lines, so the pair reads right in a log file too, where there is no colour."""
    import difflib

    from rich.markup import escape

    old, new = before.split(" "), after.split(" ")
    old_marked, new_marked = [], []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=old, b=new, autojunk=False).get_opcodes():
        old_text, new_text = escape(" ".join(old[i1:i2])), escape(" ".join(new[j1:j2]))
        if op == "equal":
            old_marked.append(old_text)
            new_marked.append(new_text)
            continue
        if old_text:
            old_marked.append(f"[bold red]{old_text}[/bold red]")
        if new_text:
            new_marked.append(f"[bold green]{new_text}[/bold green]")
    return " ".join(old_marked), " ".join(new_marked)
