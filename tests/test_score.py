"""score.py: ROUGE-1 exactly as the official scorer computes it, checked against hand-counted morphemes."""
from __future__ import annotations

from fractions import Fraction

import pytest

import score  # import-light by design: no torch, no model

def f1(overlap: int, n_hyp: int, n_ref: int) -> float:
    p, r = Fraction(overlap, n_hyp), Fraction(overlap, n_ref)
    return float(2 * p * r / (p + r))


@pytest.fixture(scope="module")
def morphs():
    return score.mecab_morphs()


@pytest.mark.parametrize("hyp, ref, hyp_tokens, ref_tokens, expected", [
    # particles: 는/에 match, the verb endings do not. 3 of 6 vs 3 of 5.
    ("나는 학교에 갔다.", "저는 학교에 갑니다!",
     ["나", "는", "학교", "에", "갔", "다"], ["저", "는", "학교", "에", "갑니다"], f1(3, 6, 5)),
    # numbers are their own morpheme; "3" never matches "세"; punctuation (…) disappears. 4 of 8 each.
    ("두 화자는 3시에 만났다.", "화자들은 세 시에 만났습니다…",
     ["두", "화자", "는", "3", "시", "에", "만났", "다"], ["화자", "들", "은", "세", "시", "에", "만났", "습니다"], 0.5),
    # speaker ids: lowercased and split into letters + digits, so the id matches across 은/는. 5 of 11 vs 5 of 9.
    ("SD2000691은 영화를 좋아한다고 말했습니다.", "sd2000691는 영화가 좋다고 했다",
     ["sd", "2000691", "은", "영화", "를", "좋", "아", "한다고", "말", "했", "습니다"],
     ["sd", "2000691", "는", "영화", "가", "좋", "다고", "했", "다"], 0.5),
    # clipped counts: three 학교 in the hypothesis match the reference's one. 1 of 3 vs 1 of 4.
    ("학교 학교 학교", "학교에 갔다", ["학교", "학교", "학교"], ["학교", "에", "갔", "다"], f1(1, 3, 4)),
    # an empty (or punctuation-only) hypothesis scores 0
    ("", "학교에 갔다", [], ["학교", "에", "갔", "다"], 0.0),
    ("~~~!!", "학교에 갔다", [], ["학교", "에", "갔", "다"], 0.0),
])
def test_rouge1_matches_hand_computation(morphs, hyp, ref, hyp_tokens, ref_tokens, expected):
    assert score.rouge_tokens(hyp, morphs) == hyp_tokens
    assert score.rouge_tokens(ref, morphs) == ref_tokens
    assert score.rouge1_f1(hyp_tokens, ref_tokens) == pytest.approx(expected)


def test_rouge1_is_the_per_sample_mean_and_keeps_1000_words(morphs):
    scores = score.rouge1_scores(["나는 학교에 갔다.", "학교 학교 학교"], ["저는 학교에 갑니다!", "학교에 갔다"])
    assert scores == pytest.approx([6 / 11, 2 / 7])
    assert len(score.rouge_tokens("가 " * 1500, morphs)) == 1000
