"""TextVQA: the EvalAI normalisation, finding the question in the prompt, and the soft accuracy."""

import pytest
from eval_folders import SHORT, TEXTVQA_QUESTIONS, textvqa, write_answers

from cumo_mlx.errors import DataError
from cumo_mlx.eval import score
from cumo_mlx.eval.evalai import normalise_answer
from cumo_mlx.eval.textvqa import question_in_prompt, soft_scores


@pytest.mark.parametrize(
    "answer, normalised",
    [
        ("Two dogs.", "2 dogs"),  # lowercase, number word to digit, final period off
        ("the cat's toy", "cat 's toy"),  # "'s" split off, article dropped
        ("dont", "don't"),  # contraction gets its apostrophe
        ("hello-world", "hello world"),  # a mark touching no space becomes a space
        ("hello - world", "hello world"),  # a mark touching a space is deleted
        ("3.5", "3.5"),  # a period before a digit stays
        ("1,000", "1000"),  # commas go
        ("e.g.", "eg"),
        ("yes!", "yes"),
        ("A  b\tc\n", "b c"),  # whitespace runs collapse, "a" is an article
        ("none", "0"),
        ("." * 40 + "x", "." * 8 + "x"),  # at most 32 periods are deleted, as on the servers
    ],
)
def test_evalai_normalisation(answer, normalised):
    assert normalise_answer(answer) == normalised


@pytest.mark.parametrize(
    "prompt, question",
    [
        (f"What is it?\nReference OCR token: a, b\n{SHORT}", "what is it?"),
        (f"Reference OCR token: a, b\nWhat is it?\n{SHORT}", "what is it?"),
        (f"What is it?\n{SHORT}", "what is it?"),
        ("OCR tokens: a b Question: What is it? Short answer:", "what is it?"),
        ("What is it?", None),  # neither two nor three lines: the official script stops
        (f"What\nis\nit?\n{SHORT}", None),
    ],
)
def test_question_in_prompt(prompt, question):
    assert question_in_prompt(prompt) == question


def test_soft_scores_leave_one_out():
    # "canon" by 2 of 10 humans: leaving out one of those 2 leaves 1 match (1/3), leaving out one of the
    # other 8 leaves 2 (2/3): (2 * 1/3 + 8 * 2/3) / 10 = 0.6. "nikon" by 8: always >= 3 matches: 1.
    scores = soft_scores(["canon"] * 2 + ["nikon"] * 8)
    assert scores == pytest.approx({"canon": 0.6, "nikon": 1.0})
    with pytest.raises(DataError, match="9 human answers, not 10"):
        soft_scores(["a"] * 9)


def test_textvqa_score(tmp_path):
    folder = textvqa(tmp_path)
    answers = [
        # "Canon." -> "canon": 2 of 10 humans -> 0.6 (above)
        ("img1", TEXTVQA_QUESTIONS[0]["text"], "Canon."),
        # "The two." -> "2"; humans "two", "2", "2" (all "2") and seven "3": leaving out a "2" (3 ways)
        # leaves 2 matches (2/3), leaving out a "3" (7 ways) leaves 3 (1): (3 * 2/3 + 7) / 10 = 0.9
        ("img1", TEXTVQA_QUESTIONS[1]["text"], "The two."),
        ("img2", TEXTVQA_QUESTIONS[2]["text"], "Blue"),  # 0
    ]
    result = score("textvqa", tmp_path, write_answers(tmp_path / "a.jsonl", answers))
    assert result.task == "textvqa" and result.count == 3
    assert result.metrics == {"accuracy": pytest.approx(100 * (0.6 + 0.9 + 0) / 3)}  # 50.0
    assert score("textvqa", folder, tmp_path / "a.jsonl") == result  # DIR may be the task's own folder


def test_textvqa_answer_for_another_question(tmp_path):
    textvqa(tmp_path)
    path = write_answers(tmp_path / "a.jsonl", [("img2", TEXTVQA_QUESTIONS[0]["text"], "x")])
    with pytest.raises(DataError, match="matches no question of TextVQA_0.5.1_val.json") as error:
        score("textvqa", tmp_path, path)
    assert "\n" not in str(error.value)
