"""SimHash near-duplicate removal: prep.py's numpy version against the `simhash` package.

    python tests/benchmarks/bench_dedup.py                       # 200k rows; simhash compared on 20k
    python tests/benchmarks/bench_dedup.py --compare_rows 200000 # both tools on all 200k (~5 min)

A synthetic corpus of Magpie-size rows (~600 characters of Korean-like text drawn from a Zipf
vocabulary, a fifth of them opening with one shared 300-character template) with planted
near-duplicates: copies of an earlier row with one or two light edits (a typo, a swapped, dropped
or inserted word, changed spacing/punctuation). Both tools keep the first of each near-duplicate
group at distance <= 3 of 64 bits (prep.py also confirms a fingerprint match by the texts' 3-gram
Jaccard, as prep.py does when it runs); the `simhash` package is driven the way the seed team used
it (Simhash per row, SimhashIndex.get_near_dups, add the survivors). Recall = planted copies
flagged; false matches = flagged rows that are not planted copies (the templated rows share half
their text and are the hard negatives). Times include normalisation, fingerprints and search.
Exits 1 if a target is missed.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import prep  # noqa: E402

N_SYLLABLES = 2350  # the KS X 1001 count of common Hangul syllables, drawn from U+AC00 on
PUNCTUATION = ["", "", "", "", ".", ",", "?"]
WORDS_PER_ROW = 180  # enough for 600 characters
ZIPF_VOCAB, ZIPF_EXPONENT = 30_000, 0.8  # word frequencies of a natural-ish text, not one word dominating


def make_corpus(n_rows: int, dup_fraction: float, seed: int) -> tuple[list[str], np.ndarray]:
    """(texts, original index of each planted copy or -1)."""
    rng = np.random.default_rng(seed)
    syllable = lambda: chr(0xAC00 + int(rng.integers(0, N_SYLLABLES)))  # noqa: E731
    vocab = ["".join(syllable() for _ in range(rng.integers(1, 5))) for _ in range(ZIPF_VOCAB)]
    weights = 1.0 / np.arange(1, len(vocab) + 1) ** ZIPF_EXPONENT
    word_ids = rng.choice(len(vocab), size=(n_rows + 1, WORDS_PER_ROW), p=weights / weights.sum()).tolist()
    marks = rng.choice(PUNCTUATION, size=(n_rows, WORDS_PER_ROW)).tolist()
    template = " ".join(vocab[w] for w in word_ids[n_rows][:110])[:300]
    spare_words = iter(rng.choice(len(vocab), size=4 * n_rows, p=weights / weights.sum()).tolist())

    def fresh_text(i: int, templated: bool) -> str:
        text = " ".join(map(str.__add__, map(vocab.__getitem__, word_ids[i]), marks[i]))
        text = (template + " " + text) if templated else text
        return text[:600].rsplit(" ", 1)[0]

    def edit(text: str) -> str:
        words = text.split()
        for _ in range(rng.integers(1, 3)):
            k = int(rng.integers(1, len(words) - 1))
            kind = rng.integers(0, 5)
            if kind == 0:  # typo: one syllable replaced
                pos = int(rng.integers(0, len(words[k])))
                words[k] = words[k][:pos] + syllable() + words[k][pos + 1:]
            elif kind == 1:
                words[k] = vocab[next(spare_words)]
            elif kind == 2:
                del words[k]
            elif kind == 3:
                words.insert(k, vocab[next(spare_words)])
            else:  # spacing / punctuation only
                words[k] = words[k] + str(rng.choice([",", ".", " ", "!"]))
        return " ".join(words)

    is_copy = rng.random(n_rows) < dup_fraction
    is_copy[0] = False
    templated = rng.random(n_rows) < 0.2
    texts: list[str] = []
    original = np.full(n_rows, -1)
    for i in range(n_rows):
        if is_copy[i]:
            src = int(rng.integers(0, i))
            while original[src] >= 0:  # copy an original, not a copy
                src = int(original[src])
            original[i] = src
            texts.append(edit(texts[src]))
        else:
            texts.append(fresh_text(i, templated[i]))
    return texts, original


def score(flagged: np.ndarray, original: np.ndarray) -> tuple[int, int, int]:
    planted = original >= 0
    return int(planted.sum()), int((flagged & planted).sum()), int((flagged & ~planted).sum())


def run_prep(texts: list[str], k: int) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    keep = prep.keep_first_of_near_duplicates(prep.simhash_fingerprints(texts), k, texts)
    return ~keep, time.perf_counter() - start


def run_simhash_package(texts: list[str], k: int) -> tuple[np.ndarray, float]:
    from simhash import Simhash, SimhashIndex

    logging.getLogger("simhash").setLevel(logging.ERROR)  # it logs every crowded bucket

    start = time.perf_counter()
    index = SimhashIndex([], k=k)
    flagged = np.zeros(len(texts), dtype=bool)
    for i, text in enumerate(texts):
        fingerprint = Simhash(text)
        if index.get_near_dups(fingerprint):
            flagged[i] = True
        else:
            index.add(str(i), fingerprint)
    return flagged, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--compare_rows", type=int, default=20_000, help="rows both tools run on")
    parser.add_argument("--dup_fraction", type=float, default=0.1)
    parser.add_argument("--dedup_distance", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    texts, original = make_corpus(args.rows, args.dup_fraction, args.seed)
    print(f"corpus: {len(texts)} rows, mean {np.mean([len(t) for t in texts]):.0f} chars, {int((original >= 0).sum())} planted near-duplicates")
    m = min(args.compare_rows, args.rows)
    sub_texts, sub_original = texts[:m], original[:m]
    results = {}
    for name, fn in (("prep.py (numpy)", run_prep), ("simhash package", run_simhash_package)):
        flagged, seconds = fn(sub_texts, args.dedup_distance)
        results[name] = (seconds, *score(flagged, sub_original))
    full_flagged, full_seconds = run_prep(texts, args.dedup_distance)
    full = (full_seconds, *score(full_flagged, original))

    print(f"\nsame {m} rows, distance <= {args.dedup_distance}:")
    print(f"{'tool':18} {'seconds':>8} {'rows/s':>9} {'recall':>16} {'false matches':>14}")
    for name, (seconds, planted, found, false) in results.items():
        print(f"{name:18} {seconds:8.2f} {m / seconds:9.0f} {found:>6}/{planted:<6} {found / planted:4.0%} {false:14d}")
    ours, theirs = results["prep.py (numpy)"], results["simhash package"]
    ratio = theirs[0] / ours[0]
    print(f"speed ratio: {ratio:.0f}x")
    seconds, planted, found, false = full
    print(f"\nprep.py on all {args.rows} rows: {seconds:.2f} s, {args.rows / seconds:.0f} rows/s, recall {found}/{planted} ({found / planted:.1%}), false matches {false}")

    checks = {
        f"{args.rows} rows in <= 30 s": seconds <= 30,
        ">= 10x faster than the simhash package": ratio >= 10,
        "recall >= simhash package": ours[2] >= theirs[2],
        "false matches <= simhash package": ours[3] <= theirs[3],
    }
    for label, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {label}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
