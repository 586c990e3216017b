"""Korean daily talk from a small phrase grammar, for the leak check's tests (test_dedup.py, test_prep.py).

Held-out dialogues and unrelated augmentation rows drawn from the same grammar share most of their 5-grams
(the same time, company, place and activity phrases) but none of their talk: the rows a leak check must keep.
The layouts are the ways a copied dialogue shows up in public augmentation sets.
"""
from __future__ import annotations

import random

OPENERS = ["음", "아", "그러니까", "근데", "아 진짜", "그래서", "솔직히", "요즘은", "저는", "저도"]
TIMES = ["주말에", "어제", "퇴근하고", "아침마다", "지난주에", "방학 때", "저녁에", "요즘", "쉬는 날에", "점심시간에"]
COMPANY = ["친구들이랑", "가족들이랑", "동생이랑", "혼자서", "회사 사람들이랑", "남편이랑", "엄마랑", "동기들이랑"]
PLACES = ["집 근처 공원에서", "카페에서", "시장에서", "바닷가에서", "동네 헬스장에서", "도서관에서", "영화관에서", "산에서"]
ACTIVITIES = ["산책을 했어요", "커피를 마셨어요", "장을 봤어요", "운동을 했어요", "책을 읽었어요", "영화를 봤어요",
              "맛있는 걸 먹었어요", "사진을 찍었어요", "수다를 떨었어요", "게임을 했어요"]
FEELINGS = ["정말 재미있었어요", "좀 피곤했어요", "생각보다 좋았어요", "다음에 또 가고 싶어요", "시간 가는 줄 몰랐어요",
            "돈이 좀 많이 들었어요", "스트레스가 풀렸어요", "날씨가 좋아서 다행이었어요"]
QUESTIONS = ["그쪽은 어떠세요", "주말에 뭐 하세요", "요즘 뭐가 제일 재미있으세요", "그거 어디서 하세요", "자주 가세요"]
REPLIES = ["아 그렇구나", "맞아요", "저도 그래요", "오 좋네요", "진짜요", "그렇죠"]


def sentence(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.15:
        return rng.choice(QUESTIONS) + "?"
    if roll < 0.25:
        return rng.choice(REPLIES) + "."
    words = [rng.choice(OPENERS)] if rng.random() < 0.5 else []
    words += [rng.choice(TIMES), rng.choice(COMPANY), rng.choice(PLACES), rng.choice(ACTIVITIES) + "."]
    if rng.random() < 0.6:
        words.append(rng.choice(FEELINGS) + ".")
    return " ".join(words)


def dialogue(rng: random.Random, n_turns: int) -> list[str]:
    """Utterances of one to three sentences each."""
    return [" ".join(sentence(rng) for _ in range(rng.randint(1, 3))) for _ in range(n_turns)]


def resegmented(utterances: list[str], rng: random.Random) -> list[str]:
    """The same talk cut into other utterances of 3 to 9 words: not one utterance stays equal."""
    words = " ".join(utterances).split()
    pieces, start = [], 0
    while start < len(words):
        size = rng.randint(3, 9)
        pieces.append(" ".join(words[start:start + size]))
        start += size
    return pieces


LAYOUTS = ("speaker_id_lines", "one_paragraph", "half_dialogue", "separators", "resegmented_letters",
           "resegmented_speaker_ids")


def leak_texts(utterances: list[str], rng: random.Random) -> dict[str, str]:
    """One dialogue in every layout a leak check must see through."""
    half = utterances[:(len(utterances) + 1) // 2]
    return {
        "speaker_id_lines": "\n".join(f"SD20000{31 + k % 2}: {u}" for k, u in enumerate(utterances)),
        "one_paragraph": "다음 글을 요약하세요. " + " ".join(utterances),
        "half_dialogue": "대화의 앞부분입니다. 다음에 올 말을 써 주세요: " + " ".join(half),
        "separators": " // ".join(utterances) + " <== 두 사람의 관계를 추측하세요.",
        "resegmented_letters": "\n".join(f"{'AB'[k % 2]}: {u}" for k, u in enumerate(resegmented(utterances, rng))),
        "resegmented_speaker_ids": "\n".join(f"화자SD20000{k % 2}: {u}" for k, u in enumerate(resegmented(utterances, rng))),
    }


def unrelated_text(rng: random.Random, layout: int) -> str:
    """A row of new talk from the same grammar, in one of three layouts."""
    talk = dialogue(rng, rng.randint(8, 24))
    if layout % 3 == 0:
        return "다음 대화를 요약하세요.\n" + "\n".join(f"SD20001{k % 2}: {u}" for k, u in enumerate(talk))
    if layout % 3 == 1:
        return " ".join(talk)
    return "\n".join(talk) + "\n요약: 두 사람은 주말 이야기를 했다."
