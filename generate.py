"""Model loading and generation: Unsloth's batched generate() or vLLM, behind one engine interface.

infer.py (submissions, scores, checkpoint tables) and distill.py (a local teacher, Magpie) generate through
this file; it imports common.py and prep.py only. Nothing heavy is imported at module level.

    model, tokenizer, run_config = load_model("outputs/run1/final")
    texts = generate_texts(model, tokenizer, chat_prompts, batch_size=8, max_new_tokens=1024)
    samples = sample_texts(model, tokenizer, chat_prompts, num_samples=4, temperature=0.7, top_p=0.95,
                           batch_size=8, max_new_tokens=1024)  # 4 texts per prompt
    engine = open_engine(name, run_config, EngineSettings(engine="vllm"), batch_size=8, max_seq_length=None,
                         load_in_4bit=None)
    with ItemProgress(console, "rows", len(rows)) as progress:   # a bar, or plain lines in a log
        progress.advance(1)
"""
from __future__ import annotations

import contextlib
import glob
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from common import CHECKPOINT_DIR, TRAINING_PROGRESS_KEYS, UserError, checkpoint_dirs, read_json
from prep import build_messages, drop_middle_utterances
ENGINES = ("unsloth", "vllm")
# gemma-2-9b keeps 42 layers x 2 x 8 KV heads x 256 dims x 2 bytes = 344 KB of KV cache per token:
# 32K token positions are ~11 GB, beside the ~6.5 GB of 4-bit weights on a 24 GB card.
DEFAULT_MAX_BATCH_TOKENS = 32768
# Unsloth's Gemma 2 prefill of a left-padded batch takes slow_inference_attention_softcapping
# (unsloth/models/gemma2.py:203,255-261: flash-attn only when attention_mask is None, which padding rules out),
# and that materializes every layer's rows x heads x L x L scores (unsloth/kernels/flex_attention.py:212-222):
# the scores in the model dtype, softmax's float32 copy of them and its output, then the cast back. Measured on
# the same code (tests/test_infer.py): 10 bytes a score in bfloat16 (2 + 4 + 4 while softmax runs), 8 in float32.
# Beside them the model keeps two rows x 1 x L x L masks, sliding and global (unsloth/models/llama.py:1519-1524).
SCORE_BYTES = 10
MASK_BYTES = 4  # two masks of 2 bytes (bfloat16 / float16) per position pair and row
# gemma-2-9b (16 heads): 16 x 10 + 4 = 164 bytes x L^2 a row, 8.0 GB at L = 7,000, so 4 rows (32 GB) cannot
# fit a 24 GB card. 6 GiB next to ~6.5 GB of 4-bit weights and up to ~11 GB of KV cache (--max_batch_tokens)
# gives 1 row above L = 4,400, 2 at 4,000, 4 at 3,000, 9 at 2,000 (--batch_size and --max_batch_tokens cap it first).
DEFAULT_MAX_ATTENTION_GIB = 6.0
# A length that ran out of memory at N rows caps prompts down to this share of it below N rows: the KV cache
# grows with the length and the scores with its square, so a prompt 10% shorter still needs 81% of the scores.
SAME_LENGTH_SHARE = 0.9
# Messages of allocation failures torch raises as a plain RuntimeError or torch.AcceleratorError: cuBLAS's
# handle or workspace (ATen/cuda/Exceptions.h:63-69, TORCH_CUDABLAS_CHECK: "CUDA error: CUBLAS_STATUS_ALLOC_FAILED
# when calling `cublasCreate(handle)`"), the CUDA runtime's cudaErrorMemoryAllocation (c10/cuda/CUDAException.h:31:
# "CUDA error: out of memory") and the CPU allocator ("DefaultCPUAllocator: can't allocate memory").
OUT_OF_MEMORY_MESSAGES = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "can't allocate memory")


@dataclass
class EngineSettings:
    """How the model generates; shared by infer.py and distill.py's local teacher."""
    engine: str = field(default="unsloth", metadata={"help": (
        "unsloth: Unsloth's generate() in length-sorted batches; vllm: vLLM's offline engine (continuous batching, "
        "prefix caching; its own venv, see README)"), "choices": ENGINES})
    max_batch_tokens: int = field(default=DEFAULT_MAX_BATCH_TOKENS, metadata={"help": (
        "unsloth engine: most token positions per generate() call, batch x (longest prompt + max_new_tokens); "
        "shrinks on CUDA out-of-memory, grows back after successes")})
    max_attention_gib: float = field(default=DEFAULT_MAX_ATTENTION_GIB, metadata={
        "help": "unsloth engine, Gemma 2: most GiB for one layer's prefill attention scores, rows x heads x "
                "longest prompt^2 x 10 bytes (Unsloth builds them whole for a padded batch); 6 suits a 24 GB card"})
    tensor_parallel_size: int = field(default=1, metadata={"help": "vllm engine: GPUs the model is split over"})
    gpu_memory_utilization: float = field(default=0.9, metadata={"help": (
        "vllm engine: share of each GPU's memory vLLM may take (weights + KV cache)")})
    max_model_len: int | None = field(default=None, metadata={"help": (
        "vllm engine: context length (prompt + answer); default: --max_seq_length's value")})
    dtype: str = field(default="auto", metadata={"help": (
        "vllm engine: auto (the checkpoint's), bfloat16, float16 or float32")})
    enforce_eager: bool = field(default=False, metadata={"help": (
        "vllm engine: no torch.compile / CUDA graphs (starts in seconds instead of minutes, decodes slower)")})
    vllm_base_model: str | None = field(default=None, metadata={"help": (
        "vllm engine: the 16-bit model vLLM serves the adapter on (or loads instead of a 4-bit --model); default: the "
        "training base, or for a *-bnb-4bit one its 16-bit original (vLLM has no bitsandbytes support)")})
    vllm_quantization: str | None = field(default=None, metadata={"help": (
        "vllm engine: vLLM's own quantization of the 16-bit weights as they load, e.g. fp8_per_tensor (vLLM 0.33 on "
        "a GPU: the 9B in ~9.5 GiB instead of 17.2, leaving room for KV cache on a 24 GB card)")})


def check_engine_settings(settings: EngineSettings) -> None:
    if settings.max_batch_tokens < 1 or settings.tensor_parallel_size < 1:
        raise UserError("--max_batch_tokens and --tensor_parallel_size must be at least 1")
    if not settings.max_attention_gib > 0:
        raise UserError("--max_attention_gib must be above 0")
    if not 0 < settings.gpu_memory_utilization <= 1:
        raise UserError("--gpu_memory_utilization must be in (0, 1]")
    if settings.max_model_len is not None and settings.max_model_len < 1:
        raise UserError("--max_model_len must be at least 1")


GEMMA2_CONTEXT = 8192  # Gemma 2's position limit, used when no training run says otherwise
STOP_TOKENS = ("<end_of_turn>", "<eos>")
GROW_BACK_AFTER = 4  # batches in a row without running out of memory before the token budget doubles again
# Unsloth's 4-bit checkpoints: `unsloth/gemma-2-9b-it-bnb-4bit`, `unsloth/Llama-3.2-1B-unsloth-bnb-4bit` (dynamic).
BNB_4BIT_SUFFIX = re.compile(r"-(unsloth-)?bnb-4bit$", re.IGNORECASE)
# Tensors Unsloth's fast decode path leaves on each attention module (unsloth/models/gemma2.py, llama.py).
UNSLOTH_DECODE_BUFFERS = ("paged_attention", "paged_attention_K", "paged_attention_V", "temp_QA", "temp_KV", "temp_O",
                          "RH_Q", "attention")


# ---------------------------------------------------------------------------------------------
# Model loading and batched generation
# ---------------------------------------------------------------------------------------------

def newest_final_dir(root: str | Path = "outputs") -> Path:
    """The most recently written `outputs/*/final` folder: what `python train.py` last produced."""
    finals = [Path(p) for p in glob.glob(str(Path(root) / "*" / "final")) if Path(p).is_dir()]
    if not finals:
        raise UserError(f"no trained model found in {root}/*/final: run train.py first or pass --model")
    return max(finals, key=lambda p: p.stat().st_mtime)


def looks_like_hub_id(name: str) -> bool:
    """`owner/name` whose first part is not a local folder: a local typo must not be sent to the Hub."""
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", name)) and not Path(name.split("/")[0]).exists()


def read_run_config(model_dir: Path) -> dict:
    """train.py's run_config.json next to the adapter ({} for a merged folder or a Hub id)."""
    path = model_dir / "run_config.json"
    if not path.is_file():
        return {}
    config = read_json(path)
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a JSON object")
    return config


def run_config_source(model_dir: Path) -> Path | None:
    """The folder whose run_config.json describes a model folder: its own, else, for a checkpoint-N/ without one
    (an older train.py, or a kill right after its trainer_state.json), its run's final/ or another checkpoint
    (every checkpoint of a run shares the prompt settings and max_seq_length); None when there is none."""
    if read_run_config(model_dir):
        return model_dir
    if CHECKPOINT_DIR.match(model_dir.name):
        return next((sibling for sibling in [model_dir.parent / "final", *checkpoint_dirs(model_dir.parent)]
                     if sibling != model_dir and read_run_config(sibling)), None)
    return None


def find_run_config(model_dir: Path) -> dict:
    """run_config.json of a model folder, borrowed from its run when missing (run_config_source); the borrowed
    one loses the lender's training progress (step, losses)."""
    source = run_config_source(model_dir)
    if source is None:
        return {}
    config = read_run_config(source)
    return config if source == model_dir else {k: v for k, v in config.items() if k not in TRAINING_PROGRESS_KEYS}


def default_load_in_4bit(name: str, run_config: dict) -> bool:
    """As run_config.json says; else 16-bit for a local folder of full weights (a merged model: loading it in 4 bit
    would re-quantize it); else 4-bit (an adapter on the 4-bit base, or a Hub id)."""
    if "load_in_4bit" in run_config:
        return bool(run_config["load_in_4bit"])
    if "load_in_4bit" in run_config.get("settings", {}):
        return bool(run_config["settings"]["load_in_4bit"])
    path = Path(name)
    return not (path.is_dir() and not (path / "adapter_config.json").is_file())


def trained_system_prompt(run_config: dict) -> bool:
    """Whether training merged the baseline system prompt into the user turn (inference must match)."""
    return bool(run_config.get("system_prompt", run_config.get("settings", {}).get("system_prompt", False)))


def trained_clean_inputs(run_config: dict) -> bool:
    """Whether prep.py --clean_inputs cleaned the training conversations (inference must clean the same way)."""
    return bool(run_config.get("clean_inputs", False))


def trained_target_format(run_config: dict) -> str:
    """prep.py's --target_format: "structured" models are prompted for sections and their text is flattened."""
    return run_config.get("target_format", "prose")


def trained_prompt_settings(run_config: dict) -> dict[str, Any]:
    """The three settings that shape a run's prompts, as a preference pair records them (preference.py) and a
    preference run checks them (align.py)."""
    return {"system_prompt": trained_system_prompt(run_config), "clean_inputs": trained_clean_inputs(run_config),
            "target_format": trained_target_format(run_config)}


def resolve_model(model: str | None) -> tuple[str, dict]:
    """(name or folder to load, run_config) for --model; errors name the missing folder."""
    if model is None:
        model_dir = newest_final_dir()
        return str(model_dir), read_run_config(model_dir)
    path = Path(model)
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise UserError(f"{path}: not a model folder (no config.json or adapter_config.json)")
        return str(path), find_run_config(path)
    if path.exists():
        raise UserError(f"{path}: --model must be a folder or a Hub id, not a file")
    if looks_like_hub_id(model):
        return model, {}
    raise UserError(f"{path}: model folder not found")


def load_model(path: str | None, max_seq_length: int | None = None,
               load_in_4bit: bool | None = None) -> tuple[Any, Any, dict]:
    """Load a model ready for generation: returns (model, tokenizer, run_config).

    `path` is a train.py `final/` or `checkpoint-N/` folder (LoRA adapter + tokenizer + run_config.json;
    Unsloth reads the base model from adapter_config.json), a merged model folder, a Hub id, or None for
    the newest `outputs/*/final`. `max_seq_length` defaults to the training run's, else Gemma 2's 8192;
    `load_in_4bit` as `default_load_in_4bit` says.
    The tokenizer pads on the left, as batched generation needs; run_config is {} without train.py.
    """
    name, run_config = resolve_model(path)
    import unsloth  # noqa: F401  (must patch transformers before anything imports it)
    from unsloth import FastLanguageModel

    max_seq_length = max_seq_length or run_config.get("max_seq_length") or GEMMA2_CONTEXT
    load_in_4bit = default_load_in_4bit(name, run_config) if load_in_4bit is None else load_in_4bit
    try:
        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=name,
            max_seq_length=max_seq_length,
            dtype=None,
            load_in_4bit=load_in_4bit,
        )
    except (OSError, ValueError) as err:
        raise UserError(f"{name}: could not load the model ({str(err).strip().splitlines()[0]})") from None
    FastLanguageModel.for_inference(model)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, {**run_config, "max_seq_length": max_seq_length, "loaded_from": name}


def stop_token_ids(tokenizer) -> list[int]:
    """Ids generation stops on: Gemma's `<end_of_turn>` (end of the model turn) and `<eos>`."""
    ids = {tokenizer.eos_token_id}
    for token in STOP_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return sorted(i for i in ids if i is not None)


def length_order(lengths: list[int]) -> list[int]:
    """Indices longest first: neighbours pad little, and an out-of-memory error shows up at once."""
    return sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))


def batch_tokens(size: int, longest_prompt: int, max_new_tokens: int) -> int:
    """Token positions one generate() call holds at its end: every row padded to the longest prompt, plus the new
    tokens."""
    return size * (longest_prompt + max_new_tokens)


def prefill_attention_bytes(size: int, longest_prompt: int, heads: int) -> int:
    """Peak bytes of one layer's attention while Unsloth prefills `size` rows padded to `longest_prompt`
    (see SCORE_BYTES): the scores of every head and the two masks."""
    return size * longest_prompt ** 2 * (heads * SCORE_BYTES + MASK_BYTES)


def prefill_score_heads(config) -> int:
    """Heads whose L x L scores the prefill materializes: Gemma 2's (Unsloth's softcapping path, IS_GEMMA2 in
    unsloth/models/llama.py:1405), 0 for other models, whose attention is not budgeted here."""
    return config.num_attention_heads if str(getattr(config, "model_type", "")).startswith("gemma2") else 0


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is an allocation failure that a smaller batch can avoid: torch.OutOfMemoryError (what
    bitsandbytes' 4-bit kernels raise too, allocating through torch.empty: bitsandbytes/backends/cuda/ops.py),
    Python's MemoryError, or a RuntimeError carrying one of OUT_OF_MEMORY_MESSAGES."""
    torch = sys.modules.get("torch")  # not imported here: no torch error can exist without it
    if isinstance(error, MemoryError) or (torch is not None and isinstance(error, torch.OutOfMemoryError)):
        return True
    message = str(error).lower()
    return isinstance(error, RuntimeError) and any(text.lower() in message for text in OUT_OF_MEMORY_MESSAGES)


def rows_known_to_fail(failures: list[tuple[int, int]], longest_prompt: int) -> int | None:
    """Fewest rows that ran out of memory, as (longest prompt, rows) in `failures`, at this length or one up to
    1 / SAME_LENGTH_SHARE longer; None when none did."""
    rows = [size for length, size in failures if longest_prompt >= SAME_LENGTH_SHARE * length]
    return min(rows) if rows else None


def fitting_batch_size(longest_prompt: int, max_new_tokens: int, max_batch_size: int, max_batch_tokens: int,
                       heads: int = 0, max_attention_bytes: int | None = None) -> int:
    """Most rows (at least one, at most `max_batch_size`) whose batch_tokens stay within `max_batch_tokens`
    and, for a model with `heads` budgeted (prefill_score_heads), whose prefill_attention_bytes stay within
    `max_attention_bytes`."""
    rows = min(max_batch_size, max_batch_tokens // (longest_prompt + max_new_tokens))
    if heads and max_attention_bytes is not None:
        rows = min(rows, max_attention_bytes // prefill_attention_bytes(1, longest_prompt, heads))
    return max(1, rows)


def plan_batches(lengths: list[int], max_batch_size: int, max_new_tokens: int = 0, max_batch_tokens: int | None = None,
                 heads: int = 0, max_attention_bytes: int | None = None) -> list[list[int]]:
    """The batches run_batches starts with: longest prompts first, each within the token and attention
    budgets (until an out-of-memory error shrinks them)."""
    order, batches, position = length_order(lengths), [], 0
    while position < len(order):
        size = max_batch_size if max_batch_tokens is None else fitting_batch_size(
            lengths[order[position]], max_new_tokens, max_batch_size, max_batch_tokens, heads, max_attention_bytes)
        batches.append(order[position:position + size])
        position += size
    return batches


def padding_waste(lengths: list[int], batches: list[list[int]]) -> float:
    """Share of prompt positions that are padding when each batch is padded to its longest prompt."""
    padded = sum(max(lengths[i] for i in batch) * len(batch) for batch in batches)
    return 1 - sum(lengths) / padded if padded else 0.0


def run_batches(lengths: list[int], run_batch: Callable[[list[int]], tuple[list[str], int]], *, max_new_tokens: int,
                max_batch_size: int, max_batch_tokens: int, heads: int = 0, max_attention_bytes: int | None = None,
                free_memory: Callable[[], None], on_batch: Callable[[list[int], list[str], int], None],
                on_set_aside: Callable[[int], None], say: Callable[[str], None]) -> None:
    """Run every prompt once, longest first, in batches of at most `max_batch_size` rows, `max_batch_tokens`
    token positions (batch_tokens) and, with `heads`, `max_attention_bytes` (prefill_attention_bytes).

    `run_batch(indices) -> (texts, new_tokens)`. When it raises an out-of-memory error (is_out_of_memory;
    others propagate), memory is freed and the same prompts are retried with half the rows: both budgets
    shrink to that. After GROW_BACK_AFTER batches in a row they double again, up to their maxima, so one long
    batch does not slow the whole run; but a row count that ran out of memory is not tried again for prompts of
    about the same length (rows_known_to_fail), so the run does not grow back into the same error.
    A prompt that runs out of memory alone is handed to `on_set_aside(index)` and the run goes on.
    """
    order = length_order(lengths)
    tokens, attention = max_batch_tokens, max_attention_bytes
    failures: list[tuple[int, int]] = []
    position, successes = 0, 0
    while position < len(order):
        longest = lengths[order[position]]
        size = min(fitting_batch_size(longest, max_new_tokens, max_batch_size, tokens, heads, attention),
                   len(order) - position)
        known_to_fail = rows_known_to_fail(failures, longest)
        if known_to_fail is not None:
            size = max(1, min(size, known_to_fail - 1))
        indices = order[position:position + size]
        try:
            texts, new_tokens = run_batch(indices)
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            texts = None  # freed below, outside this block: the traceback still holds the batch's tensors here
        if texts is not None:
            on_batch(indices, texts, new_tokens)
            position, successes = position + size, successes + 1
            shrunk = tokens < max_batch_tokens or (attention is not None and attention < max_attention_bytes)
            if successes >= GROW_BACK_AFTER and shrunk:
                successes, tokens = 0, min(max_batch_tokens, 2 * tokens)
                attention = None if attention is None else min(max_attention_bytes, 2 * attention)
                say(f"batch token budget back up to {tokens}")
            continue
        free_memory()
        successes = 0
        failures.append((longest, size))
        if size == 1:
            on_set_aside(indices[0])
            position += 1
            say(f"[yellow]CUDA out of memory for one prompt of {longest} tokens + {max_new_tokens} new: "
                "set aside, the rest go on")
        else:
            tokens = batch_tokens(size // 2, longest, max_new_tokens)
            if attention is not None and heads:
                attention = prefill_attention_bytes(size // 2, longest, heads)
            say(f"[yellow]CUDA out of memory at {size} x {longest + max_new_tokens} tokens: "
                f"batch token budget now {tokens}")


def free_decode_memory(model) -> None:
    """Free what an out-of-memory generate() left behind. Unsloth's fast decode path keeps the last
    batch's KV cache and scratch tensors as plain attributes of every attention module
    (unsloth/models/gemma2.py: paged_attention*, temp_*, RH_Q, attention) until the next prefill
    replaces them layer by layer; while they are referenced, torch.cuda.empty_cache() cannot return
    their memory, and the retry runs out again."""
    import torch

    for module in model.modules():
        for name in UNSLOTH_DECODE_BUFFERS:
            if isinstance(module.__dict__.get(name), torch.Tensor):
                del module.__dict__[name]
    free_accelerator_memory()


def new_token_count(row: list[int], stops: list[int], pad_id: int) -> int:
    """Tokens one row really generated: up to and including its first stop token, padding excluded."""
    for position, token in enumerate(row):
        if token in stops:
            return position + 1
    return sum(1 for token in row if token != pad_id)


def _generate_batch(model, tokenizer, batch: list[list[int]], stops: list[int],
                    generation_kwargs: dict) -> tuple[list[str], int]:
    import torch

    pad_id = tokenizer.pad_token_id
    width = max(len(ids) for ids in batch)
    input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in batch])
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch])
    device = next(model.parameters()).device
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            eos_token_id=stops,
            pad_token_id=pad_id,
            **generation_kwargs,
        )
    new_rows = out[:, width:].tolist()
    texts = [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new_rows]
    return texts, sum(new_token_count(row, stops, pad_id) for row in new_rows)


PROGRESS_EVERY_PERCENT = 5  # without a terminal, one plain progress line per this share of the items


def format_duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def progress_line(label: str, done: int, total: int, elapsed: float, note: str = "") -> str:
    """One plain line for a log: items done of total, items/s, and the time left at that rate."""
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = format_duration((total - done) / rate) if rate > 0 else "unknown"
    line = f"{label}: {done}/{total} ({done / total:.0%}), {rate:.2f} items/s, ETA {eta}"
    return line + (f", {note}" if note else "")


def crosses_report_point(before: int, after: int, total: int, every_percent: int = PROGRESS_EVERY_PERCENT) -> bool:
    """Whether going from `before` to `after` items done passes another `every_percent` of `total` (or finishes)."""
    step = max(1, -(-total * every_percent // 100))
    return after >= total or after // step > before // step


class ItemProgress:
    """Progress over a known number of items, the same for every long loop of the kit.

    On a terminal: a rich bar. Anywhere else (nohup, `> log`, Colab's `!python`) a bar shows nothing
    until the end, so a plain line (done/total, items/s, ETA) is printed every few percent instead.
        with ItemProgress(console, "generating", len(prompts)) as progress:
            progress.advance(len(batch), note="812.0 tok/s")
    """

    def __init__(self, console, label: str, total: int, *, enabled: bool = True):
        self.console, self.label, self.total, self.enabled = console, label, total, enabled
        self.done, self.started, self.bar, self.task = 0, 0.0, None, None

    def __enter__(self) -> "ItemProgress":
        self.started = time.perf_counter()
        if self.enabled and self.console.is_terminal and not self.console.is_dumb_terminal:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self.bar = Progress(TextColumn(f"[bold]{self.label}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[note]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                console=self.console)
            self.bar.start()
            self.task = self.bar.add_task(self.label, total=self.total, note="")
        return self

    def advance(self, count: int = 1, note: str = "") -> None:
        before, self.done = self.done, self.done + count
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        if self.bar is not None:
            rate = f"{self.done / elapsed:.2f} items/s"
            self.bar.update(self.task, advance=count, note=rate + (f"  {note}" if note else ""))
        elif self.enabled and crosses_report_point(before, self.done, self.total):
            self.console.print(progress_line(self.label, self.done, self.total, elapsed, note), markup=False,
                               highlight=False)

    def __exit__(self, *exc_info) -> None:
        if self.bar is not None:
            self.bar.stop()


class _Advance:
    """Moves the generation progress: items done, with tokens/s; say() prints above a bar."""

    def __init__(self, progress: ItemProgress, console):
        self.progress, self.say = progress, console.print
        self.start, self.tokens = time.perf_counter(), 0

    def __call__(self, items: int, new_tokens: int) -> None:
        self.tokens += new_tokens
        self.progress.advance(items, f"{self.tokens / max(time.perf_counter() - self.start, 1e-9):.1f} tok/s")


@contextlib.contextmanager
def generation_progress(total: int, console=None, enabled: bool = True) -> Iterator[_Advance]:
    """Progress over `total` prompts, shared by both engines: a bar on a terminal, plain lines in a log."""
    from rich.console import Console

    console = console or Console()
    with ItemProgress(console, "generating", total, enabled=enabled) as progress:
        yield _Advance(progress, console)


def generate_kwargs(max_new_tokens: int, do_sample: bool, temperature: float, top_p: float,
                    repetition_penalty: float) -> dict[str, Any]:
    """model.generate()'s sampling arguments."""
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample,
                              "repetition_penalty": repetition_penalty}
    if do_sample:
        return {**kwargs, "temperature": temperature, "top_p": top_p}
    # Checkpoints ship sampling defaults in generation_config; greedy must not inherit them.
    return {**kwargs, "temperature": None, "top_p": None, "top_k": None}


def generate_texts(
    model,
    tokenizer,
    prompts: list[str],
    *,
    batch_size: int,
    max_new_tokens: int,
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    max_attention_gib: float = DEFAULT_MAX_ATTENTION_GIB,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    on_batch: Callable[[list[int], list[str], int], None] | None = None,
    on_set_aside: Callable[[int], None] | None = None,
    console=None,
    show_progress: bool = True,
) -> list[str]:
    """Generate one completion per prompt; results come back in input order.

    `prompts` are finished chat-templated strings (they already start with `<bos>`, so they are
    tokenized without adding special tokens). They are sorted by length and left-padded in batches
    of at most `batch_size` prompts, `max_batch_tokens` token positions and, for Gemma 2, `max_attention_gib`
    of prefill attention (run_batches: shrinks on an out-of-memory error, grows back after successes);
    greedy unless `do_sample`. Each text is the decoded new tokens only, stopped at `<end_of_turn>` /
    `<eos>`, whitespace stripped.
    `on_batch(indices, texts, new_tokens)` runs after every finished batch (indices into `prompts`),
    e.g. to save progress; a prompt that does not fit in memory even alone gets "" and
    `on_set_aside(index)`. Progress goes through generation_progress (ItemProgress) unless `show_progress` is off
    (a caller that reports its own, coarser progress).
    """
    stops = stop_token_ids(tokenizer)
    encoded = [tokenizer(prompt, add_special_tokens=False)["input_ids"] for prompt in prompts]
    kwargs = generate_kwargs(max_new_tokens, do_sample, temperature, top_p, repetition_penalty)
    results = [""] * len(prompts)
    with generation_progress(len(prompts), console, enabled=show_progress) as advance:
        def finished(indices: list[int], texts: list[str], new_tokens: int) -> None:
            for index, text in zip(indices, texts):
                results[index] = text
            if on_batch is not None:
                on_batch(indices, texts, new_tokens)
            advance(len(indices), new_tokens)

        def set_aside(index: int) -> None:
            if on_set_aside is not None:
                on_set_aside(index)
            advance(1, 0)

        run_batches(
            [len(ids) for ids in encoded],
            lambda indices: _generate_batch(model, tokenizer, [encoded[i] for i in indices], stops, kwargs),
            max_new_tokens=max_new_tokens, max_batch_size=batch_size, max_batch_tokens=max_batch_tokens,
            heads=prefill_score_heads(model.config), max_attention_bytes=int(max_attention_gib * 2**30),
            free_memory=lambda: free_decode_memory(model),
            on_batch=finished, on_set_aside=set_aside, say=advance.say,
        )
    return results


def sample_texts(model, tokenizer, prompts: list[str], *, num_samples: int,
                 on_prompt: Callable[[int, list[str]], None] | None = None, **generation: Any) -> list[list[str]]:
    """`num_samples` sampled completions per prompt: texts per prompt, in input order.

    Each prompt is repeated `num_samples` times and goes through generate_texts with do_sample=True
    (`generation`: batch_size, max_new_tokens, temperature, top_p, repetition_penalty, console); the
    repeats of one prompt sort next to each other, so `on_prompt(index, texts)` fires as soon as all of a
    prompt's samples are done, e.g. to save progress. Seed the run (transformers.set_seed) to repeat it.
    """
    results: list[list[str]] = [[] for _ in prompts]

    def collect(indices: list[int], texts: list[str], new_tokens: int) -> None:
        for index, text in zip(indices, texts):
            prompt_index = index // num_samples
            results[prompt_index].append(text)
            if len(results[prompt_index]) == num_samples and on_prompt is not None:
                on_prompt(prompt_index, results[prompt_index])

    repeated = [prompt for prompt in prompts for _ in range(num_samples)]
    generate_texts(model, tokenizer, repeated, do_sample=True, on_batch=collect, **generation)
    return results


# ---------------------------------------------------------------------------------------------
# Engines: one interface over Unsloth's generate() and vLLM (main and distill.py use only this)
# ---------------------------------------------------------------------------------------------

@dataclass
class Sampling:
    """Decoding settings both engines honour: greedy unless do_sample; stop tokens are the tokenizer's."""
    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0


class UnslothEngine:
    """The default engine: Unsloth's generate() in token-budgeted, length-sorted batches (generate_texts)."""

    def __init__(self, model_name: str, settings: EngineSettings, *, batch_size: int, max_seq_length: int | None,
                 load_in_4bit: bool | None):
        self.model, self.tokenizer, self.run_config = load_model(model_name, max_seq_length, load_in_4bit)
        self.max_seq_length = self.run_config["max_seq_length"]
        self.served_on = self.run_config["loaded_from"]
        self.batch_size, self.max_batch_tokens = batch_size, settings.max_batch_tokens
        self.max_attention_gib = settings.max_attention_gib

    def generate(self, prompts: list[str], sampling: Sampling, *, on_batch=None, on_set_aside=None,
                 console=None) -> list[str]:
        return generate_texts(
            self.model, self.tokenizer, prompts, batch_size=self.batch_size, max_new_tokens=sampling.max_new_tokens,
            max_batch_tokens=self.max_batch_tokens, max_attention_gib=self.max_attention_gib,
            do_sample=sampling.do_sample, temperature=sampling.temperature, top_p=sampling.top_p,
            repetition_penalty=sampling.repetition_penalty, on_batch=on_batch, on_set_aside=on_set_aside,
            console=console,
        )

    def sample(self, prompts: list[str], n: int, sampling: Sampling, *, on_prompt=None,
               console=None) -> list[list[str]]:
        """`n` sampled completions per prompt (sample_texts); `on_prompt(index, texts)` as each prompt's are done."""
        return sample_texts(self.model, self.tokenizer, prompts, num_samples=n, on_prompt=on_prompt,
                            batch_size=self.batch_size, max_new_tokens=sampling.max_new_tokens,
                            max_batch_tokens=self.max_batch_tokens, max_attention_gib=self.max_attention_gib,
                            temperature=sampling.temperature,
                            top_p=sampling.top_p, repetition_penalty=sampling.repetition_penalty, console=console)

    def peak_memory(self) -> str:
        import torch

        return f"{torch.cuda.max_memory_reserved() / 2**30:.1f} GiB" if torch.cuda.is_available() else "n/a (no GPU)"

    def close(self) -> str:
        """Give the model's memory back (before the scorers load their own models); says what was done."""
        del self.model
        free_accelerator_memory()
        return "model released"


def adapter_rank(model_dir: Path) -> int | None:
    """The LoRA rank `r` of a PEFT adapter folder (train.py's final/), or None for a full model."""
    path = model_dir / "adapter_config.json"
    if not path.is_file():
        return None
    config = read_json(path)
    return int(config["r"]) if isinstance(config, dict) and isinstance(config.get("r"), int) else None


def vllm_lora_rank(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts (vllm/config/lora.py MaxLoRARanks) that holds `rank`."""
    allowed = (1, 8, 16, 32, 64, 128, 256, 320, 512)
    fitting = [value for value in allowed if value >= rank]
    if not fitting:
        raise UserError(f"LoRA rank {rank} is above vLLM's largest max_lora_rank ({allowed[-1]}): merge the adapter "
                        "(train.py --save_merged) and serve merged/")
    return fitting[0]


def trained_base_model(model_dir: Path, run_config: dict) -> str:
    """The model the adapter was trained on: run_config.json's base_model, else adapter_config.json's."""
    base = run_config.get("base_model")
    if not base:
        adapter = read_json(model_dir / "adapter_config.json")
        base = adapter.get("base_model_name_or_path") if isinstance(adapter, dict) else None
    if not base:
        raise UserError(f"{model_dir}: neither run_config.json nor adapter_config.json names the base model")
    return str(base)


def sixteen_bit_original(name: str) -> str | None:
    """The 16-bit checkpoint a `*-bnb-4bit` model was quantized from, or None when the name says nothing of 4 bit.

    Hub names lose the suffix: every Gemma 2 entry of Unsloth's own table (unsloth/models/mapper.py,
    __INT_TO_FLOAT_MAPPER) maps `unsloth/gemma-2-9b-it-bnb-4bit` to `unsloth/gemma-2-9b-it` this way, and
    unsloth itself is not installed beside vLLM. A local folder maps to its sibling without the suffix,
    when there is one."""
    stripped = BNB_4BIT_SUFFIX.sub("", name.rstrip("/"))
    if stripped == name.rstrip("/"):
        return None
    if Path(name).is_dir():
        return stripped if Path(stripped).is_dir() else None
    return stripped


def quantization_method(name: str) -> str | None:
    """config.json's quantization_config.quant_method of a local folder, or of a Hub model already in the local
    cache (nothing is downloaded); None when unquantized or unknown."""
    path = Path(name) / "config.json"
    if not path.is_file():
        if not looks_like_hub_id(name):
            return None
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
        if not isinstance(cached, str):
            return None
        path = Path(cached)
    config = read_json(path)
    quantization = config.get("quantization_config") if isinstance(config, dict) else None
    return quantization.get("quant_method") if isinstance(quantization, dict) else None


def is_bitsandbytes(name: str) -> bool:
    """A bitsandbytes checkpoint by its config.json, or, for a Hub name not in the cache, by its `-bnb-4bit` name."""
    if quantization_method(name) == "bitsandbytes":
        return True
    return not Path(name).exists() and bool(BNB_4BIT_SUFFIX.search(name))


def vllm_model(name: str, chosen: str | None) -> tuple[str, str]:
    """(the model vLLM loads in place of `name`, why): --vllm_base_model when given, else `name`, or its 16-bit
    original when `name` is a `*-bnb-4bit` checkpoint. Refuses a bitsandbytes checkpoint in one line naming the
    fix: vLLM has no bitsandbytes support."""
    if chosen:
        model, why = chosen, "--vllm_base_model"
    else:
        original = sixteen_bit_original(name)
        model, why = (original, f"the 16-bit original of {name}") if original else (name, "as trained")
    if is_bitsandbytes(model):
        raise UserError(f"{model}: a bitsandbytes 4-bit checkpoint, which vLLM cannot load (it has no bitsandbytes "
                        f"support); pass --vllm_base_model with the 16-bit model it was quantized from")
    return model, why


def start_error_reason(error: BaseException) -> str:
    """The line of a vLLM start-up error that says why. Its settings are checked by pydantic, whose first line is
    only "1 validation error for VllmConfig"; the reason follows as "  Value error, ... [type=value_error, ...]"."""
    lines = [line.strip() for line in str(error).strip().splitlines()] or [type(error).__name__]
    reason = next((line for line in lines if line.startswith("Value error, ")), lines[0])
    return reason.removeprefix("Value error, ").split(" [type=")[0]


def check_vllm_quantization(method: str | None) -> None:
    """Refuse in one line a --vllm_quantization the installed vLLM does not know (vLLM's own error is a traceback)."""
    if method is None:
        return
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

    if method not in QUANTIZATION_METHODS:
        raise UserError(f"--vllm_quantization {method}: not a method this vLLM knows; for the 16-bit weights as they "
                        f"load, fp8_per_tensor or fp8_per_block (vLLM 0.33)")


class VllmEngine:
    """vLLM's offline engine: continuous batching and prefix caching over the same prompts, stop tokens
    and decoding as UnslothEngine. A train.py final/ folder is applied as a LoRA adapter (LoRARequest)
    on its base model; a merged folder or Hub id is served directly. Create it only under
    `if __name__ == "__main__":` (vLLM spawns its engine process, which imports the main module)."""

    def __init__(self, model_name: str, settings: EngineSettings, *, max_seq_length: int | None, run_config: dict):
        from transformers import AutoTokenizer
        from vllm import LLM
        from vllm.lora.request import LoRARequest

        model_dir = Path(model_name)
        rank = adapter_rank(model_dir) if model_dir.is_dir() else None
        self.max_seq_length = (settings.max_model_len or max_seq_length or run_config.get("max_seq_length")
                               or GEMMA2_CONTEXT)
        self.lora = LoRARequest("final", 1, str(model_dir.resolve())) if rank else None
        self.gpu_memory_utilization, self.calls = settings.gpu_memory_utilization, 0
        trained = trained_base_model(model_dir, run_config) if rank else model_name
        served, why = vllm_model(trained, settings.vllm_base_model)
        check_vllm_quantization(settings.vllm_quantization)
        quantized = f", quantized by vLLM to {settings.vllm_quantization}" if settings.vllm_quantization else ""
        self.served_on = f"{'the adapter on ' if rank else ''}{served} ({why}{quantized})"
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_name)
            self.llm = LLM(
                model=served,
                quantization=settings.vllm_quantization,
                dtype=settings.dtype,
                tensor_parallel_size=settings.tensor_parallel_size,
                gpu_memory_utilization=settings.gpu_memory_utilization,
                max_model_len=self.max_seq_length,
                enable_prefix_caching=True,
                enable_lora=bool(rank),
                max_lora_rank=vllm_lora_rank(rank) if rank else 16,
                enforce_eager=settings.enforce_eager,
            )
        except (OSError, ValueError, RuntimeError) as err:
            raise UserError(f"{model_name}: vLLM could not start ({start_error_reason(err)}; its log above says more, "
                            f"e.g. lower --gpu_memory_utilization)") from None

    def sampling_params(self, sampling: Sampling, n: int = 1):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            output_kind=RequestOutputKind.FINAL_ONLY,
            n=n, max_tokens=sampling.max_new_tokens, stop_token_ids=stop_token_ids(self.tokenizer),
            temperature=sampling.temperature if sampling.do_sample else 0.0,
            top_p=sampling.top_p if sampling.do_sample else 1.0,
            repetition_penalty=sampling.repetition_penalty, detokenize=False,
        )

    def generate_candidates(self, prompts: list[str], sampling: Sampling, n: int, *, on_finished=None,
                            console=None) -> list[list[str]]:
        """`n` completions per prompt (n > 1 needs do_sample), in input order. vLLM schedules every
        request at once (continuous batching; the n samples of a prompt share its cached prefix);
        `on_finished(index, texts, new_tokens)` runs as each prompt completes, e.g. to save progress."""
        engine, params = self.llm.llm_engine, self.sampling_params(sampling, n)
        self.calls += 1
        for index, prompt in enumerate(prompts):
            ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            engine.add_request(f"{self.calls}-{index}", {"prompt_token_ids": ids}, params, lora_request=self.lora)
        results: list[list[str]] = [[] for _ in prompts]
        with generation_progress(len(prompts), console) as advance:
            while engine.has_unfinished_requests():
                for output in engine.step():
                    if not output.finished:
                        continue
                    index = int(output.request_id.split("-")[1])
                    results[index] = [self.tokenizer.decode(sample.token_ids, skip_special_tokens=True).strip()
                                      for sample in output.outputs]
                    new_tokens = sum(len(sample.token_ids) for sample in output.outputs)
                    if on_finished is not None:
                        on_finished(index, results[index], new_tokens)
                    advance(1, new_tokens)
        return results

    def generate(self, prompts: list[str], sampling: Sampling, *, on_batch=None, on_set_aside=None,
                 console=None) -> list[str]:
        """One completion per prompt, as UnslothEngine.generate (vLLM preempts instead of running out of memory)."""
        def finished(index: int, texts: list[str], new_tokens: int) -> None:
            if on_batch is not None:
                on_batch([index], texts, new_tokens)

        candidates = self.generate_candidates(prompts, sampling, 1, on_finished=finished, console=console)
        return [texts[0] for texts in candidates]

    def sample(self, prompts: list[str], n: int, sampling: Sampling, *, on_prompt=None,
               console=None) -> list[list[str]]:
        """`n` sampled completions per prompt in one request each (SamplingParams n: they share the prompt's cached
        prefix)."""
        def finished(index: int, texts: list[str], _new_tokens: int) -> None:
            if on_prompt is not None:
                on_prompt(index, texts)

        return self.generate_candidates(prompts, sampling, n, on_finished=finished, console=console)

    def peak_memory(self) -> str:
        return f"n/a (vLLM reserves --gpu_memory_utilization {self.gpu_memory_utilization:g} of each GPU)"

    def close(self) -> str:
        """vLLM's own shutdown (vllm/v1/engine/core_client.py, MPClient.shutdown): the engine process ends, and with it
        its hold on --gpu_memory_utilization of the card; then its distributed state and cached memory go
        (vllm/distributed/parallel_state.py, cleanup_dist_env_and_memory). Says how many engine processes ended."""
        import multiprocessing

        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        running = len(multiprocessing.active_children())
        self.llm.llm_engine.engine_core.shutdown()
        del self.llm
        cleanup_dist_env_and_memory()
        free_accelerator_memory()
        left = len(multiprocessing.active_children())
        return f"vLLM shut down, {running - left} engine process(es) ended, {left} still running"


def open_engine(model_name: str, run_config: dict, settings: EngineSettings, *, batch_size: int,
                max_seq_length: int | None, load_in_4bit: bool | None):
    """The engine --engine names, loaded and ready: `.tokenizer`, `.max_seq_length`, `.generate(prompts, sampling,
    ...)`."""
    if settings.engine == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise UserError("--engine vllm: vLLM is not installed in this Python; run infer.py from the vLLM venv "
                            "(.venv-vllm, see README: Install)") from None
        return VllmEngine(model_name, settings, max_seq_length=max_seq_length, run_config=run_config)
    return UnslothEngine(model_name, settings, batch_size=batch_size, max_seq_length=max_seq_length,
                         load_in_4bit=load_in_4bit)


# ---------------------------------------------------------------------------------------------
# Prompts that fit
# ---------------------------------------------------------------------------------------------

def chat_prompt(tokenizer, record: dict, system_prompt: bool, target_format: str = "prose") -> str:
    """The training prompt for one record, rendered by the tokenizer's chat template, ready for the model turn."""
    messages = build_messages(record, system_prompt, target_format)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _with_turns(record: dict, turns: list[dict]) -> dict:
    return {**record, "input": {**record["input"], "conversation": turns}}


def shorten_to_fit(record: dict, render: Callable[[dict], str], count_tokens: Callable[[str], int],
                   budget: int) -> tuple[str, bool]:
    """(prompt, shortened?) with the prompt at most `budget` tokens.

    Whole utterances are removed from the middle of the conversation first, as prep.py cuts training
    rows (its opening and its end carry the topic and the wrap-up); if the first and last utterances
    alone are still too long, their middles are cut. A record is never dropped: a prompt that cannot
    fit at all raises UserError.
    """
    prompt = render(record)
    if count_tokens(prompt) <= budget:
        return prompt, False
    turns = record["input"]["conversation"]
    low, high = 1, max(len(turns) - 2, 0)  # fewest middle utterances to drop so that the prompt fits
    while low < high:
        middle = (low + high) // 2
        if count_tokens(render(drop_middle_utterances(record, middle))) <= budget:
            high = middle
        else:
            low = middle + 1
    kept = drop_middle_utterances(record, high)["input"]["conversation"]
    prompt = render(_with_turns(record, kept))
    if count_tokens(prompt) <= budget:
        return prompt, True

    def cut(fraction: float) -> list[dict]:
        out = []
        for turn in kept:
            text = turn["utterance"]
            drop = int(len(text) * fraction)
            head = (len(text) - drop) // 2
            out.append({**turn, "utterance": text[:head] + text[head + drop:]})
        return out

    low_chars, high_chars = 0, 1000  # binary search over the cut share, in 1/1000 steps
    while low_chars < high_chars:
        middle = (low_chars + high_chars) // 2
        if count_tokens(render(_with_turns(record, cut(middle / 1000)))) <= budget:
            high_chars = middle
        else:
            low_chars = middle + 1
    prompt = render(_with_turns(record, cut(high_chars / 1000)))
    if count_tokens(prompt) > budget:
        raise UserError(f"record {record['id']!r}: the prompt cannot fit in {budget} tokens even without its "
                        "conversation; raise --max_seq_length or lower --max_new_tokens")
    return prompt, True


def free_accelerator_memory() -> None:
    """Return unreferenced GPU memory to the driver: after an out-of-memory batch, and between checkpoints
    (main's locals are gone once it returns)."""
    import gc

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
