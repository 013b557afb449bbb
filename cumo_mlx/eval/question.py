"""One benchmark question, as CuMo's eval scripts put it to the model."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

from PIL import Image

from ..prompt import IMAGE_PLACEHOLDER

# New-token budgets of CuMo's scripts (greedy decoding): cumo/eval/model_vqa_loader.py's default for the
# short-answer benchmarks; model_vqa.py, model_vqa_science.py and model_vqa_mmbench.py hard-code 1024.
SHORT_ANSWER_TOKENS = 128
LONG_ANSWER_TOKENS = 1024

ImageInput = Union[Path, Image.Image, None]


@dataclass(frozen=True)
class Question:
    """A question to answer.

    question_id: the question file's id. It is not unique in TextVQA and MME, where it names the image;
        `key` is.
    prompt: the user turn as CuMo's script builds it (`<image>\\n` first when there is an image), to be put
        in the conversation template (mistral_instruct_system) for generation.
    image: an image file, a decoded image (MMBench's base64 column) or None (ScienceQA's text-only questions).
    max_new_tokens: CuMo's budget for the benchmark.
    logged_prompt: what CuMo's script writes as the answer's "prompt" (its `cur_prompt`); TextVQA's and
        MME's scorers read the question back from it.
    metadata: the question file's extra fields (category, ...).
    """

    question_id: Union[int, str]
    prompt: str
    image: ImageInput
    max_new_tokens: int
    logged_prompt: str
    metadata: dict = field(default_factory=dict)

    @property
    def key(self) -> tuple:
        """What identifies the question in an answers file: its id and its logged prompt."""
        return (self.question_id, self.logged_prompt)


def with_image(text: str, image: ImageInput) -> str:
    """The text after an `<image>` line when there is an image, as LLaVA's eval scripts prepend it."""
    return text if image is None else f"{IMAGE_PLACEHOLDER}\n{text}"
