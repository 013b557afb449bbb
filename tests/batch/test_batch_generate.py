"""`cumo_mlx.batch_generate`: every answer of a batch is the one `generate` gives alone (greedy), for
mixes of text-only, one-image and several-image prompts of different lengths; dense and MoE LLMs,
float and 4-bit; and bad input is one clear error, or ends only its own prompt."""

import cumo_mlx
import pytest
from cumo_mlx.errors import CuMoError
from cumo_mlx.prompt import IMAGE_TOKEN_INDEX

QUESTIONS = [
    "What shape is this?",
    "hello",
    "Describe the image in detail.",
    "Compare <image> with <image>, please. What colour is the circle?",
    "How many shapes are there? one two three",
    "Is there a red circle?",
]


def mixed_batch(images):
    """Prompts with no image, one image, and two or three images, of different lengths."""
    entries = [images[0], None, [images[1], images[2]], [images[2], images[0]], None, images]
    return QUESTIONS, entries, [12, 7, 16, 5, 20, 9]


def assert_as_alone(loaded, alone, result, prompts, entries, limits, **options):
    for i, (prompt, entry, limit) in enumerate(zip(prompts, entries, limits)):
        tokens, text, reason = alone(loaded, prompt, entry, max_tokens=limit, **options)
        assert result.tokens[i] == tokens, f"prompt {i}"
        assert result.texts[i] == text and result.finish_reasons[i] == reason and result.errors[i] is None


@pytest.mark.parametrize("name", ["mistral", "mixtral", "mistral-4bit", "mixtral-4bit"])
def test_each_answer_is_the_one_generated_alone(models, images, alone, name):
    prompts, entries, limits = mixed_batch(images)
    result = cumo_mlx.batch_generate(*models[name], prompts, entries, max_tokens=limits, temp=0.0)
    assert isinstance(result, cumo_mlx.BatchResponse)
    assert_as_alone(models[name], alone, result, prompts, entries, limits)
    stats = result.stats
    assert stats.generation_tokens >= sum(len(t) for t in result.tokens) and stats.images == 8
    assert stats.vision_hits + stats.vision_misses == 8 and stats.vision_misses == 3  # 3 distinct images
    assert stats.prompt_tps > 0 and stats.generation_tps > 0 and stats.wall_time > 0


def test_requests_joining_and_leaving_a_small_batch(models, images, alone):
    """Two places for six prompts: each finished one makes room for the next, mid-decode."""
    prompts, entries, limits = mixed_batch(images)
    result = cumo_mlx.batch_generate(*models["mixtral"], prompts, entries, max_tokens=limits, temp=0.0,
                                     max_batch_size=2)  # fmt: skip
    assert_as_alone(models["mixtral"], alone, result, prompts, entries, limits)


def test_options_apply_per_sequence_as_alone(mistral, images, alone):
    """Logits processors see each sequence's own history; prefill chunks as generate's."""
    prompts, entries, limits = mixed_batch(images)
    for options in ({"repetition_penalty": 1.5, "logit_bias": {5: 2.0}}, {"prefill_step_size": 7}):
        result = cumo_mlx.batch_generate(*mistral, prompts, entries, max_tokens=limits, temp=0.0, **options)
        assert_as_alone(mistral, alone, result, prompts, entries, limits, **options)


def test_prompt_ids_and_system(mistral, images, alone):
    model, processor = mistral
    ids = processor.tokenize("<s>[INST] <image>\nWhat shape? [/INST]")
    assert ids.count(IMAGE_TOKEN_INDEX) == 1
    result = cumo_mlx.batch_generate(model, processor, [ids, "hello"], [images[1], None], max_tokens=6, temp=0.0,
                                     system="Be brief.")  # fmt: skip
    assert result.tokens[0] == alone(mistral, ids, images[1], max_tokens=6)[0]
    assert result.tokens[1] == alone(mistral, "hello", None, max_tokens=6, system="Be brief.")[0]


def test_an_unreadable_image_ends_only_its_prompt(mistral, images, alone, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    prompts = ["What shape is this?", "Compare them.", "hello", "Describe it."]
    entries = [images[0], [images[1], broken], None, tmp_path / "missing.png"]
    result = cumo_mlx.batch_generate(*mistral, prompts, entries, max_tokens=8, temp=0.0)
    assert result.finish_reasons[1] == result.finish_reasons[3] == "error"
    assert result.errors[1].startswith("prompt 1: image 2: cannot read") and "broken.png" in result.errors[1]
    assert result.errors[3].startswith("prompt 3: image 1: image file not found")
    assert result.texts[1] == "" and result.tokens[1] == []
    for i in (0, 2):
        assert result.tokens[i] == alone(mistral, prompts[i], entries[i], max_tokens=8)[0]


def test_a_prompt_over_the_context_ends_only_itself(mistral):
    model, processor = mistral
    long_ids = [1] + [5] * (model.args.text_config.max_position_embeddings + 3)
    result = cumo_mlx.batch_generate(model, processor, [long_ids, "hello"], max_tokens=3, temp=0.0)
    assert result.finish_reasons[0] == "error" and "over the model's context" in result.errors[0]
    assert result.finish_reasons[1] == "length" and len(result.tokens[1]) == 3


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m, p: cumo_mlx.batch_generate(m, p, []), "the list of prompts is empty"),
        (lambda m, p: cumo_mlx.batch_generate(m, p, "hello"), "prompts must be a list"),
        (lambda m, p: cumo_mlx.batch_generate(m, p, ["a", "b"], [None]), "images has 1 entries but there are 2"),
        (lambda m, p: cumo_mlx.batch_generate(m, p, ["a"], max_tokens=0), "max_tokens must be a positive integer"),
        (lambda m, p: cumo_mlx.batch_generate(m, p, ["a", "b"], max_tokens=[3, 0]), "max_tokens[1] must be a positive"),
        (lambda m, p: cumo_mlx.batch_generate(m, p, ["a", "b"], max_tokens=[3]), "max_tokens has 1 entries"),
        (lambda m, p: cumo_mlx.batch_generate(m, p, ["a"], kv_bits=4), "kv_bits is not supported in batched"),
        (lambda m, p: cumo_mlx.batch_generate(m, p, ["a"], max_kv_size=64), "max_kv_size is not supported in"),
        (lambda m, p: cumo_mlx.batch_generate(m, p, ["a"], temp=-1), "temp must be >= 0"),
        (lambda m, p: cumo_mlx.batch_generate(m, p, ["a", " "]), "prompt 1: the prompt is empty"),
        (lambda m, p: cumo_mlx.batch_generate(m, p, ["a <image>"]), "prompt 0: the prompt has 1 <image>"),
        (lambda m, p: cumo_mlx.batch_generate(m, p, ["a", "b"], max_tokens=100, max_kv_bytes=50_000),
         "prompt 0: the request needs"),
    ],
)  # fmt: skip
def test_bad_input_is_one_clear_error(mistral, call, message):
    with pytest.raises(CuMoError) as error:
        call(*mistral)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_exported_from_the_package():
    assert {"batch_generate", "BatchResponse"} <= set(cumo_mlx.__all__)
    assert cumo_mlx.batch_generate.__module__ == "cumo_mlx.batch.generate"
