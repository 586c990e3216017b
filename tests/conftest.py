"""Shared fixtures: a tiny Gemma 2 built on the spot (no downloads), the sample data, and a runner
for the scripts' real command lines.

The tiny model copies what the scripts rely on in google/gemma-2-9b-it: the special-token ids
(pad 0, eos 1, bos 2, unk 3, <start_of_turn> 106, <end_of_turn> 107), a tokenizer that prepends
<bos>, the official chat template, and a generation config that stops on [<eos>, <end_of_turn>].
Its tokenizer is byte-level BPE trained on data/sample, so Korean text and newlines round-trip
exactly and a sample prompt is ~200 tokens. Nothing here imports unsloth: model tests run the
scripts (or a script of their own) in a subprocess, where unsloth is imported first.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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

# tokenizer_config.json of google/gemma-2-9b-it, verbatim.
GEMMA2_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
# Gemma's first 108 ids; the 100 unused slots put the two turn markers at 106 / 107.
GEMMA2_SPECIAL_TOKENS = (
    ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "[@BOS@]"]
    + [f"<unused{i}>" for i in range(100)]
    + ["<start_of_turn>", "<end_of_turn>"]
)
PAD_ID, EOS_ID, BOS_ID, UNK_ID, START_OF_TURN_ID, END_OF_TURN_ID = 0, 1, 2, 3, 106, 107
PROMPT_SCAFFOLDING = ["[Conversation]\n", "화자", "\n\n[Question]\n", "위 ", " 주제에 대한 대화를 요약해주세요.",
                      "<start_of_turn>user\n", "<start_of_turn>model\n"]

TINY_VOCAB_SIZE = 1500
TINY_HIDDEN_SIZE = 64
# 0.02 (Gemma's own) leaves the tied embeddings so small that every logit sits near zero: greedy
# ties flip between batched and single generation, and a memorizing LoRA cannot push the loss
# below ~6. 0.1 gives clear argmax margins.
TINY_INITIALIZER_RANGE = 0.1
# vLLM's CPU attention has kernels for head_dim 64 and up, not the default fixture's 16.
VLLM_SHAPE = {"hidden_size": 128, "heads": 2, "kv_heads": 1}


def sample_texts() -> list[str]:
    """Every utterance, keyword line and summary in the competition-format sample files."""
    texts = []
    for name in ("train", "dev", "test"):
        for record in json.loads((SAMPLE_DIR / f"{name}.json").read_text(encoding="utf-8")):
            keywords = record["input"]["subject_keyword"]
            keywords = [keywords] if isinstance(keywords, str) else keywords
            texts += [f"화자{turn['speaker']}: {turn['utterance']}" for turn in record["input"]["conversation"]]
            texts += [f"위 {', '.join(keywords)} 주제에 대한 대화를 요약해주세요.", record["output"]]
    return texts


def build_tiny_tokenizer():
    """Byte-level BPE with Gemma 2's special tokens, wrapped like the real fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=GEMMA2_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(sample_texts() + PROMPT_SCAFFOLDING * 20, trainer)
    # Not GemmaTokenizer: in transformers 5 that class rebuilds its own sentencepiece-style
    # pipeline from the vocabulary, which would drop the byte-level pre-tokenizer.
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
        add_bos_token=True,
        add_eos_token=False,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=8192,
        chat_template=GEMMA2_CHAT_TEMPLATE,
    )


def build_tiny_gemma2(out_dir: Path, hidden_size: int = TINY_HIDDEN_SIZE, seed: int = 0, heads: int = 4, kv_heads: int = 2) -> Path:
    """Save a random 2-layer Gemma 2 and its tokenizer to out_dir, loadable by
    FastLanguageModel.from_pretrained(out_dir, load_in_4bit=True), vLLM and AutoTokenizer.
    head_dim is hidden_size // heads (vLLM's CPU attention needs 64: see VLLM_SHAPE)."""
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM, GenerationConfig

    out_dir = Path(out_dir)
    tokenizer = build_tiny_tokenizer()
    config = Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden_size // heads,
        query_pre_attn_scalar=hidden_size // heads,
        max_position_embeddings=8192,
        sliding_window=4096,
        initializer_range=TINY_INITIALIZER_RANGE,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Gemma2ForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=[EOS_ID, END_OF_TURN_ID], pad_token_id=PAD_ID)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    # Saved the way the real tokenizer_config.json has it, so a reload re-derives the <bos> post-processor.
    config_path = out_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text(encoding="utf-8"))
    tokenizer_config.update(add_bos_token=True, add_eos_token=False)
    config_path.write_text(json.dumps(tokenizer_config, ensure_ascii=False, indent=2), encoding="utf-8")
    return out_dir


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
