"""What answers the questions for `run_task`: a local model, or any OpenAI-compatible server.

Both decode greedily with the question's new-token budget, answer a batch at a time and count the
tokens they generate (`tokens`, for the progress bar's tokens/s).
"""

import base64
import http.client
import io
import json
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

from ..batch.generate import batch_generate
from ..vision_cache import VisionCache
from ..errors import CuMoError, DataError
from ..models.model import Model
from ..processor import Processor, load_image
from ..prompt import DEFAULT_SYSTEM, IMAGE_PLACEHOLDER
from .question import Question

SERVER_TIMEOUT_S = 600.0  # one answer of up to 1024 tokens from a 7B model on a busy server


class ModelAnswerer:
    """A loaded model's answers, a batch decoded together (`cumo_mlx.batch_generate`, token for token
    `generate`'s greedy answers): question.prompt in the mistral_instruct_system template with CuMo's
    system prompt, as CuMo's eval scripts build it. Images seen before are not encoded again."""

    def __init__(self, model: Model, processor: Processor, system: Optional[str] = DEFAULT_SYSTEM):
        self.model, self.processor, self.system = model, processor, system
        self.vision_cache = VisionCache()  # TextVQA and MME ask several questions about each image
        self.tokens = 0

    def __call__(self, questions: Sequence[Question]) -> list[str]:
        response = batch_generate(
            self.model,
            self.processor,
            [question.prompt for question in questions],
            [question.image for question in questions],
            system=self.system,
            max_tokens=[question.max_new_tokens for question in questions],
            temp=0.0,
            max_batch_size=len(questions),
            vision_cache=self.vision_cache,
        )
        for i, (question, error) in enumerate(zip(questions, response.errors, strict=True)):
            if error is not None:  # an unreadable image, a prompt over the model's context
                raise DataError(f"question {question.question_id}: {error.removeprefix(f'prompt {i}: ')}")  # with its fix
        self.tokens += sum(len(tokens) for tokens in response.tokens)
        return response.texts


def image_url(question: Question) -> str:
    """The question's image as a PNG data URL (RGB, EXIF orientation applied, as the local model reads it)."""
    buffer = io.BytesIO()
    load_image(question.image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat_request(question: Question, model: Optional[str]) -> dict:
    """The chat completion request of a question: its text without the `<image>` placeholder (the image
    goes as a part of the message; the server places it first, as LLaVA does), greedy, its budget."""
    text = question.prompt.replace(IMAGE_PLACEHOLDER + "\n", "").replace(IMAGE_PLACEHOLDER, "")
    content = [{"type": "text", "text": text}]
    if question.image is not None:
        content.append({"type": "image_url", "image_url": {"url": image_url(question)}})
    request = {"messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": question.max_new_tokens}
    return request if model is None else {"model": model, **request}


class ServerAnswerer:
    """Answers from an OpenAI-compatible server (POST URL/v1/chat/completions), the questions of a
    batch sent at once (the server batches them). `model` names the served model, if it needs one."""

    def __init__(self, url: str, api_key: Optional[str] = None, model: Optional[str] = None, timeout: float = SERVER_TIMEOUT_S):
        if not url.startswith(("http://", "https://")):
            raise CuMoError(f"--server {url} is not an http(s) URL", "give the server's address, e.g. http://127.0.0.1:8080")
        self.url = url.rstrip("/").removesuffix("/v1") + "/v1/chat/completions"
        self.api_key, self.model, self.timeout = api_key, model, timeout
        self.tokens = 0
        self._lock = threading.Lock()

    def __call__(self, questions: Sequence[Question]) -> list[str]:
        with ThreadPoolExecutor(max_workers=len(questions)) as pool:
            return list(pool.map(self.ask, questions))

    def ask(self, question: Question) -> str:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        body = json.dumps(chat_request(question, self.model)).encode()
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as reply:
                completion = json.loads(reply.read())
        except urllib.error.HTTPError as e:
            raise CuMoError(f"{self.url} answered HTTP {e.code}: {_server_message(e)}", _fix(e.code)) from None
        except TimeoutError:
            raise CuMoError(f"{self.url} did not answer in {self.timeout:g} s", "check that the server runs") from None
        except (OSError, http.client.HTTPException) as e:  # URLError (refused, unknown host), a dropped connection
            reason = getattr(e, "reason", None) or e or type(e).__name__
            raise CuMoError(f"cannot reach {self.url}: {reason}", "check --server and that the server runs") from None
        except ValueError:  # JSONDecodeError, UnicodeDecodeError
            raise CuMoError(f"{self.url} did not answer JSON", "give an OpenAI-compatible server") from None
        return self._text(completion)

    def _text(self, completion) -> str:
        try:
            text = completion["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            text = None
        if not isinstance(text, str):
            raise CuMoError(f"{self.url} answered no chat completion", "give an OpenAI-compatible server")
        usage = completion.get("usage")
        with self._lock:
            self.tokens += usage.get("completion_tokens", 0) if isinstance(usage, dict) else 0
        return text


def _server_message(error: urllib.error.HTTPError) -> str:
    """The message of an OpenAI-style error body ({"error": {"message": ...}}), else the reason."""
    try:
        message = json.loads(error.read())["error"]["message"]
    except (ValueError, KeyError, TypeError, OSError):
        message = None
    return message if isinstance(message, str) else str(error.reason)


def _fix(code: int) -> str:
    if code in (401, 403):
        return "check --api-key"
    if code == 404:
        return "check --server: it is the server's address, without /v1/chat/completions"
    return "check the server's log"
