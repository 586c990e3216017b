"""Turn the competition JSON (plus augmentation sets) into chat-format training rows.

Terminal:
    python prep.py --check_env                       # before installing: Python >= 3.11, torch >= 2.4, or the fix
    python prep.py --tokenizer unsloth/gemma-2-9b-it-bnb-4bit   # data/일상대화요약_{train,dev}.json -> data/prepared/
    python prep.py --train data/sample/train.json --dev data/sample/dev.json --out /tmp/p
    python prep.py --extra data/sample/extra_alpaca.json nayohan/Magpie-Gemma2-Pro-200K-Filtered-ko \
        --tokenizer google/gemma-2-9b-it # augmentation, leak-checked against dev and data/일상대화요약_test.json
    python prep.py --train_on_dev --clean_inputs     # the final run: dev folded into train
    python prep.py --unify_targets --show_changes 5  # preview the target rules (then drop --show_changes to write)
    python prep.py --unify_targets --target_format structured   # one format, in ## sections (infer.py flattens)
    python prep.py --pseudo_labels data/distill/self.jsonl   # self-distillation: a model's summaries of test dialogues
    (augmentation generators: python distill.py distill|magpie ...; their JSONL goes in with --extra;
     python distill.py rewrite writes a competition JSON with teacher-rewritten summaries, for --train)

Colab:
    !python prep.py --tokenizer unsloth/gemma-2-9b-it-bnb-4bit

This file is also the single source of truth for the competition prompt: train.py reads the rows
written here and infer.py imports `build_messages`, so the two can never drift apart. It imports
nothing heavy at module level for that reason.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from common import (UserError, check_environment, parse_jsonl, parse_settings, read_json, read_utf8_text, run_cli,
                    shell_command)
from dedup import leaks_then_near_duplicates, near_copies, row_outcomes
from report import (PSEUDO_LABEL_STAGES, STAGE_HELP, STAGES, Row, dialogue_kinds, length_percentiles, plot_lengths,
                    rich_table, summary_tables, write_outputs)
from targets import (STRUCTURED_INSTRUCTION, TARGET_FORMATS, clean_records, drop_middle_utterances, fewest_middle_cuts,
                     format_target, name_ids, target_change_lines, unify_records)


@dataclass
class PrepSettings:
    train: list[str] = field(default_factory=lambda: ["data/일상대화요약_train.json"],
                             metadata={"help": "competition train file(s)"})
    dev: str = field(default="data/일상대화요약_dev.json", metadata={"help": (
        "competition dev file: dev.jsonl, and kept out of the augmentation rows")})
    test: str = field(default="data/일상대화요약_test.json", metadata={
        "help": ("competition test file: keeps its dialogues out of the --extra rows and holds records that "
                 "--pseudo_labels rows name ('none': dev only)")})
    extra: list[str] = field(default_factory=list, metadata={"help": (
        "augmentation sources: Hub dataset ids (owner/name[:split]) or .json/.jsonl/.parquet files")})
    pseudo_labels: list[str] = field(default_factory=list, metadata={"help": (
        "self-distillation: summaries of test (or other) dialogues, as distill.py distill's JSONL or competition JSON "
        "with 'output' filled; exempt from the leak check on their dialogue, dropped if (nearly) a dev reference")})
    out: str = field(default="data/prepared", metadata={"help": (
        "output directory (train.jsonl, dev.jsonl, stats.json, lengths.png)")})
    tokenizer: str | None = field(default=None, metadata={"help": (
        "tokenizer name or path for exact lengths (default: the model's, if in the local HF cache, else an estimate)")})
    max_seq_length: int = field(default=8192, metadata={"help": (
        "longest row in tokens: longer competition rows lose middle utterances, longer augmentation rows go")})
    dedup_threshold: float = field(default=0.7, metadata={"help": (
        "near-duplicates: an augmentation row goes when an earlier kept one shares this Jaccard similarity of "
        "character 3-grams (0.5-1)")})
    train_on_dev: bool = field(default=False, metadata={"help": "also train on dev (the final run)"})
    system_prompt: bool = field(default=False, metadata={"help": (
        "put the baseline's system text at the top of the user turn")})
    clean_inputs: bool = field(default=False, metadata={"help": (
        "remove fillers (어~, 음~), xx masks and stuttered word repeats (그 그) from utterances; "
        "reduplication (무슨 무슨) stays")})
    unify_targets: bool = field(default=False, metadata={"help": (
        "rewrite the training targets into one format by rules (opening, ids, particles, typos, speaker order); "
        "ids per rule in stats.json; dev.jsonl and the files scoring reads keep their references")})
    show_changes: int | None = field(default=None, metadata={"help": (
        "print N before/after pairs of what --unify_targets changes, then exit without writing anything")})
    target_format: str = field(default="prose", metadata={"help": (
        "prose: the summary as written; structured: ## 전반적인 요약 / ## SDa 요약 sections with - bullets, and the "
        "prompt asks for them (infer.py turns them back into prose)")})
    limit: int | None = field(default=None, metadata={"help": (
        "keep a random N rows of each training source (quick tries)")})
    seed: int = field(default=42, metadata={"help": "seed for --limit sampling"})
    check_env: bool = field(default=False, metadata={"help": (
        "only check Python (>= 3.11) and torch (>= 2.4, < 2.15) before installing requirements.txt, then exit")})


# The official baseline's system prompt (teddysum/Korean_DCS_2024). Gemma 2 rejects a system role,
# so when asked for it is merged into the user turn.
BASELINE_SYSTEM_PROMPT = (
    "You are a helpful AI assistant. Please answer the user's questions kindly. "
    "당신은 유능한 AI 어시스턴트 입니다. 사용자의 질문에 대해 친절하게 답변해주세요."
)


# ---------------------------------------------------------------------------------------------
# Competition records: validation and the prompt
# ---------------------------------------------------------------------------------------------

def _record_label(path: str | Path, index: int, record: Any) -> str:
    record_id = record.get("id") if isinstance(record, dict) else None
    return f"{path}: record {index}" + (f" (id {record_id!r})" if record_id is not None else "")


def validate_record(record: Any, index: int, path: str | Path) -> tuple[dict, int]:
    """Check one competition record and return (normalized copy, number of empty utterances dropped).

    Normalized: speakers are strings, `subject_keyword` is a list, empty utterances are gone.
    Accepts both shapes the task spec shows: `"speaker": 1` (int) and a plain-string keyword.
    """
    where = _record_label(path, index, record)
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected an object with id/input/output, got {type(record).__name__}")
    if not isinstance(record.get("id"), str) or not record["id"].strip():
        raise UserError(f"{where}: field 'id' must be a non-empty string")
    inp = record.get("input")
    if not isinstance(inp, dict):
        raise UserError(f"{where}: field 'input' must be an object with 'conversation' and 'subject_keyword'")
    conversation = inp.get("conversation")
    if not isinstance(conversation, list) or not conversation:
        raise UserError(f"{where}: field 'input.conversation' must be a non-empty list of {{speaker, utterance}}")
    turns = []
    for turn_index, turn in enumerate(conversation):
        field_name = f"input.conversation[{turn_index}]"
        if not isinstance(turn, dict):
            raise UserError(f"{where}: field '{field_name}' must be an object with 'speaker' and 'utterance'")
        speaker, utterance = turn.get("speaker"), turn.get("utterance")
        if isinstance(speaker, bool) or not isinstance(speaker, (str, int)) or str(speaker).strip() == "":
            raise UserError(f"{where}: field '{field_name}.speaker' must be a string or an integer")
        if not isinstance(utterance, str):
            raise UserError(f"{where}: field '{field_name}.utterance' must be a string")
        if utterance.strip():
            turns.append({**turn, "speaker": str(speaker), "utterance": utterance})
    if not turns:
        raise UserError(f"{where}: field 'input.conversation' has only empty utterances")
    keywords = inp.get("subject_keyword")
    if isinstance(keywords, str):
        keywords = [keywords]
    if not isinstance(keywords, list) or not keywords or not all(isinstance(k, str) and k.strip() for k in keywords):
        raise UserError(f"{where}: field 'input.subject_keyword' must be a non-empty list of strings (or one string)")
    if not isinstance(record.get("output", ""), str):
        raise UserError(f"{where}: field 'output' must be a string")
    normalized = {**record, "input": {**inp, "conversation": turns, "subject_keyword": keywords}}
    normalized.setdefault("output", "")
    return normalized, len(conversation) - len(turns)


def load_competition_file(path: str | Path) -> tuple[list[dict], int]:
    """Read and validate a competition JSON list; returns (records, empty utterances dropped)."""
    return validate_competition_data(read_json(path), path)


def validate_competition_data(data: Any, path: str | Path) -> tuple[list[dict], int]:
    """Validate an already parsed competition file (for callers that also need the raw list)."""
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    records, dropped, seen = [], 0, {}
    for index, raw in enumerate(data):
        record, n_dropped = validate_record(raw, index, path)
        if record["id"] in seen:
            raise UserError(f"{_record_label(path, index, record)}: field 'id' duplicates record {seen[record['id']]}")
        seen[record["id"]] = index
        records.append(record)
        dropped += n_dropped
    return records, dropped


def conversation_text(turns: list[dict]) -> str:
    return "\n".join(f"화자{turn['speaker']}: {turn['utterance']}" for turn in turns)


def build_user_text(record: dict, system_prompt: bool = False, target_format: str = "prose") -> str:
    """The official baseline's prompt, byte for byte (REFERENCE.md section 3); a structured run adds the layout."""
    inp = record["input"]
    keywords = inp["subject_keyword"]
    keywords = [keywords] if isinstance(keywords, str) else keywords
    text = (
        "[Conversation]\n"
        + conversation_text(inp["conversation"])
        + "\n\n[Question]\n"
        + f"위 {', '.join(keywords)} 주제에 대한 대화를 요약해주세요."
        + (f"\n{STRUCTURED_INSTRUCTION}" if target_format == "structured" else "")
    )
    return f"{BASELINE_SYSTEM_PROMPT}\n\n{text}" if system_prompt else text


def build_messages(record: dict, system_prompt: bool = False, target_format: str = "prose") -> list[dict]:
    """Chat messages for one competition record; used for training rows AND for inference prompts."""
    return [{"role": "user", "content": build_user_text(record, system_prompt, target_format)}]


# =============================================================================================
# prep.py proper: competition files + augmentation sources -> data/prepared/
# =============================================================================================

# Without a tokenizer, lengths are estimated at one token per character (spaces included) plus
# the chat template's tokens per message. Gemma 2's 256K vocabulary spends fewer tokens than
# characters on Korean text, so the estimate errs long: a row it lets through fits for real.
# Pass --tokenizer (or keep the model in the local Hugging Face cache) for exact counts.
CHARS_PER_TOKEN = 1.0
TEMPLATE_TOKENS_PER_MESSAGE = 6  # <start_of_turn>role\n ... <end_of_turn>\n, rounded up
LOCAL_TOKENIZER_CANDIDATES = ("unsloth/gemma-2-9b-it-bnb-4bit", "google/gemma-2-9b-it")
MISSING_DATA_HINT = (
    "get the NIKL 2024 일상대화요약 files from 국립국어원 인공지능 말평 (https://kli.korean.go.kr/) "
    "and put them in data/ under their official names, or try the bundled sample: "
    "python prep.py --train data/sample/train.json --dev data/sample/dev.json --out /tmp/p"
)
NO_TEST = "none"  # --test none: the user's explicit choice to check augmentation against dev only
EXTRA_SHAPES = (
    "competition records (input.conversation + output)",
    "messages [{role, content}]",
    "conversations [{from, value}] (ShareGPT)",
    "conversation [{role, content}] (LLaMA-Factory)",
    "instruction/input/output (alpaca)",
    "instruction/response",
    "prompt/response or prompt/completion",
    "question/answer",
    "questions/references (LogicKor)",
)


# ---------------------------------------------------------------------------------------------
# Augmentation sources: Hub ids and local files of several row shapes -> chat messages
# ---------------------------------------------------------------------------------------------

_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+(?::[\w.\[\]%:-]+)?")
ROLE_ALIASES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "model": "assistant",
         "chatgpt": "assistant", "bard": "assistant", "system": "system"}


def read_local_rows(path: Path) -> list[dict]:
    """Rows of a local .json (list), .jsonl or .parquet file."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet

        try:
            return pyarrow.parquet.read_table(path).to_pylist()
        except Exception as err:  # pyarrow raises several types for a damaged file
            raise UserError(f"{path}: not a readable Parquet file ({str(err).splitlines()[0]})") from None
    if suffix == ".jsonl":
        return [row for _, row in parse_jsonl(read_utf8_text(path), path)]
    if suffix == ".json":
        data = read_json(path)
        if not isinstance(data, list):
            raise UserError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
        return data
    raise UserError(f"{path}: unsupported file type {suffix or '(none)'}; use .json, .jsonl or .parquet")


def load_hub_rows(source: str) -> list[dict]:
    """`owner/name` or `owner/name:split` (default split: train) through `datasets`."""
    name, _, split = source.partition(":")
    import datasets

    try:
        return list(datasets.load_dataset(name, split=split or "train"))
    except Exception as err:  # offline, unknown id, bad split: datasets raises many types
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"{source}: could not load from the Hugging Face Hub "
                        f"({type(err).__name__}: {reason})") from None


def load_extra_rows(source: str) -> list[dict]:
    path = Path(source)
    if path.is_file():
        rows = read_local_rows(path)
    elif (path.suffix.lower() in (".json", ".jsonl", ".parquet") or source.startswith((".", "/"))
          or not _HUB_ID.fullmatch(source)):
        raise UserError(f"{source}: file not found (and not a Hub dataset id like owner/name or owner/name:split)")
    else:
        rows = load_hub_rows(source)
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise UserError(f"{source}: row {index} is a {type(row).__name__}, expected an object")
    return rows


def detect_shape(row: dict) -> str | None:
    keys = set(row)
    if isinstance(row.get("input"), dict) and "conversation" in row["input"] and "output" in row:
        return "competition"
    for key in ("messages", "conversations", "conversation"):
        if isinstance(row.get(key), list):
            return key
    if {"instruction", "output"} <= keys:
        return "alpaca"
    for pair in (("instruction", "response"), ("prompt", "response"), ("prompt", "completion"), ("question", "answer"),
                 ("questions", "references")):
        if set(pair) <= keys:
            return "/".join(pair)
    return None


def as_text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""


def row_messages(row: dict, shape: str, system_prompt: bool) -> list[dict] | None:
    """A row as alternating user/assistant messages ending with the assistant, or None if unusable.

    A system message is merged into the first user turn (Gemma 2 has no system role); a trailing
    user turn without an answer is dropped, so multi-turn rows stay multi-turn.
    """
    if shape == "competition":
        try:
            row, _ = validate_record(row, 0, "")
        except UserError:
            return None
        messages = build_messages(row, system_prompt) + [{"role": "assistant", "content": as_text(row["output"])}]
    elif shape in ("messages", "conversations", "conversation"):
        messages = []
        for turn in row[shape]:
            if not isinstance(turn, dict):
                return None
            role = ROLE_ALIASES.get(str(turn.get("role", turn.get("from", ""))).lower())
            if role is None:
                return None
            messages.append({"role": role, "content": as_text(turn.get("content", turn.get("value")))})
    elif shape == "questions/references":
        questions, answers = row["questions"], row["references"]
        if not isinstance(questions, list) or not isinstance(answers, list):
            return None
        messages = []
        for question, answer in zip(questions, answers):
            if not as_text(question) or not as_text(answer):
                break
            messages += [{"role": "user", "content": as_text(question)},
                         {"role": "assistant", "content": as_text(answer)}]
    else:
        prompt_key, answer_key = ("instruction", "output") if shape == "alpaca" else shape.split("/")
        user = as_text(row[prompt_key])
        if shape == "alpaca" and as_text(row.get("input")):
            user = f"{user}\n\n{as_text(row['input'])}"
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": as_text(row[answer_key])}]
    if messages and messages[0]["role"] == "system":
        system = messages.pop(0)["content"]
        if not messages or messages[0]["role"] != "user":
            return None
        messages[0] = {"role": "user", "content": f"{system}\n\n{messages[0]['content']}".strip()}
    if messages and messages[-1]["role"] == "user":
        messages.pop()
    if not messages or any(not m["content"] for m in messages):
        return None
    if any(m["role"] != ("user", "assistant")[k % 2] for k, m in enumerate(messages)):
        return None
    return messages


def extra_rows(source: str, indexed_rows: list[tuple[int, dict]], system_prompt: bool, counts: dict) -> list[Row]:
    """Rows of one augmentation source (with their index in it); unusable rows are counted, not fatal."""
    out = []
    for index, row in indexed_rows:
        shape = detect_shape(row)
        if shape is None:
            columns = ", ".join(sorted(map(str, row))) or "(none)"
            raise UserError(f"{source}: row {index} has an unknown shape; found columns: {columns}; "
                            f"expected one of: {'; '.join(EXTRA_SHAPES)}")
        messages = row_messages(row, shape, system_prompt)
        if messages is None:
            counts["unusable"] += 1
            continue
        out.append(Row(f"{source}:{index}", source, messages[:-1], messages[-1:]))
    return out


# ---------------------------------------------------------------------------------------------
# Lengths: exact with a tokenizer, estimated without one
# ---------------------------------------------------------------------------------------------

def tokenizer_is_cached(repo_id: str) -> bool:
    """Whether the local HF cache holds what AutoTokenizer reads: tokenizer files and config.json (for the
    model type); the weights are never needed."""
    from huggingface_hub import try_to_load_from_cache

    return all(isinstance(try_to_load_from_cache(repo_id, name), str)
               for name in ("tokenizer_config.json", "config.json"))


def load_tokenizer(name: str | None) -> tuple[Any, str]:
    """(tokenizer or None, how lengths are counted). Tries the model's tokenizer in the local HF cache."""
    if name is None:
        name = next(filter(tokenizer_is_cached, LOCAL_TOKENIZER_CANDIDATES), None)
        if name is None:
            return None, (f"estimate: {CHARS_PER_TOKEN:g} token per character + {TEMPLATE_TOKENS_PER_MESSAGE} "
                          "per message (no --tokenizer)")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except Exception as err:  # missing dir, no hub access, broken files
        reason = (str(err).strip().splitlines() or [""])[0]
        raise UserError(f"--tokenizer {name}: could not load a tokenizer ({type(err).__name__}: {reason})") from None
    if not tokenizer.chat_template:
        raise UserError(f"--tokenizer {name}: has no chat template; point it at the chat model's tokenizer")
    return tokenizer, f"tokenizer {name} with its chat template"


def count_tokens(tokenizer: Any, conversations: list[list[dict]]) -> list[int]:
    """Length of each conversation as the trainer sees it: the whole chat template rendered."""
    if tokenizer is None:
        return [
            math.ceil(sum(len(m["content"]) for m in conv) / CHARS_PER_TOKEN)
            + TEMPLATE_TOKENS_PER_MESSAGE * len(conv) + 1
            for conv in conversations
        ]
    texts = [tokenizer.apply_chat_template(conv, tokenize=False) for conv in conversations]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def competition_row(record: dict, source: str, system_prompt: bool, target_format: str = "prose") -> Row:
    completion = [{"role": "assistant", "content": format_target(record, target_format)}]
    return Row(record["id"], source, build_messages(record, system_prompt, target_format), completion)


def fit_competition_record(record: dict, source: str, cfg: "PrepSettings", tokenizer: Any) -> tuple[Row | None, int]:
    """(row that fits --max_seq_length or None, utterances cut). Cuts only middle utterances."""
    def measure(rec: dict) -> Row:
        row = competition_row(rec, source, cfg.system_prompt, cfg.target_format)
        row.tokens = count_tokens(tokenizer, [row.prompt + row.completion])[0]
        return row

    row = measure(record)
    if row.tokens <= cfg.max_seq_length:
        return row, 0
    n_cut = fewest_middle_cuts(record, lambda shorter: measure(shorter).tokens <= cfg.max_seq_length)
    return (measure(drop_middle_utterances(record, n_cut)), n_cut) if n_cut else (None, 0)


def sample_rows(items: list, limit: int | None, seed: int) -> list:
    """A seeded random `limit` of the items, in their original order."""
    if limit is None or len(items) <= limit:
        return items
    picked = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in picked]


def require_summaries(path: str | Path, records: list[dict], role: str, raw: list[dict]) -> None:
    """Train and dev records are learned from or scored against: each needs a non-empty `output` (`raw`: the
    records as read, where a missing `output` is still missing)."""
    if not records:
        raise UserError(f"{path}: no records; --{role} needs the competition {role} file (a non-empty list)")
    if not any(r["output"].strip() for r in records):
        state = "empty" if any("output" in r for r in raw) else "missing"
        raise UserError(f"{path}: every record's 'output' is {state}; "
                        f"this looks like a test file, and --{role} needs records with summaries")
    for index, (record, as_read) in enumerate(zip(records, raw)):
        if not record["output"].strip():
            raise UserError(f"{_record_label(path, index, record)}: field 'output' is "
                            f"{'empty' if 'output' in as_read else 'missing'}; every {role} record needs its summary")


def load_competition(paths: list[str], role: str, seen_ids: dict[str, str]) -> tuple[list[tuple[str, dict]], int]:
    """(source, record) pairs from competition files; ids must be unique across all of them.
    Train and dev records must carry summaries; test records need not."""
    out, dropped = [], 0
    for path in paths:
        if not Path(path).is_file():
            raise UserError(f"{path}: {role} file not found; {MISSING_DATA_HINT}")
        raw = read_json(path)
        records, n_dropped = validate_competition_data(raw, path)
        if role != "test":
            require_summaries(path, records, role, raw)
        dropped += n_dropped
        for index, record in enumerate(records):
            if record["id"] in seen_ids:
                raise UserError(f"{path}: record {index} (id {record['id']!r}): field 'id' already used in "
                                f"{seen_ids[record['id']]}")
            seen_ids[record["id"]] = path
            out.append((path, record))
    return out, dropped


def read_pseudo_labels(path: str, known: dict[str, list[tuple[str, dict]]]) -> list[tuple[int, dict]]:
    """(row number, record with the pseudo-label as `output`) for each row of a --pseudo_labels file (.json, .jsonl)."""
    if not Path(path).is_file():
        raise UserError(f"--pseudo_labels {path}: file not found")
    rows = read_local_rows(Path(path))
    if not rows:
        raise UserError(f"{path}: no rows; --pseudo_labels takes distill.py distill's JSONL or competition JSON")
    return [(index, pseudo_label_record(path, index, row, known)) for index, row in enumerate(rows)]


def pseudo_label_record(path: str, index: int, row: Any, known: dict[str, list[tuple[str, dict]]]) -> dict:
    """A competition record with `output` filled (infer.py's predictions) as it is; a distill.py distill row as the
    --train/--dev/--test record (`known`) of its `id` whose dialogue its prompt holds, with the summary as `output`.
    Either is then rendered like every competition record (one prompt for all)."""
    where = _record_label(path, index, row)
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected an object, got {type(row).__name__}")
    if isinstance(row.get("input"), dict):
        record, _ = validate_record(row, index, path)
        if not record["output"].strip():
            raise UserError(f"{where}: field 'output' is {'empty' if 'output' in row else 'missing'}; "
                            "every pseudo-label needs its summary")
        return record
    flat = "completion" in row or "prompt" in row  # distill.py distill --format prompt_completion
    summary_field, prompt_field = ("completion", "prompt") if flat else ("output", "instruction")
    if not as_text(row.get(summary_field)):
        raise UserError(f"{where}: field '{summary_field}': expected the summary, a non-empty string")
    if not isinstance(row.get(prompt_field), str):
        raise UserError(f"{where}: field '{prompt_field}': expected the prompt the summary answers, a string")
    if not isinstance(row.get("id"), str) or row["id"] not in known:
        raise UserError(f"{where}: field 'id': no record of --train, --dev or --test has it; summaries of other "
                        "dialogues go in as competition records with 'output' filled")
    for _, record in known[row["id"]]:
        if conversation_text(record["input"]["conversation"]) in row[prompt_field]:
            return {**record, "output": as_text(row[summary_field])}
    raise UserError(f"{where}: field '{prompt_field}': does not hold the dialogue of record {row['id']!r} in "
                    f"{known[row['id']][0][0]}; was it written for another version of that file?")


def pseudo_label_pairs(cfg: PrepSettings, competition: list[tuple[str, dict]], dev_pairs: list[tuple[str, dict]],
                       new_counts: Callable[[str], dict], console: Any) -> tuple[list[tuple[str, dict]], list[dict]]:
    """--pseudo_labels as (file, record) pairs, less those whose summary is a dev reference or nearly (each
    listed); counts loaded, sampled and dev_reference per file (`new_counts(file)` makes its counts)."""
    counts, dev_records = {path: new_counts(path) for path in cfg.pseudo_labels}, [r for _, r in dev_pairs]
    known: dict[str, list[tuple[str, dict]]] = {}
    for source, record in competition:
        known.setdefault(record["id"], []).append((source, record))
    found = []
    for path in cfg.pseudo_labels:
        rows = read_pseudo_labels(path, known)
        sampled = sample_rows(rows, cfg.limit, cfg.seed)
        counts[path]["loaded"], counts[path]["sampled"] = len(rows), len(sampled)
        found += [(path, number, record) for number, record in sampled]
    dev_at = {record["id"]: k for k, record in enumerate(dev_records)}  # a row for a dev record meets its reference
    same = [(k, dev_at[record["id"]]) for k, (_, _, record) in enumerate(found) if record["id"] in dev_at]
    matched, similarity = near_copies([r["output"] for _, _, r in found], [r["output"] for r in dev_records],
                                      cfg.dedup_threshold, same)
    copies = [{"source": path, "row": number, "id": record["id"], "matched": dev_records[m]["id"],
               "similarity": round(float(value), 3)}
              for (path, number, record), m, value in zip(found, matched, similarity) if m >= 0]
    for copy in copies:
        counts[copy["source"]]["dev_reference"] += 1
    named = [f"{copy['source']} row {copy['row']} ({copy['id']}) = {copy['matched']}" for copy in copies]
    console.print(f"{len(found)} pseudo-labels; removed {len(copies)} whose summary is a dev reference or nearly"
                  f"{name_ids(named)}", soft_wrap=True)
    return [(path, record) for (path, _, record), m in zip(found, matched) if m < 0], copies


def check_settings(cfg: PrepSettings) -> None:
    if cfg.max_seq_length < 64:
        raise UserError(f"--max_seq_length {cfg.max_seq_length}: must be at least 64 tokens")
    if not 0.5 <= cfg.dedup_threshold <= 1:
        raise UserError(f"--dedup_threshold {cfg.dedup_threshold}: must be between 0.5 and 1 "
                        "(MinHash LSH finds few pairs below 0.6)")
    if cfg.target_format not in TARGET_FORMATS:
        raise UserError(f"--target_format {cfg.target_format}: unknown; choose {' or '.join(TARGET_FORMATS)}")
    if cfg.show_changes is not None and cfg.show_changes < 1:
        raise UserError(f"--show_changes {cfg.show_changes}: must be at least 1 (how many before/after pairs to print)")
    if cfg.limit is not None and cfg.limit < 1:
        raise UserError(f"--limit {cfg.limit}: must be at least 1")
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise UserError(f"--out {cfg.out}: exists and is not a directory")
    if len(set(cfg.extra)) != len(cfg.extra):
        raise UserError("--extra: the same source is listed twice")
    inputs = [*cfg.train, cfg.dev, *cfg.extra]
    for path in cfg.pseudo_labels:
        if path in inputs or cfg.pseudo_labels.count(path) > 1:
            raise UserError(f"--pseudo_labels {path}: given twice (or also as --train, --dev or --extra); pass it once")
    if needs_test_file(cfg) and not Path(cfg.test).is_file():
        why = "the --extra rows must be checked against the test dialogues" if cfg.extra else \
            "--pseudo_labels rows name its records"
        raise UserError(f"--test {cfg.test}: file not found; {why}: pass --test PATH to the competition test file "
                        f"(--test {NO_TEST}: dev only)")


def needs_test_file(cfg: PrepSettings) -> bool:
    """The test file matters only for the leak check and pseudo-label ids; a path the user typed is read even without
    them."""
    return cfg.test != NO_TEST and (bool(cfg.extra or cfg.pseudo_labels) or cfg.test != PrepSettings.test)


# ---------------------------------------------------------------------------------------------
# The run, stage by stage: each stage reads and extends one PrepRun
# ---------------------------------------------------------------------------------------------

@dataclass
class PrepRun:
    """What one run of prep.py has found so far; main hands it from stage to stage."""

    cfg: PrepSettings
    console: Any
    started: float
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # source -> stage -> rows
    train: list[tuple[str, dict]] = field(default_factory=list)  # the competition files as read: (source, record)
    dev: list[tuple[str, dict]] = field(default_factory=list)
    test: list[tuple[str, dict]] = field(default_factory=list)
    empty_dropped: int = 0  # empty utterances dropped while reading them
    train_pairs: list[tuple[str, dict]] = field(default_factory=list)  # competition records bound for train.jsonl
    dev_pairs: list[tuple[str, dict]] = field(default_factory=list)  # and for dev.jsonl
    copies: list[dict] = field(default_factory=list)  # pseudo-labels dropped for holding a dev reference
    unified: dict | None = None  # what --unify_targets changed, for stats.json
    cleaning: dict | None = None  # what --clean_inputs removed, for stats.json
    extras: list[Row] = field(default_factory=list)  # augmentation rows
    leaks: list[dict] = field(default_factory=list)  # every augmentation row dropped as a leak, with its dialogue
    length_method: str = ""  # exact (which tokenizer) or estimated
    train_rows: list[Row] = field(default_factory=list)  # the rows written, once they fit --max_seq_length
    dev_rows: list[Row] = field(default_factory=list)
    cut_utterances: int = 0
    cut_ids: list[str] = field(default_factory=list)  # train and dev rows that lost middle utterances
    too_long_ids: list[str] = field(default_factory=list)  # competition train rows dropped whole
    pseudo_kept: dict[str, int] = field(default_factory=dict)  # pseudo-labels kept, by the file of their dialogue

    @property
    def stages(self) -> tuple[str, ...]:
        """The stage table's columns: pseudo-labels get one of their own."""
        return PSEUDO_LABEL_STAGES if self.cfg.pseudo_labels else STAGES

    def new_counts(self, source: str) -> dict[str, int]:
        """A zero for every stage of `source`'s rows, to fill as they pass."""
        self.counts[source] = dict.fromkeys(self.stages, 0)
        return self.counts[source]


def print_environment_ok() -> None:
    """--check_env: Python and torch suit the kit (plain print: rich is not installed yet)."""
    torch_version = check_environment()
    print(f"ok: Python {sys.version.split()[0]} and torch {torch_version} suit this kit; install requirements.txt next")


def show_settings(run: PrepRun) -> None:
    """The resolved settings as a table."""
    run.console.rule("[bold]prep.py")
    run.console.print(rich_table("settings", ["setting", "value"], [[f.name, str(getattr(run.cfg, f.name))]
                                                                     for f in dataclasses.fields(run.cfg)]))


def load_competition_sets(run: PrepRun) -> None:
    """Read train, dev and (when it matters) test; sample --limit train records; fold dev in with --train_on_dev."""
    cfg, console = run.cfg, run.console
    console.rule("competition data")
    seen_ids: dict[str, str] = {}
    run.train, train_dropped = load_competition(cfg.train, "train", seen_ids)
    run.dev, dev_dropped = load_competition([cfg.dev], "dev", seen_ids)
    run.test, test_dropped = load_competition([cfg.test], "test", {}) if needs_test_file(cfg) else ([], 0)
    run.empty_dropped = train_dropped + dev_dropped + test_dropped
    train_pairs = list(run.train)
    for source in cfg.train:
        run.new_counts(source)["loaded"] = sum(s == source for s, _ in train_pairs)
    if cfg.limit:
        train_pairs = [pair for source in cfg.train
                       for pair in sample_rows([p for p in train_pairs if p[0] == source], cfg.limit, cfg.seed)]
    dev_pairs = run.dev
    console.print(
        f"train {len(train_pairs)} · dev {len(dev_pairs)} · test {len(run.test)} records"
        f"{' (dev folded into train)' if cfg.train_on_dev else ''} · {run.empty_dropped} empty utterances dropped"
    )
    if cfg.train_on_dev:
        run.new_counts(cfg.dev)["loaded"] = len(dev_pairs)
        # dev.jsonl stays empty: a loss on rows the model trained on is no held-out eval loss.
        train_pairs, dev_pairs = train_pairs + dev_pairs, []
    for source, _ in train_pairs:
        run.counts[source]["sampled"] += 1
    run.train_pairs, run.dev_pairs = train_pairs, dev_pairs


def add_pseudo_labels(run: PrepRun) -> None:
    """--pseudo_labels join the training records, less those that copy a dev reference."""
    run.console.rule("pseudo-labels (--pseudo_labels)")
    pseudo_pairs, run.copies = pseudo_label_pairs(run.cfg, run.train + run.dev + run.test, run.dev, run.new_counts,
                                                  run.console)
    run.train_pairs += pseudo_pairs  # from here on like competition rows: targets, cleaning, length policy


def unify_training_targets(run: PrepRun) -> None:
    """--unify_targets: the training summaries rewritten by rules; --show_changes prints before/after pairs."""
    run.console.rule("targets (--unify_targets)")
    records, run.unified, changes = unify_records([record for _, record in run.train_pairs])
    run.train_pairs = [(source, record) for (source, _), record in zip(run.train_pairs, records)]
    for line in target_change_lines(run.unified, changes, run.cfg.show_changes or 0):
        run.console.print(line, soft_wrap=True)


def clean_dialogues(run: PrepRun) -> None:
    """--clean_inputs: fillers, masks and stutters leave the train and dev dialogues."""
    records, cleaning = clean_records([record for _, record in run.train_pairs + run.dev_pairs])
    pairs = [(source, record) for (source, _), record in zip(run.train_pairs + run.dev_pairs, records)]
    run.train_pairs, run.dev_pairs = pairs[:len(run.train_pairs)], pairs[len(run.train_pairs):]
    run.cleaning = cleaning
    share = cleaning["chars_saved"] / max(cleaning["chars_before"], 1)
    run.console.print(f"--clean_inputs: {cleaning['chars_saved']} characters saved ({share:.1%}), "
                      f"{cleaning['utterances_dropped']} utterances left empty")


def load_augmentation(run: PrepRun) -> None:
    """The usable rows of every --extra source (a --limit sample of each)."""
    cfg = run.cfg
    run.console.rule("augmentation sources")
    for source in cfg.extra:
        source_counts = run.new_counts(source)
        with run.console.status(f"loading {source}"):
            rows = load_extra_rows(source)
        source_counts["loaded"] = len(rows)
        indexed = sample_rows(list(enumerate(rows)), cfg.limit, cfg.seed)
        source_counts["sampled"] = len(indexed)
        found = extra_rows(source, indexed, cfg.system_prompt, source_counts)
        run.extras += found
        shapes = ", ".join(sorted({detect_shape(r) for _, r in indexed}))
        run.console.print(f"{source}: {len(rows)} rows, {len(found)} usable, shapes: {shapes}")


def progress_bar(console: Any) -> Any:
    """A transient rich progress bar for prep's own loops."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    return Progress(*columns, console=console, transient=True)


def remove_leaks_and_duplicates(run: PrepRun) -> None:
    """Augmentation rows that carry a dev/test dialogue go (pseudo-labels hold one on purpose and are exempt), then
    near-duplicates of earlier kept rows, pseudo-labels included."""
    cfg, console = run.cfg, run.console
    pseudo_at = [k for k, (source, _) in enumerate(run.train_pairs) if source in cfg.pseudo_labels]
    pseudo_rows = [competition_row(run.train_pairs[k][1], run.train_pairs[k][0], cfg.system_prompt, cfg.target_format)
                   for k in pseudo_at]
    if not run.extras and not pseudo_rows:
        return
    console.rule("leakage and near-duplicates (MinHash)")
    if cfg.test == NO_TEST and run.extras:
        console.print("[bold red]--test none: NO TEST DIALOGUES CHECKED; augmentation rows that carry a test "
                      "dialogue stay in training[/bold red]")
    texts = ["\n".join(m["content"] for m in row.prompt + row.completion) for row in run.extras + pseudo_rows]
    exempt = [k >= len(run.extras) for k in range(len(texts))]  # pseudo-labels hold a dev/test dialogue on purpose
    held_out = run.dev + run.test
    dialogues = [[t["utterance"] for t in r["input"]["conversation"]] for _, r in held_out]  # as given, not cleaned
    with progress_bar(console) as progress:
        on_progress = [functools.partial(progress.advance, progress.add_task(task, total=total))
                       for task, total in (("leak check", len(run.extras)), ("near-duplicates", len(texts)))]
        matched, shares, keep = leaks_then_near_duplicates(texts, dialogues, cfg.dedup_threshold, *on_progress,
                                                           exempt)
    labels = [(row.source, int(row.id.rsplit(":", 1)[1])) for row in run.extras]
    labels += [(row.source, -1) for row in pseudo_rows]  # never listed: an exempt row is no leak
    run.leaks, outcomes = row_outcomes(labels, [r["id"] for _, r in held_out], matched, shares, keep)
    for row, outcome in zip(run.extras + pseudo_rows, outcomes):
        run.counts[row.source][outcome] += outcome != "kept"
    duplicates = {k for k, outcome in zip(pseudo_at, outcomes[len(run.extras):]) if outcome != "kept"}
    run.train_pairs = [pair for k, pair in enumerate(run.train_pairs) if k not in duplicates]
    run.extras = [row for row, outcome in zip(run.extras, outcomes) if outcome == "kept"]
    named = [f"{leak['source']} row {leak['row']} = {leak['matched']} ({leak['share']:.0%})" for leak in run.leaks]
    console.print(f"removed {len(run.leaks)} rows carrying a dev/test dialogue{name_ids(named)}; "
                  f"{outcomes.count('duplicate')} near-duplicates (3-gram Jaccard >= {cfg.dedup_threshold})",
                  soft_wrap=True)


def fit_competition_rows(run: PrepRun, tokenizer: Any) -> None:
    """Train and dev records as rows within --max_seq_length: middle utterances cut, or (train only) the row dropped
    when the question and summary alone are too long."""
    for pairs, target in ((run.train_pairs, run.train_rows), (run.dev_pairs, run.dev_rows)):
        for source, record in pairs:
            row, n_cut = fit_competition_record(record, source, run.cfg, tokenizer)
            stage_counts = run.counts.get(source) if target is run.train_rows else None
            if row is None:
                if stage_counts is None:
                    raise UserError(f"{source}: record {record['id']!r}: question + summary alone exceed "
                                    f"--max_seq_length {run.cfg.max_seq_length}")
                stage_counts["too_long"] += 1
                run.too_long_ids.append(record["id"])
                continue
            run.cut_utterances += n_cut
            if n_cut:
                run.cut_ids.append(record["id"])
            if stage_counts is not None:
                stage_counts["cut"] += n_cut > 0
            target.append(row)


def fit_augmentation_rows(run: PrepRun, tokenizer: Any) -> None:
    """Augmentation rows are counted (batches of 1000) and dropped whole when over --max_seq_length."""
    with progress_bar(run.console) as progress:
        task = progress.add_task("token counts", total=len(run.extras))
        for start in range(0, len(run.extras), 1000):
            batch = run.extras[start:start + 1000]
            for row, n in zip(batch, count_tokens(tokenizer, [r.prompt + r.completion for r in batch])):
                row.tokens = n
            progress.advance(task, len(batch))
    for row in run.extras:
        if row.tokens > run.cfg.max_seq_length:
            run.counts[row.source]["too_long"] += 1
    run.extras = [row for row in run.extras if row.tokens <= run.cfg.max_seq_length]


def fit_to_length(run: PrepRun) -> None:
    """Every row within --max_seq_length, counted exactly with a tokenizer or estimated without one."""
    cfg, console = run.cfg, run.console
    console.rule("length policy")
    tokenizer, run.length_method = load_tokenizer(cfg.tokenizer)
    console.print(f"lengths: {run.length_method}; limit {cfg.max_seq_length} tokens per row")
    if tokenizer is None:
        console.print("[yellow]the estimate errs long, so rows that fit may be cut: "
                      f"--tokenizer {LOCAL_TOKENIZER_CANDIDATES[0]} counts exactly "
                      "(it downloads the tokenizer only)[/yellow]")
    fit_competition_rows(run, tokenizer)
    fit_augmentation_rows(run, tokenizer)
    run.train_rows += run.extras
    for row in run.train_rows:
        run.counts[row.source]["kept"] += 1
    console.print(f"competition rows cut: {len(run.cut_ids)} ({run.cut_utterances} utterances dropped from the "
                  f"middle){name_ids(run.cut_ids)}", soft_wrap=True)
    if run.too_long_ids:
        console.print("[yellow]competition train rows dropped, question + summary alone too long: "
                      f"{len(run.too_long_ids)}{name_ids(run.too_long_ids)}[/yellow]", soft_wrap=True)
    if not run.train_rows:
        raise UserError(f"no training rows left after the length policy (--max_seq_length {cfg.max_seq_length}); "
                        "nothing was written")
    run.pseudo_kept = dialogue_kinds([row.id for row in run.train_rows if row.source in cfg.pseudo_labels],
                                     {"test": run.test, "dev": run.dev, "train": run.train})
    if run.pseudo_kept.get("dev") and not cfg.train_on_dev:
        console.print(f"[yellow]{run.pseudo_kept['dev']} pseudo-labels summarize dev dialogues: the eval loss on "
                      "dev.jsonl is no longer held out[/yellow]")


def build_stats(run: PrepRun, lengths: dict[str, dict[str, int]]) -> dict:
    """stats.json: how the prompt was built, the settings, and what each stage did."""
    cfg = run.cfg
    return {
        # How the prompt was built: train.py carries these to the adapter so inference matches.
        "system_prompt": cfg.system_prompt,
        "clean_inputs": cfg.clean_inputs,
        "target_format": cfg.target_format,
        # all but where the files go and --check_env: same inputs, same bytes
        "settings": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("out", "check_env")},
        "length_counting": run.length_method,
        "rows": {"train": len(run.train_rows), "dev": len(run.dev_rows)},
        "sources": run.counts,
        "stage_meaning": {stage: STAGE_HELP[stage] for stage in run.stages},
        "empty_utterances_dropped": run.empty_dropped,
        "leaks": run.leaks,
        "leak_check_dialogues": {"dev": len(run.dev), "test": len(run.test)} if cfg.extra else None,
        **({"pseudo_labels": {"kept_by_dialogue": run.pseudo_kept, "dev_references": run.copies}}
           if cfg.pseudo_labels else {}),
        "clean_inputs_effect": run.cleaning,
        "unify_targets_effect": run.unified,  # ids per rule and per problem left, train targets only
        "utterances_cut_from_middle": run.cut_utterances,
        "cut_ids": run.cut_ids,  # train and dev rows that lost middle utterances
        "too_long_ids": run.too_long_ids,  # competition train rows dropped: question + summary alone exceed the limit
        "lengths": lengths,
    }


def write_prepared(run: PrepRun, stats: dict) -> None:
    """train.jsonl, dev.jsonl, stats.json and lengths.png, all or nothing."""
    competition_sources = set(run.cfg.train) | {run.cfg.dev}
    write_outputs(Path(run.cfg.out), {
        "train.jsonl": "".join(row.to_json() + "\n" for row in run.train_rows),
        "dev.jsonl": "".join(row.to_json() + "\n" for row in run.dev_rows),
        "stats.json": json.dumps(stats, ensure_ascii=False, indent=2) + "\n",
        "lengths.png": lambda path: plot_lengths(path, {
            "competition": [r for r in run.train_rows if r.source in competition_sources],
            "augmentation": [r for r in run.train_rows if r.source not in competition_sources],
        }),
    })


def report_done(run: PrepRun, lengths: dict[str, dict[str, int]]) -> None:
    """The tables of rows per stage and lengths, what was written where, and the next command."""
    cfg, console = run.cfg, run.console
    console.print(*summary_tables(run.counts, run.stages, lengths))
    console.print(f"wrote {len(run.train_rows)} train and {len(run.dev_rows)} dev rows, stats.json and lengths.png "
                  f"to {Path(cfg.out)}/ in {time.time() - run.started:.1f}s")
    data_flag = [] if Path(cfg.out) == Path(PrepSettings.out) else ["--data", cfg.out]  # train.py's default data
    console.print(f"next: {shell_command('python', 'train.py', *data_flag)}", markup=False, soft_wrap=True)


def main(cfg: PrepSettings) -> None:
    """Competition sets, pseudo-labels, targets, cleaning, augmentation, leaks and duplicates, lengths, then write."""
    if cfg.check_env:  # before rich: this runs before requirements.txt is installed
        print_environment_ok()
        return
    from rich.console import Console

    check_settings(cfg)
    run = PrepRun(cfg, Console(highlight=False), time.time())
    show_settings(run)
    load_competition_sets(run)
    if cfg.pseudo_labels:
        add_pseudo_labels(run)
    if cfg.unify_targets or cfg.show_changes:
        unify_training_targets(run)
        if cfg.show_changes:  # a preview of the rules: nothing is written
            return
    if cfg.clean_inputs:
        clean_dialogues(run)
    load_augmentation(run)
    remove_leaks_and_duplicates(run)
    fit_to_length(run)
    run.console.rule("output")
    lengths = length_percentiles(run.train_rows, run.dev_rows)
    write_prepared(run, build_stats(run, lengths))
    report_done(run, lengths)


def parse_args(argv: list[str]) -> PrepSettings:
    """The settings from the command line; the generators' old subcommands point to distill.py."""
    if argv and argv[0] in ("distill", "magpie"):
        sys.exit(f"error: the generators moved to their own script: python distill.py {' '.join(argv)}")
    return parse_settings(PrepSettings, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    run_cli(main, parse_args(sys.argv[1:]))
