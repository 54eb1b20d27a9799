"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` with the status
codes of shared/RELIABILITY.md (400 never 422, 401, 404, 413, 503 + ``Retry-After``, 500)."""

from __future__ import annotations

from fastapi.responses import JSONResponse

RETRY_AFTER_S = 1


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type_, param, code)
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def unavailable(message: str, code: str) -> APIError:
    return APIError(503, message, type_="service_unavailable_error", code=code,
                    headers={"Retry-After": str(RETRY_AFTER_S)})


def from_value_error(e: ValueError) -> APIError:
    code = getattr(e, "code", None)
    if code == "queue_full":
        return unavailable(str(e), code)
    return APIError(400, str(e), param=getattr(e, "param", None), code=code or "invalid_value")


_STATUS_TYPES = {401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error",
                 413: "invalid_request_error"}


def http_error(status: int, message: str, code: str | None = None) -> JSONResponse:
    return APIError(status, message, type_=_STATUS_TYPES.get(status, "invalid_request_error"),
                    code=code).response()
