"""What every script of the kit shares, below prep.py: settings dataclass -> argparse (and a YAML file of them, for
train.py --config), one-line errors, the Python and torch check, known-harmless library noise, files (JSON, JSONL,
atomic writes, file modes) and train.py's checkpoint folders. Standard library only at import time: `python infer.py
--help` must answer before anything heavy loads, and `import unsloth` must come before transformers in every script.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import shlex
import sys
import tempfile
import typing
from pathlib import Path
from typing import Any, Iterator


class UserError(Exception):
    """A mistake the user can fix (bad file, bad field, impossible setting): shown as one line, no traceback."""


# ---------------------------------------------------------------------------------------------
# Settings dataclass -> argparse (shared by every script; must stay import-light)
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
    # allow_abbrev=False: a mistyped flag (--learning_rat) must fail, not silently set another setting.
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                     allow_abbrev=False)
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


def _yaml_value(key: str, value: Any, annotation: Any, path: str) -> Any:
    """Check one YAML value against the field's type; strings are left for argparse to convert like a flag."""
    annotation, optional = _unwrap_optional(annotation)
    if value is None:
        if optional:
            return None
        raise UserError(f"{path}: key '{key}' must not be empty")
    if typing.get_origin(annotation) is list:
        items = value if isinstance(value, list) else [value]
        if typing.get_args(annotation)[0] is float:
            if not all(isinstance(item, (int, float)) and not isinstance(item, bool) for item in items):
                raise UserError(f"{path}: key '{key}' must be a list of numbers")
            return [float(item) for item in items]
        if not all(isinstance(item, str) for item in items):
            raise UserError(f"{path}: key '{key}' must be a list of strings")
        return items
    if annotation is bool:
        if not isinstance(value, bool):
            raise UserError(f"{path}: key '{key}' must be true or false, got {value!r}")
        return value
    if annotation in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        if annotation is int and value != int(value):
            raise UserError(f"{path}: key '{key}' must be an integer, got {value!r}")
        return annotation(value)
    if isinstance(value, str):
        return value
    raise UserError(f"{path}: key '{key}' must be {annotation.__name__}, got {value!r}")


def load_yaml_config(path: str, settings_cls: type, script: str) -> dict[str, Any]:
    """The same names as `script`'s flags, from a YAML mapping (Axolotl-style run file: train.py --config)."""
    import yaml

    config_path = Path(path)
    if not config_path.is_file():
        raise UserError(f"{path}: config file not found")
    text = read_utf8_text(config_path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise UserError(f"{path}: not valid YAML{where}: {getattr(err, 'problem', None) or err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of setting: value, got {type(data).__name__}")
    hints = typing.get_type_hints(settings_cls)
    known = {f.name for f in dataclasses.fields(settings_cls)} - {"config"}
    values = {}
    for key, value in data.items():
        if key not in known:
            raise UserError(f"{path}: unknown setting '{key}' (run python {script} --help for the names)")
        values[key] = _yaml_value(key, value, hints[key], path)
    return values


def shell_command(*words: Any) -> str:
    """A command to print for copying: each word shell-quoted, so a path with a space still pastes as one."""
    return " ".join(shlex.quote(str(word)) for word in words)


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
# The environment: versions checked and known-harmless library noise filtered before heavy imports
# (train.py, infer.py and distill.py call these first thing; stdlib only)
# ---------------------------------------------------------------------------------------------

MIN_PYTHON = (3, 11)  # trl 1.15 requires it; matplotlib 3.11.2 has no cp310 wheel
MIN_TORCH = (2, 4)  # bitsandbytes' floor: pip would otherwise pull a PyPI torch over the image's CUDA one
MAX_TORCH = (2, 15)  # unsloth 2026.10.9 pins torch < 2.15
TORCH_FIX = ("install a CUDA torch from the PyTorch index first, e.g. pip install 'torch>=2.4,<2.15' "
             "--index-url https://download.pytorch.org/whl/cu124 (the cuXXX your driver supports), "
             "then requirements.txt")


def release_tuple(version: str) -> tuple[int, int] | None:
    """'2.3.1+cu121' -> (2, 3); None when the string does not start with major.minor."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match[1]), int(match[2])) if match else None


def environment_problems(python_version: tuple[int, ...], torch_version: str | None,
                         needs_torch: bool = True) -> list[str]:
    """What stops this kit from installing or running on this interpreter and torch, each with its fix."""
    problems = []
    if tuple(python_version[:2]) < MIN_PYTHON:
        problems.append(
            f"Python {'.'.join(map(str, python_version[:2]))} is too old: "
            "trl 1.15 and matplotlib 3.11.2 need Python >= 3.11; "
            "make a 3.11+ environment (uv venv -p 3.11 .venv, or Colab's Python 3.12) and install there"
        )
    if not needs_torch:
        return problems
    release = release_tuple(torch_version) if torch_version else None
    if torch_version is None:
        problems.append(f"torch is not installed: {TORCH_FIX}")
    elif release is not None and release < MIN_TORCH:
        problems.append(f"torch {torch_version} is too old: bitsandbytes needs torch >= 2.4; {TORCH_FIX}")
    elif release is not None and release >= MAX_TORCH:
        problems.append(f"torch {torch_version} is too new: unsloth 2026.10.9 needs torch < 2.15; {TORCH_FIX}")
    return problems


def check_environment(needs_torch: bool = True) -> str | None:
    """Refuse an interpreter or torch this kit cannot use, in one line with the fix; returns torch's
    version. Read from its package metadata: importing torch would take seconds."""
    from importlib import metadata

    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = None
    problems = environment_problems(sys.version_info, torch_version, needs_torch)
    if problems:
        raise UserError("; ".join(problems))
    return torch_version


# Messages libraries log on every healthy run (mostly on CPU) that make it look broken. Matched by the
# logger that emits them and the start of their message template, so anything else they say still shows.
KNOWN_HARMLESS_LOGS = {
    # torchao tries its prebuilt C++ kernels (CUDA archs, other Python ABIs) and falls back; this kit never calls them.
    "torchao": ("Failed to load ", "Skipping import of cpp extensions"),
    # torchao registers its config enums the pre-2.10 way; torch handles them natively now.
    "torch.utils._pytree": ("%s is an Enum subclass and is now natively supported",),
    # bitsandbytes' CPU backend would fetch a faster 4-bit kernel from the Hub; its built-in one is used instead.
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
    # vLLM's CPU build finds the GPU Triton that torch brings and runs without it, as it should on a CPU.
    "vllm.triton_utils.importing": ("Triton is installed, but doesn't include CPU backend",),
}


class _HideKnownMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def filter_known_noise() -> None:
    """Hide KNOWN_HARMLESS_LOGS. Call before the libraries are imported: they log while importing."""
    for logger_name, prefixes in KNOWN_HARMLESS_LOGS.items():
        logger = logging.getLogger(logger_name)
        if not any(isinstance(f, _HideKnownMessages) for f in logger.filters):
            logger.addFilter(_HideKnownMessages(prefixes))


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------

def read_utf8_text(path: str | Path) -> str:
    """A text file's contents, tolerating a UTF-8 BOM; a file in another encoding stops the run naming the byte."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def read_json(path: str | Path) -> Any:
    """Parse a JSON file, tolerating a UTF-8 BOM and CRLF line ends; errors name the file and position."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    text = read_utf8_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None


def parse_jsonl(text: str, path: str | Path, hint: str = "") -> Iterator[tuple[int, Any]]:
    """(line number, value) for every non-blank line; a line that is not JSON stops the run naming file and line."""
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: line {line_number} is not valid JSON "
                            f"({err.msg}, column {err.colno}){hint}") from None
        yield line_number, value


def new_file_mode() -> int:
    """The mode open() gives a new file: 0666 minus the process umask (0644 under the usual 022)."""
    umask = os.umask(0)  # the only way to read it is to set it; put it straight back
    os.umask(umask)
    return 0o666 & ~umask


def give_usual_file_modes(folder: str | Path) -> None:
    """Every file under `folder` gets new_file_mode(). safetensors 0.8 writes through a temp file that
    stays 0600 (safetensors issue #782), so an adapter saved by one user could not be read by another
    (a vLLM server, a teammate), although its config.json next to it could."""
    mode = new_file_mode()
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(mode)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write via a temp file in the same directory and rename, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, new_file_mode())  # mkstemp makes 0600; a plain open() would give 0644 under the usual umask
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
# Training runs: train.py's checkpoint-N folders (train.py resumes from them, infer.py scores them)
# ---------------------------------------------------------------------------------------------

CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
# run_config.json keys true of one checkpoint only
TRAINING_PROGRESS_KEYS = ("global_step", "epoch", "train_loss", "eval_loss")


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """checkpoint-N directories, newest (highest N) first."""
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and CHECKPOINT_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_DIR.match(p.name).group(1)), reverse=True)


def read_trainer_state(path: Path) -> dict | None:
    """A checkpoint's trainer_state.json, or None when it is missing or torn."""
    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and "global_step" in state else None


def is_complete_checkpoint(path: Path) -> bool:
    """Trainer writes trainer_state.json last, so a checkpoint cut short by a kill has none (or a torn one)."""
    return read_trainer_state(path) is not None
