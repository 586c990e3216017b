"""dedup.py: n-gram hashes, MinHash LSH and exact Jaccard against pure-Python references; the leak check.
Leaks through the real `python prep.py --extra ... --test ...` command line are in test_prep.py."""
from __future__ import annotations

import random

import numpy as np
import pytest

import daily_talk
import dedup

MASK64 = (1 << 64) - 1


def reference_ngram_hashes(text: str, n: int) -> list[int]:
    """Plain-Python n-gram hashes with the same normalization and hash as dedup.py, one text at a time."""
    def mix(h: int) -> int:
        h ^= h >> 30
        h = (h * 0xBF58476D1CE4E5B9) & MASK64
        h ^= h >> 27
        h = (h * 0x94D049BB133111EB) & MASK64
        return h ^ (h >> 31)

    lowered = (c.lower() if len(c.lower()) == 1 else c for c in text)  # "İ" lowercases to two characters: kept as is
    normalized = "".join(c for c in lowered if c.isalnum() or c == "_")
    codes = [ord(c) for c in normalized] + [0] * max(0, n - len(normalized))
    hashes = []
    for i in range(len(codes) - n + 1):
        h = 0
        for c in codes[i:i + n]:
            h = (h * 0x100000001B3 + c) & MASK64
        hashes.append(mix(h))
    return hashes


def reference_jaccard(a: str, b: str) -> float:
    a_set, b_set = set(reference_ngram_hashes(a, 3)), set(reference_ngram_hashes(b, 3))
    return len(a_set & b_set) / len(a_set | b_set)


def random_texts(seed: int, count: int, max_length: int = 250) -> list[str]:
    rng = random.Random(seed)
    alphabet = [chr(c) for c in range(0xAC00, 0xAC00 + 200)] + list("abcXYZ 019_,.!?~\n\t") + ["İ", "😀", "Ⅻ"]
    return ["".join(rng.choices(alphabet, k=rng.randint(0, max_length))) for _ in range(count)] + ["", "a", "ab", "abc", "Hello, World!"]


@pytest.mark.parametrize("n", [3, 5])
def test_vectorised_ngram_hashes_equal_a_text_by_text_reference(n):
    texts = random_texts(3, 150)
    hashes, counts = dedup.ngram_hashes(texts, n)
    per_text = np.split(hashes, np.cumsum(counts)[:-1])
    assert [h.tolist() for h in per_text] == [reference_ngram_hashes(t, n) for t in texts]


def test_exact_jaccards_of_many_pairs_at_once():
    texts = random_texts(4, 60, max_length=40)
    rng = random.Random(4)
    i = np.array([rng.randrange(len(texts)) for _ in range(300)])
    j = np.array([rng.randrange(len(texts)) for _ in range(300)])
    assert dedup.ngram_jaccards(texts, i, j).tolist() == pytest.approx([reference_jaccard(texts[a], texts[b]) for a, b in zip(i, j)])


def test_spacing_and_punctuation_do_not_change_the_signature():
    a, b = dedup.minhash_signatures(["오늘 날씨가 정말 좋네요. 산책 갈까요?", "오늘날씨가 정말, 좋네요!! 산책 갈까요"])
    assert (a == b).all()


def edit_words(text: str, n_edits: int, rng: random.Random) -> str:
    words = text.split()
    for k in rng.sample(range(len(words)), n_edits):
        words[k] = "".join(rng.choices([chr(c) for c in range(0xAC00, 0xAC00 + 2000)], k=len(words[k])))
    return " ".join(words)


def korean_like_text(rng: random.Random, n_words: int) -> str:
    return " ".join("".join(rng.choices([chr(c) for c in range(0xAC00, 0xAC00 + 2000)], k=rng.randint(1, 4))) for _ in range(n_words))


def test_signature_agreement_estimates_the_jaccard_similarity():
    """Densified one-permutation MinHash stays unbiased, for long texts and for texts with fewer
    3-grams than bins (most bins borrowed)."""
    rng = random.Random(5)
    errors = []
    for n_words in (8, 40, 150):
        for n_edits in (1, n_words // 4, n_words // 2):
            a = korean_like_text(rng, n_words)
            b = edit_words(a, n_edits, rng)
            signatures = dedup.minhash_signatures([a, b])
            agreement = dedup.signature_agreement(signatures, np.array([0]), np.array([1]))[0]
            errors.append(agreement - reference_jaccard(a, b))
    assert max(map(abs, errors)) < 0.15 and abs(np.mean(errors)) < 0.04, errors


def test_keep_first_equals_a_brute_force_sequential_scan():
    """Near-copies (1-3 words of 100 changed), copies of copies, and rows that share half their
    text with others (a template: Jaccard ~0.3-0.5) or nothing: the LSH result equals comparing
    every row with every earlier kept row."""
    rng = random.Random(11)
    template = korean_like_text(rng, 50)
    texts: list[str] = []
    for _ in range(400):
        roll = rng.random()
        if texts and roll < 0.3:
            texts.append(edit_words(rng.choice(texts), rng.randint(1, 3), rng))
        elif roll < 0.6:
            texts.append(template + " " + korean_like_text(rng, 50))
        else:
            texts.append(korean_like_text(rng, 100))
    keep = dedup.keep_first_of_near_duplicates(texts, 0.7)
    sets = [set(reference_ngram_hashes(text, 3)) for text in texts]
    kept: list[int] = []
    expected = []
    for k in range(len(texts)):
        is_new = all(len(sets[a] & sets[k]) < 0.7 * len(sets[a] | sets[k]) for a in kept)
        expected.append(is_new)
        if is_new:
            kept.append(k)
    assert keep.tolist() == expected
    assert 60 <= len(texts) - len(kept) <= 130  # the planted near-copies went; the templated rows stayed


def test_a_bucket_of_many_rows_sharing_a_template_is_linear_not_quadratic():
    keys = np.array([7] * 5000 + [3, 9, 3], dtype=np.uint64)
    i, j = dedup._bucket_pairs(keys)
    assert len(i) == 2 * (4999 + 1)  # each later row of a bucket: its first and its previous row
    assert (i < j).all() and set(zip(i.tolist(), j.tolist())) >= {(0, 1), (0, 4999), (4998, 4999), (5000, 5002)}


def test_no_rows_one_row_and_texts_shorter_than_a_shingle():
    assert dedup.keep_first_of_near_duplicates([], 0.7).tolist() == []
    assert dedup.keep_first_of_near_duplicates(["x"], 0.7).tolist() == [True]
    assert dedup.keep_first_of_near_duplicates(["", "ab", "ab!", "", "abc"], 0.7).tolist() == [True, True, False, False, True]


def test_leak_matches_by_utterance_content():
    dialogue = ["아까 누나가 한 명 있다고 하셨는데 몇 살 차이 나세요?", "저랑은 세 살 차이 나는데 어릴 때는 많이 싸웠어요",
                "지금은 사이가 좋으세요?", "네 요즘은 같이 여행도 다니고 자주 연락해요", "부럽네요 저는 외동이라서 형제가 있었으면 했어요"]
    rows = [
        "\n".join(f"SD200012{k % 2}: {u}" for k, u in enumerate(dialogue)),  # another prefix
        " ".join(dialogue[:3]),  # half, one paragraph
        "다음 대화를 요약하세요.\n" + " / ".join(dialogue) + "\n요약:",  # separators and an instruction
        "저는 주말마다 등산을 가요. 산 위에서 먹는 김밥이 제일 맛있어요. 다음에 같이 가실래요?",
        dialogue[0],  # one utterance is not a dialogue
    ]
    matched, shares = dedup.leak_matches(rows, [["네", "아니요"], dialogue])
    assert matched.tolist() == [1, 1, 1, -1, -1]
    assert shares[0] == shares[2] == 1.0 and 0.5 < shares[1] < 0.7 and shares[3] == shares[4] == 0


def test_leaks_are_long_stretches_in_order_not_shared_phrases():
    """Issue 17 item 15: every layout of a held-out dialogue, re-segmented ones included, is caught and matched
    to its dialogue; of 300 rows built from the same phrase grammar (no talk of theirs) at most 2% go, where
    the share of 5-grams alone flags most of them."""
    rng = random.Random(17)
    held_out = [daily_talk.dialogue(rng, rng.randint(10, 20)) for _ in range(12)]
    leaks = [(k, layout, text) for k, talk in enumerate(held_out)
             for layout, text in daily_talk.leak_texts(talk, rng).items()]
    matched, shares = dedup.leak_matches([text for _, _, text in leaks], held_out)
    missed = [(k, layout) for (k, layout, _), m in zip(leaks, matched) if m != k]
    assert not missed and shares.min() >= dedup.LEAK_MIN_SHARE

    unrelated = [daily_talk.unrelated_text(rng, layout) for layout in range(300)]
    candidates, _ = dedup._leak_candidates(unrelated, held_out, None, 20_000)
    assert len(set(candidates.tolist())) > 150, "5-gram shares alone flag most"
    matched, _ = dedup.leak_matches(unrelated, held_out)
    assert (matched >= 0).sum() <= 6
