"""Fine-tune Gemma 2 9B on prep.py's rows: Unsloth 4-bit LoRA (QLoRA) + TRL's SFTTrainer, resumable.

Terminal (one 24 GB GPU, the seed team's hyperparameters are the defaults):
    python prep.py                                       # data/일상대화요약_{train,dev}.json -> data/prepared/
    python train.py                                      # data/prepared/ -> outputs/gemma2-9b-dcs/final/
    python train.py                                      # same command after an interruption: resumes
    python train.py --config run.yaml --learning_rate 1e-5          # YAML holds the same names; flags win
    python train.py --per_device_train_batch_size 4 --gradient_accumulation_steps 4   # seed's 4 x 4 (48-80 GB)
    TORCH_ELASTIC_SHUTDOWN_TIMEOUT=300 torchrun --standalone --nproc_per_node 2 train.py \
        --gradient_accumulation_steps 8     # 2 GPUs (DDP), same effective 16; 300 s to checkpoint on Ctrl-C

Colab (keep output_dir on Drive so a disconnect does not lose the checkpoints):
    !python train.py --output_dir /content/drive/MyDrive/gemma2-9b-dcs

Then:
    python infer.py --model outputs/gemma2-9b-dcs --input data/일상대화요약_dev.json     # every checkpoint, scored
    python infer.py --model outputs/gemma2-9b-dcs/final --input data/일상대화요약_test.json

Preference training after SFT (align.py): DPO or KTO on infer.py's pairs, continuing the SFT adapter, which is also
the reference policy; the base model, LoRA shape and max_seq_length come from it; lr 1e-4 and 4 epochs by default:
    python infer.py --model outputs/gemma2-9b-dcs/final --input data/일상대화요약_train.json --num_samples 4 \
        --preference_out pairs.jsonl                          # the model's own candidates, scored: best vs worst
    python train.py --stage kto --init_adapter outputs/gemma2-9b-dcs/final --preference_data pairs.jsonl \
        --output_dir outputs/kto                              # resumes, checkpoints and saves final/ like SFT
    python train.py --stage dpo --init_adapter outputs/gemma2-9b-dcs/final --preference_data pairs.jsonl \
        --loss_type sigmoid sft --loss_weights 1.0 1.0 --beta 0.1 --output_dir outputs/dpo

Merging adapters (runs, seeds, or checkpoints of one run) into one, with PEFT's add_weighted_adapter:
    python train.py merge --adapters outputs/seed1/final outputs/seed2/final --method cat --output_dir outputs/merged
    python train.py merge --adapters outputs/run/checkpoint-64 outputs/run/checkpoint-96 --method linear \
        --output_dir outputs/ckpt-avg                         # the mean of two checkpoints' LoRA weights

The loss covers only the summary and the end-of-turn that closes it: prep.py writes prompt/completion
chat rows and TRL masks the prompt. `output_dir/final/` holds the LoRA adapter, the tokenizer with its
chat template and run_config.json (base model, max_seq_length, every setting, versions, losses), which
infer.py reads back. Without a GPU the same code runs on Unsloth's CPU backend: that is for tests and
smoke runs on tiny models, not for training the 9B model.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import math
import os
import shutil
import signal
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import align
from common import (UserError, build_parser, check_environment, checkpoint_dirs, filter_known_noise,
                    give_usual_file_modes, is_complete_checkpoint, load_yaml_config, parse_jsonl, read_json,
                    read_utf8_text, shell_command)
from merge import MERGE_DESCRIPTION, MergeSettings, merge_main, replace_dir, write_json

SEVEN_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class TrainSettings:
    config: str | None = field(default=None, metadata={
        "help": "YAML file with any of these settings by name; flags win"})
    stage: str = field(default="sft", metadata={
        "help": "sft on --data; dpo or kto on --preference_data from --init_adapter", "choices": list(align.STAGES)})
    init_adapter: str | None = field(default=None, metadata={
        "help": "dpo/kto: the SFT adapter to continue (RUN/final or checkpoint-N), also the reference policy"})
    preference_data: str | None = field(default=None, metadata={"help": "dpo/kto: infer.py --preference_out's pairs"})
    beta: float = field(default=0.1, metadata={"help": "dpo/kto: how close to the reference the policy stays"})
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"], metadata={
        "help": "dpo: TRL's loss names, several mix (sigmoid sft); kto: kto (default) or apo_zero_unpaired"})
    loss_weights: list[float] | None = field(default=None, metadata={"help": "dpo: a weight per --loss_type (1 each)"})
    model: str = field(default="unsloth/gemma-2-9b-it-bnb-4bit", metadata={
        "help": "base model (hub name or local dir)"})
    data: str = field(default="data/prepared", metadata={"help": "prep.py output dir: train.jsonl (+ dev.jsonl)"})
    output_dir: str = field(default="outputs/gemma2-9b-dcs", metadata={"help": "checkpoints, then final/ (adapter)"})
    max_seq_length: int = field(default=8192, metadata={
        "help": "longest prompt+summary in tokens; longer rows are refused (dpo/kto: the init adapter's)"})
    load_in_4bit: bool = field(default=True, metadata={"help": "4-bit base weights (QLoRA)"})
    lora_r: int = field(default=64, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=64, metadata={"help": "LoRA scaling numerator (alpha / r)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA path"})
    target_modules: list[str] = field(default_factory=lambda: list(SEVEN_PROJECTIONS), metadata={
        "help": "projections that get LoRA"})
    num_train_epochs: float = field(default=5.0, metadata={"help": "passes over train.jsonl (dpo/kto: 4, over pairs)"})
    max_steps: int = field(default=-1, metadata={
        "help": "stop after this many optimizer steps (-1: use num_train_epochs)"})
    per_device_train_batch_size: int = field(default=1, metadata={"help": "micro-batch; 1 fits 8192 tokens on 24 GB"})
    per_device_eval_batch_size: int = field(default=1, metadata={"help": "eval micro-batch"})
    gradient_accumulation_steps: int = field(default=16, metadata={
        "help": "micro-batches per step (1 x 16 = seed's effective 16)"})
    learning_rate: float = field(default=2e-5, metadata={"help": "peak learning rate (dpo/kto: 1e-4)"})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay"})
    warmup_steps: int = field(default=20, metadata={"help": "linear warmup steps"})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "transformers scheduler name"})
    optim: str = field(default="adamw_8bit", metadata={
        "help": "transformers optimizer name (CPU swaps 8-bit for torch AdamW)"})
    seed: int = field(default=42, metadata={"help": "seed for LoRA init, shuffling and dropout"})
    logging_steps: int = field(default=1, metadata={"help": "log train loss every N steps"})
    save_steps: int = field(default=0, metadata={"help": "also checkpoint every N steps (0: only at each epoch end)"})
    eval_steps: int = field(default=0, metadata={
        "help": "also evaluate on dev every N steps (0: only at each epoch end)"})
    save_total_limit: int = field(default=2, metadata={"help": "checkpoints kept in output_dir (older ones deleted)"})
    report_to: str = field(default="none", metadata={"help": "tracker: none, wandb, tensorboard, ..."})
    resume_from_checkpoint: str | None = field(default=None, metadata={
        "help": "checkpoint dir to resume from (default: the last one in output_dir)"})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "start from scratch over a finished or interrupted run"})
    save_merged: bool = field(default=False, metadata={"help": "also write a merged 16-bit model to output_dir/merged"})
    push_to_hub: str | None = field(default=None, metadata={
        "help": "upload the adapter to this hub repo, created private (needs HF_TOKEN)"})
    hub_public: bool = field(default=False, metadata={
        "help": "create the --push_to_hub repo public instead of private"})


@dataclass
class RunData:
    """The rows a run trains on, and what run_config.json records about where they came from."""
    train_rows: list[dict]  # prep.py's rows (sft) or preference pairs (dpo/kto)
    dev_rows: list[dict]  # none for dpo/kto
    stats: dict  # sft: prep's stats.json; dpo/kto: the init run's prompt settings
    extra: dict | None  # dpo/kto: the run_config keys beyond SFT's
    longest: int = 0  # the longest row in tokens, once measure_rows has counted them


@dataclass
class Device:
    """Where the run trains: the card (or the CPU), the processes torchrun started, the precision it supports."""
    name: str
    on_gpu: bool
    world_size: int
    main_process: bool
    bf16: bool


@dataclass
class Training:
    """What the stages after the build share: the model with its LoRA, its tokenizer, the trainer, the stop."""
    model: Any
    tokenizer: Any
    trainer: Any
    stop: Any  # save_and_stop_on_request's callback


# ---------------------------------------------------------------------------------------------
# Checks: settings, prep.py's rows, the output directory
# ---------------------------------------------------------------------------------------------

def check_settings(cfg: TrainSettings) -> None:
    """Every setting in its range (and the stage's loss settings) before anything loads: one line if not."""
    positive = ["max_seq_length", "lora_r", "lora_alpha", "per_device_train_batch_size",
                "per_device_eval_batch_size", "gradient_accumulation_steps", "logging_steps", "save_total_limit"]
    for name in positive:
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name} must be a positive integer, got {getattr(cfg, name)}")
    for name in ["save_steps", "eval_steps", "warmup_steps", "weight_decay"]:
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name} must be 0 or more, got {getattr(cfg, name)}")
    if not cfg.learning_rate > 0:
        raise UserError(f"--learning_rate must be positive, got {cfg.learning_rate}")
    if not 0 <= cfg.lora_dropout < 1:
        raise UserError(f"--lora_dropout must be in [0, 1), got {cfg.lora_dropout}")
    if cfg.max_steps == 0 or cfg.max_steps < -1:
        raise UserError(f"--max_steps must be a positive integer or -1 (use num_train_epochs), got {cfg.max_steps}")
    if cfg.max_steps == -1 and not cfg.num_train_epochs > 0:
        raise UserError(f"--num_train_epochs must be positive, got {cfg.num_train_epochs}")
    if not cfg.target_modules:
        raise UserError("--target_modules needs at least one module name")
    align.check_stage_settings(cfg)


def _check_messages(value: Any, role: str) -> bool:
    return (
        isinstance(value, list) and len(value) >= 1
        and all(isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in ("user", "assistant")
                for m in value)
        and value[-1]["role"] == role and value[-1]["content"].strip() != ""
    )


def validate_row(row: Any, line_no: int, path: Path) -> dict:
    """One prep.py row: {"id", "prompt": [... user turn], "completion": [assistant turn]}; returns the row."""
    row_id = row.get("id") if isinstance(row, dict) else None
    where = f"{path} line {line_no}" + (f" (id {row_id!r})" if row_id is not None else "")
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object per line, got {type(row).__name__}")
    if not _check_messages(row.get("prompt"), "user"):
        raise UserError(f"{where}: field 'prompt' must be a list of chat messages ending with a non-empty user turn")
    completion = row.get("completion")
    if not (_check_messages(completion, "assistant") and len(completion) == 1):
        raise UserError(f"{where}: field 'completion' must be one non-empty assistant message (the summary)")
    return row


def read_rows(path: Path) -> list[dict]:
    """All rows of a prep.py JSONL file; errors name the file, the line and the field."""
    text = read_utf8_text(path)
    return [validate_row(row, line_no, path) for line_no, row in parse_jsonl(text, path)]


def load_prepared(data_dir: str) -> tuple[list[dict], list[dict], dict]:
    """(train rows, dev rows, prep's stats.json or {}) from prep.py's output directory."""
    root = Path(data_dir)
    hint = f"run `python prep.py --out {data_dir}` first"
    if not root.is_dir():
        raise UserError(f"{data_dir}: data directory not found; {hint}")
    train_path = root / "train.jsonl"
    if not train_path.is_file():
        raise UserError(f"{train_path}: file not found; {hint}")
    train = read_rows(train_path)
    if not train:
        raise UserError(f"{train_path}: no rows to train on; {hint}")
    dev_path = root / "dev.jsonl"
    dev = read_rows(dev_path) if dev_path.is_file() else []
    stats = read_json(root / "stats.json") if (root / "stats.json").is_file() else {}
    return train, dev, stats if isinstance(stats, dict) else {}


def to_trl_rows(rows: list[dict]) -> list[dict]:
    """Only the two columns TRL templates: the user turn(s) and the summary."""
    return [{"prompt": row["prompt"], "completion": row["completion"]} for row in rows]


def count_tokens(tokenizer, row: dict) -> int:
    """Length of the training sequence exactly as TRL builds it: the chat template over prompt + completion."""
    messages = row["prompt"] + row["completion"]
    return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])


def check_lengths(rows: list[dict], lengths: list[int], max_seq_length: int, path: str) -> None:
    """Refuse rows that would be truncated: truncation keeps the start and would cut the summary."""
    for row, length in zip(rows, lengths):
        if length > max_seq_length:
            over = sum(n > max_seq_length for n in lengths)
            raise UserError(
                f"{path}: row id {row.get('id')!r} is {length} tokens, longer than --max_seq_length {max_seq_length} "
                f"({over} row(s) over) and truncation would cut its summary; re-run `python prep.py --max_seq_length "
                f"{max_seq_length} --tokenizer <model>` (its length policy cuts middle utterances of long dialogues "
                f"and drops long augmentation rows) or raise --max_seq_length"
            )


def steps_per_epoch(n_rows: int, batch_size: int, grad_accum: int, world_size: int = 1) -> int:
    """HF Trainer's count: micro-batches per process (accelerate deals whole batches round-robin to the
    processes and pads the last round), then optimizer steps (a partial accumulation counts)."""
    micro_batches = math.ceil(math.ceil(n_rows / batch_size) / world_size)
    return max(math.ceil(micro_batches / grad_accum), 1)


def total_steps(cfg: TrainSettings, per_epoch: int) -> int:
    return cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * per_epoch)


def is_finished_run(output_dir: Path) -> bool:
    return (output_dir / "final" / "run_config.json").is_file()


def find_resumable_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint; transformers' get_last_checkpoint would also pick a half-written one."""
    return next((p for p in checkpoint_dirs(output_dir) if is_complete_checkpoint(p)), None)


def resolve_resume(cfg: TrainSettings) -> Path | None:
    output_dir = Path(cfg.output_dir)
    if cfg.resume_from_checkpoint:
        path = Path(cfg.resume_from_checkpoint)
        if not is_complete_checkpoint(path):
            raise UserError(f"--resume_from_checkpoint {path}: not a complete checkpoint "
                            "(no readable trainer_state.json)")
        return path
    if cfg.overwrite_output_dir:
        return None
    if is_finished_run(output_dir):
        raise UserError(
            f"{output_dir}: holds a finished run (final/run_config.json); pass --overwrite_output_dir to train again "
            "from scratch, or choose another --output_dir"
        )
    return find_resumable_checkpoint(output_dir)


def clear_previous_run(output_dir: Path) -> None:
    """--overwrite_output_dir: remove what an earlier run of this script wrote, nothing else."""
    for path in checkpoint_dirs(output_dir):
        shutil.rmtree(path)
    for name in ("final", "merged"):
        if (output_dir / name).exists():
            shutil.rmtree(output_dir / name)


def interrupted_message(output_dir: Path, how: str = "interrupted") -> str:
    """What a Ctrl-C or a SIGTERM leaves behind, as it is: the newest complete checkpoint, or nothing."""
    checkpoint = find_resumable_checkpoint(output_dir)
    if checkpoint is None:
        return f"{how} before the first checkpoint: nothing was saved in {output_dir}; the same command starts over"
    return f"{how}: {checkpoint} is saved; run the same command again to resume from it"


def infer_command(model: Path, input_file: str) -> str:
    """The infer.py command for `model`, shell-quoted: a path with a space pastes as one word."""
    return shell_command("python", "infer.py", "--model", model, "--input", input_file)


def merge_space_problem(need_bytes: int, free_bytes: int | None, where: Path) -> str | None:
    """Why a 16-bit merge will not fit in `where`, or None. The merge downloads the 16-bit base into the
    target folder and overwrites it shard by shard, so its peak is one 16-bit copy; unsloth_zoo's own guard
    keeps 5% spare, and so does this."""
    if free_bytes is None or free_bytes * 0.95 >= need_bytes:
        return None
    return (f"--save_merged needs about {need_bytes / 0.95 / 2**30:.1f} GiB free in {where} for the 16-bit merge, "
            f"{free_bytes / 2**30:.1f} GiB free; free some space or drop --save_merged")


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------

def loss_curves(log_history: list[dict]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(train, eval) as (step, loss) points from Trainer's log history."""
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e and "step" in e]
    return train, evals


def plot_loss(log_history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = loss_curves(log_history)
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss (dev)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def library_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {"python": sys.version.split()[0]}
    for name in ("unsloth", "unsloth_zoo", "torch", "transformers", "trl", "peft", "datasets", "accelerate",
                 "bitsandbytes"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def build_run_config(cfg: TrainSettings, stats: dict, device: str, log_history: list[dict],
                     global_step: int, epoch: float | None, n_train: int, n_dev: int,
                     extra: dict | None = None) -> dict:
    """What travels with the adapter (final/ and every checkpoint-N/); infer.py reads base_model,
    max_seq_length, load_in_4bit, system_prompt, clean_inputs, target_format and data_dir back.
    `extra` (a dpo/kto run's inputs and init run's data_dir) goes over the rest."""
    train, evals = loss_curves(log_history)
    return {
        "stage": cfg.stage,
        "base_model": cfg.model,
        "max_seq_length": cfg.max_seq_length,
        "load_in_4bit": cfg.load_in_4bit,
        "system_prompt": bool(stats.get("system_prompt", False)),
        "clean_inputs": bool(stats.get("clean_inputs", False)),
        "target_format": stats.get("target_format", "prose"),
        "settings": dataclasses.asdict(cfg),
        # settings.data is as typed (often relative): the output guard finds the training rows here from any folder
        "data_dir": str(Path(cfg.data).resolve()),
        "versions": library_versions(),
        "device": device,
        "train_rows": n_train,
        "eval_rows": n_dev,
        **({"preference_pairs": n_train} if cfg.stage != "sft" else {}),  # the pairs trained on: those that fit
        "global_step": global_step,
        "epoch": epoch,
        "train_loss": train[-1][1] if train else None,
        "eval_loss": evals[-1][1] if evals else None,
        **(extra or {}),
    }


def settings_table(cfg: TrainSettings, facts: dict[str, Any]):
    from rich.table import Table

    table = Table(title="train.py", show_header=False, title_justify="left")
    table.add_column(style="cyan")
    table.add_column()
    for key, value in facts.items():
        table.add_row(key, f"[bold]{value}[/bold]")
    table.add_section()
    for key, value in dataclasses.asdict(cfg).items():
        table.add_row(key, ", ".join(map(str, value)) if isinstance(value, list) else str(value))
    return table


def first_line(err: Exception) -> str:
    """An exception as one line: its message's first line, or its type's name when it has none."""
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def losses_line(run_config: dict, log_history: list[dict]) -> str:
    """The last train and eval loss, and for dpo/kto how the reward margin moved."""
    named = (("train loss", "train_loss"), ("eval loss", "eval_loss"))
    losses = ", ".join(f"{name} {run_config[key]:.4f}" for name, key in named if run_config[key] is not None)
    return losses + align.margin_note(log_history)


# ---------------------------------------------------------------------------------------------
# What the stages put together: processes, Ctrl-C and SIGTERM, the model and its trainer
# ---------------------------------------------------------------------------------------------

def is_main_process() -> bool:
    """torchrun and accelerate launch start one copy of this script per GPU, numbered by RANK."""
    return int(os.environ.get("RANK", "0")) == 0


def use_plain_cpu_device(environ: typing.MutableMapping[str, str]) -> None:
    """For CPU runs. With several processes accelerate names each one's device cpu:<local rank modulo the CPU
    device count>, and Trainer resuming with several processes loads optimizer.pt with map_location=args.device,
    which torch.load refuses for any CPU location but "cpu". ACCELERATE_TORCH_DEVICE is the device accelerate
    takes as given instead (a GPU run keeps cuda:<local rank>, which torch.load accepts)."""
    environ.setdefault("ACCELERATE_TORCH_DEVICE", "cpu")


class Terminated(KeyboardInterrupt):
    """SIGTERM (a spot instance's preemption, a scheduler, torchrun passing on a stop) handled like Ctrl-C."""


def raise_terminated(signum, frame):
    raise Terminated()


def shutdown_timeout_warning(environ: typing.Mapping[str, str]) -> str | None:
    """Under torchrun, a Ctrl-C or SIGTERM reaches the agent, which passes it on to the processes (each in a
    session of its own) and SIGKILLs them TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds later, 30 by default: less
    than one 16-micro-batch step at 8192 tokens plus a checkpoint may take. `torchrun --shutdown-timeout N`
    does the same but is invisible to the processes; its variable form, PET_SHUTDOWN_TIMEOUT, is not."""
    if int(environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" in environ or "PET_SHUTDOWN_TIMEOUT" in environ:
        return None
    return ("TORCH_ELASTIC_SHUTDOWN_TIMEOUT is not set: on Ctrl-C or SIGTERM torchrun kills the processes after 30 s, "
            "maybe before the step ends and its checkpoint is written; start it as "
            "`TORCH_ELASTIC_SHUTDOWN_TIMEOUT=300 torchrun ...` (ignore this if you passed --shutdown-timeout)")


def load_lora_model(cfg: TrainSettings):
    """The base model (4-bit unless --no-load_in_4bit) with fresh LoRA adapters, and its tokenizer."""
    from unsloth import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=cfg.model,
        max_seq_length=cfg.max_seq_length,
        dtype=None,
        load_in_4bit=cfg.load_in_4bit,
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules,
        bias="none",
        use_gradient_checkpointing="unsloth",
        random_state=cfg.seed,
        max_seq_length=cfg.max_seq_length,
    )
    return model, tokenizer


def add_run_config_to_checkpoints(trainer, make_run_config: Callable[[Any], dict]) -> None:
    """Every checkpoint-N/ gets a run_config.json like final/'s (at its own step), so `infer.py --model
    .../checkpoint-N` uses the run's prompt settings and max_seq_length, and its checkpoint table the losses."""
    from transformers import TrainerCallback

    class RunConfigInCheckpoints(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and checkpoint.is_dir():
                write_json(checkpoint / "run_config.json", make_run_config(state))
                give_usual_file_modes(checkpoint)  # safetensors leaves the weights 0600, unreadable to a teammate

    trainer.add_callback(RunConfigInCheckpoints())


def every_epoch_too(has_dev: bool):
    """Trainer checkpoints (and evaluates) either per epoch or per N steps; this run wants both."""
    from transformers import TrainerCallback

    class EveryEpochToo(TrainerCallback):
        def __init__(self):
            self.saved_at = self.evaluated_at = -1

        def on_save(self, args, state, control, **kwargs):
            self.saved_at = state.global_step

        def on_evaluate(self, args, state, control, **kwargs):
            self.evaluated_at = state.global_step

        def on_epoch_end(self, args, state, control, **kwargs):
            control.should_save = control.should_save or self.saved_at != state.global_step
            if has_dev:
                control.should_evaluate = control.should_evaluate or self.evaluated_at != state.global_step

    return EveryEpochToo()


def training_args(cfg: TrainSettings, bf16: bool) -> dict[str, Any]:
    """The Trainer settings every stage shares, all explicit (Unsloth's GPU trainers change some defaults)."""
    return dict(
        output_dir=cfg.output_dir,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_steps,
        lr_scheduler_type=cfg.lr_scheduler_type,
        optim=cfg.optim,
        seed=cfg.seed,
        bf16=bf16,
        fp16=not bf16,
        logging_steps=cfg.logging_steps,
        save_strategy="steps" if cfg.save_steps else "epoch",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        report_to=cfg.report_to,
        # Several GPUs (torchrun): every LoRA weight gets a gradient each step, and the search for unused ones
        # breaks under gradient checkpointing; Unsloth's GPU trainer picks False for LoRA too (_ddp_defaults.py).
        ddp_find_unused_parameters=False,
    )


def build_trainer(cfg: TrainSettings, model, tokenizer, train_rows: list[dict], dev_rows: list[dict], bf16: bool):
    """TRL's SFTTrainer over prep's prompt/completion rows: TRL templates them and masks the prompt."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        **training_args(cfg, bf16),
        eval_strategy=("steps" if cfg.eval_steps else "epoch") if dev_rows else "no",
        eval_steps=cfg.eval_steps or None,
        max_length=cfg.max_seq_length,
        packing=False,
        completion_only_loss=True,
    )
    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(to_trl_rows(train_rows)),
        eval_dataset=Dataset.from_list(to_trl_rows(dev_rows)) if dev_rows else None,
        processing_class=tokenizer,
        callbacks=[every_epoch_too(bool(dev_rows))],
    )


def save_and_stop_on_request():
    """A callback: once `requested` is set (by Ctrl-C or SIGTERM), the Trainer checkpoints at the end of the current
    optimizer step and stops. Under torchrun every process must stop at the same step, or the others wait
    forever in the next all-reduce: the processes agree on the request each step (one tiny all-reduce)."""
    import torch
    import torch.distributed as dist
    from transformers import TrainerCallback

    class SaveAndStopOnRequest(TrainerCallback):
        requested = False
        stopped = False
        signal_name = "Ctrl-C"  # what asked for the stop, for the closing message

        def agreed(self, args) -> bool:
            if not (dist.is_available() and dist.is_initialized()):
                return self.requested
            flag = torch.tensor([int(self.requested)], device=args.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            return bool(flag.item())

        def on_step_end(self, args, state, control, **kwargs):
            if self.agreed(args):
                control.should_save = control.should_training_stop = True
                self.stopped = True

        def on_epoch_end(self, args, state, control, **kwargs):
            if self.stopped:
                control.should_evaluate = False  # a dev pass would only delay the exit

    return SaveAndStopOnRequest()


@contextlib.contextmanager
def checkpoint_on_stop_signal(stop, console):
    """While training, the first Ctrl-C or SIGTERM asks `stop` for a checkpoint at the step's end; a second
    one of either interrupts at once, leaving the newest complete checkpoint."""
    def request_stop(signum, frame):
        stop.requested = True
        stop.signal_name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, raise_terminated)
        console.print(f"[yellow]{stop.signal_name}: saving a checkpoint when this optimizer step ends, then stopping "
                      "(Ctrl-C or SIGTERM again stops at once, without it)[/yellow]")

    previous = {signum: signal.signal(signum, request_stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def evaluate_without_half_precision_cast(trainer) -> None:
    """trainer.evaluate() outside training honours bf16/fp16_full_eval, which Unsloth turns on with bf16/fp16
    training: HF Trainer then casts the whole model in place to half precision (norms and embeddings too) and
    never casts back, so final/ and --save_merged would get the cast weights. Evaluate as trained instead."""
    trainer.args.bf16_full_eval = trainer.args.fp16_full_eval = False
    trainer.evaluate()


def check_merge_space(model, output_dir: Path) -> None:
    from unsloth_zoo.disk_utils import free_bytes, model_16bit_bytes

    problem = merge_space_problem(model_16bit_bytes(model), free_bytes(output_dir), output_dir)
    if problem:
        raise UserError(problem)


def save_merged(model, tokenizer, output_dir: Path, run_config: dict) -> None:
    """base + adapter in 16 bit to output_dir/merged; final/ is already saved, so any failure is one line."""
    check_merge_space(model, output_dir)
    staging = output_dir / ".merged.partial"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.save_pretrained_merged(str(staging), tokenizer, save_method="merged_16bit")
    except Exception as err:  # download, disk, memory or backend: the adapter is safe whatever it was
        shutil.rmtree(staging, ignore_errors=True)
        raise after_final_failed("--save_merged", err, output_dir) from None
    # The merged weights are 16-bit: re-quantizing them at inference would not be the model that was merged.
    write_json(staging / "run_config.json",
               {**run_config, "load_in_4bit": False, "merged_from": str(output_dir / "final")})
    replace_dir(staging, output_dir / "merged")


def push_adapter(model, tokenizer, repo_id: str, private: bool, output_dir: Path) -> None:
    """Adapter + tokenizer to the hub; `private` applies when the upload creates the repo."""
    try:
        model.push_to_hub(repo_id, private=private)
        tokenizer.push_to_hub(repo_id, private=private)
    except Exception as err:  # network, token, permissions: the adapter is safe whatever it was
        raise after_final_failed("--push_to_hub", err, output_dir) from None


def after_final_failed(flag: str, err: Exception, output_dir: Path) -> UserError:
    """A step after final/ was written failed: one line that says so and that the adapter is kept."""
    return UserError(f"{flag} failed ({type(err).__name__}: {first_line(err)}); "
                     f"the adapter in {output_dir / 'final'} is saved")


# ---------------------------------------------------------------------------------------------
# The stages, in the order main runs them, then main
# ---------------------------------------------------------------------------------------------

def load_data(cfg: TrainSettings, console) -> RunData:
    """prep.py's train and dev rows (sft), or the preference pairs and the init run's settings (dpo/kto)."""
    console.rule("[bold]Data")
    if cfg.stage == "sft":
        train_rows, dev_rows, stats = load_prepared(cfg.data)
        console.print(f"{cfg.data}: {len(train_rows)} train rows, {len(dev_rows)} dev rows")
        return RunData(train_rows, dev_rows, stats, None)
    pairs, prompt_settings, extra = align.load_stage_data(cfg)
    console.print(f"{cfg.preference_data}: {len(pairs)} preference pairs")
    return RunData(pairs, [], prompt_settings, extra)


def choose_device(cfg: TrainSettings, console) -> Device:
    """The GPU, or Unsloth's CPU backend with a warning; torchrun's processes; then the seed."""
    import torch
    from transformers import set_seed
    from unsloth import is_bfloat16_supported

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        name = torch.cuda.get_device_name(0)
    else:
        name = f"CPU ({torch.get_num_threads()} threads)"
        console.print("[yellow]CPU run: no GPU found, so this goes through Unsloth's CPU backend "
                      "(meant for tests and smoke runs on tiny models, not for the 9B model).[/yellow]")
        if cfg.save_merged and cfg.load_in_4bit:
            raise UserError("--save_merged on the CPU backend needs --no-load_in_4bit "
                            "(it cannot merge into 4-bit weights)")
        use_plain_cpu_device(os.environ)
    if world_size > 1:
        name = f"{world_size} processes x {name}"
    warning = shutdown_timeout_warning(os.environ)
    if warning:
        console.print(f"[yellow]{warning}[/yellow]")
    set_seed(cfg.seed)
    return Device(name, on_gpu, world_size, is_main_process(), bool(is_bfloat16_supported()))


def load_tokenizer(model: str):
    """The base model's tokenizer, to measure the rows before the model loads."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as err:
        raise UserError(f"--model {model}: cannot load its tokenizer ({first_line(err)})") from None


def measure_rows(cfg: TrainSettings, data: RunData, console) -> RunData:
    """Every row's length in tokens: SFT refuses a row over --max_seq_length, dpo/kto leaves such a pair out."""
    tokenizer = load_tokenizer(cfg.model)
    train_rows = data.train_rows
    if cfg.stage == "sft":
        train_lengths = [count_tokens(tokenizer, row) for row in train_rows]
        check_lengths(train_rows, train_lengths, cfg.max_seq_length, f"{cfg.data}/train.jsonl")
    else:
        count = functools.partial(count_tokens, tokenizer)
        train_rows, train_lengths = align.fit_pairs(cfg, train_rows, count, console)
    dev_lengths = [count_tokens(tokenizer, row) for row in data.dev_rows]
    check_lengths(data.dev_rows, dev_lengths, cfg.max_seq_length, f"{cfg.data}/dev.jsonl")
    return dataclasses.replace(data, train_rows=train_rows, longest=max(train_lengths + dev_lengths))


def show_settings(cfg: TrainSettings, data: RunData, device: Device, resume: Path | None, console) -> None:
    """The facts of this run (device, rows, steps, resume), then every resolved setting, as one table."""
    trainer_rows = len(data.train_rows) * (2 if cfg.stage == "kto" else 1)  # KTO: a row per answer
    per_epoch = steps_per_epoch(trainer_rows, cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps,
                                device.world_size)
    if cfg.stage == "sft":
        rows = {"train rows": len(data.train_rows), "dev rows": len(data.dev_rows) or "none (no eval loss)"}
    else:
        rows = {"preference pairs": len(data.train_rows),
                "reference policy": f"{cfg.init_adapter} (TRL's frozen copy)"}
    console.print(settings_table(cfg, {
        "device": device.name,
        **rows,
        "longest row (tokens)": data.longest,
        "effective batch": cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * device.world_size,
        "steps per epoch": per_epoch,
        "total steps": total_steps(cfg, per_epoch),
        f"system prompt (from {'prep' if cfg.stage == 'sft' else 'the init adapter'})":
            bool(data.stats.get("system_prompt", False)),
        "resume from": str(resume) if resume else "start",
    }))


def run_config_at(cfg: TrainSettings, data: RunData, device: Device, state) -> dict:
    """build_run_config at a trainer state: a checkpoint's on save, final/'s after training."""
    return build_run_config(cfg, data.stats, device.name, state.log_history, state.global_step, state.epoch,
                            len(data.train_rows), len(data.dev_rows), data.extra)


def build_run_trainer(cfg: TrainSettings, data: RunData, device: Device, console) -> Training:
    """The model with LoRA (dpo/kto: holding the init adapter's weights) and the stage's trainer, which writes
    run_config.json into every checkpoint and stops at a step's end on Ctrl-C or SIGTERM."""
    console.rule("[bold]Model")
    model, tokenizer = load_lora_model(cfg)
    if cfg.stage != "sft":
        align.load_init_weights(model, cfg.init_adapter)
    if cfg.save_merged:
        check_merge_space(model, Path(cfg.output_dir))  # now, not after hours of training
    if cfg.stage == "sft":
        trainer = build_trainer(cfg, model, tokenizer, data.train_rows, data.dev_rows, device.bf16)
    else:
        trainer = align.build_preference_trainer(cfg, model, tokenizer, data.train_rows,
                                                 training_args(cfg, device.bf16), [every_epoch_too(has_dev=False)])
    add_run_config_to_checkpoints(trainer, functools.partial(run_config_at, cfg, data, device))
    stop = save_and_stop_on_request()
    trainer.add_callback(stop)
    # Read back from the trainer: Unsloth's CPU backend may turn fp16 / bf16 off where the CPU lacks them.
    precision = "bf16" if trainer.args.bf16 else "fp16" if trainer.args.fp16 else "fp32"
    optimizer = getattr(trainer.args.optim, "value", trainer.args.optim)
    console.print(f"LoRA r {cfg.lora_r} on {', '.join(cfg.target_modules)}; precision {precision}; "
                  f"optimizer {optimizer}")
    return Training(model, tokenizer, trainer, stop)


def fit(cfg: TrainSettings, run: Training, resume: Path | None, has_dev: bool, console) -> None:
    """Train from the start or from `resume`; a stop asked for by Ctrl-C or SIGTERM ends here, its checkpoint
    written; then the last dev evaluation if the run did not end with one."""
    console.rule("[bold]Train")
    if cfg.overwrite_output_dir and not cfg.resume_from_checkpoint and is_main_process():
        clear_previous_run(Path(cfg.output_dir))
    run.trainer.accelerator.wait_for_everyone()  # no process starts writing checkpoints into a folder being cleared
    if resume:
        console.print(f"Resuming from {resume}")
    with checkpoint_on_stop_signal(run.stop, console):
        run.trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if run.stop.stopped:
        raise Terminated if run.stop.signal_name == "SIGTERM" else KeyboardInterrupt
    if cfg.stage != "sft":
        align.drop_reference_adapter(run.model)
    if has_dev and not loss_curves(run.trainer.state.log_history)[1]:
        evaluate_without_half_precision_cast(run.trainer)  # every process: evaluation is collective


def save_final(cfg: TrainSettings, data: RunData, device: Device, run: Training, console) -> dict:
    """final/: adapter, tokenizer, loss plot and run_config.json, swapped in whole; returns the run_config."""
    console.rule("[bold]Save")
    output_dir = Path(cfg.output_dir)
    run_config = run_config_at(cfg, data, device, run.trainer.state)
    staging = output_dir / ".final.partial"
    if staging.exists():
        shutil.rmtree(staging)
    run.model.save_pretrained(str(staging))
    run.tokenizer.save_pretrained(str(staging))
    (plot_loss if cfg.stage == "sft" else align.plot_preference)(run.trainer.state.log_history, staging / "loss.png")
    write_json(staging / "run_config.json", run_config)
    replace_dir(staging, output_dir / "final")
    console.print(f"adapter, tokenizer, run_config.json and loss.png -> {output_dir / 'final'}")
    return run_config


def publish(cfg: TrainSettings, run: Training, run_config: dict, console) -> None:
    """--save_merged and --push_to_hub, once final/ is safe: a failure here is one line and keeps the adapter."""
    output_dir = Path(cfg.output_dir)
    if cfg.save_merged:
        save_merged(run.model, run.tokenizer, output_dir, run_config)
        console.print(f"merged 16-bit model -> {output_dir / 'merged'}")
    if cfg.push_to_hub:
        push_adapter(run.model, run.tokenizer, cfg.push_to_hub, not cfg.hub_public, output_dir)
        visibility = "private" if not cfg.hub_public else "public"
        console.print(f"adapter and tokenizer uploaded to https://huggingface.co/{cfg.push_to_hub} "
                      f"({visibility} if this run created it; an existing repo keeps its visibility)")


def report_done(cfg: TrainSettings, device: Device, trainer, run_config: dict, started: float, console) -> None:
    """Step, losses, wall time and peak GPU memory, then the commands to run next."""
    import torch
    from rich.markup import escape

    console.rule("[bold]Done")
    output_dir = Path(cfg.output_dir)
    minutes = (time.time() - started) / 60
    losses = losses_line(run_config, trainer.state.log_history)
    console.print(f"step {trainer.state.global_step}, {losses}, wall time {minutes:.1f} min")
    if device.on_gpu:
        console.print(f"peak GPU memory {torch.cuda.max_memory_reserved() / 2**30:.1f} GiB on {device.name}"
                      + (" (rank 0's card; each process has its own)" if device.world_size > 1 else ""))
    compare = escape(infer_command(output_dir, "data/일상대화요약_dev.json"))
    console.print(f"compare the checkpoints on dev: [bold]{compare}[/bold]", soft_wrap=True)
    console.print(f"next: [bold]{escape(infer_command(output_dir / 'final', 'data/일상대화요약_test.json'))}[/bold]",
                  soft_wrap=True)


def main(cfg: TrainSettings) -> None:
    """The run, one stage a line: checks, data, device, row lengths, settings, trainer, train, final/, publish."""
    check_environment()
    filter_known_noise()
    from rich.console import Console

    console = Console()
    started = time.time()
    check_settings(cfg)
    data = load_data(cfg, console)
    resume = resolve_resume(cfg)

    import unsloth  # noqa: F401  (must come first: it patches transformers, TRL and PEFT)

    device = choose_device(cfg, console)
    data = measure_rows(cfg, data, console)
    show_settings(cfg, data, device, resume, console)
    run = build_run_trainer(cfg, data, device, console)
    fit(cfg, run, resume, bool(data.dev_rows), console)
    if not device.main_process:
        return  # the processes hold the same weights: rank 0 writes them
    run_config = save_final(cfg, data, device, run, console)
    publish(cfg, run, run_config, console)
    report_done(cfg, device, run.trainer, run_config, started, console)


# ---------------------------------------------------------------------------------------------
# Command line: flags over YAML over the defaults
# ---------------------------------------------------------------------------------------------

DESCRIPTION = ("Unsloth 4-bit LoRA SFT of Gemma 2 on prep.py's rows, or DPO / KTO after it (--stage; see the docstring "
               "for commands). `python train.py merge --help`: merge adapters.")


def parse_train_settings(argv: list[str] | None) -> TrainSettings:
    """Flags over YAML over the dataclass defaults: the YAML values become the parser's defaults."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    parser = build_parser(TrainSettings, DESCRIPTION)
    from_yaml = load_yaml_config(known.config, TrainSettings, "train.py") if known.config else {}
    parser.set_defaults(**from_yaml)
    values = vars(parser.parse_args(argv))
    if values["stage"] != "sft":  # what the user left out comes from the init adapter, then the stage's defaults
        values = align.stage_settings(values, align.given_flags(argv) | set(from_yaml))
    return TrainSettings(**values)


def cli(argv: list[str] | None = None) -> None:
    """Errors as one line, Ctrl-C and SIGTERM as what they left behind; under torchrun only rank 0 speaks."""
    argv = sys.argv[1:] if argv is None else argv
    main_process = is_main_process()
    signal.signal(signal.SIGTERM, raise_terminated)  # a preemption before or after training: like Ctrl-C
    if not main_process:
        sys.stdout = open(os.devnull, "w", encoding="utf-8")
    cfg = None
    try:
        if argv[:1] == ["merge"]:
            parser = build_parser(MergeSettings, MERGE_DESCRIPTION)
            parser.prog = "train.py merge"
            cfg, main_fn = MergeSettings(**vars(parser.parse_args(argv[1:]))), merge_main
        else:
            cfg, main_fn = parse_train_settings(argv), main
        main_fn(cfg)
        return
    except UserError as err:
        message, code = f"error: {err}", 2
    except KeyboardInterrupt as err:
        terminated = isinstance(err, Terminated)
        how, code = ("stopped by SIGTERM", 128 + signal.SIGTERM) if terminated else ("interrupted", 128 + signal.SIGINT)
        message = interrupted_message(Path(cfg.output_dir), how) if cfg else how
    if main_process:
        print(message, file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    cli()
