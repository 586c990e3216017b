"""The tiny Gemma 2 of conftest.py behaves like the real one where the scripts depend on it, and the
stack (unsloth CPU backend, 4-bit, LoRA, TRL SFTTrainer) can teach it summaries it then generates
back exactly: the ground every model test stands on."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import (BOS_ID, END_OF_TURN_ID, EOS_ID, OFFLINE_ENV, PAD_ID, REPO_ROOT, SAMPLE_DIR, START_OF_TURN_ID,
                      UNK_ID)

# Settings that memorize 4 sample summaries well before the last step (all LoRA, no embeddings).
MEMORIZE_ROWS = 4
MEMORIZE_SETTINGS = dict(lora_r=16, learning_rate=1e-2, max_steps=60)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_korean_and_newlines_round_trip_exactly(tokenizer):
    record = json.loads((SAMPLE_DIR / "dev.json").read_text(encoding="utf-8"))[0]
    conversation = "\n".join(turn["utterance"] for turn in record["input"]["conversation"])
    for text in [record["output"], conversation, "  두 칸 띄고\n\n\t탭, 이모지 🙂, 끝 공백 \n", "name1이랑 xx 공항~ 어~"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert UNK_ID not in ids
        assert tokenizer.decode(ids) == text
    assert len(tokenizer(record["output"])["input_ids"]) < len(record["output"]) / 2, "trained merges keep sequences short"


def test_special_tokens_match_gemma2(tokenizer, tiny_model_dir):
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id) == (PAD_ID, EOS_ID, BOS_ID, UNK_ID)
    assert tokenizer.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>"]) == [START_OF_TURN_ID, END_OF_TURN_ID]
    assert tokenizer.padding_side == "left"
    ids = tokenizer("요약<end_of_turn>\n")["input_ids"]
    assert ids[0] == BOS_ID and ids.count(BOS_ID) == 1 and END_OF_TURN_ID in ids
    config = json.loads((tiny_model_dir / "config.json").read_text(encoding="utf-8"))
    generation = json.loads((tiny_model_dir / "generation_config.json").read_text(encoding="utf-8"))
    assert config["model_type"] == "gemma2" and config["vocab_size"] == len(tokenizer)
    assert generation["eos_token_id"] == [EOS_ID, END_OF_TURN_ID]
    assert (tiny_model_dir / "model.safetensors").is_file()


def test_chat_template_is_the_official_gemma2_one(tokenizer):
    messages = [{"role": "user", "content": "HI"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<bos><start_of_turn>user\nHI<end_of_turn>\n<start_of_turn>model\n"
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids[:2] == [BOS_ID, START_OF_TURN_ID] and ids.count(BOS_ID) == 1
    # The rendered text already holds <bos>: tokenizing it again must skip the special tokens.
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids
    assert tokenizer(text)["input_ids"][:2] == [BOS_ID, BOS_ID]
    with pytest.raises(Exception, match="System role not supported"):
        tokenizer.apply_chat_template([{"role": "system", "content": "x"}, *messages], tokenize=False)


def memorize(model_dir: str, result_path: str) -> None:
    """QLoRA-train the tiny model on a few sample records, then generate them back greedily.
    Runs in a fresh process, since unsloth must be imported before transformers and TRL."""
    import time

    import unsloth  # noqa: F401
    from unsloth import FastLanguageModel

    import bitsandbytes
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    sys.path.insert(0, str(REPO_ROOT))
    import prep

    records = json.loads((SAMPLE_DIR / "train.json").read_text(encoding="utf-8"))[:MEMORIZE_ROWS]
    rows = [{"prompt": prep.build_messages(r), "completion": [{"role": "assistant", "content": r["output"]}]} for r in records]
    model, tokenizer = FastLanguageModel.from_pretrained(model_dir, max_seq_length=1024, load_in_4bit=True)
    quantized = sum(isinstance(m, bitsandbytes.nn.Linear4bit) for m in model.modules())
    model = FastLanguageModel.get_peft_model(
        model, r=MEMORIZE_SETTINGS["lora_r"], lora_alpha=MEMORIZE_SETTINGS["lora_r"], lora_dropout=0.0,
        target_modules=LORA_TARGETS, bias="none", use_gradient_checkpointing="unsloth", random_state=3407,
    )
    args = SFTConfig(
        output_dir=str(Path(result_path).parent / "trainer"),
        per_device_train_batch_size=MEMORIZE_ROWS,
        max_steps=MEMORIZE_SETTINGS["max_steps"],
        learning_rate=MEMORIZE_SETTINGS["learning_rate"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_length=1024,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        seed=0,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    started = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - started

    FastLanguageModel.for_inference(model)
    prompts = [tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True) for row in rows]
    batch = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
    output = model.generate(**batch, max_new_tokens=256, do_sample=False)
    new_tokens = output[:, batch["input_ids"].shape[1]:].tolist()
    first = trainer.train_dataset[0]
    Path(result_path).write_text(json.dumps({
        "summaries": [r["output"] for r in records],
        "new_tokens": new_tokens,
        "generated": [tokenizer.decode(ids, skip_special_tokens=True) for ids in new_tokens],
        "quantized_linears": quantized,
        "padding_side": tokenizer.padding_side,
        "input_ids": first["input_ids"],
        "labels": first["labels"],
        "prompt_ids": tokenizer.apply_chat_template(rows[0]["prompt"], add_generation_prompt=True, return_dict=True)["input_ids"],
        "summary_ids": tokenizer(records[0]["output"], add_special_tokens=False)["input_ids"],
        "newline_id": tokenizer.convert_tokens_to_ids(tokenizer.tokenize("\n"))[0],
        "loss_history": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        "train_seconds": train_seconds,
    }, ensure_ascii=False), encoding="utf-8")


@pytest.fixture(scope="module")
def memorized(tiny_model_dir, tmp_path_factory) -> dict:
    result_path = tmp_path_factory.mktemp("memorize") / "result.json"
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_fixture; test_fixture.memorize(*sys.argv[1:])"
    result = subprocess.run([sys.executable, "-c", code, str(tiny_model_dir), str(result_path)], cwd=result_path.parent,
                            env={**os.environ, **OFFLINE_ENV}, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "no GPU found, training on CPU" in result.stdout
    return json.loads(result_path.read_text(encoding="utf-8"))


def test_qlora_sft_memorizes_summaries_and_stops_at_end_of_turn(memorized):
    assert memorized["quantized_linears"] == 14, "all 7 projections of both layers should be 4-bit"
    assert memorized["generated"] == memorized["summaries"]
    for ids, summary in zip(memorized["new_tokens"], memorized["summaries"]):
        stop = ids.index(END_OF_TURN_ID)
        assert set(ids[stop + 1:]) <= {PAD_ID}, "generation must stop at <end_of_turn>"
    assert memorized["padding_side"] == "left", "for_inference switches to left padding for batched generate"


def test_trl_masks_the_prompt_and_trains_on_summary_end_of_turn_newline(memorized):
    """TRL templates prompt+completion and masks the prompt rendered with add_generation_prompt=True:
    one <bos>, and the loss covers the summary, <end_of_turn> and the template's trailing "\\n"
    (no <eos> is appended to conversational rows)."""
    prompt, summary, labels = memorized["prompt_ids"], memorized["summary_ids"], memorized["labels"]
    assert memorized["input_ids"] == prompt + summary + [END_OF_TURN_ID, memorized["newline_id"]]
    assert memorized["input_ids"].count(BOS_ID) == 1
    assert labels == [-100] * len(prompt) + summary + [END_OF_TURN_ID, memorized["newline_id"]]
