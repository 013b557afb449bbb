"""Prompt (KV) cache reuse in the engine: a request extending a finished request's prompt and answer
prefills only its new positions, and answers as a fresh run of the whole prompt does."""

import mlx.core as mx
from cumo_mlx.batch import BatchEngine, PromptCache
from cumo_mlx.batch.prompt_cache import position_keys
from cumo_mlx.prompt import IMAGE_TOKEN_INDEX, chat_prompt, user_turn
from mlx_lm.models.cache import make_prompt_cache

QUESTION = "What shape is this?"


def ask(engine, prompt, images, max_tokens=6):
    """Run one request to its end: its responses and the positions it prefilled."""
    before = engine.stats.prompt_tokens
    stream = engine.submit(prompt, images, temp=0.0, max_tokens=max_tokens)
    while engine.step():
        pass
    return list(stream), engine.stats.prompt_tokens - before


def answer_tokens(responses):
    return [r.token for r in responses if r.finish_reason != "stop"]


def follow_up(processor, ids, answer, question):
    """The ids of the conversation continued by another turn, as ChatSession builds them."""
    after = len(processor.tokenize("</s>"))
    eos = processor.tokenizer.eos_token_id
    closing = [] if answer and answer[-1] == eos else [eos]
    return ids + answer + closing + processor.tokenize("</s>" + user_turn(question, False))[after:]


def test_a_follow_up_turn_prefills_only_its_new_positions(mistral, images, alone):
    model, processor = mistral
    rows = model.args.image_tokens
    engine = BatchEngine(model, processor)
    ids = processor.tokenize(chat_prompt([f"<image>\n{QUESTION}"]))
    first, prefilled = ask(engine, ids, images[0])
    positions = len(ids) + rows - 1
    assert prefilled == positions and first[0].cached_tokens == 0
    answer = [r.token for r in first]
    ids2 = follow_up(processor, ids, answer, "What colour is it?")
    second, prefilled = ask(engine, ids2, images[0])
    reused = positions + len(answer)
    assert second[0].cached_tokens == reused and prefilled == len(ids2) + rows - 1 - reused
    assert answer_tokens(second) == alone(mistral, ids2, images[0], max_tokens=6)[0]
    again, prefilled = ask(engine, ids2, images[0])  # the same prompt again: only its last position runs
    assert prefilled == 1 and answer_tokens(again) == answer_tokens(second)


def test_a_shared_image_prefix_is_reused_and_another_image_is_not(mistral, images, alone):
    model, processor = mistral
    engine = BatchEngine(model, processor)
    ask(engine, QUESTION, images[0])
    image_at = processor.tokenize(chat_prompt([f"<image>\n{QUESTION}"])).index(IMAGE_TOKEN_INDEX)
    other_question, _ = ask(engine, "What colour is it?", images[0])
    assert other_question[0].cached_tokens >= image_at + model.args.image_tokens  # system and image rows
    assert answer_tokens(other_question) == alone(mistral, "What colour is it?", images[0], max_tokens=6)[0]
    other_image, _ = ask(engine, QUESTION, images[1])
    assert other_image[0].cached_tokens <= image_at  # the text before the image only
    assert answer_tokens(other_image) == alone(mistral, QUESTION, images[1], max_tokens=6)[0]


def prefilled_cache(language_model, ids):
    cache = make_prompt_cache(language_model)
    language_model(mx.array([ids]), cache=cache)
    mx.eval([c.state for c in cache])
    return cache


def test_position_keys_and_byte_bound(mistral):
    keys = position_keys([1, IMAGE_TOKEN_INDEX, 7, IMAGE_TOKEN_INDEX], ["a", "b"], 2)
    assert keys == [1, ("a", 0), ("a", 1), 7, ("b", 0), ("b", 1)]
    language_model = mistral[0].language_model
    cache = prefilled_cache(language_model, [1, 5, 6, 7])
    size = sum(c.nbytes for c in cache)
    store = PromptCache(max_bytes=size)
    store.store([1, 5, 6, 7], cache)
    assert len(store) == 1 and store.nbytes == size
    copy, cached = store.fetch([1, 5, 6, 7, 9])
    assert cached == 4 and copy is not cache and copy[0].offset == 4
    store.store([2, 5, 6, 8], prefilled_cache(language_model, [2, 5, 6, 8]))
    assert len(store) == 1 and store.nbytes == size  # the older entry made room
    assert store.fetch([1, 5, 6, 7, 9]) == (None, 0)
    assert PromptCache(max_bytes=0).fetch([1, 5]) == (None, 0)
