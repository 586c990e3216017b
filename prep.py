"""Turn the competition JSON (plus augmentation sets) into chat-format training rows.

Terminal:
    python prep.py                                   # data/일상대화요약_{train,dev}.json -> data/prepared/
    python prep.py --train data/sample/train.json --dev data/sample/dev.json --out /tmp/p

Colab:
    !python prep.py --train data/일상대화요약_train.json --dev data/일상대화요약_dev.json

This file is also the single source of truth for the competition prompt: train.py reads the rows
written here and infer.py imports `build_messages`, so the two can never drift apart. It imports
nothing heavy at module level for that reason.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class PrepSettings:
    train: list[str] = field(default_factory=lambda: ["data/일상대화요약_train.json"], metadata={"help": "competition train file(s)"})
    dev: str | None = field(default="data/일상대화요약_dev.json", metadata={"help": "competition dev file"})
    out: str = field(default="data/prepared", metadata={"help": "output directory"})


# The official baseline's system prompt (teddysum/Korean_DCS_2024). Gemma 2 rejects a system role,
# so when asked for it is merged into the user turn.
BASELINE_SYSTEM_PROMPT = (
    "You are a helpful AI assistant. Please answer the user's questions kindly. "
    "당신은 유능한 AI 어시스턴트 입니다. 사용자의 질문에 대해 친절하게 답변해주세요."
)


class UserError(Exception):
    """A mistake the user can fix (bad file, bad field, impossible setting): shown as one line, no traceback."""


# ---------------------------------------------------------------------------------------------
# Settings dataclass -> argparse (shared by prep.py, train.py and infer.py; must stay import-light)
# ---------------------------------------------------------------------------------------------

def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    """`int | None` -> (int, True); anything else -> (annotation, False)."""
    args = typing.get_args(annotation)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return annotation, False


def build_parser(settings_cls: type, description: str) -> argparse.ArgumentParser:
    """One `--field_name` flag per dataclass field, typed from its annotation, help from its metadata."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(settings_cls)
    for f in dataclasses.fields(settings_cls):
        annotation, _ = _unwrap_optional(hints[f.name])
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        kwargs: dict[str, Any] = {"default": default, "help": f.metadata.get("help", " ")}
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(annotation) is list:
            kwargs.update(nargs="+", type=typing.get_args(annotation)[0])
        else:
            kwargs["type"] = annotation
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        parser.add_argument(f"--{f.name}", **kwargs)
    return parser


def parse_settings(settings_cls: type, argv: list[str] | None, description: str) -> Any:
    args = build_parser(settings_cls, description).parse_args(argv)
    return settings_cls(**vars(args))


def run_cli(main_fn, settings: Any) -> None:
    """Run `main_fn(settings)`; a UserError becomes one red line on stderr and exit code 2."""
    try:
        main_fn(settings)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: finished work is kept; run the same command again to resume", file=sys.stderr)
        sys.exit(130)


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------

def read_json(path: str | Path) -> Any:
    """Parse a JSON file, tolerating a UTF-8 BOM and CRLF line ends; errors name the file and position."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write via a temp file in the same directory and rename, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def dump_submission_json(records: list[dict]) -> str:
    """The official baseline's layout: UTF-8 Korean kept as is, indent 4."""
    return json.dumps(records, ensure_ascii=False, indent=4) + "\n"


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
    data = read_json(path)
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


def build_user_text(record: dict, system_prompt: bool = False) -> str:
    """The official baseline's prompt, byte for byte (REFERENCE.md section 3)."""
    inp = record["input"]
    keywords = inp["subject_keyword"]
    keywords = [keywords] if isinstance(keywords, str) else keywords
    text = (
        "[Conversation]\n"
        + conversation_text(inp["conversation"])
        + "\n\n[Question]\n"
        + f"위 {', '.join(keywords)} 주제에 대한 대화를 요약해주세요."
    )
    return f"{BASELINE_SYSTEM_PROMPT}\n\n{text}" if system_prompt else text


def build_messages(record: dict, system_prompt: bool = False) -> list[dict]:
    """Chat messages for one competition record; used for training rows AND for inference prompts."""
    return [{"role": "user", "content": build_user_text(record, system_prompt)}]
