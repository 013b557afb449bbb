"""`cumo-mlx chat` and `ChatSession`: one KV cache across turns, on a tiny model."""

import cumo_mlx
import mlx.core as mx
import pytest
from cumo_mlx.generate import ChatSession
from cumo_mlx.prompt import IMAGE_TOKEN_INDEX, chat_prompt, image_layout, user_turn
from cumo_mlx.errors import CuMoError
from test_generate import QUESTION, greedy, images, loaded, model_dir, run_cli, short_context_dir  # noqa: F401  (fixtures)

SECOND = "What colour is the circle?"


def cache_lengths(session):
    return {layer.offset for layer in session.cache}


def answer(session, question, **kwargs):
    responses = list(session.stream(question, **greedy(**kwargs)))
    return [r.token for r in responses], "".join(r.text for r in responses)


def fresh_answer(loaded, ids, image_features, **kwargs):
    """Greedy answer to the whole conversation `ids`, prefilled from an empty cache."""
    responses = cumo_mlx.stream_generate(*loaded, ids, image_features=image_features, **greedy(**kwargs))
    return [r.token for r in responses]


def test_second_turn_continues_the_first_in_the_cache(loaded, images):
    model, processor = loaded
    eos = processor.tokenizer.eos_token_id
    session = ChatSession(model, processor)
    session.add_image(images[0])
    features = session.pending[0]
    rows = features.shape[1]

    first_prompt = processor.tokenize(chat_prompt([f"<image>\n{QUESTION}"]))
    first_answer, _ = answer(session, QUESTION, max_tokens=6)
    assert session.ids == first_prompt + first_answer and len(first_answer) == 6
    assert cache_lengths(session) == {len(first_prompt) + rows - 1 + 6} == {session.length}

    second_answer, text = answer(session, SECOND, max_tokens=8)
    # The first answer ran out of tokens, so `</s>` closes it; then the next `[INST] ... [/INST]`,
    # tokenized as it follows `</s>` in the template's whole-conversation text.
    conversation = chat_prompt([f"<image>\n{QUESTION}"]) + "</s>" + user_turn(SECOND, first=False)
    new = processor.tokenize(conversation)[len(first_prompt) + 1 :]
    second_prompt = first_prompt + first_answer + [eos] + new
    assert new[-4:] == processor.tokenize(" [/INST]")[-4:] and IMAGE_TOKEN_INDEX not in new
    assert session.ids == second_prompt + second_answer
    assert cache_lengths(session) == {image_layout(session.ids, rows)[0].size} == {session.length}
    # What the kept cache gives equals prefilling the whole conversation afresh.
    assert second_answer == fresh_answer(loaded, second_prompt, features, max_tokens=8)
    assert text == processor.decode(second_answer)


def test_an_answer_ended_by_eos_is_not_closed_again(loaded):
    model, processor = loaded
    eos = processor.tokenizer.eos_token_id
    session = ChatSession(model, processor, system=None)
    tokens, text = answer(session, QUESTION, logit_bias={eos: 1e9})
    assert tokens == [eos] and text == ""
    before = list(session.ids)
    tokens, _ = answer(session, SECOND, max_tokens=5)
    new = session.ids[len(before) : len(session.ids) - 5]
    assert new == processor.tokenize("</s>" + user_turn(SECOND, first=False))[2:] and new[0] != eos
    assert cache_lengths(session) == {len(session.ids)}
    assert tokens == fresh_answer(loaded, session.ids[:-5], None, max_tokens=5)


def test_images_added_between_turns(loaded, images):
    model, processor = loaded
    session = ChatSession(model, processor)
    answer(session, "hello there", max_tokens=4)
    session.add_image(images[0])
    session.add_image(images[1])
    features = mx.concatenate(session.pending)
    tokens, _ = answer(session, "Compare <image> with <image>.", max_tokens=6)
    assert session.ids.count(IMAGE_TOKEN_INDEX) == 2 and not session.pending
    assert cache_lengths(session) == {image_layout(session.ids, features.shape[1])[0].size}
    assert tokens == fresh_answer(loaded, session.ids[:-6], features, max_tokens=6)


def test_each_image_is_encoded_once(loaded, images, monkeypatch):
    model, processor = loaded
    calls = []
    encode = model.encode_images
    monkeypatch.setattr(model, "encode_images", lambda pixels: calls.append(1) or encode(pixels))
    session = ChatSession(model, processor)
    session.add_image(str(images[0]))
    for question in (QUESTION, SECOND, "And the square?"):
        answer(session, question, max_tokens=3)
    session.reset()
    session.add_image(str(images[0]))  # the same image again after /reset
    answer(session, QUESTION, max_tokens=3)
    assert len(calls) == 1


def test_interrupted_turns_leave_the_cache_matching_the_conversation(loaded, images):
    model, processor = loaded
    session = ChatSession(model, processor)
    session.add_image(images[0])
    features = session.pending[0]

    def interrupt_during_prefill(done, total):
        if 0 < done < total:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # Ctrl-C while the prompt is prefilled: the turn is dropped
        answer(session, QUESTION, prefill_step_size=8, prompt_progress_callback=interrupt_during_prefill)
    assert session.ids == [] and session.length == 0 and cache_lengths(session) == {0}
    assert len(session.pending) == 1  # the image waits for the next try

    stream = session.stream(QUESTION, **greedy())
    kept = [next(stream).token for _ in range(3)]
    stream.close()  # Ctrl-C after three tokens: they stay in the conversation
    assert session.ids[-3:] == kept and cache_lengths(session) == {session.length}
    before = len(session.ids)
    tokens, _ = answer(session, SECOND, max_tokens=6)
    assert session.ids[before] == processor.tokenizer.eos_token_id  # the cut answer is closed
    assert tokens == fresh_answer(loaded, session.ids[:-6], features, max_tokens=6)


def test_a_turn_past_the_context_counts_the_earlier_turns(short_context_dir):
    """Context 110: the first turn (100 prompt ids) fits; the second would fit alone, not after it."""
    model, processor = cumo_mlx.load(short_context_dir)
    session = ChatSession(model, processor)
    answer(session, QUESTION, max_tokens=3)
    before = (list(session.ids), session.length)
    assert len(session.turn_ids(SECOND)) < 110 - 3 < before[1] + len(session.turn_ids(SECOND))
    with pytest.raises(CuMoError, match=f"after {before[1]} earlier tokens of the conversation, over the model's context of 110"):
        answer(session, SECOND, max_tokens=3)
    assert (session.ids, session.length) == before and cache_lengths(session) == {session.length}


def test_chat_cli(model_dir, loaded, images):
    model, processor = loaded
    script = f"/image {images[0]}\n{QUESTION}\n\n{SECOND}\n/reset\nhello there\n/exit\nnever read\n"
    code, out, err = run_cli("chat", "--model", model_dir, "--temp", 0, "--max-tokens", 8, input=script)
    assert code == 0, err
    session = ChatSession(model, processor)
    session.add_image(images[0])
    expected = [answer(session, QUESTION, max_tokens=8)[1], answer(session, SECOND, max_tokens=8)[1]]
    session.reset()
    expected.append(answer(session, "hello there", max_tokens=8)[1])
    assert out == "".join(text + "\n" for text in expected)
    assert "error" not in err and "(the conversation is reset)" in err


def test_chat_cli_image_flag_and_system(model_dir, loaded, images):
    model, processor = loaded
    code, out, err = run_cli("chat", "--model", model_dir, "--image", images[1], "--system", "Be brief.",
                             "--temp", 0, "--max-tokens", 6, "--verbose", input=f"{QUESTION}\n")  # fmt: skip
    assert code == 0, err
    session = ChatSession(model, processor, system="Be brief.")
    session.add_image(images[1])
    assert out == answer(session, QUESTION, max_tokens=6)[1] + "\n"
    assert "Generation: 6 tokens" in err


def test_chat_cli_bad_input(model_dir, images, tmp_path):
    code, out, err = run_cli("chat", "--model", model_dir, "--image", tmp_path / "missing.png", input="hi\n")
    assert code == 2 and out == "" and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        f"error: image file not found: {tmp_path / 'missing.png'} (check the path)"
    ]
    code, _, err = run_cli("chat", "--model", model_dir, "--temp", -1, input="hi\n")
    assert code == 2 and "error: temp must be >= 0" in err

    # In the chat, a bad line is reported and the chat goes on.
    script = f"/image {tmp_path / 'missing.png'}\n/frobnicate\n<image> What is it?\n   \n/image\n{QUESTION}\n"
    code, out, err = run_cli("chat", "--model", model_dir, "--temp", 0, "--max-tokens", 4, input=script)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 0 and "Traceback" not in err
    assert len(errors) == 4, err
    assert "image file not found" in errors[0] and "unknown command /frobnicate" in errors[1]
    assert "1 <image> placeholder(s) but 0 image(s)" in errors[2] and "/image needs an image" in errors[3]
    assert len(out.splitlines()) == 1 and out.strip()  # the one good question was answered


def test_chat_cli_reset_keeps_the_image_flag(model_dir, loaded, images):
    """/reset starts over with the --image image(s): they go with the new conversation's first message."""
    model, processor = loaded
    script = f"{QUESTION}\n/reset\n{QUESTION}\n"
    code, out, err = run_cli("chat", "--model", model_dir, "--image", images[1], "--temp", 0, "--max-tokens", 6,
                             input=script)  # fmt: skip
    assert code == 0, err
    session = ChatSession(model, processor)
    session.add_image(images[1])
    with_image = answer(session, QUESTION, max_tokens=6)[1]
    assert out == with_image + "\n" + with_image + "\n"  # the same answer: the image is there again
    assert "go with your next message" in err and "error" not in err


def test_a_repeated_image_is_encoded_once_through_the_vision_cache(loaded, images):
    from PIL import Image

    model, processor = loaded
    session = ChatSession(model, processor)
    session.add_image(images[0])
    answer(session, QUESTION, max_tokens=3)
    session.add_image(str(images[0]))  # the same pixels: a path as a string, then as a PIL image
    session.add_image(Image.open(images[0]))
    answer(session, "Compare <image> with <image>.", max_tokens=3)
    assert (session.vision_cache.misses, session.vision_cache.hits) == (1, 2) and len(session.vision_cache) == 1


def test_answers_are_the_same_with_and_without_the_vision_cache(loaded, images):
    from cumo_mlx.vision_cache import VisionCache

    cache = VisionCache()
    without = cumo_mlx.generate(*loaded, "Compare <image> with <image>.", images, **greedy(max_tokens=8))
    for _ in range(2):  # encoded, then from the cache
        assert cumo_mlx.generate(*loaded, "Compare <image> with <image>.", images, vision_cache=cache,
                                 **greedy(max_tokens=8)) == without  # fmt: skip
    assert (cache.misses, cache.hits) == (2, 2)
    session, uncached = ChatSession(*loaded), ChatSession(*loaded, vision_cache=VisionCache(max_bytes=0))
    for chat in (session, uncached):
        chat.add_image(images[1])
    assert answer(session, QUESTION, max_tokens=8) == answer(uncached, QUESTION, max_tokens=8)
    assert len(uncached.vision_cache) == 0


def test_an_image_file_changed_on_disk_is_encoded_again(loaded, tmp_path):
    import numpy as np
    from PIL import Image

    model, processor = loaded
    path = tmp_path / "changing.png"
    rng = np.random.default_rng(1)
    session = ChatSession(model, processor)
    features = []
    for _ in range(2):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(path)  # the same name, new pixels
        session.add_image(path)
        features.append(session.pending[-1])
    assert (session.vision_cache.misses, session.vision_cache.hits) == (2, 0)
    assert not mx.array_equal(features[0], features[1])
