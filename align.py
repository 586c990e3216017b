"""Preference training for `train.py --stage dpo|kto`: the preference file infer.py writes (PREF_FORMAT), the SFT
adapter the run continues from, and TRL's DPOTrainer / KTOTrainer over them. train.py runs the stage like SFT
(resume, Ctrl-C and SIGTERM, several GPUs, checkpoints, final/); this module holds what differs.

The reference policy is the SFT adapter itself: the run loads --init_adapter's LoRA weights into a fresh adapter of
the same shape, and TRL, given a PeftModel and no ref_model, copies that adapter into a frozen "ref" adapter
(trl/trainer/dpo_trainer.py, kto_trainer.py: `elif is_peft_model(model) and ref_model is None`) and computes the
reference log-probs with it switched on. Only the trained adapter is saved.
"""
from __future__ import annotations

import functools
import random
from pathlib import Path
from typing import Any, Callable

from common import UserError, parse_jsonl, read_json, read_utf8_text
from generate import find_run_config, trained_base_model, trained_prompt_settings

STAGES = ("sft", "dpo", "kto")
# The overall winner of the competition: SFT, then KTO with LoRA at lr 1e-4 for 4 epochs (REFERENCE section 9).
PREFERENCE_DEFAULTS = {"learning_rate": 1e-4, "num_train_epochs": 4.0}
# TRL's KTO estimates its KL term from the other rows of a micro-batch, so it needs two or more (kto_trainer.py).
KTO_DEFAULTS = {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 8, "loss_type": ["kto"]}
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")  # trl dpo_config.py
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")  # trl kto_config.py
# Settings that must be the init adapter's: the LoRA shape its weights load into, and the base they were trained on.
FROM_INIT_ADAPTER = ("model", "lora_r", "lora_alpha", "target_modules")
# The metrics a dpo/kto run's loss.png shows, each as (logged key, label).
PLOTTED = (("loss", "loss"), ("rewards/margins", "reward margin (chosen - rejected)"),
           ("rewards/accuracies", "reward accuracy (chosen > rejected)"))


# ---------------------------------------------------------------------------------------------
# Settings: the stage's defaults, the init adapter
# ---------------------------------------------------------------------------------------------

def given_flags(argv: list[str]) -> set[str]:
    """Setting names typed on the command line (`--no-load_in_4bit` names load_in_4bit)."""
    names = {arg[2:].split("=", 1)[0] for arg in argv if arg.startswith("--")}
    return {name.removeprefix("no-") for name in names}


def read_init_adapter(path: str) -> tuple[dict, dict]:
    """(adapter_config.json, run_config) of --init_adapter, a train.py final/ or checkpoint-N/."""
    folder = Path(path)
    if not (folder / "adapter_config.json").is_file() or not (folder / "adapter_model.safetensors").is_file():
        raise UserError(f"--init_adapter {path}: not a LoRA adapter folder (adapter_config.json and "
                        "adapter_model.safetensors); pass an SFT run's final/ or checkpoint-N/")
    adapter = read_json(folder / "adapter_config.json")
    run_config = find_run_config(folder)
    if not isinstance(adapter, dict) or not run_config:
        raise UserError(f"--init_adapter {path}: no run_config.json here or in its run, so its base model and "
                        "prompt settings are unknown")
    return adapter, run_config


def init_adapter_settings(adapter: dict, run_config: dict, folder: Path) -> dict[str, Any]:
    """The settings a run continuing this adapter inherits: its base, LoRA shape and sequence length."""
    return {
        "model": trained_base_model(folder, run_config),
        "load_in_4bit": bool(run_config.get("load_in_4bit", True)),
        "max_seq_length": int(run_config.get("max_seq_length", 8192)),
        "lora_r": int(adapter["r"]),
        "lora_alpha": int(adapter["lora_alpha"]),
        "lora_dropout": float(adapter.get("lora_dropout", 0.0)),
        "target_modules": sorted(adapter["target_modules"]),
    }


def stage_settings(values: dict[str, Any], given: set[str]) -> dict[str, Any]:
    """The settings of a dpo/kto run: what the user set, else the init adapter's, else the stage's defaults.
    A LoRA shape or base model set explicitly must be the init adapter's (its weights load into that shape)."""
    for name in ("init_adapter", "preference_data"):
        if not values.get(name):
            raise UserError(f"--stage {values['stage']} needs --{name} "
                            + ("(the SFT run's final/ or checkpoint-N/)" if name == "init_adapter"
                               else "(the file infer.py --preference_out writes)"))
    inherited = init_adapter_settings(*read_init_adapter(values["init_adapter"]), Path(values["init_adapter"]))
    for name in FROM_INIT_ADAPTER:
        mine, theirs = values[name], inherited[name]
        if name in given and (sorted(mine) if isinstance(mine, list) else mine) != theirs:
            raise UserError(f"--{name} {' '.join(mine) if isinstance(mine, list) else mine}: --init_adapter "
                            f"{values['init_adapter']} was trained with {name} {theirs}; leave --{name} out to take it")
    defaults = {**PREFERENCE_DEFAULTS, **(KTO_DEFAULTS if values["stage"] == "kto" else {}), **inherited}
    return {**values, **{name: value for name, value in defaults.items() if name not in given}}


def check_stage_settings(cfg) -> None:
    """The loss settings of the stage; SFT refuses the preference flags rather than ignoring them."""
    if cfg.stage == "sft":
        for name in ("init_adapter", "preference_data"):
            if getattr(cfg, name):
                raise UserError(f"--{name} is for --stage dpo or kto; SFT trains on --data")
        return
    allowed = DPO_LOSS_TYPES if cfg.stage == "dpo" else KTO_LOSS_TYPES
    unknown = [name for name in cfg.loss_type if name not in allowed]
    if unknown:
        raise UserError(f"--loss_type {unknown[0]}: --stage {cfg.stage} takes {', '.join(allowed)}")
    if cfg.stage == "kto":
        if len(cfg.loss_type) != 1:
            raise UserError(f"--loss_type: --stage kto takes one loss, got {' '.join(cfg.loss_type)}")
        if cfg.loss_weights is not None:
            raise UserError("--loss_weights combines --stage dpo losses; --stage kto has one loss")
        if cfg.loss_type == ["kto"] and cfg.per_device_train_batch_size < 2:
            raise UserError("--per_device_train_batch_size must be 2 or more for --loss_type kto (TRL estimates "
                            "its KL term from the other rows of a micro-batch)")
    if cfg.loss_weights is not None and len(cfg.loss_weights) != len(cfg.loss_type):
        raise UserError(f"--loss_weights: {len(cfg.loss_weights)} given for {len(cfg.loss_type)} --loss_type "
                        "(one each)")
    if not cfg.beta > 0:
        raise UserError(f"--beta must be positive, got {cfg.beta}")


# ---------------------------------------------------------------------------------------------
# Data: the preference file
# ---------------------------------------------------------------------------------------------

def _one_message(value: Any, role: str) -> bool:
    return (isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict) and value[0].get("role") == role
            and isinstance(value[0].get("content"), str) and value[0]["content"].strip() != "")


def _prompt_messages(value: Any) -> bool:
    return (isinstance(value, list) and len(value) >= 1 and value[-1].get("role") == "user"
            and all(isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                    and isinstance(m.get("content"), str) for m in value)
            and value[-1]["content"].strip() != "")


def expected_source(init_dir: Path, run_config: dict) -> dict[str, Any]:
    """What a preference file for this adapter must say it came from: the base model and the prompt settings."""
    return {"base_model": trained_base_model(init_dir, run_config),
            "prompt_settings": trained_prompt_settings(run_config)}


def validate_pair(row: Any, line_no: int, path: Path, expected: dict[str, Any]) -> dict:
    """One preference pair (PREF_FORMAT.md), made by the same base model with the same prompt settings."""
    row_id = row.get("id") if isinstance(row, dict) else None
    where = f"{path} line {line_no}" + (f" (id {row_id!r})" if row_id is not None else "")
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object per line, got {type(row).__name__}")
    if not _prompt_messages(row.get("prompt")):
        raise UserError(f"{where}: field 'prompt' must be a list of chat messages ending with a non-empty user turn")
    for name in ("chosen", "rejected"):
        if not _one_message(row.get(name), "assistant"):
            raise UserError(f"{where}: field '{name}' must be one non-empty assistant message")
    if row["chosen"][0]["content"].strip() == row["rejected"][0]["content"].strip():
        raise UserError(f"{where}: field 'rejected': the same text as 'chosen', so the pair prefers nothing")
    if row.get("base_model") != expected["base_model"]:
        raise UserError(f"{where}: field 'base_model': expected {expected['base_model']!r} (the base of "
                        f"--init_adapter), got {row.get('base_model')!r}; these candidates came from another model")
    settings = row.get("prompt_settings")
    for key, value in expected["prompt_settings"].items():
        got = settings.get(key) if isinstance(settings, dict) else None
        if got != value:
            raise UserError(f"{where}: field 'prompt_settings.{key}': expected {value!r} (as --init_adapter was "
                            f"trained), got {got!r}; the prompts would differ from the model's")
    return row


def read_preference_file(path: str, init_dir: Path, run_config: dict) -> list[dict]:
    """Every pair of --preference_data, checked against the init adapter's run; errors name file, line, id, field."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"{path}: preference file not found (infer.py --preference_out writes it)")
    text = read_utf8_text(file)
    expected = expected_source(init_dir, run_config)
    rows = [validate_pair(row, line_no, file, expected) for line_no, row in parse_jsonl(text, file)]
    if not rows:
        raise UserError(f"{path}: no preference pairs to train on")
    return rows


def dpo_rows(pairs: list[dict]) -> list[dict]:
    """The three columns TRL's DPOTrainer templates: the conversation so far and the two answers."""
    return [{"prompt": pair["prompt"], "chosen": pair["chosen"], "rejected": pair["rejected"]} for pair in pairs]


def kto_rows(pairs: list[dict], seed: int) -> list[dict]:
    """Each pair as a desirable and an undesirable row (PREF_FORMAT), shuffled once with the seed: KTO samples in
    order and estimates its KL term from a micro-batch's other rows, which should not be one prompt's two answers."""
    rows = [{"prompt": pair["prompt"], "completion": pair[name], "label": name == "chosen"}
            for pair in pairs for name in ("chosen", "rejected")]
    random.Random(seed).shuffle(rows)
    return rows


def fitting_pairs(pairs: list[dict], lengths: list[int], max_seq_length: int,
                  path: str) -> tuple[list[dict], list[int], list[str]]:
    """(the pairs that fit --max_seq_length, their lengths, the ids of those left out). TRL's truncation keeps the
    start, so a longer pair would lose the end of its answers: it is left out rather than cut (a shorter
    --max_seq_length, chosen to fit the card, should not stop the run). None fitting is an error."""
    kept = [(pair, length) for pair, length in zip(pairs, lengths) if length <= max_seq_length]
    if not kept:
        raise UserError(f"{path}: every pair is longer than --max_seq_length {max_seq_length} (the shortest is "
                        f"{min(lengths)} tokens, prompt and its longer answer); raise --max_seq_length")
    too_long = [pair.get("id") for pair, length in zip(pairs, lengths) if length > max_seq_length]
    return [pair for pair, _ in kept], [length for _, length in kept], too_long


def fit_pairs(cfg, pairs: list[dict], count_tokens: Callable[[dict], int], console) -> tuple[list[dict], list[int]]:
    """(the pairs that fit --max_seq_length, their lengths), with one line for those left out. A pair is as long
    as its prompt with the longer answer, each counted by `count_tokens` as a prompt/completion row of SFT."""
    lengths = [max(count_tokens({"prompt": pair["prompt"], "completion": pair[answer]})
                   for answer in ("chosen", "rejected")) for pair in pairs]
    kept, kept_lengths, too_long = fitting_pairs(pairs, lengths, cfg.max_seq_length, cfg.preference_data)
    if too_long:
        console.print(f"[yellow]{len(too_long)} pairs longer than --max_seq_length {cfg.max_seq_length} left out "
                      f"(first id {too_long[0]!r}): TRL's truncation would cut their answers", highlight=False)
    return kept, kept_lengths


# ---------------------------------------------------------------------------------------------
# Model and trainer
# ---------------------------------------------------------------------------------------------

def load_init_weights(model, init_adapter: str) -> None:
    """The SFT adapter's LoRA weights into the fresh adapter of the same shape (train.load_lora_model)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    result = set_peft_model_state_dict(model, load_file(str(Path(init_adapter) / "adapter_model.safetensors")))
    missing = [key for key in result.missing_keys if "lora_" in key]
    if result.unexpected_keys or missing:
        key = (list(result.unexpected_keys) + missing)[0]
        raise UserError(f"--init_adapter {init_adapter}: its weights do not fit the model ({key}); "
                        "was it trained on another base model?")


def build_preference_trainer(cfg, model, tokenizer, pairs: list[dict], common_args: dict, callbacks: list):
    """TRL's DPOTrainer or KTOTrainer with every setting explicit: on a GPU `import unsloth` swaps in its own
    trainer class, whose config has other defaults (unsloth/models/rl.py). No ref_model: TRL copies the init
    adapter into a frozen "ref" adapter and uses it as the reference policy."""
    from datasets import Dataset

    shared = dict(
        **common_args,
        eval_strategy="no",
        max_length=cfg.max_seq_length,
        beta=cfg.beta,
        precompute_ref_log_probs=False,
        disable_dropout=True,  # policy and reference log-probs must be deterministic to compare
    )
    if cfg.stage == "dpo":
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(**shared, loss_type=list(cfg.loss_type), loss_weights=cfg.loss_weights,
                         truncation_mode="keep_start")
        trainer_cls, rows = DPOTrainer, dpo_rows(pairs)
    else:
        from trl import KTOConfig, KTOTrainer

        args = KTOConfig(**shared, loss_type=cfg.loss_type[0], desirable_weight=1.0, undesirable_weight=1.0,
                         train_sampling_strategy="sequential")
        trainer_cls, rows = KTOTrainer, kto_rows(pairs, cfg.seed)
    trainer = trainer_cls(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                          callbacks=callbacks)
    # PeftModel.save_pretrained writes every adapter, the "ref" copy into a ref/ subfolder (peft_model.py), and
    # transformers' resume then loads only subfolder adapters (trainer.py _load_from_checkpoint), leaving the trained
    # one at its init weights. Checkpoints and final/ get the trained adapter alone: a plain LoRA adapter.
    peft_model = trainer.accelerator.unwrap_model(trainer.model)
    peft_model.save_pretrained = functools.partial(peft_model.save_pretrained, selected_adapters=["default"])
    return trainer


def drop_reference_adapter(model) -> None:
    """After training the frozen "ref" copy is dead weight, and --save_merged / --push_to_hub must see one adapter."""
    if "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------

def curves(log_history: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """(step, value) points of each plotted metric that was logged."""
    points = {key: [(e["step"], e[key]) for e in log_history if key in e and "step" in e] for key, _ in PLOTTED}
    return {key: values for key, values in points.items() if values}


def margin_note(log_history: list[dict]) -> str:
    """How the reward margin moved over the run, for train.py's closing line; "" when none was logged (SFT)."""
    margins = curves(log_history).get("rewards/margins")
    return f", reward margin {margins[0][1]:.4f} -> {margins[-1][1]:.4f}" if margins else ""


def plot_preference(log_history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found = curves(log_history)
    panels = [(key, label) for key, label in PLOTTED if key in found] or PLOTTED[:1]
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.6 * len(panels)), sharex=True, squeeze=False)
    for ax, (key, label) in zip(axes[:, 0], panels):
        if key in found:
            ax.plot(*zip(*found[key]), linewidth=1)
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def carried_run_config(cfg, init_config: dict) -> dict[str, Any]:
    """run_config.json keys of a dpo/kto run beyond train.py's: its inputs, and the init run's training rows
    (infer.py's length band reads them through data_dir)."""
    settings = init_config.get("settings", {})
    return {
        "init_adapter": str(Path(cfg.init_adapter).resolve()),
        "preference_data": str(Path(cfg.preference_data).resolve()),
        "data_dir": init_config.get("data_dir") or settings.get("data"),
    }


def load_stage_data(cfg) -> tuple[list[dict], dict, dict]:
    """(the pairs, the init run's prompt settings, the run_config keys carried over) for a dpo/kto run."""
    _, init_config = read_init_adapter(cfg.init_adapter)
    pairs = read_preference_file(cfg.preference_data, Path(cfg.init_adapter), init_config)
    return pairs, trained_prompt_settings(init_config), carried_run_config(cfg, init_config)
