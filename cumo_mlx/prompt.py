"""CuMo's prompts: the conversation templates, the image placeholders, and the one check that a
prompt places one image per image given.

The templates are the original's (SHI-Labs/CuMo: cumo/conversation.py).
`mistral_instruct_system` (`conv_mistral_instruct_system`, SeparatorStyle.LLAMA_2; stages 2-3 and inference):
    <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{question} [/INST] {answer} </s>[INST] {question} [/INST]
`plain` (`conv_llava_plain`; stage 1): <image>{caption}\\n
The placeholder text, its id in prompt ids and the label of unsupervised positions are cumo/constants.py's.
"""

import operator
from typing import Sequence, Union

import numpy as np

from .errors import CuMoError

IMAGE_PLACEHOLDER = "<image>"
IMAGE_TOKEN_INDEX = -200  # placeholder id of an image in prompt ids
IGNORE_INDEX = -100  # label of positions that are not supervised
DEFAULT_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
TEMPLATES = ("mistral_instruct_system", "plain")


def check_placeholders(prompt: Union[str, Sequence[int]], num_images: int) -> None:
    """CuMoError unless the prompt holds one placeholder per image: `<image>` in text, IMAGE_TOKEN_INDEX
    in prompt ids. A generation checks this once, on the question or the prompt ids it is given."""
    if isinstance(prompt, str):
        found, what = prompt.count(IMAGE_PLACEHOLDER), f"{IMAGE_PLACEHOLDER} placeholder(s)"
        fix = f"give one image per {IMAGE_PLACEHOLDER}, or leave {IMAGE_PLACEHOLDER} out of the prompt"
    else:
        found, what = list(prompt).count(IMAGE_TOKEN_INDEX), "image placeholder(s)"
        fix = f"give one image per {IMAGE_PLACEHOLDER}"
    if found != num_images:
        raise CuMoError(f"the prompt has {found} {what} but {num_images} image(s) were given", fix)


def check_token_ids(ids: Sequence[int], vocab_size: int) -> list[int]:
    """Prompt ids given as such, as a list of ints: CuMoError for one that is not an integer or lies
    outside the vocabulary (other than IMAGE_TOKEN_INDEX). The embedding lookup does not check its
    indices: an id past the table reads other memory or crashes the process."""
    checked = []
    for i in ids:
        try:
            if isinstance(i, (bool, np.bool_)):
                raise TypeError
            checked.append(operator.index(i))
        except TypeError:
            raise CuMoError(f"prompt id {i!r} is not an integer", "give token ids as integers") from None
    outside = sorted({i for i in checked if not 0 <= i < vocab_size and i != IMAGE_TOKEN_INDEX})
    if outside:
        raise CuMoError(
            f"prompt id(s) {', '.join(map(str, outside[:5]))} outside the vocabulary of {vocab_size} tokens",
            f"give ids in 0..{vocab_size - 1}, or {IMAGE_TOKEN_INDEX} for an image",
        )
    return checked


def with_image_placeholders(text: str, num_images: int) -> str:
    """Put one `<image>` line per image before the text (as the original's Conversation.get_prompt
    does for its one image), unless the text already places them: then it must place all."""
    if IMAGE_PLACEHOLDER not in text:
        return f"{IMAGE_PLACEHOLDER}\n" * num_images + text
    check_placeholders(text, num_images)
    return text


def user_turn(question: str, first: bool, system: str | None = DEFAULT_SYSTEM) -> str:
    """One user turn; the first carries `<s>` and the system block."""
    if first:
        if system:
            question = f"<<SYS>>\n{system}\n<</SYS>>\n\n{question}"
        return f"<s>[INST] {question} [/INST]"
    return f"[INST] {question} [/INST]"


def assistant_turn(answer: str) -> str:
    return f" {answer} </s>"


def chat_prompt(messages: list[str], system: str | None = DEFAULT_SYSTEM) -> str:
    """`mistral_instruct_system` prompt for alternating user/assistant messages (user first).

    Ending on a user message leaves the assistant turn open for generation.
    """
    parts = []
    for i, message in enumerate(messages):
        parts.append(user_turn(message, i == 0, system) if i % 2 == 0 else assistant_turn(message))
    return "".join(parts)


def plain_prompt(caption: str = "") -> str:
    """Stage-1 `plain` prompt: the image, then its caption (empty for generation)."""
    return IMAGE_PLACEHOLDER + caption + ("\n" if caption else "")


def image_layout(ids, rows_per_image: int, fill_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Where image rows go in the LLM's input: the ids with each IMAGE_TOKEN_INDEX expanded to
    `rows_per_image` positions holding `fill_id`, and for each position the row of the images'
    features (flattened to [images * rows_per_image, hidden]) it takes, -1 at a token. The original
    splices the same way (cumo/model/llava_arch.py, `prepare_inputs_labels_for_multimodal`)."""
    ids = np.asarray(ids, dtype=np.int64)
    is_image = ids == IMAGE_TOKEN_INDEX
    repeats = np.where(is_image, rows_per_image, 1)
    tokens = np.repeat(np.where(is_image, fill_id, ids), repeats)
    at_image = np.repeat(is_image, repeats)
    rows = np.full(tokens.shape, -1, dtype=np.int64)
    rows[at_image] = np.arange(int(at_image.sum()))
    return tokens, rows
