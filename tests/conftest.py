"""Shared fixtures: a tiny Gemma 2 built on the spot (no downloads; tests/tiny_model.py, which
`bash run.sh --smoke` uses too), the sample data, and a runner for the scripts' real command lines.
Nothing here imports unsloth: model tests run the scripts (or a script of their own) in a subprocess,
where unsloth is imported first.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_model import (  # noqa: F401 (the tests import these from here)
    BOS_ID, END_OF_TURN_ID, EOS_ID, GEMMA2_CHAT_TEMPLATE, GEMMA2_SPECIAL_TOKENS, PAD_ID, PROMPT_SCAFFOLDING,
    START_OF_TURN_ID, TINY_HIDDEN_SIZE, TINY_INITIALIZER_RANGE, TINY_VOCAB_SIZE, UNK_ID, VLLM_SHAPE,
    build_tiny_gemma2, build_tiny_tokenizer, sample_texts,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
# tests/run.sh builds vLLM's CPU build in a venv of its own (`import unsloth` imports vllm when it finds it).
VLLM_PYTHON = REPO_ROOT / ".venv-vllm" / "bin" / "python"
SAMPLE_DIR = REPO_ROOT / "data" / "sample"
sys.path.insert(0, str(REPO_ROOT))  # tests import prep / train / infer; pytest itself only adds tests/

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_MODE": "disabled",
    "COLUMNS": "200",  # rich wraps at 80 columns when not on a terminal, splitting the log lines tests read
}
os.environ.update(OFFLINE_ENV)


def run_script(args, *, cwd=None, env=None, timeout: float = 900, input: str | None = None, python: str | Path = sys.executable) -> subprocess.CompletedProcess:
    """Run `python <repo>/<args[0]> <args[1:]>` the way a user would, offline; text output captured.

    run_script(["train.py", "--model", tiny_model_dir, "--max_steps", "5"], cwd=tmp_path)
    run_script(["infer.py", "--engine", "vllm", ...], python=VLLM_PYTHON)   # from vLLM's venv
    """
    script, *rest = [str(arg) for arg in args]
    return subprocess.run(
        [str(python), str(REPO_ROOT / script), *rest],
        cwd=str(cwd or REPO_ROOT),
        env={**os.environ, **OFFLINE_ENV, **(env or {})},
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """A user error as the scripts promise it: exit 2, one `error: ...` line on stderr holding every fragment."""
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return SAMPLE_DIR


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_gemma2(tmp_path_factory.mktemp("tiny_gemma2"))


@pytest.fixture(name="run_script")
def run_script_fixture():
    return run_script


# A few short chat turns for `chatty_model_dir`; training on them is cheap and makes the tiny model
# end its turns with <end_of_turn> (a random one always runs to max_new_tokens).
CHATTY_TURNS = [
    ("주말에 뭐 하셨어요?", "친구를 만났어요."),
    ("좋아하는 음식이 뭐예요?", "김치찌개를 좋아해요."),
    ("여행 가고 싶은 곳은?", "제주도에 가고 싶어요."),
    ("요즘 무슨 책을 읽어요?", "소설을 읽고 있어요."),
]
_TEACH_CHATTY = """
import json, shutil, sys
import torch
from transformers import AutoTokenizer, AutoModelForCausalLM
src, dst, turns = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
shutil.copytree(src, dst, dirs_exist_ok=True)
tokenizer = AutoTokenizer.from_pretrained(src)
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}], tokenize=False) for q, a in turns]
batch = tokenizer(texts, add_special_tokens=False, return_tensors="pt", padding=True)
labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
torch.manual_seed(0)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
for _ in range(60):
    model(**batch, labels=labels).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
model.save_pretrained(dst)
"""


@pytest.fixture(scope="session")
def chatty_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model after a few steps of plain torch training on CHATTY_TURNS: its turns end, so
    distill.py magpie and distill's local teacher keep some rows. Trained in a subprocess so this
    pytest process never imports transformers ahead of unsloth."""
    out = tmp_path_factory.mktemp("chatty_model")
    subprocess.run([sys.executable, "-c", _TEACH_CHATTY, str(tiny_model_dir), str(out), json.dumps(CHATTY_TURNS, ensure_ascii=False)],
                   check=True, env={**os.environ, **OFFLINE_ENV}, capture_output=True, timeout=600)
    return out


# train.py settings that make the tiny model learn the first 4 sample summaries token-perfectly
# (found with tests/test_fixture.py); shared so the suite trains it once.
MEMORIZE_ROWS = 4
MEMORIZE_FLAGS = [
    "--max_steps", "60", "--learning_rate", "1e-2", "--lr_scheduler_type", "constant", "--warmup_steps", "0",
    "--weight_decay", "0", "--lora_r", "16", "--lora_alpha", "16", "--lora_dropout", "0",
    "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
    "--logging_steps", "10", "--save_total_limit", "60", "--max_seq_length", "1024",
]  # one step per epoch, and train.py checkpoints every epoch: all 60 kept, for the checkpoint table and merges


def prepare_memorize_rows(model_dir: Path, root: Path) -> dict:
    """prep.py on data/sample through its real command line, cut to the first MEMORIZE_ROWS training rows:
    {"prepared" (train.jsonl, dev.jsonl, stats.json), "records" (those competition records, in order)}."""
    prepared, four = root / "prepared", root / "prepared_four"
    result = run_script(["prep.py", "--train", SAMPLE_DIR / "train.json", "--dev", SAMPLE_DIR / "dev.json",
                         "--out", prepared, "--tokenizer", model_dir, "--max_seq_length", "1024"])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    four.mkdir()
    lines = (prepared / "train.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (four / "train.jsonl").write_text("".join(lines[:MEMORIZE_ROWS]), encoding="utf-8")
    for name in ("dev.jsonl", "stats.json"):
        (four / name).write_bytes((prepared / name).read_bytes())
    ids = [json.loads(line)["id"] for line in lines[:MEMORIZE_ROWS]]
    by_id = {r["id"]: r for r in json.loads((SAMPLE_DIR / "train.json").read_text(encoding="utf-8"))}
    return {"prepared": four, "records": [by_id[i] for i in ids]}


def train_memorized(model_dir: Path, root: Path, *train_flags: str) -> dict:
    """prepare_memorize_rows, then train.py on those rows through its real command line: {"prepared", "run"
    (output_dir; the adapter is run/"final"), "result" (train.py's process), "records" (the memorized records)}."""
    data = prepare_memorize_rows(model_dir, root)
    result = run_script(["train.py", "--model", model_dir, "--data", data["prepared"], "--output_dir", root / "run",
                         *MEMORIZE_FLAGS, *train_flags], cwd=root, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {**data, "run": root / "run", "result": result}


@pytest.fixture(scope="session")
def memorize_data(tiny_model_dir, tmp_path_factory) -> dict:
    """The rows and records train_memorized trains on, for tests that train them their own way."""
    return prepare_memorize_rows(tiny_model_dir, tmp_path_factory.mktemp("memorize_data"))


@pytest.fixture(scope="session")
def memorized_run(tiny_model_dir, tmp_path_factory) -> dict:
    """The tiny model after train.py memorized MEMORIZE_ROWS sample summaries (train_memorized)."""
    return train_memorized(tiny_model_dir, tmp_path_factory.mktemp("memorized"))


@pytest.fixture(scope="session")
def vllm_memorized_run(tmp_path_factory) -> dict:
    """train_memorized on a tiny Gemma 2 of VLLM_SHAPE (head_dim 64, which vLLM's CPU attention needs),
    16-bit: vLLM loads the base unquantized, so the adapter is trained on exactly the weights it is served on."""
    model_dir = build_tiny_gemma2(tmp_path_factory.mktemp("tiny_gemma2_vllm"), **VLLM_SHAPE)
    return {**train_memorized(model_dir, tmp_path_factory.mktemp("memorized_vllm"), "--no-load_in_4bit"), "base": model_dir}
