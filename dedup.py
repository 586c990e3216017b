"""Near-duplicates and leaks: character n-grams, MinHash LSH, vectorised with numpy.

prep.py removes augmentation rows that carry a dev/test dialogue (`leak_matches`) and near-duplicate
rows (`keep_first_of_near_duplicates`), both in `leaks_then_near_duplicates`, and pseudo-labels that copy a dev
reference (`near_copies`); distill.py magpie filters its instructions with the same engine.
Pure numpy, no project imports: benchmarked in tests/benchmarks/bench_dedup.py.
"""
from __future__ import annotations

import functools

import numpy as np

# Texts are compared as sets of character n-grams of the text lowercased with every non-word
# character removed: spacing and punctuation edits are invisible, and speaker prefixes or an
# instruction around a text only add n-grams. Each n-gram is hashed to 64 bits.
#
# Near-duplicates: one-permutation MinHash (Li, Owen & Zhang 2012) of a text's 3-grams. The top
# byte of an n-gram's hash picks one of 256 bins and each bin keeps the smallest low 24 bits; an
# empty bin borrows the next filled bin's value tagged with the distance (rotation densification,
# Shrivastava & Li 2014). Two texts then agree on a bin with probability equal to the Jaccard
# similarity J of their 3-gram sets, at one hash per n-gram rather than one per n-gram and
# permutation (datasketch's MinHash). The bins form 32 bands of 8: texts that share a band are
# candidates, found with probability 1 - (1 - J^8)^32 (J 0.8: 99.7%, 0.75: 97%, 0.7: 85%,
# 0.6: 42%, 0.5: 12%). A candidate counts only if its exact 3-gram Jaccard reaches
# --dedup_threshold, so rows that merely share a template or system prompt stay.

SHINGLE = 3  # characters per n-gram for near-duplicates
LEAK_SHINGLE = 5  # longer for leaks: unrelated Korean dialogues share many 3-grams, few 5-grams
MINHASH_BANDS, MINHASH_ROWS = 32, 8
_BIN_BITS, _VALUE_BITS = 8, 24  # 2**8 bins = MINHASH_BANDS * MINHASH_ROWS; bits above a value hold the borrow distance
_EMPTY_BIN = np.uint32(0xFFFFFFFF)
# Candidates whose signatures agree on fewer bins than the threshold minus this margin (about 1.7
# standard deviations of the estimate at 0.7) skip the exact check: most of them share a template.
AGREEMENT_MARGIN = 0.05
_POLY = np.uint64(0x100000001B3)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


@functools.cache
def _normalize_table() -> np.ndarray:
    """Code point -> its lowercase if `re`'s \\w keeps it (letters and digits of any script, '_'), else 0."""
    def norm(c: int) -> int:
        char = chr(c)
        if not (char.isalnum() or char == "_"):
            return 0
        lower = char.lower()
        return ord(lower) if len(lower) == 1 else c

    return np.fromiter(map(norm, range(0x110000)), dtype=np.uint32, count=0x110000)


def _normalized_codes(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(code points of all texts lowercased with non-word characters removed, length of each)."""
    lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    mapped = _normalize_table()[np.frombuffer("".join(texts).encode("utf-32-le", "surrogatepass"), dtype=np.uint32)]
    keep = mapped != 0
    text_starts = np.concatenate(([0], np.cumsum(lengths)))
    removed_before = np.searchsorted(np.flatnonzero(~keep), text_starts)  # at each text's start
    return mapped[keep], lengths - np.diff(removed_before)


def _mix64(h: np.ndarray) -> np.ndarray:
    h ^= h >> np.uint64(30)
    h *= _MIX1
    h ^= h >> np.uint64(27)
    h *= _MIX2
    h ^= h >> np.uint64(31)
    return h


def _ngram_hashes(codes: np.ndarray, lengths: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(64-bit hash of every n-gram of every text, in order; n-grams per text). A text shorter
    than n is one n-gram, padded with zeros, so that every text has at least one."""
    padded = np.maximum(lengths, n)
    if (lengths < n).any():
        grid = np.zeros(int(padded.sum()), dtype=np.uint64)
        grid[_expand_ranges(np.cumsum(padded) - padded, lengths)] = codes
    else:
        grid = codes.astype(np.uint64)
    n_positions = len(grid) - n + 1
    h = grid[:n_positions].copy()
    for offset in range(1, n):
        h *= _POLY
        h += grid[offset:offset + n_positions]
    inside = np.ones(len(grid), dtype=bool)  # n-grams that start in the last n - 1 places of a text cross into the next
    for back in range(1, n):
        inside[np.cumsum(padded) - back] = False
    return _mix64(h[inside[:n_positions]]), padded - (n - 1)


def ngram_hashes(texts: list[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    return _ngram_hashes(*_normalized_codes(texts), n)


def minhash_signatures(texts: list[str], on_progress=None, chunk_rows: int = 20_000) -> np.ndarray:
    """(rows, 256) uint32 one-permutation MinHash signatures of the texts' 3-gram sets."""
    n_bins = MINHASH_BANDS * MINHASH_ROWS
    columns = np.arange(n_bins)
    out = np.empty((len(texts), n_bins), dtype=np.uint32)
    for start in range(0, len(texts), chunk_rows):
        hashes, counts = ngram_hashes(texts[start:start + chunk_rows], SHINGLE)
        bins = (hashes >> np.uint64(64 - _BIN_BITS)).astype(np.intp)
        bins += np.repeat(np.arange(0, len(counts) * n_bins, n_bins), counts)
        signatures = np.full(len(counts) * n_bins, _EMPTY_BIN, dtype=np.uint32)
        np.minimum.at(signatures, bins, (hashes & np.uint64((1 << _VALUE_BITS) - 1)).astype(np.uint32))
        signatures = signatures.reshape(len(counts), n_bins)
        sparse = np.flatnonzero((signatures == _EMPTY_BIN).any(axis=1))
        if len(sparse):
            filled_at = np.where(signatures[sparse] == _EMPTY_BIN, 2 * n_bins, columns)
            filled_at = np.concatenate([filled_at, filled_at + n_bins], axis=1)  # wrap around
            donor = np.minimum.accumulate(filled_at[:, ::-1], axis=1)[:, ::-1][:, :n_bins]
            borrowed = np.take_along_axis(signatures[sparse], donor % n_bins, axis=1)
            signatures[sparse] = borrowed | ((donor - columns).astype(np.uint32) << np.uint32(_VALUE_BITS))
        out[start:start + len(counts)] = signatures
        if on_progress:
            on_progress(len(counts))
    return out


def _bucket_pairs(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(earlier, later) row pairs with equal keys: every row with the first and with the previous
    row of its bucket. Linear in the rows, where all pairs would be quadratic in a bucket of rows
    that share a template; a pair of near-duplicates in such a bucket meets in other bands."""
    order = np.argsort(keys, kind="stable")  # equal keys stay in row order
    sorted_keys = keys[order]
    same = np.zeros(len(keys), dtype=bool)
    same[1:] = sorted_keys[1:] == sorted_keys[:-1]
    bucket_first = order[np.maximum.accumulate(np.where(same, 0, np.arange(len(keys))))]
    later = order[same]
    return np.concatenate([bucket_first[same], order[np.flatnonzero(same) - 1]]), np.concatenate([later, later])


def candidate_pairs(signatures: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique (earlier, later) row pairs that share at least one band of their signatures."""
    n_rows = len(signatures)
    keys = np.zeros((n_rows, MINHASH_BANDS), dtype=np.uint64)
    for row in range(MINHASH_ROWS):  # band b is bins 8b .. 8b+7
        keys = _mix64(keys ^ signatures[:, row::MINHASH_ROWS].astype(np.uint64))
    packed = [i.astype(np.int64) * n_rows + j for i, j in map(_bucket_pairs, keys.T)]
    return np.divmod(np.unique(np.concatenate(packed)), max(n_rows, 1))


def signature_agreement(signatures: np.ndarray, i: np.ndarray, j: np.ndarray, chunk: int = 50_000) -> np.ndarray:
    """Share of equal bins for each pair: an estimate of its Jaccard similarity."""
    return np.concatenate([(signatures[i[s:s + chunk]] == signatures[j[s:s + chunk]]).mean(axis=1)
                           for s in range(0, len(i), chunk)] or [np.empty(0)])


def _expand_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The indices starts[k] .. starts[k] + lengths[k] - 1 of every range k, concatenated."""
    return np.repeat(starts - (np.cumsum(lengths) - lengths), lengths) + np.arange(int(lengths.sum()))


def _unique_pairs(first: np.ndarray, second: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (first, second) pairs, sorted by first."""
    order = np.lexsort((second, first))
    first, second = first[order], second[order]
    new = np.ones(len(first), dtype=bool)
    new[1:] = (first[1:] != first[:-1]) | (second[1:] != second[:-1])
    return first[new], second[new]


def ngram_jaccards(texts: list[str], i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Exact Jaccard similarity of the 3-gram sets of texts[i[k]] and texts[j[k]], for every k."""
    rows = np.unique(np.concatenate([i, j]))
    hashes, counts = ngram_hashes([texts[r] for r in rows], SHINGLE)
    # Every row's distinct 3-grams as one sorted array of keys: the row's rank in the top 24 bits,
    # 40 bits of the hash below (two 3-grams of one text collide with odds of about one in a million).
    row_ranks = np.repeat(np.arange(len(rows), dtype=np.uint64), counts)
    keys = np.sort((row_ranks << np.uint64(40)) | (hashes >> np.uint64(24)))
    repeated = np.zeros(len(keys), dtype=bool)
    repeated[1:] = keys[1:] == keys[:-1]
    keys = keys[~repeated]
    sizes = np.bincount((keys >> np.uint64(40)).astype(np.intp), minlength=len(rows))
    a, b = np.searchsorted(rows, i), np.searchsorted(rows, j)
    b_keys = keys[_expand_ranges(np.cumsum(sizes)[b] - sizes[b], sizes[b])]
    queries = b_keys & np.uint64((1 << 40) - 1)  # b's 3-grams ...
    queries |= np.repeat(a.astype(np.uint64), sizes[b]) << np.uint64(40)  # ... looked up among a's
    found = keys[np.minimum(np.searchsorted(keys, queries), len(keys) - 1)] == queries
    shared = np.bincount(np.repeat(np.arange(len(i)), sizes[b]), weights=found, minlength=len(i))
    return shared / np.maximum(sizes[a] + sizes[b] - shared, 1)


def keep_first_of_near_duplicates(texts: list[str], threshold: float, on_progress=None) -> np.ndarray:
    """Boolean keep-mask: a text goes when an earlier KEPT text has a 3-gram Jaccard >= threshold.

    MinHash LSH proposes the pairs, their signatures must roughly agree, and the exact Jaccard decides.
    """
    signatures = minhash_signatures(texts, on_progress)
    i, j = candidate_pairs(signatures)
    likely = signature_agreement(signatures, i, j) >= threshold - AGREEMENT_MARGIN
    i, j = i[likely], j[likely]
    similar = ngram_jaccards(texts, i, j) >= threshold
    i, j = i[similar], j[similar]
    order = np.lexsort((i, j))  # by the later row: every earlier row's verdict is final when it is used
    keep = np.ones(len(texts), dtype=bool)
    for a, b in zip(i[order].tolist(), j[order].tolist()):
        if keep[a]:
            keep[b] = False
    return keep


# A leak is a held-out dialogue's talk copied into a row: long stretches of it, in its order, whatever the
# layout around them (speaker labels, separators, an instruction, the talk cut into other utterances).
# Rows made of the same everyday phrases share many 5-grams with a dialogue but only short, scattered
# runs of its text. So a row is first a candidate when it holds LEAK_MIN_SHARE of one dialogue's distinct
# 5-grams (taken inside each utterance; cheap, vectorised over all rows), and the candidate is confirmed
# when stretches of at least LEAK_MIN_STRETCH characters of that dialogue's text cover LEAK_MIN_SHARE of it.
# A stretch is a chain of exact runs (row and dialogue read on in step) that the row may interrupt for up
# to LEAK_ROW_GAP characters (a speaker label, a separator word) while the dialogue skips at most
# LEAK_DIALOGUE_GAP (an utterance too short to hold a 5-gram, a one-character edit).
LEAK_MIN_SHARE = 0.3
LEAK_MIN_STRETCH = 40  # characters (spaces and punctuation removed): about a dozen Korean words
LEAK_ROW_GAP = 24  # two speaker labels around a skipped one-word utterance ("sd2000032b" is 10)
LEAK_DIALOGUE_GAP = 4


def leak_matches(texts: list[str], dialogues: list[list[str]], on_progress=None,
                 chunk_rows: int = 20_000) -> tuple[np.ndarray, np.ndarray]:
    """(index of the dialogue each text carries, -1 for none; share of that dialogue's text in long stretches)."""
    matched, shares = np.full(len(texts), -1), np.zeros(len(texts))
    held_out = _HeldOutText(dialogues)
    rows, candidates = _leak_candidates(texts, dialogues, on_progress, chunk_rows)  # sorted by row
    starts = np.flatnonzero(np.diff(rows, prepend=-1))
    for row, row_candidates in zip(rows[starts].tolist(), np.split(candidates, starts[1:])):
        share = held_out.stretch_shares(texts[row], row_candidates)
        if share.max() >= LEAK_MIN_SHARE:
            matched[row], shares[row] = row_candidates[share.argmax()], share.max()
    return matched, shares


def _leak_candidates(texts, dialogues, on_progress, chunk_rows) -> tuple[np.ndarray, np.ndarray]:
    """(row, dialogue) pairs, by row: the row holds LEAK_MIN_SHARE of the dialogue's distinct utterance 5-grams."""
    utterances = [utterance for dialogue in dialogues for utterance in dialogue]
    codes, lengths = _normalized_codes(utterances)
    hashes, counts = _ngram_hashes(codes, lengths, LEAK_SHINGLE)
    owner = np.repeat(np.repeat(np.arange(len(dialogues)), [len(d) for d in dialogues]), counts)
    real = np.repeat(lengths >= LEAK_SHINGLE, counts)  # not a padded short utterance
    table_hashes, table_dialogues = _unique_pairs(hashes[real], owner[real])
    sizes = np.bincount(table_dialogues, minlength=len(dialogues))
    may_hit = np.zeros(1 << 24, dtype=bool)  # a cheap first look on the top bits, exact lookups for the few that pass
    may_hit[table_hashes >> np.uint64(40)] = True
    found_rows, found_dialogues = [np.empty(0, dtype=np.int64)], [np.empty(0, dtype=np.int64)]
    for start in range(0, len(texts), chunk_rows):
        hashes, counts = ngram_hashes(texts[start:start + chunk_rows], LEAK_SHINGLE)
        rows = np.repeat(np.arange(start, start + len(counts)), counts)
        hit = may_hit[hashes >> np.uint64(40)]
        hashes, rows = _unique_pairs(hashes[hit], rows[hit])
        low, high = np.searchsorted(table_hashes, hashes, "left"), np.searchsorted(table_hashes, hashes, "right")
        matches = high - low  # a 5-gram can belong to several dialogues
        pairs = np.repeat(rows, matches) * len(dialogues) + table_dialogues[_expand_ranges(low, matches)]
        pair, shared = np.unique(pairs, return_counts=True)
        row, dialogue = np.divmod(pair, len(dialogues))
        candidate = shared >= LEAK_MIN_SHARE * sizes[dialogue]
        found_rows.append(row[candidate])
        found_dialogues.append(dialogue[candidate])
        if on_progress:
            on_progress(len(counts))
    return np.concatenate(found_rows), np.concatenate(found_dialogues)


class _HeldOutText:
    """Every dialogue's utterances as one normalized text, laid end to end with a gap between dialogues that no
    chain bridges. Its 5-grams are sorted by hash and then dialogue (the dialogue in the low bits of the key), so
    a row is looked up in its candidate dialogues only: an everyday 5-gram found in every dialogue costs little."""

    def __init__(self, dialogues: list[list[str]]):
        codes, self.lengths = _normalized_codes(["".join(dialogue) for dialogue in dialogues])
        hashes, counts = _ngram_hashes(codes, self.lengths, LEAK_SHINGLE)
        self.offsets = np.cumsum(self.lengths + LEAK_ROW_GAP) - self.lengths - LEAK_ROW_GAP
        position = np.arange(len(hashes)) - np.repeat(np.cumsum(counts) - counts - self.offsets, counts)
        real = np.repeat(self.lengths >= LEAK_SHINGLE, counts)  # not the padded 5-gram of a dialogue under 5 characters
        self.bits = np.uint64(max(len(dialogues) - 1, 1).bit_length())
        keys = self._hash_part(hashes[real]) | np.repeat(np.arange(len(dialogues), dtype=np.uint64), counts)[real]
        order = np.argsort(keys, kind="stable")
        self.keys, self.positions = keys[order], position[real][order]

    def _hash_part(self, hashes: np.ndarray) -> np.ndarray:
        return (hashes >> self.bits) << self.bits

    def stretch_shares(self, text: str, dialogues: np.ndarray) -> np.ndarray:
        """For each of `dialogues`: the share of its characters inside stretches of LEAK_MIN_STRETCH+ that `text`
        holds in order."""
        hashes, _ = ngram_hashes([text], LEAK_SHINGLE)
        queries = (self._hash_part(hashes)[:, None] | dialogues.astype(np.uint64)[None, :]).ravel()
        low, high = np.searchsorted(self.keys, queries, "left"), np.searchsorted(self.keys, queries, "right")
        row_at = np.repeat(np.arange(len(queries)) // len(dialogues), high - low)
        row_start, dialogue_start, size = _exact_runs(row_at, self.positions[_expand_ranges(low, high - low)])
        earlier, later = _chain_links(row_start, dialogue_start, size)
        ending, starting = _longest_chains(size, earlier, later), _longest_chains(size, later, earlier)
        kept = ending + starting - size >= LEAK_MIN_STRETCH  # the longest chain through the run
        covered = _covered_lengths(dialogue_start[kept], dialogue_start[kept] + size[kept])
        owner = np.searchsorted(self.offsets, dialogue_start[kept], "right") - 1
        per_dialogue = np.bincount(owner, weights=covered, minlength=len(self.lengths))
        return per_dialogue[dialogues] / np.maximum(self.lengths[dialogues], 1)


def _covered_lengths(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Characters each interval adds to the union of the intervals before it (taken in start order), in input order."""
    order = np.argsort(starts, kind="stable")
    reach = np.maximum.accumulate(ends[order])
    before = np.concatenate([[np.iinfo(np.int64).min], reach[:-1]])
    added = np.zeros(len(starts), dtype=np.int64)
    added[order] = np.maximum(ends[order] - np.maximum(starts[order], before), 0)
    return added


def _exact_runs(row_at: np.ndarray, dialogue_at: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Maximal runs of equal 5-grams at consecutive places in both texts: (row start, dialogue start, characters)."""
    order = np.lexsort((row_at, row_at - dialogue_at))
    row_at, dialogue_at = row_at[order], dialogue_at[order]
    starts = np.ones(len(row_at), dtype=bool)
    starts[1:] = (np.diff(row_at) != 1) | (np.diff(row_at - dialogue_at) != 0)
    first = np.flatnonzero(starts)
    return row_at[first], dialogue_at[first], np.diff(np.append(first, len(row_at))) + LEAK_SHINGLE - 1


def _chain_links(row_start: np.ndarray, dialogue_start: np.ndarray, size: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(earlier, later) run pairs where the later run goes on from the earlier one: the dialogue skips at most
    LEAK_DIALOGUE_GAP characters and the row LEAK_ROW_GAP (or they overlap by less than a 5-gram)."""
    by_dialogue = np.argsort(dialogue_start, kind="stable")
    starts = dialogue_start[by_dialogue]
    low = np.searchsorted(starts, dialogue_start + size - LEAK_SHINGLE + 1, "left")
    high = np.searchsorted(starts, dialogue_start + size + LEAK_DIALOGUE_GAP, "right")
    earlier = np.repeat(np.arange(len(size)), high - low)
    later = by_dialogue[_expand_ranges(low, high - low)]
    row_gap = row_start[later] - (row_start[earlier] + size[earlier])
    near = (row_gap > -LEAK_SHINGLE) & (row_gap <= LEAK_ROW_GAP)
    return earlier[near], later[near]


def _longest_chains(size: np.ndarray, source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Characters of the longest chain of runs that reaches each run along the links source -> target. The links
    go forward in the row, so relaxing them all at once settles in as many rounds as the longest chain has runs."""
    best = size.copy()
    while True:
        longer = best.copy()
        np.maximum.at(longer, target, best[source] + size[target])
        if (longer == best).all():
            return best
        best = longer


def leaks_then_near_duplicates(texts: list[str], dialogues: list[list[str]], threshold: float, on_leak_progress=None,
                               on_duplicate_progress=None, exempt: list[bool] | None = None
                               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dialogue each text carries or -1, its share, keep-mask): leaks go, then near-duplicates among the rest.
    Texts marked `exempt` (pseudo-labels, written for held-out dialogues on purpose) skip the leak check only."""
    checked = np.flatnonzero(~np.asarray(exempt, dtype=bool)) if exempt is not None else np.arange(len(texts))
    matched, shares = np.full(len(texts), -1), np.zeros(len(texts))
    matched[checked], shares[checked] = leak_matches([texts[k] for k in checked], dialogues, on_leak_progress)
    survivors = np.flatnonzero(matched < 0)
    keep = np.zeros(len(texts), dtype=bool)
    keep[survivors] = keep_first_of_near_duplicates([texts[k] for k in survivors], threshold, on_duplicate_progress)
    return matched, shares, keep


def near_copies(texts: list[str], references: list[str], threshold: float,
                same: list[tuple[int, int]] = ()) -> tuple[np.ndarray, np.ndarray]:
    """(index of the reference each text nearly equals or -1, that 3-gram Jaccard): MinHash LSH proposes
    (reference, text) pairs, the `same` (text, reference) pairs are always compared, and the exact Jaccard
    decides (>= threshold)."""
    signatures = minhash_signatures(references + texts)
    i, j = candidate_pairs(signatures)  # earlier, later: references come first
    across = (i < len(references)) & (j >= len(references))
    forced = np.asarray(same, dtype=np.int64).reshape(-1, 2)
    i, j = _unique_pairs(np.concatenate([i[across], forced[:, 1]]),
                         np.concatenate([j[across], forced[:, 0] + len(references)]))
    similarity = ngram_jaccards(references + texts, i, j) if len(i) else np.empty(0)
    matched, best = np.full(len(texts), -1), np.zeros(len(texts))
    for reference, text, value in zip(i.tolist(), (j - len(references)).tolist(), similarity.tolist()):
        if value >= threshold and value > best[text]:
            matched[text], best[text] = reference, value
    return matched, best


def row_outcomes(labels: list[tuple[str, int]], dialogue_ids: list[str], matched: np.ndarray, shares: np.ndarray,
                 keep: np.ndarray) -> tuple[list[dict], list[str]]:
    """leaks_then_near_duplicates' verdicts in words, for rows labelled (source, row number): every leak as
    {source, row, matched: the held-out dialogue's id, share}, and each row's outcome: kept, leak or duplicate."""
    leaks = [{"source": source, "row": row, "matched": dialogue_ids[m], "share": round(float(share), 3)}
             for (source, row), m, share in zip(labels, matched, shares) if m >= 0]
    outcomes = ["kept" if kept else "leak" if m >= 0 else "duplicate" for m, kept in zip(matched, keep)]
    return leaks, outcomes
