"""Serve a student over HTTP with Ray Serve: its prediction together with its own explanation.

``POST /predict`` takes one image, as the raw request body (``Content-Type: image/*`` or
``application/octet-stream``) or as the first file of a ``multipart/form-data`` body, and answers
``{label, class_name, probability, probabilities, explanation: {map, kind}}``: ``map`` is a base64
PNG (8-bit grey, the map at the image's resolution, 255 = most important), ``kind`` is ``head``
(the student's explanation head) or the captum explainer run on a headless student (``gradcam``).
``GET /health`` answers ``{status: ok, ...}`` once a replica has loaded the student.

Requests are grouped by ``@serve.batch`` into one forward pass. Every problem with a request (no
body, not an image, too many bytes or pixels, a content type that is not an image) is answered
with HTTP 400 and a one-line ``{"error": ...}`` before the request reaches the batch, so a bad
request can neither fail its batch neighbours nor turn into a 500.
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import io
import logging
import time
from typing import Any

import numpy as np
import torch
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from xkd_ray.student.predict import Student
from xkd_ray.student.preprocessing import raw_to_batch, to_input_size

logger = logging.getLogger(__name__)
APP_NAME = "xkd-student"
MAX_BYTES = 8 * 1024 * 1024  # a request body larger than this is refused (400)
MAX_PIXELS = 4096 * 4096  # and so is an image with more pixels (a small file can decode to a huge image)
MAX_BATCH = 16
BATCH_WAIT_S = 0.005
RAW_TYPES = ("image/", "application/octet-stream")


class BadRequest(ValueError):
    """A request the server refuses with HTTP 400; its message is the one line sent back."""


def _multipart_file(body: bytes, content_type: str) -> bytes:
    """The first file part of a multipart/form-data body (the stdlib email parser: no extra package)."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
    )
    if not message.is_multipart():
        raise BadRequest("multipart body could not be parsed (boundary missing or wrong)")
    parts = [part for part in message.iter_parts() if part.get_content_disposition() == "form-data"]
    files = [part for part in parts if part.get_filename()] or parts
    if not files:
        raise BadRequest("multipart body holds no file part")
    payload = files[0].get_payload(decode=True)
    return payload if isinstance(payload, bytes) else b""


def image_from_body(body: bytes, content_type: str, max_bytes: int = MAX_BYTES) -> Any:
    """The request's image as a PIL image, or ``BadRequest`` naming what is wrong."""
    from PIL import Image, UnidentifiedImageError

    kind = content_type.split(";")[0].strip().lower()
    if not body:
        raise BadRequest("empty body; POST the image bytes (or a multipart/form-data file)")
    if len(body) > max_bytes:
        raise BadRequest(f"body of {len(body)} bytes is over the limit of {max_bytes}")
    if kind == "multipart/form-data":
        body = _multipart_file(body, content_type)
        if not body:
            raise BadRequest("the multipart file part is empty")
    elif not kind.startswith(RAW_TYPES):
        raise BadRequest(f"content type {kind or 'none'!r} is not an image; use image/*, octet-stream or multipart")
    try:
        with Image.open(io.BytesIO(body)) as opened:
            if opened.width * opened.height > MAX_PIXELS:
                raise BadRequest(f"image of {opened.width}x{opened.height} pixels is over the limit of {MAX_PIXELS}")
            opened.load()
            return opened.copy()
    except BadRequest:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise BadRequest(f"body is not a readable image ({reason})") from None


def map_png(explanation: torch.Tensor) -> str:
    """A map in [0, 1] as a base64 8-bit grey PNG."""
    from PIL import Image

    pixels = (explanation.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels), mode="L").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def answer(student: Student, images: list[Any]) -> list[dict[str, Any]]:
    """The JSON answers for decoded images, in one forward pass (also the in-process baseline)."""
    prep = student.prep
    batch, sizes = raw_to_batch(images, prep)
    logits, maps = student.forward_batch(batch)
    probabilities = torch.softmax(logits, dim=1)
    maps_at_size = to_input_size(maps, sizes) if maps is not None else [None] * len(images)
    out = []
    for index, label in enumerate(logits.argmax(dim=1).tolist()):
        out.append(
            {
                "label": label,
                "class_name": prep.class_names[label],
                "probability": float(probabilities[index, label]),
                "probabilities": [float(p) for p in probabilities[index]],
                "explanation": {"map": map_png(maps_at_size[index]), "kind": prep.explanation.kind},
            }
        )
    return out


@serve.deployment(name="student", max_ongoing_requests=64)
class StudentServer:
    """One replica: the student in memory, batched predictions, 400 for any bad request."""

    def __init__(self, student: Student, max_bytes: int = MAX_BYTES) -> None:
        torch.set_num_threads(1)  # replicas share the node's cores; one intra-op thread each
        self.student = student
        self.student.model.eval()
        self.max_bytes = max_bytes
        self.started = time.time()

    @serve.batch(max_batch_size=MAX_BATCH, batch_wait_timeout_s=BATCH_WAIT_S)
    async def _predict(self, images: list[Any]) -> list[dict[str, Any]]:
        return answer(self.student, images)

    async def __call__(self, request: Request) -> JSONResponse:
        route = request.url.path.rstrip("/").rsplit("/", 1)[-1]
        if route == "health" and request.method == "GET":
            prep = self.student.prep
            return JSONResponse(
                {"status": "ok", "classes": list(prep.class_names), "explanation": prep.explanation.kind,
                 "uptime_s": round(time.time() - self.started, 1)}
            )  # fmt: skip
        if route != "predict":
            return JSONResponse({"error": f"no route {request.url.path!r}; use POST /predict or GET /health"}, 404)
        if request.method != "POST":
            return JSONResponse({"error": "use POST /predict with an image body"}, 405)
        try:
            declared = int(request.headers.get("content-length") or 0)
            if declared > self.max_bytes:
                raise BadRequest(f"body of {declared} bytes is over the limit of {self.max_bytes}")
            image = image_from_body(await request.body(), request.headers.get("content-type", ""), self.max_bytes)
        except BadRequest as exc:
            return JSONResponse({"error": str(exc)}, 400)
        except ValueError as exc:  # a Content-Length that is not a number
            return JSONResponse({"error": f"bad request header ({exc})"}, 400)
        return JSONResponse(await self._predict(image))


def deploy(
    student: Student,
    *,
    port: int = 8000,
    host: str = "127.0.0.1",
    replicas: int = 1,
    cpus_per_replica: float = 1.0,
    max_bytes: int = MAX_BYTES,
) -> str:
    """Start Serve's HTTP proxy on ``host:port`` (Ray must be initialised) and deploy the student;
    returns the base URL. The student travels to the replicas through Ray's object store, so they
    need no access to its folder."""
    student.prep  # noqa: B018 (an old folder is refused here, before anything starts)
    serve.start(http_options={"host": host, "port": port})
    application = StudentServer.options(num_replicas=replicas, ray_actor_options={"num_cpus": cpus_per_replica}).bind(
        student, max_bytes
    )
    serve.run(application, name=APP_NAME, route_prefix="/")
    logger.info("serving %s on http://%s:%d with %d replica(s)", student.path, host, port, replicas)
    return f"http://{host}:{port}"


def undeploy() -> None:
    """Take the application down and stop Serve's proxy and controller (``xkd serve`` after Ctrl-C)."""
    serve.delete(APP_NAME)
    serve.shutdown()
