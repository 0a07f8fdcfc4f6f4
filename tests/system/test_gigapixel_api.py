"""The large-image path through the HTTP API and a real worker process: a pyramidal slide
uploaded with a mask picture, the same slide by reference (image_url under an allowed
prefix, read in place), and every disallowed image_url refused at submission."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from slide_inputs import make_slide


@pytest.fixture(scope="module")
def slide_stack(tmp_path_factory, redis_server):
    from conftest import Stack, make_database

    tmp = tmp_path_factory.mktemp("gigapixel_api")
    slides = tmp / "slides"
    slides.mkdir()
    slide = make_slide(slides)
    (tmp / "private").mkdir()
    (tmp / "private" / "secret.tif").write_bytes(slide.path.read_bytes())
    stack = Stack(tmp, make_database("sqlite", tmp), redis_server, input_url_prefixes=[f"file://{slides}"])
    stack.start_worker()
    yield stack, slide, tmp
    stack.close()


def _submit(client, data, files=()):
    payload = dict(data)
    for name, value in files:
        payload[name] = value
    return client.post("/api/v1/jobs", data=payload, content_type="multipart/form-data")


@pytest.mark.slow
def test_slide_by_reference_and_upload_with_mask(slide_stack):
    stack, slide, _ = slide_stack
    client = stack.client()
    form = {"model": "shapes", "classes": "triangle,cross", "level": "1"}
    by_url = _submit(client, {**form, "image_url": f"file://{slide.path}"})
    assert by_url.status_code == 202, by_url.json
    assert by_url.json["image"]["width"] == 3072
    mask = np.zeros((64, 96), np.uint8)
    x, y, w, h = slide.tissue[1]
    mask[y * 64 // 2048 : (y + h) * 64 // 2048 + 1, x * 96 // 3072 : (x + w) * 96 // 3072 + 1] = 255
    buffer = io.BytesIO()
    Image.fromarray(mask).save(buffer, format="PNG")
    uploaded = _submit(
        client,
        {**form, "mode": "tiled", "stride": "32"},
        [
            ("image", (io.BytesIO(slide.path.read_bytes()), "s.tif")),
            ("mask_image", (io.BytesIO(buffer.getvalue()), "m.png")),
        ],
    )
    assert uploaded.status_code == 202, uploaded.json
    for response, mask_mode in ((by_url, "auto"), (uploaded, "image")):
        done = stack.wait_for(client, response.json["id"], timeout=300)
        assert done["status"] == "succeeded", done
        summary = client.get(done["result"]["summary_url"]).json
        assert summary["mask"]["mode"] == mask_mode and summary["mask"]["masked_fraction"] > 0.5
        for entry in summary["classes"]:
            obj = next(o for o in slide.coarse if o.label == entry["name"])
            assert obj.contains(entry["peak"]["x"], entry["peak"]["y"], margin=8), (entry, obj)


def test_disallowed_image_urls_are_refused(slide_stack):
    stack, slide, tmp = slide_stack
    client = stack.client()
    base = f"file://{slide.path.parent}"
    cases = [
        (f"file://{tmp}/private/secret.tif", 403, "url_not_allowed"),
        (f"{base}/../private/secret.tif", 400, "invalid_image_url"),
        (f"{base}x/slide.tif", 403, "url_not_allowed"),
        ("ftp://example.org/slide.tif", 400, "invalid_image_url"),
        (f"{base}/slide.tif?x=1", 400, "invalid_image_url"),
        ("s3://user:pw@bucket/slide.tif", 400, "invalid_image_url"),
        (f"{base}/missing.tif", 422, "url_unreadable"),
    ]
    for url, status, code in cases:
        response = _submit(client, {"image_url": url})
        assert (response.status_code, response.json["error"]["code"]) == (status, code), url
    both = _submit(client, {"image_url": f"{base}/slide.tif"}, [("image", (io.BytesIO(b"x"), "a.png"))])
    assert both.status_code == 400
    no_mpp = _submit(client, {"image_url": f"{base}/slide.tif", "level": "9"})
    assert no_mpp.json["error"]["code"] == "invalid_parameter"
