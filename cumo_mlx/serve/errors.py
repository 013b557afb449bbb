"""OpenAI-style error bodies: `{"error": {"message", "type", "param", "code"}}`.

Every refusal is an APIError with its HTTP status; a CuMoError (a bad image, a prompt over the
context) is a 400 with its message, the backend's Unavailable a 503 with Retry-After. Anything else
is a 500 whose body says only that: the traceback goes to the server's log, never to the client.
"""

from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ..errors import CuMoError
from .backend import Unavailable

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error",
         413: "invalid_request_error", 500: "server_error", 503: "server_error"}  # fmt: skip
INTERNAL = "the server failed to answer this request (the cause is in its log)"


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: Optional[str] = None,
        code: Optional[str] = None,
        headers: Optional[dict] = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        kind = TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def as_api_error(error: BaseException) -> APIError:
    """The APIError a failure becomes (a CuMoError is the request's fault; anything else a 500)."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, Unavailable):
        return APIError(503, str(error), headers={"Retry-After": str(error.retry_after)})
    if isinstance(error, CuMoError):
        return APIError(400, str(error))
    return APIError(500, INTERNAL)


def install(app: FastAPI) -> None:
    """Answer every error the app can meet in the one shape."""

    async def known_error(request: Request, error: Exception) -> JSONResponse:
        # For a 500, Starlette logs the traceback after this handler answers.
        return as_api_error(error).response()

    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return APIError(error.status_code, str(error.detail), headers=getattr(error, "headers", None)).response()

    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return APIError(400, str(error)).response()

    for kind in (APIError, CuMoError, Unavailable, Exception):
        app.add_exception_handler(kind, known_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
