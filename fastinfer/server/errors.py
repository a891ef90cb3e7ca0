"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` with the HTTP status
that OpenAI's clients map to their exception classes."""
from __future__ import annotations

from fastapi.responses import JSONResponse

# status -> OpenAI error type
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_error",
          409: "conflict_error", 500: "internal_server_error", 503: "service_unavailable",
          507: "insufficient_storage"}


class APIError(Exception):
    """Raised anywhere in a request's handling; the app turns it into an OpenAI-shaped body.
    ``retry_after`` (seconds) becomes a ``Retry-After`` header (429 and 503)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry_after = retry_after

    def body(self) -> dict:
        return error_body(self.status, self.message, param=self.param, code=self.code)

    def response(self) -> JSONResponse:
        headers = {}
        if self.retry_after is not None:
            headers["Retry-After"] = str(max(1, int(-(-self.retry_after // 1))))
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}
