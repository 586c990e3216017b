"""`python train.py merge`: several LoRA adapters of one base model (runs, seeds, checkpoints) -> one adapter,
with PEFT's add_weighted_adapter. train.py dispatches here; see its docstring and docs/train.md for the commands.

--weights are each adapter's share in every method: n copies of one adapter, with the default 1/n each, merge back
into that adapter. PEFT 0.21.2 weighs the methods differently (peft/tuners/lora/model.py add_weighted_adapter,
peft/utils/merge_utils.py): cat and svd sum weight x each update; linear, ties and dare_* put sqrt(weight x scaling)
on A and on B, then linear and dare_linear sum the factors while ties and dare_ties average them (over the adapters
that keep a value). peft_weights converts the shares into what each method needs for that.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import (TRAINING_PROGRESS_KEYS, UserError, check_environment, filter_known_noise, give_usual_file_modes,
                    read_json, shell_command, write_text_atomic)
from generate import read_run_config, run_config_source

MERGE_METHODS = ("cat", "linear", "svd", "ties", "dare_ties", "dare_linear")  # PEFT's combination_type names
EQUAL_RANK_METHODS = ("linear", "ties", "dare_ties", "dare_linear")
DENSITY_METHODS = ("ties", "dare_ties", "dare_linear")
SUMMED_FACTOR_METHODS = ("linear", "dare_linear")  # (sum of sqrt(w) A)(sum of sqrt(w) B): shares go in squared
AVERAGED_FACTOR_METHODS = ("ties", "dare_ties")  # (mean of sqrt(w) A)(mean of sqrt(w) B): shares go in as (n w)^2
PROMPT_SETTINGS = (("system_prompt", False), ("clean_inputs", False), ("target_format", "prose"))


@dataclass
class MergeSettings:
    adapters: list[str] = field(default_factory=list, metadata={"help": (
        "adapter folders to merge: train.py final/ or checkpoint-N/ folders (2 or more, one base model)")})
    method: str = field(default="cat", metadata={"choices": MERGE_METHODS, "help": (
        "PEFT add_weighted_adapter combination: cat = exact sum of weight x update, rank = sum of the ranks; "
        "svd = the same sum cut back to the largest rank by SVD; linear = the weighted sum of the LoRA A matrices "
        "times that of the B matrices (equal ranks needed; the default weights give the mean of n checkpoints' "
        "LoRA weights); ties / dare_ties / dare_linear = linear after pruning to --density (equal ranks)")})
    weights: list[float] = field(default_factory=list, metadata={"help": (
        "each adapter's share, the same meaning for every method (converted to PEFT's weights per method): "
        "none given: 1/n each, so n copies of one adapter merge back into that adapter")})
    density: float | None = field(default=None, metadata={"help": (
        "share of values kept, in (0, 1]: needed by ties, dare_ties, dare_linear")})
    seed: int = field(default=3407, metadata={"help": "seed of dare_* random pruning (the same seed repeats a merge)"})
    output_dir: str = field(default="outputs/merged", metadata={"help": (
        "folder for the merged adapter (infer.py --model takes it like final/)")})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "replace an existing output_dir"})


MERGE_DESCRIPTION = ("Merge LoRA adapters (runs, seeds or checkpoints of one base model) with PEFT's "
                     "add_weighted_adapter.")


def peft_weights(method: str, shares: list[float]) -> list[float]:
    """PEFT's weights for `method` that give each adapter its share of the merged update (see the docstring); the
    sign stays on A (PEFT takes sqrt(|w|) and puts the sign on A only)."""
    if method in SUMMED_FACTOR_METHODS:
        return [share * abs(share) for share in shares]
    if method in AVERAGED_FACTOR_METHODS:
        n = len(shares)
        return [n * share * abs(n * share) for share in shares]
    return list(shares)


def replace_dir(staging: Path, target: Path) -> None:
    """Swap a fully written staging directory into place, so target is never half written."""
    give_usual_file_modes(staging)
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)


def write_json(path: Path, value: Any) -> None:
    write_text_atomic(path, json.dumps(value, ensure_ascii=False, indent=2) + "\n")


def read_adapter_folder(path: str) -> tuple[dict, dict, Path | None]:
    """(adapter_config.json, run_config.json or {}, the folder it came from) of a train.py adapter folder: a
    checkpoint-N/ without one borrows its run's, as infer.py does (generate.run_config_source)."""
    folder = Path(path)
    if not (folder / "adapter_config.json").is_file():
        raise UserError(f"--adapters {path}: not a LoRA adapter folder (no adapter_config.json); "
                        "pass train.py's final/ or checkpoint-N/ folders")
    adapter = read_json(folder / "adapter_config.json")
    source = run_config_source(folder)
    if source is None:
        return adapter, {}, None
    run_config = read_run_config(source)
    if source != folder:
        run_config = {key: value for key, value in run_config.items() if key not in TRAINING_PROGRESS_KEYS}
    return adapter, run_config, source


def check_merge(cfg: MergeSettings, adapters: list[tuple[dict, dict, Path | None]]) -> list[float]:
    """Refuse, before any model loads, what PEFT would refuse or what would merge into nonsense; returns the shares."""
    if len(cfg.adapters) < 2:
        raise UserError("merge needs two or more --adapters folders")
    weights = cfg.weights or [1 / len(cfg.adapters)] * len(cfg.adapters)
    if len(weights) != len(cfg.adapters):
        raise UserError(f"--weights: {len(weights)} given for {len(cfg.adapters)} adapters (one each)")
    bases = sorted({str(adapter.get("base_model_name_or_path")) for adapter, _, _ in adapters})
    if len(bases) > 1:
        raise UserError(f"--adapters: trained on different base models ({', '.join(bases)}); only adapters of one "
                        "base merge")
    ranks = [adapter.get("r") for adapter, _, _ in adapters]
    if cfg.method in EQUAL_RANK_METHODS and len(set(ranks)) > 1:
        raise UserError(f"--method {cfg.method} needs equal LoRA ranks, got {ranks}; --method cat is exact for any "
                        f"ranks (rank {sum(ranks)}), svd cuts the sum back to rank {max(ranks)}")
    if cfg.method in DENSITY_METHODS and not (cfg.density is not None and 0 < cfg.density <= 1):
        raise UserError(f"--method {cfg.method} needs --density in (0, 1] (the share of values kept)")
    if cfg.method not in DENSITY_METHODS and cfg.density is not None:
        raise UserError(f"--density applies to {', '.join(DENSITY_METHODS)}, not to --method {cfg.method}")
    unknown = [path for path, (_, run_config, _) in zip(cfg.adapters, adapters) if not run_config]
    if unknown:
        # Merging it unchecked could mix a system-prompt run with a plain one; infer.py, in the same case, falls
        # back to the default prompt with a warning, which a merged adapter would then carry for good.
        raise UserError(f"--adapters {unknown[0]}: no run_config.json, here or in its run's final/ or checkpoints, so "
                        "its prompt settings are unknown and cannot be checked against the others; copy the "
                        "run_config.json of the run that trained it into that folder")
    for key, default in PROMPT_SETTINGS:
        if len({run_config.get(key, default) for _, run_config, _ in adapters}) > 1:
            raise UserError(f"--adapters: trained with different prompts ({key} differs); a merged adapter is "
                            "prompted one way")
    if Path(cfg.output_dir).exists() and not cfg.overwrite_output_dir:
        raise UserError(f"--output_dir {cfg.output_dir}: exists; pass --overwrite_output_dir or choose another folder")
    if any(Path(cfg.output_dir).resolve() == Path(path).resolve() for path in cfg.adapters):
        raise UserError(f"--output_dir {cfg.output_dir} is one of the --adapters")
    return weights


def merged_run_config(cfg: MergeSettings, adapters: list[tuple[dict, dict, Path | None]], weights: list[float],
                      rank: int) -> dict:
    """The first run's settings (what infer.py reads back) plus a record of the merge."""
    run_configs = [run_config for _, run_config, _ in adapters]
    base = {key: value for key, value in run_configs[0].items() if key not in TRAINING_PROGRESS_KEYS}
    return {
        **base,
        "max_seq_length": min(run_config.get("max_seq_length", 8192) for run_config in run_configs),
        "merge": {
            "method": cfg.method, "weights": weights, "peft_weights": peft_weights(cfg.method, weights),
            "density": cfg.density, "rank": rank, **({"seed": cfg.seed} if cfg.method.startswith("dare_") else {}),
            "adapters": [{"path": str(Path(path).resolve()), "r": adapter.get("r"),
                          "global_step": run_config.get("global_step"), "run_config_from": str(source.resolve())}
                         for path, (adapter, run_config, source) in zip(cfg.adapters, adapters)],
        },
    }


def write_in_dtype_of(weights: Path, like: Path) -> None:
    """Cast `weights` to the floating dtype `like` was saved in. PEFT builds linear, ties and svd merges in fp32 and
    concatenates cat merges in the adapters' own dtype; every method should hand infer.py what training wrote."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(like), "pt") as handle:
        dtype = next(t.dtype for t in map(handle.get_tensor, handle.keys()) if t.is_floating_point())
    tensors = {key: value.to(dtype) if value.is_floating_point() else value
               for key, value in load_file(str(weights)).items()}
    save_file(tensors, str(weights), metadata={"format": "pt"})


def merge_adapters(cfg: MergeSettings, first_run: dict, weights: list[float], console):
    """The first adapter with its base, the others loaded beside it, combined by PEFT into the "merged" adapter."""
    import torch
    from unsloth import FastLanguageModel

    console.rule(f"[bold]Merge ({cfg.method})")
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=cfg.adapters[0],
        max_seq_length=first_run.get("max_seq_length", 8192),
        dtype=None,
        load_in_4bit=first_run.get("load_in_4bit", first_run.get("settings", {}).get("load_in_4bit", True)),
    )
    names = ["default"] + [f"adapter_{i}" for i in range(1, len(cfg.adapters))]  # the first loads as "default"
    for name, path in zip(names[1:], cfg.adapters[1:]):
        model.load_adapter(path, adapter_name=name)
    torch.manual_seed(cfg.seed)  # DARE's masks come from torch.bernoulli (peft/utils/merge_utils.py random_pruning)
    model.add_weighted_adapter(adapters=names, weights=peft_weights(cfg.method, weights), adapter_name="merged",
                               combination_type=cfg.method, density=cfg.density)
    return model, tokenizer


def save_merged_adapter(cfg: MergeSettings, model, tokenizer, adapters: list[tuple[dict, dict, Path | None]],
                        weights: list[float]) -> int:
    """The merged adapter in the first adapter's dtype, with the tokenizer and run_config.json, swapped into
    --output_dir whole; returns its rank."""
    output_dir = Path(cfg.output_dir)
    staging = output_dir.with_name(f".{output_dir.name}.partial")
    if staging.exists():
        shutil.rmtree(staging)
    # PEFT puts a non-default adapter in staging/merged
    model.save_pretrained(str(staging), selected_adapters=["merged"])
    merged = staging / "merged"
    write_in_dtype_of(merged / "adapter_model.safetensors", Path(cfg.adapters[0]) / "adapter_model.safetensors")
    tokenizer.save_pretrained(str(merged))
    rank = read_json(merged / "adapter_config.json")["r"]
    write_json(merged / "run_config.json", merged_run_config(cfg, adapters, weights, rank))
    replace_dir(merged, output_dir)
    shutil.rmtree(staging)
    return rank


def merge_main(cfg: MergeSettings) -> None:
    """Read and check the adapters before any model loads, merge them, save the result, say what to run next."""
    check_environment()
    filter_known_noise()
    from rich.console import Console
    from rich.markup import escape

    console = Console()
    adapters = [read_adapter_folder(path) for path in cfg.adapters]
    weights = check_merge(cfg, adapters)
    for path, (_, _, source) in zip(cfg.adapters, adapters):
        if source != Path(path):
            console.print(f"[yellow]{path}: no run_config.json, so its run's {source} gives the prompt settings "
                          "(as infer.py does)")

    import unsloth  # noqa: F401  (must come first: it patches transformers and PEFT)

    model, tokenizer = merge_adapters(cfg, adapters[0][1], weights, console)
    rank = save_merged_adapter(cfg, model, tokenizer, adapters, weights)
    output_dir = Path(cfg.output_dir)
    for path, weight, (adapter, _, _) in zip(cfg.adapters, weights, adapters):
        console.print(f"{path}: rank {adapter.get('r')}, weight {weight:g}")
    console.print(f"merged adapter (rank {rank}), tokenizer and run_config.json -> {output_dir}")
    next_command = shell_command("python", "infer.py", "--model", output_dir, "--input", "data/일상대화요약_dev.json")
    console.print(f"next: [bold]{escape(next_command)}[/bold]", soft_wrap=True)
