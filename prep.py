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


# ---------------------------------------------------------------------------------------------
# ---- Augmentation generators: `prep.py distill` and `prep.py magpie` ----
# Both append each finished row to a JSONL file at once (one line, flushed) and, when started
# again, skip every id already in the output or rejects file: an interrupted run resumes where it
# stopped, and nothing finished is lost or generated twice. Both outputs are valid --extra sources.
# ---------------------------------------------------------------------------------------------

# Answers that open like this are refusals, not summaries; they go to the rejects file.
REFUSAL_PREFIXES = (
    "I'm sorry", "I am sorry", "I cannot", "I can't", "As an AI", "Sorry, I",
    "죄송하지만", "죄송합니다만", "죄송합니다. 저는", "저는 AI", "요청하신 내용은 도와드릴 수 없",
)
DISTILL_FORMATS = ("alpaca", "prompt_completion")


@dataclass
class DistillSettings:
    input: list[str] = field(default_factory=lambda: ["data/일상대화요약_train.json"], metadata={"help": "rows for the teacher: competition files (it writes a summary per conversation) or any source --extra accepts"})
    output: str = field(default="data/distill/teacher.jsonl", metadata={"help": "JSONL the answers are appended to (resumed if it exists)"})
    rejects: str | None = field(default=None, metadata={"help": "JSONL of refused/empty/truncated rows with the reason (default: <output>.rejects.jsonl)"})
    teacher_url: str = field(default="http://localhost:8000/v1", metadata={"help": "OpenAI-compatible base URL (…/v1), or 'local' to generate with --teacher_model through infer.py"})
    teacher_model: str | None = field(default=None, metadata={"help": "model name the server serves, or a local path / hub id with --teacher_url local"})
    api_key_env: str = field(default="OPENAI_API_KEY", metadata={"help": "environment variable holding the API key (sent as a Bearer token when set)"})
    instruction: str | None = field(default=None, metadata={"help": "competition files only: the [Question] line instead of the competition's; {keywords} is replaced by the topic keywords"})
    format: str = field(default="alpaca", metadata={"help": "output rows", "choices": DISTILL_FORMATS})
    max_new_tokens: int = field(default=1024, metadata={"help": "answer length limit (max_tokens in the request); an answer cut by it is rejected"})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling (only with temperature > 0)"})
    concurrency: int = field(default=8, metadata={"help": "requests in flight at once"})
    request_timeout: float = field(default=300.0, metadata={"help": "seconds to wait for one reply before retrying"})
    max_retries: int = field(default=6, metadata={"help": "retries per row on 429 / 5xx / timeouts / connection errors"})
    backoff_base: float = field(default=1.0, metadata={"help": "first retry waits about this many seconds, doubling each time (with jitter); Retry-After wins when sent"})
    backoff_max: float = field(default=60.0, metadata={"help": "longest wait between two retries, in seconds"})
    max_consecutive_failures: int = field(default=10, metadata={"help": "stop (keeping all finished rows) after this many rows in a row failed every retry"})
    batch_size: int = field(default=8, metadata={"help": "--teacher_url local: prompts generated together"})
    limit: int | None = field(default=None, metadata={"help": "send only the first N input rows (try a run cheaply)"})


@dataclass
class DistillItem:
    id: str
    source: str
    messages: list[dict]


class RowRejected(Exception):
    """The teacher answered, but the answer is unusable (refused, empty, cut short, or the request was invalid)."""


class TeacherUnavailable(Exception):
    """Every retry for one row failed (rate limits, server errors, timeouts, connection errors)."""


def distill_user_text(record: dict, instruction: str | None) -> str:
    """The competition prompt, or the same conversation block with a custom [Question] line."""
    if instruction is None:
        return build_user_text(record)
    keywords = ", ".join(record["input"]["subject_keyword"])
    return f"[Conversation]\n{conversation_text(record['input']['conversation'])}\n\n[Question]\n{instruction.replace('{keywords}', keywords)}"


def is_competition_file(path: str | Path) -> bool:
    """A JSON list whose records carry input.conversation (the NIKL layout), as opposed to an --extra source."""
    path = Path(path)
    if path.suffix.lower() != ".json" or not path.is_file():
        return False
    data = read_json(path)
    return isinstance(data, list) and bool(data) and isinstance(data[0], dict) and isinstance(data[0].get("input"), dict) and "conversation" in data[0]["input"]


def chat_completions_url(base_url: str) -> str:
    """Accept the base URL servers print (http://host:8000/v1) or the full endpoint."""
    base_url = base_url.rstrip("/")
    return base_url if base_url.endswith("/chat/completions") else f"{base_url}/chat/completions"


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds (the form rate limiters send) or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    import email.utils
    import time
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def backoff_delay(attempt: int, base: float, cap: float, retry_after: float | None, rng: Any) -> float:
    """Seconds before retry number `attempt` (1, 2, ...): the server's Retry-After when given, else
    exponential with jitter so that many workers hit by the same 429 do not retry in lockstep."""
    if retry_after is not None:
        return min(retry_after, cap)
    ceiling = min(cap, base * 2 ** (attempt - 1))
    return ceiling / 2 + rng.uniform(0, ceiling / 2)


def answer_from_completion(data: Any) -> str:
    """The assistant text of an OpenAI chat-completions response, or RowRejected with the reason."""
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise RowRejected("response has no choices")
    choice = choices[0]
    message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
    if message.get("refusal"):
        raise RowRejected(f"refused: {str(message['refusal'])[:200]}")
    if choice.get("finish_reason") == "content_filter":
        raise RowRejected("refused: finish_reason content_filter")
    if choice.get("finish_reason") == "length":
        raise RowRejected("truncated: the answer hit max_new_tokens")
    return judge_answer(message.get("content"))


def judge_answer(text: Any) -> str:
    """Strip the answer; empty answers and refusals are rejected."""
    text = text.strip() if isinstance(text, str) else ""
    if not text:
        raise RowRejected("empty answer")
    if text.startswith(REFUSAL_PREFIXES):
        raise RowRejected(f"refused: {text[:200]}")
    return text


def distill_row(item: DistillItem, answer: str, teacher: str, fmt: str) -> dict:
    """One output row: alpaca for a single user turn, prompt/completion (chat messages for multi-turn)."""
    single_turn = len(item.messages) == 1
    if fmt == "alpaca":
        row = {"instruction": item.messages[0]["content"], "input": "", "output": answer}
    elif single_turn:
        row = {"prompt": item.messages[0]["content"], "completion": answer}
    else:
        row = {"prompt": item.messages, "completion": [{"role": "assistant", "content": answer}]}
    return {**row, "id": item.id, "teacher": teacher, "source": item.source}


def read_done_ids(path: str | Path) -> set[str]:
    """Ids in a JSONL file this section writes. A last line cut off by a kill mid-write was never
    finished, so it is removed; any other unreadable line is the user's to fix."""
    path = Path(path)
    if not path.is_file():
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        with open(path, "r+b") as handle:
            handle.truncate(keep)
        data = data[:keep]
    done = set()
    for line_number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: line {line_number} is not valid JSON ({err.msg}); fix or delete that line, or pick another --output") from None
        if not isinstance(row, dict) or not isinstance(row.get("id"), str):
            raise UserError(f"{path}: line {line_number}: field 'id' missing; this file was not written by prep.py distill/magpie, pick another --output")
        done.add(row["id"])
    return done


class JsonlAppender:
    """Append-only JSONL writer: each row is one complete line, flushed the moment it is written."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.handle = None
        self.count = 0

    def write(self, row: dict) -> None:
        if self.handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.handle = open(self.path, "a", encoding="utf-8")
        self.handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.handle.flush()
        self.count += 1

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()


def load_distill_items(cfg: DistillSettings) -> list[DistillItem]:
    """Every input row as the chat messages the teacher will see, with a stable id for resuming."""
    items: list[DistillItem] = []
    seen: dict[str, str] = {}
    for path in cfg.input:
        if is_competition_file(path):
            records, _ = load_competition_file(path)
            new = [DistillItem(r["id"], str(path), [{"role": "user", "content": distill_user_text(r, cfg.instruction)}]) for r in records]
        else:
            if cfg.instruction is not None:
                raise UserError(f"{path}: --instruction applies to competition files only; this source already carries its prompts")
            new = extra_source_items(path)
        for item in new:
            if item.id in seen:
                raise UserError(f"{path}: id {item.id!r} also appears in {seen[item.id]}; ids must be unique across --input files")
            seen[item.id] = str(path)
        items.extend(new)
    return items[: cfg.limit] if cfg.limit is not None else items


async def ask_teacher(client: Any, url: str, payload: dict, cfg: DistillSettings, rng: Any) -> str:
    """One row's chat completion, retried on 429 / 408 / 5xx / timeouts / connection errors."""
    import asyncio

    import httpx

    last_problem = ""
    retry_after = None
    for attempt in range(cfg.max_retries + 1):
        if attempt:
            await asyncio.sleep(backoff_delay(attempt, cfg.backoff_base, cfg.backoff_max, retry_after, rng))
        retry_after = None
        try:
            response = await client.post(url, json=payload)
        except httpx.TimeoutException:
            last_problem = f"no reply within {cfg.request_timeout:g}s"
            continue
        except httpx.TransportError as err:
            last_problem = f"connection error ({type(err).__name__}: {err})"
            continue
        status = response.status_code
        if status in (408, 429) or status >= 500:
            last_problem = f"HTTP {status}"
            retry_after = parse_retry_after(response.headers.get("retry-after"))
            continue
        detail = response.text[:200].replace("\n", " ")
        if status in (401, 403):
            raise UserError(f"{url}: HTTP {status} ({detail}); set the API key in the environment variable {cfg.api_key_env}")
        if status == 404:
            raise UserError(f"{url}: HTTP 404 ({detail}); check --teacher_url (the base URL ending in /v1) and --teacher_model")
        if status >= 400:
            raise RowRejected(f"HTTP {status}: {detail}")
        try:
            data = response.json()
        except ValueError:
            last_problem = f"HTTP {status} with a body that is not JSON ({detail})"
            continue
        return answer_from_completion(data)
    raise TeacherUnavailable(f"{last_problem} (after {cfg.max_retries + 1} attempts)")


async def distill_over_http(items: list[DistillItem], cfg: DistillSettings, output: JsonlAppender, rejects: JsonlAppender, stats: dict, progress: Any) -> None:
    """Send every item with `concurrency` requests in flight; each result is written as it arrives."""
    import asyncio
    import random

    import httpx

    url = chat_completions_url(cfg.teacher_url)
    headers = {"Content-Type": "application/json"}
    if os.environ.get(cfg.api_key_env):
        headers["Authorization"] = f"Bearer {os.environ[cfg.api_key_env]}"
    rng = random.Random()
    pending = iter(items)  # shared by all workers: each row is taken exactly once
    failures_in_a_row = 0
    last_failure = ""

    async def worker(client: Any) -> None:
        nonlocal failures_in_a_row, last_failure
        for item in pending:
            payload = {"model": cfg.teacher_model, "messages": item.messages, "max_tokens": cfg.max_new_tokens, "temperature": cfg.temperature}
            if cfg.temperature > 0:
                payload["top_p"] = cfg.top_p
            try:
                answer = await ask_teacher(client, url, payload, cfg, rng)
            except RowRejected as reason:
                rejects.write({"id": item.id, "reason": str(reason), "teacher": cfg.teacher_model, "source": item.source})
                stats["rejected"] += 1
                failures_in_a_row = 0
            except TeacherUnavailable as problem:
                stats["failed"] += 1
                failures_in_a_row += 1
                last_failure = f"row {item.id!r}: {problem}"
                if failures_in_a_row >= cfg.max_consecutive_failures:
                    raise UserError(
                        f"{url}: stopped after {failures_in_a_row} rows in a row failed every retry (last: {last_failure}); "
                        f"{stats['written']} answers are kept in {cfg.output}; run the same command again to resume"
                    ) from None
            else:
                output.write(distill_row(item, answer, cfg.teacher_model, cfg.format))
                stats["written"] += 1
                failures_in_a_row = 0
            progress()

    timeout = httpx.Timeout(cfg.request_timeout, connect=min(cfg.request_timeout, 30.0))
    limits = httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency)
    async with httpx.AsyncClient(timeout=timeout, headers=headers, limits=limits) as client:
        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(cfg.concurrency):
                    group.create_task(worker(client))
        except BaseExceptionGroup as group_error:
            raise group_error.exceptions[0] from None


def check_output_format(path: str | Path, fmt: str) -> None:
    """Resuming must not mix alpaca and prompt/completion rows in one file."""
    path = Path(path)
    if not path.is_file():
        return
    with open(path, encoding="utf-8") as handle:
        first = handle.readline()
    if first.strip():
        found = "alpaca" if "instruction" in json.loads(first) else "prompt_completion"
        if found != fmt:
            raise UserError(f"{path}: holds {found} rows; pass --format {found} to resume it, or pick another --output")


def print_settings(console: Any, title: str, cfg: Any) -> None:
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    for f in dataclasses.fields(cfg):
        table.add_row(f.name, str(getattr(cfg, f.name)))
    console.print(table)


def distill_main(cfg: DistillSettings) -> None:
    import asyncio
    import time

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console()
    local = cfg.teacher_url == "local"
    if not cfg.teacher_model:
        raise UserError("--teacher_model is required: the model name the server serves, or a local path with --teacher_url local")
    if not local and not cfg.teacher_url.startswith(("http://", "https://")):
        raise UserError(f"--teacher_url {cfg.teacher_url!r}: expected an http(s):// base URL such as http://localhost:8000/v1, or 'local'")
    for name in ("concurrency", "batch_size", "max_new_tokens", "max_consecutive_failures"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name} must be at least 1")
    if cfg.max_retries < 0 or cfg.request_timeout <= 0 or cfg.backoff_base < 0:
        raise UserError("--max_retries must be >= 0, --request_timeout > 0 and --backoff_base >= 0")
    cfg.rejects = cfg.rejects or str(Path(cfg.output).with_suffix("")) + ".rejects.jsonl"
    if Path(cfg.rejects).resolve() == Path(cfg.output).resolve():
        raise UserError(f"--rejects {cfg.rejects}: must differ from --output")
    started = time.time()
    console.rule("[bold]prep.py distill")
    print_settings(console, "settings", cfg)

    items = load_distill_items(cfg)
    done = read_done_ids(cfg.output) | read_done_ids(cfg.rejects)
    check_output_format(cfg.output, cfg.format)
    todo = [item for item in items if item.id not in done]
    console.print(f"{len(items)} input rows: {len(items) - len(todo)} already done (resumed), {len(todo)} to send to {cfg.teacher_model}")
    stats = {"written": 0, "rejected": 0, "failed": 0}
    output, rejects = JsonlAppender(cfg.output), JsonlAppender(cfg.rejects)
    columns = (TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    try:
        with Progress(*columns, console=console) as progress:
            task = progress.add_task("teacher answers", total=len(todo))

            def advance() -> None:
                progress.update(task, advance=1, description=f"ok {stats['written']} · rejected {stats['rejected']} · failed {stats['failed']}")

            if local:
                distill_locally(todo, cfg, output, rejects, stats, advance)
            elif todo:
                asyncio.run(distill_over_http(todo, cfg, output, rejects, stats, advance))
    finally:
        output.close()
        rejects.close()
    console.print(f"written {stats['written']} → {cfg.output}; rejected {stats['rejected']} → {cfg.rejects}; failed {stats['failed']}; {time.time() - started:.1f}s")
    if stats["failed"]:
        raise UserError(f"{stats['failed']} rows failed every retry and were not written; run the same command again to retry them")
    console.print(f"next: python prep.py --extra {cfg.output}")


def run_generator_command(argv: list[str]) -> None:
    """`prep.py distill ...` / `prep.py magpie ...`: each subcommand has its own settings and flags."""
    settings_cls, main_fn, description = GENERATOR_COMMANDS[argv[0]]
    run_cli(main_fn, parse_settings(settings_cls, argv[1:], description))


GENERATOR_COMMANDS = {
    "distill": (DistillSettings, distill_main, "Have a teacher model (OpenAI-compatible server or local) answer every input row; append to JSONL, resumably."),
}


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in GENERATOR_COMMANDS:
        run_generator_command(sys.argv[1:])
