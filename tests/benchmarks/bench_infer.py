"""Benchmark: infer.py's length-sorted batched generation against a one-at-a-time loop (the official baseline's way).

    python tests/benchmarks/bench_infer.py                       # tiny random Gemma 2 on CPU, 48 prompts, batch 16
    python tests/benchmarks/bench_infer.py --model outputs/run1/final --n_prompts 64 --load_in_4bit   # a real model on a GPU

Both paths run the same `infer.generate_texts` (greedy, same stop tokens); the loop just gives it one
prompt at a time. Prompts are the sample conversations cut to different lengths, so the batches see a
realistic spread of lengths. Greedy decoding makes both runs generate the same tokens (the last figure
counts any output that differs), so they do the same work. Prints items/s of both, the
speed-up (best of --repeats timings), the padding waste of the length-sorted schedule (and of input order, for contrast), and how
many outputs differ between the two runs (should be 0).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def bench_prompts(n: int) -> list[dict]:
    """n competition records: the sample conversations, each cut after a different number of turns."""
    from prep import load_competition_file

    records = []
    for name in ("train", "dev", "test"):
        records += load_competition_file(REPO / "data" / "sample" / f"{name}.json")[0]
    out = []
    for i in range(n):
        record = records[i % len(records)]
        turns = record["input"]["conversation"]
        keep = max(1, len(turns) - (i // len(records)) * 2)
        out.append({**record, "id": f"{record['id']}-{i}", "input": {**record["input"], "conversation": turns[:keep]}})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder / Hub id; default: a tiny random Gemma 2 built now")
    parser.add_argument("--n_prompts", type=int, default=48)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--load_in_4bit", action=argparse.BooleanOptionalAction, default=False,
                        help="4-bit base weights (bitsandbytes' CPU kernels are slow: off by default here)")
    parser.add_argument("--repeats", type=int, default=2, help="time each mode this many times and keep the fastest")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")

    import unsloth  # noqa: F401  (before transformers, as in infer.py)
    import torch
    from rich.console import Console
    from rich.table import Table

    import infer

    console = Console()
    quiet = Console(quiet=True)
    with tempfile.TemporaryDirectory() as tmp:
        model_path = args.model
        if model_path is None:
            from conftest import build_tiny_gemma2

            model_path = str(build_tiny_gemma2(Path(tmp) / "tiny"))
        model, tokenizer, _ = infer.load_model(model_path, 4096, args.load_in_4bit)
        prompts = [infer.chat_prompt(tokenizer, record, False) for record in bench_prompts(args.n_prompts)]
        lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
        generate = dict(max_new_tokens=args.max_new_tokens, console=quiet)

        # Warm-up: the first calls of each batch shape are slower (kernel selection, allocator growth).
        infer.generate_texts(model, tokenizer, prompts[:args.batch_size], batch_size=args.batch_size, **generate)
        infer.generate_texts(model, tokenizer, prompts[:1], batch_size=1, **generate)

        def timed(run):
            """Best of --repeats: the CPU is often shared, and the fastest run is the least disturbed one."""
            best = None
            for _ in range(args.repeats):
                start = time.perf_counter()
                texts = run()
                seconds = time.perf_counter() - start
                best = seconds if best is None else min(best, seconds)
            return texts, best

        single, single_s = timed(lambda: [infer.generate_texts(model, tokenizer, [p], batch_size=1, **generate)[0] for p in prompts])
        batched, batched_s = timed(lambda: infer.generate_texts(model, tokenizer, prompts, batch_size=args.batch_size, **generate))

    input_order = [list(range(i, min(i + args.batch_size, len(prompts)))) for i in range(0, len(prompts), args.batch_size)]
    figures = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads",
        "model": args.model or "tiny random Gemma 2 (hidden 64, 2 layers)",
        "load_in_4bit": args.load_in_4bit,
        "prompts": len(prompts),
        "prompt_tokens_min_median_max": [min(lengths), sorted(lengths)[len(lengths) // 2], max(lengths)],
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "timing": f"best of {args.repeats}",
        "one_at_a_time_items_per_s": len(prompts) / single_s,
        "batched_items_per_s": len(prompts) / batched_s,
        "speedup": single_s / batched_s,
        "padding_waste_length_sorted": infer.padding_waste(lengths, infer.plan_batches(lengths, args.batch_size)),
        "padding_waste_input_order": infer.padding_waste(lengths, input_order),
        "outputs_differing": sum(a != b for a, b in zip(single, batched)),
    }
    table = Table(title="bench_infer: batched vs one at a time", show_header=False)
    for key, value in figures.items():
        table.add_row(key, f"{value:.3f}" if isinstance(value, float) else str(value))
    console.print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
