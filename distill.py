"""Augmentation for prep.py: a teacher's answers (`distill`), synthetic pairs (`magpie`), restyled targets (`rewrite`).

Terminal:
    python distill.py distill --teacher_url http://localhost:8000/v1 --teacher_model MODEL  # teacher answers -> JSONL
    python distill.py distill --teacher_url local --teacher_model outputs/run/final  # a local model, via generate.py
    python distill.py magpie --model google/gemma-2-27b-it --n 1000                         # synthetic pairs -> JSONL
    python prep.py --extra data/distill/teacher.jsonl                                       # then train on them
    python distill.py distill --input data/일상대화요약_test.json --teacher_url local --teacher_model outputs/run/final \
        --output data/distill/self.jsonl && python prep.py --pseudo_labels data/distill/self.jsonl   # self-distillation
    python distill.py rewrite --input data/일상대화요약_train.json --output data/rewrite/train.json \
        --teacher_url http://localhost:8000/v1 --teacher_model MODEL     # references rewritten in our style, guarded
    python prep.py --train data/rewrite/train.json                       # then train on the rewritten targets

Colab:
    !python distill.py distill --teacher_url local --teacher_model google/gemma-2-27b-it --limit 50

Both commands append each finished row to a JSONL file at once (one line, flushed) and, when started
again, skip every id already in the output or rejects file: an interrupted run resumes where it
stopped, and nothing finished is lost or generated twice. Both outputs are valid --extra sources.

`rewrite` keeps a teacher's answer only where it passes a guard against the original (agreement, length,
speaker ids) and writes the input's competition JSON with those outputs replaced.

Imports go one way: this script builds on common.py (IO, settings), prep.py (records, prompt), generate.py (model
loading, batched generation), score.py (the rewrite guard's metrics) and targets.py (speaker ids); nothing imports
it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import generate
from common import (UserError, check_environment, dump_submission_json, filter_known_noise, parse_jsonl, parse_settings,
                    read_json, run_cli, shell_command, write_text_atomic)
from dedup import keep_first_of_near_duplicates
from prep import (as_text, build_user_text, conversation_text, detect_shape, EXTRA_SHAPES, load_competition_file,
                  load_extra_rows, ROLE_ALIASES, row_messages, validate_competition_data)
from score import BERTSCORE_MODEL, MetricModels, load_scorers
from targets import speakers_in_order
REFUSAL_PREFIXES = (
    "I'm sorry", "I am sorry", "I cannot", "I can't", "As an AI", "Sorry, I",
    "죄송하지만", "죄송합니다만", "죄송합니다. 저는", "저는 AI", "요청하신 내용은 도와드릴 수 없",
)
DISTILL_FORMATS = ("alpaca", "prompt_completion")
OUT_OF_MEMORY_REASON = "CUDA out of memory even alone: lower --max_new_tokens, or use a smaller teacher"
# Columns that hold a prompt in sources that carry no answer yet (what a teacher is asked to write).
PROMPT_ONLY_KEYS = ("instruction", "prompt", "question")
# OpenAI's newer models take only max_completion_tokens; most other servers take max_tokens.
TOKEN_PARAM_CHOICES = ("auto", "max_tokens", "max_completion_tokens")
REWRITE_INSTRUCTION = (
    "위 요약문을 다음 형식으로 다시 써 주세요. 첫 문장은 '두 화자는 이 대화에서'로 시작해 대화 전체를 요약합니다. "
    "그다음 화자마다 먼저 말한 화자부터, 화자 ID와 조사('SD2000001은', 'SD2000002는')로 시작하는 문장들로 그 화자의 "
    "이야기를 요약합니다. 요약문의 사실은 하나도 빠뜨리지 말고, 대화에 없는 내용은 더하지 마세요. 필러(어~, 음~), "
    "말 더듬, 반복, xx 같은 전사 잡음은 쓰지 않습니다. 문장은 '~습니다.'로 끝냅니다. 다시 쓴 요약문만 출력하세요."
)


@dataclass
class DistillSettings(generate.EngineSettings):
    input: list[str] = field(default_factory=lambda: ["data/일상대화요약_train.json"], metadata={"help": (
        "rows for the teacher: competition files (it writes a summary per conversation) or any source --extra "
        "accepts")})
    output: str = field(default="data/distill/teacher.jsonl", metadata={"help": (
        "JSONL the answers are appended to (resumed if it exists)")})
    rejects: str | None = field(default=None, metadata={"help": (
        "JSONL of refused/empty/truncated rows with the reason (default: <output>.rejects.jsonl)")})
    teacher_url: str = field(default="http://localhost:8000/v1", metadata={"help": (
        "OpenAI-compatible base URL (…/v1), or 'local' to generate with --teacher_model here (the engines infer.py "
        "uses)")})
    teacher_model: str | None = field(default=None, metadata={"help": (
        "model name the server serves, or a local path / hub id with --teacher_url local")})
    api_key_env: str = field(default="OPENAI_API_KEY", metadata={"help": (
        "environment variable holding the API key (sent as a Bearer token when set)")})
    instruction: str | None = field(default=None, metadata={"help": (
        "competition files only: the [Question] line instead of the competition's; {keywords} is replaced by the "
        "topic keywords")})
    format: str = field(default="alpaca", metadata={"choices": DISTILL_FORMATS, "help": (
        "output rows for single-turn prompts (multi-turn prompts are always written as messages rows)")})
    max_new_tokens: int = field(default=1024, metadata={"help": (
        "answer length limit (sent as --max_tokens_param); an answer cut by it is rejected")})
    max_tokens_param: str = field(default="auto", metadata={"choices": TOKEN_PARAM_CHOICES, "help": (
        "request field that carries --max_new_tokens; auto: max_tokens, switching to max_completion_tokens for the "
        "rest of the run when the server answers 400 naming max_tokens (newer OpenAI models)")})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling (only with temperature > 0)"})
    concurrency: int = field(default=8, metadata={"help": "requests in flight at once"})
    request_timeout: float = field(default=300.0, metadata={"help": "seconds to wait for one reply before retrying"})
    max_retries: int = field(default=6, metadata={"help": (
        "retries per row on 429 / 5xx / timeouts / connection errors")})
    backoff_base: float = field(default=1.0, metadata={"help": (
        "first retry waits about this many seconds, doubling each time (with jitter); Retry-After wins when sent")})
    backoff_max: float = field(default=60.0, metadata={"help": "longest wait between two retries, in seconds"})
    max_consecutive_failures: int = field(default=10, metadata={"help": (
        "stop (keeping all finished rows) after this many rows in a row failed every retry")})
    batch_size: int = field(default=8, metadata={"help": (
        "--teacher_url local, unsloth engine: most prompts generated together")})
    load_in_4bit: bool | None = field(default=None, metadata={"help": (
        "--teacher_url local: load in 4 bit (default: as the model's training run, else on)")})
    limit: int | None = field(default=None, metadata={"help": "send only the first N input rows (try a run cheaply)"})


@dataclass
class RewriteSettings(DistillSettings):
    input: str = field(default="data/일상대화요약_train.json", metadata={"help": (
        "competition JSON whose outputs the teacher rewrites: training references, or a prediction file (infer.py's)")})
    output: str = field(default="data/rewrite/train.json", metadata={"help": (
        "the input's JSON with each kept rewrite as its output (ids, order and inputs unchanged); the teacher's "
        "answers are appended to <output>.answers.jsonl as they come, so a run resumes, and the verdicts go to "
        "<output>.report.json")})
    instruction: str | None = field(default=None, metadata={"help": "a style instruction instead of the built-in one"})
    min_agreement: float = field(default=0.5, metadata={"help": (
        "a rewrite is kept only if each of --guard_metrics against the original is at least this")})
    max_length_change: float = field(default=0.3, metadata={"help": (
        "... and its length is within this share of the original's (0.3: 70%%-130%%)")})
    guard_metrics: list[str] = field(default_factory=lambda: ["rouge1", "bertscore"], metadata={"help": (
        "agreement measures: rouge1 always, bertscore when its model loads (skipped with the reason otherwise)")})
    bertscore_model: str = field(default=BERTSCORE_MODEL, metadata={"help": "BERTScore model, Hub id or local folder"})


@dataclass
class MagpieSettings:
    model: str = field(default="google/gemma-2-9b-it", metadata={"help": (
        "aligned chat model (local path or Hub id) that writes both the instructions and the answers")})
    output: str = field(default="data/magpie/magpie.jsonl", metadata={"help": (
        "JSONL the kept pairs are appended to (resumed if it exists)")})
    rejects: str | None = field(default=None, metadata={"help": (
        "JSONL of empty/truncated/near-duplicate pairs with the reason (default: <output>.rejects.jsonl)")})
    n: int = field(default=1000, metadata={"help": (
        "pairs to generate in all, kept plus rejected; run again with a larger --n to add more")})
    instruction_max_new_tokens: int = field(default=256, metadata={"help": (
        "instruction length limit; an instruction cut by it is rejected")})
    max_new_tokens: int = field(default=1024, metadata={"help": "answer length limit; an answer cut by it is rejected"})
    temperature: float = field(default=1.0, metadata={"help": (
        "instruction sampling temperature (0 = greedy: every instruction the same)")})
    top_p: float = field(default=1.0, metadata={"help": "instruction nucleus sampling"})
    response_temperature: float = field(default=0.0, metadata={"help": "answer sampling temperature (0 = greedy)"})
    response_top_p: float = field(default=1.0, metadata={"help": (
        "answer nucleus sampling (only with response_temperature > 0)")})
    batch_size: int = field(default=8, metadata={"help": "pairs generated together"})
    load_in_4bit: bool | None = field(default=None, metadata={"help": (
        "load the model in 4 bit (default: as its training run, else on)")})
    dedup_threshold: float = field(default=0.7, metadata={"help": (
        "an instruction goes when a kept one shares this Jaccard similarity of character 3-grams (as prep.py "
        "--dedup_threshold)")})
    seed: int = field(default=42, metadata={"help": (
        "sampling seed (each batch is seeded from it and its first pair number)")})


@dataclass
class DistillItem:
    id: str
    source: str
    messages: list[dict]


class RowRejected(Exception):
    """The teacher answered, but the answer is unusable (refused, empty, cut short, or the request was invalid)."""


class TokenParamRejected(RowRejected):
    """HTTP 400 naming the answer-length field the request carried: the server wants the other name."""


class TeacherUnavailable(Exception):
    """Every retry for one row failed (rate limits, server errors, timeouts, connection errors)."""


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


def distill_user_text(record: dict, instruction: str | None) -> str:
    """The competition prompt, or the same conversation block with a custom [Question] line."""
    if instruction is None:
        return build_user_text(record)
    keywords = ", ".join(record["input"]["subject_keyword"])
    return (f"[Conversation]\n{conversation_text(record['input']['conversation'])}\n\n"
            f"[Question]\n{instruction.replace('{keywords}', keywords)}")


def is_competition_file(path: str | Path) -> bool:
    """A JSON list whose records carry input.conversation (the NIKL layout), as opposed to an --extra source."""
    path = Path(path)
    if path.suffix.lower() != ".json" or not path.is_file():
        return False
    data = read_json(path)
    return (isinstance(data, list) and bool(data) and isinstance(data[0], dict)
            and isinstance(data[0].get("input"), dict) and "conversation" in data[0]["input"])


def prep_flag(inputs: list[str]) -> str:
    """How prep.py takes the answers: summaries of unlabeled competition records (a test file) are pseudo-labels, which
    --extra would drop as leaks of the test dialogues; answers for anything else are augmentation rows."""
    unlabeled = any(not str(record.get("output") or "").strip() for path in inputs if is_competition_file(path)
                    for record in read_json(path) if isinstance(record, dict))
    return "--pseudo_labels" if unlabeled and all(map(is_competition_file, inputs)) else "--extra"


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
    import email.utils  # only a server that sends a date needs it
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


def hit_token_limit(tokenizer: Any, text: str, max_new_tokens: int) -> bool:
    """generate.generate_texts returns decoded, stripped text, so the tokens are counted again; one token
    of slack covers the whitespace the strip removed."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) >= max_new_tokens - 1


def distill_row(item: DistillItem, answer: str, teacher: str, fmt: str) -> dict:
    """One output row in a shape --extra reads: alpaca or prompt/completion for a single user turn,
    messages when the prompt is multi-turn (neither flat shape can hold earlier turns)."""
    if len(item.messages) > 1:
        row = {"messages": [*item.messages, {"role": "assistant", "content": answer}]}
    elif fmt == "alpaca":
        row = {"instruction": item.messages[0]["content"], "input": "", "output": answer}
    else:
        row = {"prompt": item.messages[0]["content"], "completion": answer}
    return {**row, "id": item.id, "teacher": teacher, "source": item.source}


def reject_row(item_id: str, reason: Any, model: str, source: str) -> dict:
    """One line of a rejects file: which row, why, and who wrote it."""
    return {"id": item_id, "reason": str(reason), "teacher": model, "source": source}


def teacher_payload(item: DistillItem, cfg: DistillSettings, token_param: str) -> dict:
    """The chat-completions request for one row, its answer length sent in the field `token_param`."""
    payload = {"model": cfg.teacher_model, "messages": item.messages, token_param: cfg.max_new_tokens,
               "temperature": cfg.temperature}
    if cfg.temperature > 0:
        payload["top_p"] = cfg.top_p
    return payload


def prompt_messages(row: dict) -> list[dict] | None:
    """The turns a teacher answers: an --extra row without its final answer, or a prompt-only row
    (instruction[/input], prompt or question; messages ending with a user turn). None if unusable."""
    shape = detect_shape(row)
    if shape in ("messages", "conversations") and row[shape] and isinstance(row[shape][-1], dict):
        last = row[shape][-1]
        if ROLE_ALIASES.get(str(last.get("role", last.get("from", ""))).lower()) == "user":
            # row_messages drops a trailing unanswered turn; a stand-in answer keeps it, then goes.
            messages = row_messages({shape: [*row[shape], {"role": "assistant", "content": "-"}]}, shape, False)
            return messages[:-1] if messages else None
    if shape is not None:
        messages = row_messages(row, shape, False)
        return messages[:-1] if messages else None
    for key in PROMPT_ONLY_KEYS:
        if as_text(row.get(key)):
            extra_input = as_text(row.get("input")) if key == "instruction" else ""
            content = f"{as_text(row[key])}\n\n{extra_input}" if extra_input else as_text(row[key])
            return [{"role": "user", "content": content}]
    return None


def rejects_path(output: str, rejects: str | None) -> str:
    """--rejects, by default <output>.rejects.jsonl next to the output; never the output itself."""
    path = rejects or str(Path(output).with_suffix("")) + ".rejects.jsonl"
    if Path(path).resolve() == Path(output).resolve():
        raise UserError(f"--rejects {path}: must differ from --output")
    return path


def magpie_id(index: int) -> str:
    """The id of pair number `index`: the same number always gets the same id, so a run resumes by id."""
    return f"magpie-{index:06d}"


def rewrite_user_text(record: dict, instruction: str) -> str:
    """What the teacher sees: the dialogue and its question as the competition prompt, the summary, the style."""
    return f"{build_user_text(record)}\n\n[Summary]\n{record['output'].strip()}\n\n[Instruction]\n{instruction}"


def rewrite_problems(original: str, rewrite: str, speakers: list[str], agreement: dict[str, float],
                     min_agreement: float, max_length_change: float) -> list[str]:
    """Why a rewrite may not replace the original ([] when it may): an agreement below the floor, a length too far
    from the original's, a speaker id of the original missing from it."""
    problems = [f"{name} {value:.3f} < {min_agreement:g}" for name, value in agreement.items() if value < min_agreement]
    change = len(rewrite) / max(len(original), 1) - 1
    if abs(change) > max_length_change:
        problems.append(f"length {change:+.0%} (limit ±{max_length_change:.0%})")
    missing = [speaker for speaker in speakers if speaker in original and speaker not in rewrite]
    if missing:
        problems.append(f"speaker id missing: {', '.join(missing)}")
    return problems


def rewrite_report(verdicts: list[dict], skipped: dict[str, str], cfg: RewriteSettings) -> dict:
    """What was kept and, for the rest, why not: counted by kind of reason, every record's verdict listed."""
    why_not: dict[str, int] = {}
    for verdict in verdicts:
        for kind in {reason.split(" ")[0].rstrip(":") for reason in verdict["reasons"]}:
            why_not[kind] = why_not.get(kind, 0) + 1
    return {"input": cfg.input, "teacher": cfg.teacher_model, "kept": sum(v["kept"] for v in verdicts),
            "not_kept": sum(not v["kept"] for v in verdicts), "not_kept_by_reason": dict(sorted(why_not.items())),
            "guard": {"min_agreement": cfg.min_agreement, "max_length_change": cfg.max_length_change,
                      "metrics": sorted(set(cfg.guard_metrics) - set(skipped)), "skipped": skipped},
            "items": verdicts}


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
    hint = "; fix or delete that line, or pick another --output"
    for line_number, row in parse_jsonl(data.decode("utf-8", errors="replace"), path, hint):
        if not isinstance(row, dict) or not isinstance(row.get("id"), str):
            raise UserError(f"{path}: line {line_number}: field 'id' missing; this file was not written by prep.py "
                            "distill/magpie, pick another --output")
        done.add(row["id"])
    return done


def check_output_format(path: str | Path, fmt: str) -> None:
    """Resuming must not mix alpaca and prompt/completion rows in one file."""
    path = Path(path)
    if not path.is_file():
        return
    with open(path, encoding="utf-8") as handle:
        first = handle.readline()
    if first.strip():
        row = json.loads(first)
        found = "alpaca" if "instruction" in row else "prompt_completion" if "prompt" in row else fmt
        if found != fmt:
            raise UserError(f"{path}: holds {found} rows; pass --format {found} to resume it, or pick another --output")


def finished_ids(cfg: DistillSettings | MagpieSettings, fmt: str) -> set[str]:
    """Ids an earlier run already wrote to --output or --rejects, which this run skips; --output keeps its format."""
    done = read_done_ids(cfg.output) | read_done_ids(cfg.rejects)
    check_output_format(cfg.output, fmt)
    return done


def read_kept_instructions(path: str | Path) -> list[str]:
    """The instructions of the pairs a magpie --output already holds (new ones must not repeat them)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line)["instruction"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_answers(path: str | Path) -> dict[str, str]:
    """{id: answer} from the answers JSONL (prompt/completion rows, the last of an id wins)."""
    path = Path(path)
    if not path.is_file():
        return {}
    rows = parse_jsonl(path.read_text(encoding="utf-8"), path, "; fix or delete that line")
    return {row["id"]: row["completion"] for _, row in rows if isinstance(row, dict) and "completion" in row}


def read_reasons(path: str | Path) -> dict[str, str]:
    """{id: why the teacher's answer was unusable} from the rejects JSONL."""
    path = Path(path)
    if not path.is_file():
        return {}
    return {row["id"]: row.get("reason", "") for _, row in parse_jsonl(path.read_text(encoding="utf-8"), path)}


def print_settings(console: Any, title: str, cfg: Any) -> None:
    """The resolved settings as a two-column table."""
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    for f in dataclasses.fields(cfg):
        table.add_row(f.name, str(getattr(cfg, f.name)))
    console.print(table)


# distill: a teacher answers every input row
def check_teacher_settings(cfg: DistillSettings) -> None:
    """The teacher flags `distill` and `rewrite` share."""
    local = cfg.teacher_url == "local"
    if not cfg.teacher_model:
        raise UserError("--teacher_model is required: the model name the server serves, or a local path with "
                        "--teacher_url local")
    if not local and not cfg.teacher_url.startswith(("http://", "https://")):
        raise UserError(f"--teacher_url {cfg.teacher_url!r}: expected an http(s):// base URL such as "
                        "http://localhost:8000/v1, or 'local'")
    for name in ("concurrency", "batch_size", "max_new_tokens", "max_consecutive_failures"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name} must be at least 1")
    generate.check_engine_settings(cfg)
    if cfg.engine != "unsloth" and not local:
        raise UserError(f"--engine {cfg.engine} runs a local teacher: pass --teacher_url local (a server is its own "
                        "engine)")
    if cfg.max_retries < 0 or cfg.request_timeout <= 0 or cfg.backoff_base < 0:
        raise UserError("--max_retries must be >= 0, --request_timeout > 0 and --backoff_base >= 0")


def extra_source_items(source: str) -> list[DistillItem]:
    """An --extra source (file or Hub id) as teacher prompts; ids are the row's own `id` or `source:index`."""
    items = []
    for index, row in enumerate(load_extra_rows(source)):
        messages = prompt_messages(row)
        if messages is None:
            columns = ", ".join(sorted(map(str, row))) or "(none)"
            raise UserError(f"{source}: row {index} has no usable prompt; found columns: {columns}; expected one of: "
                            f"{'; '.join(EXTRA_SHAPES)}, or a prompt-only row ({', '.join(PROMPT_ONLY_KEYS)})")
        row_id = row.get("id")
        own_id = isinstance(row_id, (str, int)) and str(row_id).strip()
        items.append(DistillItem(str(row_id) if own_id else f"{source}:{index}", source, messages))
    return items


def load_distill_items(cfg: DistillSettings) -> list[DistillItem]:
    """Every input row as the chat messages the teacher will see, with a stable id for resuming."""
    items: list[DistillItem] = []
    seen: dict[str, str] = {}
    for path in cfg.input:
        if is_competition_file(path):
            records, _ = load_competition_file(path)
            new = [DistillItem(r["id"], str(path), [{"role": "user", "content": distill_user_text(r, cfg.instruction)}])
                   for r in records]
        else:
            if cfg.instruction is not None:
                raise UserError(f"{path}: --instruction applies to competition files only; this source already "
                                "carries its prompts")
            new = extra_source_items(path)
        for item in new:
            if item.id in seen:
                raise UserError(f"{path}: id {item.id!r} also appears in {seen[item.id]}; ids must be unique across "
                                "--input files")
            seen[item.id] = str(path)
        items.extend(new)
    return items[: cfg.limit] if cfg.limit is not None else items


class TeacherRun:
    """Where one run's answers go as they arrive: usable ones to --output, unusable ones with the reason to --rejects
    (both flushed at once); rows that failed every retry are counted, and the answer-length field in use is kept."""

    def __init__(self, cfg: DistillSettings):
        self.cfg = cfg
        self.output, self.rejects = JsonlAppender(cfg.output), JsonlAppender(cfg.rejects)
        self.failed = 0
        self.first_token_param = "max_tokens" if cfg.max_tokens_param == "auto" else cfg.max_tokens_param
        self.token_param = self.first_token_param

    def keep(self, item: DistillItem, answer: str) -> None:
        self.output.write(distill_row(item, answer, self.cfg.teacher_model, self.cfg.format))

    def reject(self, item: DistillItem, reason: Any) -> None:
        self.rejects.write(reject_row(item.id, reason, self.cfg.teacher_model, item.source))

    def counts(self) -> str:
        return f"ok {self.output.count} · rejected {self.rejects.count} · failed {self.failed}"

    def close(self) -> None:
        self.output.close()
        self.rejects.close()


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
        if status == 400 and any(re.search(rf"\b{name}\b", response.text)
                                 for name in TOKEN_PARAM_CHOICES[1:] if name in payload):
            raise TokenParamRejected(f"HTTP 400: {detail}")
        if status in (401, 403):
            raise UserError(f"{url}: HTTP {status} ({detail}); set the API key in the environment variable "
                            f"{cfg.api_key_env}")
        if status == 404:
            raise UserError(f"{url}: HTTP 404 ({detail}); check --teacher_url (the base URL ending in /v1) and "
                            "--teacher_model")
        if status >= 400:
            raise RowRejected(f"HTTP {status}: {detail}")
        try:
            data = response.json()
        except ValueError:
            last_problem = f"HTTP {status} with a body that is not JSON ({detail})"
            continue
        return answer_from_completion(data)
    raise TeacherUnavailable(f"{last_problem} (after {cfg.max_retries + 1} attempts)")


class HttpTeacher:
    """An OpenAI-compatible server as the teacher: `concurrency` workers share one client and one queue of rows, log
    each result as it arrives, and stop together after `max_consecutive_failures` rows in a row failed every retry."""

    def __init__(self, cfg: DistillSettings, run: TeacherRun, progress: Any):
        self.cfg, self.run, self.progress = cfg, run, progress
        self.url = chat_completions_url(cfg.teacher_url)
        self.rng = random.Random()
        self.failures_in_a_row = 0

    async def answer_all(self, items: list[DistillItem]) -> None:
        """Send every item with `concurrency` requests in flight."""
        import asyncio
        import httpx

        headers = {"Content-Type": "application/json"}
        if os.environ.get(self.cfg.api_key_env):
            headers["Authorization"] = f"Bearer {os.environ[self.cfg.api_key_env]}"
        pending = iter(items)  # shared by all workers: each row is taken exactly once
        timeout = httpx.Timeout(self.cfg.request_timeout, connect=min(self.cfg.request_timeout, 30.0))
        limits = httpx.Limits(max_connections=self.cfg.concurrency, max_keepalive_connections=self.cfg.concurrency)
        async with httpx.AsyncClient(timeout=timeout, headers=headers, limits=limits) as client:
            try:
                async with asyncio.TaskGroup() as group:
                    for _ in range(self.cfg.concurrency):
                        group.create_task(self.work(client, pending))
            except BaseExceptionGroup as group_error:
                raise group_error.exceptions[0] from None

    async def work(self, client: Any, pending: Any) -> None:
        """One worker: ask for the next row until none is left, logging each answer, rejection or failure."""
        for item in pending:
            try:
                answer = await self.ask(client, item)
            except RowRejected as reason:
                self.run.reject(item, reason)
                self.failures_in_a_row = 0
            except TeacherUnavailable as problem:
                self.run.failed += 1
                self.failures_in_a_row += 1
                if self.failures_in_a_row >= self.cfg.max_consecutive_failures:
                    raise UserError(
                        f"{self.url}: stopped after {self.failures_in_a_row} rows in a row failed every retry "
                        f"(last: row {item.id!r}: {problem}); {self.run.output.count} answers are kept in "
                        f"{self.cfg.output}; run the same command again to resume"
                    ) from None
            else:
                self.run.keep(item, answer)
                self.failures_in_a_row = 0
            self.progress.advance(1, self.run.counts())

    async def ask(self, client: Any, item: DistillItem) -> str:
        """ask_teacher with the answer-length field the server takes: with --max_tokens_param auto, a 400 naming
        max_tokens sends the row again with max_completion_tokens, which the rest of the run then keeps using."""
        try:
            return await ask_teacher(client, self.url, teacher_payload(item, self.cfg, self.run.token_param),
                                     self.cfg, self.rng)
        except TokenParamRejected as first:
            if self.cfg.max_tokens_param != "auto" or self.run.token_param == "max_completion_tokens":
                raise
            try:
                answer = await ask_teacher(client, self.url, teacher_payload(item, self.cfg, "max_completion_tokens"),
                                           self.cfg, self.rng)
            except TokenParamRejected:
                raise RowRejected(f"{first}; max_completion_tokens was rejected too") from None
            self.run.token_param = "max_completion_tokens"
            return answer


class LocalAnswers:
    """generate.py's callbacks for a local teacher: each finished batch judged and logged, and each row set aside
    (out of memory even alone) rejected."""

    def __init__(self, ready: list[DistillItem], tokenizer: Any, max_new_tokens: int, run: TeacherRun):
        self.ready, self.tokenizer, self.max_new_tokens, self.run = ready, tokenizer, max_new_tokens, run

    def save_batch(self, indices: list[int], texts: list[str], _new_tokens: int) -> None:
        for index, text in zip(indices, texts):
            item = self.ready[index]
            try:
                answer = judge_answer(text)
                if hit_token_limit(self.tokenizer, answer, self.max_new_tokens):
                    raise RowRejected("truncated: the answer hit max_new_tokens")
            except RowRejected as reason:
                self.run.reject(item, reason)
            else:
                self.run.keep(item, answer)

    def set_aside(self, index: int) -> None:
        self.run.reject(self.ready[index], OUT_OF_MEMORY_REASON)


def distill_locally(items: list[DistillItem], cfg: DistillSettings, run: TeacherRun, console: Any) -> None:
    """--teacher_url local: the same engines infer.py uses (generate.py); each batch is written as it finishes."""
    engine = generate.open_engine(*generate.resolve_model(cfg.teacher_model), cfg, batch_size=cfg.batch_size,
                                  max_seq_length=None, load_in_4bit=cfg.load_in_4bit)
    console.print(f"teacher: {engine.served_on}", markup=False, highlight=False)
    tokenizer = engine.tokenizer
    budget = engine.max_seq_length - cfg.max_new_tokens
    ready, prompts = [], []
    for item in items:
        prompt = tokenizer.apply_chat_template(item.messages, tokenize=False, add_generation_prompt=True)
        if len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) > budget:
            run.reject(item, f"prompt longer than max_seq_length - max_new_tokens ({budget} tokens)")
        else:
            ready.append(item)
            prompts.append(prompt)
    if prompts:
        sampling = generate.Sampling(cfg.max_new_tokens, do_sample=cfg.temperature > 0,
                                     temperature=cfg.temperature or 1.0, top_p=cfg.top_p)
        answers = LocalAnswers(ready, tokenizer, cfg.max_new_tokens, run)
        engine.generate(prompts, sampling, on_batch=answers.save_batch, on_set_aside=answers.set_aside,
                        console=console)
    engine.close()


def ask_for_answers(todo: list[DistillItem], cfg: DistillSettings, console: Any) -> None:
    """The teacher answers every item: each answer is appended to --output and each unusable one to --rejects as it
    arrives; rows that failed every retry end the run with one line (run again to retry just those)."""
    started = time.time()
    run = TeacherRun(cfg)
    try:
        if cfg.teacher_url == "local" and todo:
            distill_locally(todo, cfg, run, console)
        elif todo:
            import asyncio  # the HTTP teacher's alone: kept off every subcommand's start
            with generate.ItemProgress(console, "teacher answers", len(todo)) as progress:
                asyncio.run(HttpTeacher(cfg, run, progress).answer_all(todo))
    finally:
        run.close()
    console.print(f"written {run.output.count} → {cfg.output}; rejected {run.rejects.count} → {cfg.rejects}; "
                  f"failed {run.failed}; {time.time() - started:.1f}s")
    if run.token_param != run.first_token_param:
        console.print(f"the server rejected {run.first_token_param}, so this run sent {run.token_param}; next time "
                      f"pass --max_tokens_param {run.token_param}")
    if run.failed:
        raise UserError(f"{run.failed} rows failed every retry and were not written; run the same command again to "
                        "retry them")


# rewrite: a teacher rewrites each reference in one style; a guard keeps only the faithful ones
def check_rewrite_settings(cfg: RewriteSettings) -> None:
    """The teacher flags, the guard's, and an --output that is not the --input."""
    check_teacher_settings(cfg)
    unknown = [name for name in cfg.guard_metrics if name not in ("rouge1", "bertscore")]
    if unknown or "rouge1" not in cfg.guard_metrics:
        raise UserError(f"--guard_metrics {' '.join(cfg.guard_metrics)}: rouge1, optionally with bertscore")
    if not 0 <= cfg.min_agreement <= 1 or cfg.max_length_change <= 0:
        raise UserError("--min_agreement must be in [0, 1] and --max_length_change positive (0.3 = within 30%)")
    if Path(cfg.output).resolve() == Path(cfg.input).resolve():
        raise UserError(f"--output {cfg.output} is the --input file: choose another name (inputs stay as they are)")


def load_rewrite_input(path: str) -> tuple[list[dict], list[dict]]:
    """(the file's records as given, validated copies); every record needs the `output` to rewrite."""
    raw = read_json(path)
    records, _ = validate_competition_data(raw, path)
    for index, record in enumerate(records):
        if not record["output"].strip():
            raise UserError(f"{path}: record {index} (id {record['id']!r}): field 'output' is empty; rewrite needs the "
                            "summary to rewrite (a training file or a prediction file, not a test file)")
    return raw, records


def ask_for_rewrites(records: list[dict], answers_path: str, cfg: RewriteSettings, console: Any) -> None:
    """The teacher rewrites each summary (the first --limit), appended to answers_path; answered ones are skipped."""
    instruction = cfg.instruction or REWRITE_INSTRUCTION
    asked = records[: cfg.limit] if cfg.limit is not None else records
    items = [DistillItem(r["id"], cfg.input, [{"role": "user", "content": rewrite_user_text(r, instruction)}])
             for r in asked]
    done = read_done_ids(answers_path) | read_done_ids(cfg.rejects)
    todo = [item for item in items if item.id not in done]
    console.print(f"{len(records)} records, {len(items)} to rewrite: {len(items) - len(todo)} already answered "
                  f"(resumed), {len(todo)} to send to {cfg.teacher_model}")
    ask_for_answers(todo, dataclasses.replace(cfg, output=answers_path, format="prompt_completion"), console)


def judge_rewrites(records: list[dict], answers: dict[str, str], teacher_reasons: dict[str, str],
                   scorers: dict[str, Any], cfg: RewriteSettings) -> list[dict]:
    """Per record: {id, kept, reasons, agreement, length_change}; one without a usable answer keeps its original."""
    answered = [r for r in records if r["id"] in answers]
    originals, rewrites = [r["output"].strip() for r in answered], [answers[r["id"]] for r in answered]
    values = {name: scorer(rewrites, originals) for name, scorer in scorers.items()}
    verdicts = {}
    for k, record in enumerate(answered):
        agreement = {name: round(column[k], 4) for name, column in values.items()}
        problems = rewrite_problems(originals[k], rewrites[k], speakers_in_order(record), agreement,
                                    cfg.min_agreement, cfg.max_length_change)
        verdicts[record["id"]] = {"id": record["id"], "kept": not problems, "reasons": problems, "agreement": agreement,
                                  "length_change": round(len(rewrites[k]) / max(len(originals[k]), 1) - 1, 4)}
    for record in records:
        if record["id"] not in verdicts:
            reason = teacher_reasons.get(record["id"], "not sent (--limit)")
            verdicts[record["id"]] = {"id": record["id"], "kept": False, "reasons": [f"teacher: {reason}"]}
    return [verdicts[r["id"]] for r in records]


def write_rewrites(raw: list[dict], records: list[dict], answers: dict[str, str], verdicts: list[dict],
                   output: str) -> None:
    """The input's JSON with each kept rewrite as its output; ids, order, inputs and every other output as given."""
    kept = {v["id"]: answers[v["id"]] for v in verdicts if v["kept"]}
    rewritten = [{**row, "output": kept.get(record["id"], row.get("output", ""))} for row, record in zip(raw, records)]
    write_text_atomic(output, dump_submission_json(rewritten))


def print_rewrite_result(report: dict, total: int, report_path: str, cfg: RewriteSettings, console: Any) -> None:
    """How many rewrites were kept, why the rest were not, and the next command."""
    reasons = ", ".join(f"{kind} {n}" for kind, n in report["not_kept_by_reason"].items()) or "none"
    console.print(f"kept {report['kept']} of {total} rewrites; the original stays for {report['not_kept']} "
                  f"(by reason: {reasons}) -> {cfg.output}; verdicts -> {report_path}")
    console.print(f"next: {shell_command('python', 'prep.py', '--train', cfg.output)}   "
                  "(or upload it, if it holds test predictions)", markup=False, soft_wrap=True)


# magpie: an aligned chat model writes instructions from its bare user-turn prefix, then answers them
def check_magpie_settings(cfg: MagpieSettings) -> None:
    """Counts of at least 1 and a dedup threshold in [0.5, 1]."""
    for name in ("n", "batch_size", "max_new_tokens", "instruction_max_new_tokens"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name} must be at least 1")
    if not 0.5 <= cfg.dedup_threshold <= 1:
        raise UserError(f"--dedup_threshold {cfg.dedup_threshold}: must be between 0.5 and 1")


def user_turn_prefix(tokenizer: Any) -> str:
    """What the chat template puts before a user's text (Gemma 2: `<bos><start_of_turn>user\n`):
    given only this, an aligned model writes a user instruction itself (Magpie)."""
    marker = "MAGPIEUSERTEXTMARKER"
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    if marker not in rendered:
        raise UserError("the model's chat template does not show the user's text verbatim; Magpie needs a template "
                        "that does")
    return rendered.split(marker)[0]


class MagpiePairs:
    """One magpie run: the model writes instructions from the bare user-turn prefix, near-duplicates of any kept
    instruction go, and it answers the rest; each pair goes to --output or --rejects the moment it is judged."""

    def __init__(self, cfg: MagpieSettings, console: Any):
        self.cfg, self.console = cfg, console
        self.model, self.tokenizer, _ = generate.load_model(cfg.model, load_in_4bit=cfg.load_in_4bit)
        self.prefix = user_turn_prefix(self.tokenizer)
        self.kept_instructions = read_kept_instructions(cfg.output)
        self.output, self.rejects = JsonlAppender(cfg.output), JsonlAppender(cfg.rejects)

    def add_batch(self, batch: list[int]) -> None:
        """Pairs for these pair numbers: instructions, the novel ones kept, an answer to each of those."""
        cfg = self.cfg
        instructions = self.usable_texts([self.prefix] * len(batch), batch, "instruction", "instruction_max_new_tokens",
                                         cfg.temperature, cfg.top_p)
        instructions = self.drop_near_duplicates(instructions)
        if not instructions:
            return
        prompts = [self.tokenizer.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False,
                                                      add_generation_prompt=True) for _, instruction in instructions]
        instruction_of = dict(instructions)
        for index, answer in self.usable_texts(prompts, list(instruction_of), "answer", "max_new_tokens",
                                               cfg.response_temperature, cfg.response_top_p):
            self.output.write({"instruction": instruction_of[index], "input": "", "output": answer,
                               "id": magpie_id(index), "model": cfg.model})

    def usable_texts(self, prompts: list[str], indices: list[int], what: str, limit_flag: str, temperature: float,
                     top_p: float) -> list[tuple[int, str]]:
        """(pair number, text) of each usable text generated for the prompts; the pair of an unusable one (set aside
        out of memory, empty, or cut by the `limit_flag` tokens) is rejected."""
        max_new_tokens = getattr(self.cfg, limit_flag)
        set_aside: set[int] = set()
        texts = generate.generate_texts(
            self.model, self.tokenizer, prompts, batch_size=self.cfg.batch_size, max_new_tokens=max_new_tokens,
            do_sample=temperature > 0, temperature=temperature or 1.0, top_p=top_p, on_set_aside=set_aside.add,
            console=self.console, show_progress=False,
        )
        usable = []
        for position, (index, text) in enumerate(zip(indices, texts)):
            if position in set_aside:
                self.reject(index, OUT_OF_MEMORY_REASON)
            elif not text:
                self.reject(index, f"empty {what}")
            elif hit_token_limit(self.tokenizer, text, max_new_tokens):
                self.reject(index, f"truncated {what}: it hit {limit_flag}")
            else:
                usable.append((index, text))
        return usable

    def drop_near_duplicates(self, fresh: list[tuple[int, str]]) -> list[tuple[int, str]]:
        """The same dedup as prep's main run, over the kept instructions first, then this batch."""
        texts = self.kept_instructions + [instruction for _, instruction in fresh]
        novel = keep_first_of_near_duplicates(texts, self.cfg.dedup_threshold)[len(self.kept_instructions):]
        for (index, _), is_novel in zip(fresh, novel):
            if not is_novel:
                self.reject(index, "near-duplicate instruction (MinHash)")
        fresh = [pair for pair, is_novel in zip(fresh, novel) if is_novel]
        self.kept_instructions += [instruction for _, instruction in fresh]
        return fresh

    def reject(self, index: int, reason: str) -> None:
        self.rejects.write(reject_row(magpie_id(index), reason, self.cfg.model, "magpie"))

    def close(self) -> None:
        self.output.close()
        self.rejects.close()


def generate_magpie_pairs(todo: list[int], cfg: MagpieSettings, console: Any) -> tuple[int, int]:
    """Every pair number in `todo`, a batch at a time, each batch seeded from --seed and its first pair number;
    returns the pairs this run (kept, rejected)."""
    import torch

    pairs = MagpiePairs(cfg, console)
    try:
        with generate.ItemProgress(console, "pairs", len(todo)) as progress:
            for start in range(0, len(todo), cfg.batch_size):
                batch = todo[start:start + cfg.batch_size]
                torch.manual_seed(cfg.seed + batch[0])
                pairs.add_batch(batch)
                progress.advance(len(batch), f"kept {pairs.output.count}, rejected {pairs.rejects.count}")
    finally:
        pairs.close()
    return pairs.output.count, pairs.rejects.count


# The runs
def distill_main(cfg: DistillSettings) -> None:
    check_environment(needs_torch=cfg.teacher_url == "local")  # a teacher behind a URL needs no torch here
    filter_known_noise()
    from rich.console import Console

    console = Console()
    check_teacher_settings(cfg)
    cfg.rejects = rejects_path(cfg.output, cfg.rejects)
    console.rule("[bold]prep.py distill")
    print_settings(console, "settings", cfg)

    items = load_distill_items(cfg)
    done = finished_ids(cfg, cfg.format)
    todo = [item for item in items if item.id not in done]
    console.print(f"{len(items)} input rows: {len(items) - len(todo)} already done (resumed), {len(todo)} to send to "
                  f"{cfg.teacher_model}")
    ask_for_answers(todo, cfg, console)
    console.print(f"next: {shell_command('python', 'prep.py', prep_flag(cfg.input), cfg.output)}", markup=False,
                  soft_wrap=True)


def rewrite_main(cfg: RewriteSettings) -> None:
    check_environment(needs_torch=cfg.teacher_url == "local")
    filter_known_noise()
    from rich.console import Console

    console = Console()
    check_rewrite_settings(cfg)
    stem = str(Path(cfg.output).with_suffix(""))  # the answers (resumed), verdicts and rejects go next to --output
    answers_path, report_path = f"{stem}.answers.jsonl", f"{stem}.report.json"
    cfg.rejects = cfg.rejects or f"{stem}.rejects.jsonl"
    console.rule("[bold]distill.py rewrite")
    print_settings(console, "settings", cfg)

    raw, records = load_rewrite_input(cfg.input)
    ask_for_rewrites(records, answers_path, cfg, console)

    console.rule("guard: each rewrite against its original")
    scorers, skipped = load_scorers(cfg.guard_metrics, MetricModels(bertscore_model=cfg.bertscore_model), console)
    answers = read_answers(answers_path)
    verdicts = judge_rewrites(records, answers, read_reasons(cfg.rejects), scorers, cfg)
    report = rewrite_report(verdicts, skipped, cfg)
    write_rewrites(raw, records, answers, verdicts, cfg.output)
    write_text_atomic(report_path, json.dumps(report, ensure_ascii=False, indent=2) + "\n")
    print_rewrite_result(report, len(records), report_path, cfg, console)


def magpie_main(cfg: MagpieSettings) -> None:
    check_environment()
    filter_known_noise()
    from rich.console import Console

    console = Console(highlight=False)
    check_magpie_settings(cfg)
    cfg.rejects = rejects_path(cfg.output, cfg.rejects)
    started = time.time()
    console.rule("[bold]prep.py magpie")
    print_settings(console, "settings", cfg)

    done = finished_ids(cfg, "alpaca")
    todo = [index for index in range(cfg.n) if magpie_id(index) not in done]
    console.print(f"{cfg.n} pairs wanted: {cfg.n - len(todo)} already done (resumed), {len(todo)} to generate")
    if todo:
        kept, rejected = generate_magpie_pairs(todo, cfg, console)
        console.print(f"kept {kept} → {cfg.output}; rejected {rejected} → {cfg.rejects}; "
                      f"{time.time() - started:.1f}s")
    console.print(f"next: {shell_command('python', 'prep.py', '--extra', cfg.output)}", markup=False, soft_wrap=True)


# Argument parsing
def run_generator_command(argv: list[str]) -> None:
    """`prep.py distill ...` / `prep.py magpie ...`: each subcommand has its own settings and flags."""
    settings_cls, main_fn, description = GENERATOR_COMMANDS[argv[0]]
    run_cli(main_fn, parse_settings(settings_cls, argv[1:], description))


GENERATOR_COMMANDS = {
    "distill": (DistillSettings, distill_main, "Have a teacher model (OpenAI-compatible server or local) answer every "
                "input row; append to JSONL, resumably."),
    "magpie": (MagpieSettings, magpie_main, "Synthesize instruction/answer pairs from an aligned chat model given only "
               "its user-turn prefix (Magpie); append to JSONL, resumably."),
    "rewrite": (RewriteSettings, rewrite_main, "Have a teacher rewrite each summary of a competition JSON in one "
                "style; keep a rewrite only where it passes the guard; resumably."),
}


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in GENERATOR_COMMANDS:
        print(f"usage: python distill.py {{{','.join(GENERATOR_COMMANDS)}}} [--help | settings]", file=sys.stderr)
        sys.exit(2)
    run_generator_command(sys.argv[1:])
