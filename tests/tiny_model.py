"""A tiny Gemma 2 built on the spot (no downloads): the tests' model and `bash run.sh --smoke`'s.

    python tests/tiny_model.py OUT_DIR       # random 2-layer Gemma 2 + byte-level tokenizer, ~1 s

It copies what the scripts rely on in google/gemma-2-9b-it: the special-token ids (pad 0, eos 1, bos 2,
unk 3, <start_of_turn> 106, <end_of_turn> 107), a tokenizer that prepends <bos>, the official chat
template, and a generation config that stops on [<eos>, <end_of_turn>]. Its tokenizer is byte-level BPE
trained on data/sample, so Korean text and newlines round-trip exactly and a sample prompt is ~200 tokens.
transformers is imported inside the builders: whoever imports this module before unsloth stays clean.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO_ROOT / "data" / "sample"

# tokenizer_config.json of google/gemma-2-9b-it, verbatim.
GEMMA2_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
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


def build_tiny_gemma2(out_dir: Path, hidden_size: int = TINY_HIDDEN_SIZE, seed: int = 0, heads: int = 4,
                      kv_heads: int = 2) -> Path:
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
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=[EOS_ID, END_OF_TURN_ID],
                                               pad_token_id=PAD_ID)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    # Saved the way the real tokenizer_config.json has it, so a reload re-derives the <bos> post-processor.
    config_path = out_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text(encoding="utf-8"))
    tokenizer_config.update(add_bos_token=True, add_eos_token=False)
    config_path.write_text(json.dumps(tokenizer_config, ensure_ascii=False, indent=2), encoding="utf-8")
    return out_dir


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python tests/tiny_model.py OUT_DIR", file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO_ROOT))
    from common import filter_known_noise

    filter_known_noise()  # torchao's failed kernel loads and the like, as the scripts hide them
    out_dir = build_tiny_gemma2(Path(argv[0]))
    print(f"tiny Gemma 2 -> {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
