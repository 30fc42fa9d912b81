"""The served student on the real local Ray Serve: predictions with maps, batching, and 400s."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image
from sklearn.datasets import load_digits

from tests.conftest import _free_port
from xkd_ray.core.distill import distill, save_student
from xkd_ray.student.predict import load_student_folder

# One worker builds this module's costly fixture (conftest.SMOKE_SEARCH says why).
pytestmark = pytest.mark.xdist_group("served")


MAX_BYTES = 64 * 1024


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def served(ray_local, tiny_config, tiny_data, tmp_path_factory):
    from ray import serve

    from xkd_ray.cluster.serve import deploy

    config = tiny_config.with_overrides({"distill.method": "xd"})
    trained, metrics = distill(config, tiny_data, progress=False)
    student = load_student_folder(
        save_student(tmp_path_factory.mktemp("serve") / "xd", config, trained, tiny_data, metrics)
    )
    url = deploy(student, port=_free_port(), replicas=1, cpus_per_replica=0.5, max_bytes=MAX_BYTES)
    yield student, url
    serve.shutdown()


def digit_images(count: int) -> list[Image.Image]:
    """scikit-learn digits as the 8-bit grey files a user would send, at 24 x 24."""
    images = load_digits().images[:count]
    return [Image.fromarray((image * 255 / 16).astype(np.uint8)).resize((24, 24)) for image in images]


def test_predict_returns_label_probabilities_and_map(served) -> None:
    student, url = served
    health = requests.get(f"{url}/health", timeout=60)
    assert health.status_code == 200 and health.json()["status"] == "ok" and health.json()["explanation"] == "head"
    images = digit_images(12)
    with ThreadPoolExecutor(8) as pool:  # concurrent requests share forward passes (@serve.batch)
        raw = list(
            pool.map(
                lambda im: requests.post(
                    f"{url}/predict", data=png(im), headers={"Content-Type": "image/png"}, timeout=60
                ),
                images,
            )
        )
    expected = student.predict(images)
    for index, response in enumerate(raw):
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["label"] == int(expected.labels[index]) and body["class_name"] == expected.class_names[index]
        np.testing.assert_allclose(body["probabilities"], expected.probabilities[index].numpy(), atol=1e-5)
        assert body["explanation"]["kind"] == "head"
        explanation = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["explanation"]["map"]))))
        assert explanation.shape == (24, 24)  # at the image's resolution
        assert np.abs(explanation / 255.0 - expected.maps[index].numpy()).max() <= 0.5 / 255 + 1e-6
    files = {"image": ("digit.png", png(images[0]), "image/png")}
    multipart = requests.post(f"{url}/predict", files=files, data={"note": "x"}, timeout=60)
    assert multipart.status_code == 200 and multipart.json()["label"] == raw[0].json()["label"]
    np.testing.assert_allclose(multipart.json()["probabilities"], raw[0].json()["probabilities"], atol=1e-6)
    rgb = requests.post(
        f"{url}/predict", data=png(images[0].convert("RGB")), headers={"Content-Type": "image/png"}, timeout=60
    )
    assert rgb.status_code == 200 and rgb.json()["label"] == raw[0].json()["label"]  # RGB to a grey student


@pytest.mark.parametrize(
    ("body", "content_type", "message"),
    [
        (b"", "image/png", "empty body"),
        (b"GIF89a but not really an image", "image/gif", "not a readable image"),
        (b"\x89PNG" + bytes(MAX_BYTES), "image/png", "over the limit"),
        (b'{"image": "abc"}', "application/json", "is not an image"),
        (
            b"--x\r\nContent-Disposition: form-data; name=a\r\n\r\nhello\r\n--x--\r\n",
            "multipart/form-data; boundary=x",
            "not a readable image",
        ),
    ],
    ids=["empty", "not-an-image", "too-large", "json", "multipart-text"],
)
def test_bad_requests_get_400_and_the_server_keeps_serving(served, body, content_type, message) -> None:
    _, url = served
    response = requests.post(f"{url}/predict", data=body, headers={"Content-Type": content_type}, timeout=60)
    assert response.status_code == 400 and message in response.json()["error"]
    assert "\n" not in response.json()["error"]
    after = requests.post(
        f"{url}/predict", data=png(digit_images(1)[0]), headers={"Content-Type": "image/png"}, timeout=60
    )
    assert after.status_code == 200 and after.json()["class_name"] in [str(d) for d in range(10)]
    assert requests.get(f"{url}/predict", timeout=60).status_code == 405
    assert requests.get(f"{url}/nowhere", timeout=60).status_code == 404
