"""CuMo's conversation templates (reference §6).

`mistral_instruct_system` (stages 2-3 and inference):
    <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{question} [/INST] {answer} </s>[INST] {question} [/INST]
`plain` (stage 1): <image>{caption}\\n
"""

from .errors import CuMoError

IMAGE_PLACEHOLDER = "<image>"
DEFAULT_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
TEMPLATES = ("mistral_instruct_system", "plain")


def with_image_placeholders(text: str, num_images: int) -> str:
    """Put one `<image>` line per image before the text, unless the text already places them."""
    found = text.count(IMAGE_PLACEHOLDER)
    if found == 0:
        return f"{IMAGE_PLACEHOLDER}\n" * num_images + text
    if found != num_images:
        raise CuMoError(
            f"the prompt has {found} {IMAGE_PLACEHOLDER} placeholder(s) but {num_images} image(s) were given",
            f"give one image per {IMAGE_PLACEHOLDER}, or leave {IMAGE_PLACEHOLDER} out of the prompt",
        )
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
