"""The new artifacts through the API with a real worker: result links, downloads with their
content types, the threshold parameter, and the OpenAPI document."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import rasterio
import shapely
import tifffile
from conftest import scene_png
from shapely.geometry import shape


@pytest.mark.slow
def test_raster_and_regions_download_with_their_content_types(service):
    client = service.client()
    image, objects = scene_png(384, 320, seed=11, n_objects=2)
    response = service.submit(client, image, model="shapes", mode="direct", classes="circle,square,triangle,cross")
    assert response.status_code == 202, response.json
    job_id = response.json["id"]
    assert response.json["params"]["threshold"] == 0.5
    done = service.wait_for(client, job_id)
    assert done["status"] == "succeeded", done
    result = done["result"]
    assert result["raster_url"] == f"/api/v1/jobs/{job_id}/raster"
    assert result["regions_url"] == f"/api/v1/jobs/{job_id}/regions"
    assert "regions_map_url" not in result  # a PNG has no georeference

    raster = client.get(result["raster_url"])
    assert raster.status_code == 200 and raster.mimetype == "image/tiff"
    scores = np.load(io.BytesIO(client.get(result["heatmap_url"]).data))["scores"]
    with tifffile.TiffFile(io.BytesIO(raster.data)) as tif:
        np.testing.assert_array_equal(tif.series[0].asarray(), np.moveaxis(scores, 2, 0))
    with rasterio.MemoryFile(raster.data) as memory, memory.open() as src:
        assert src.descriptions == ("circle", "square", "triangle", "cross") and src.crs is None

    regions = client.get(result["regions_url"])
    assert regions.status_code == 200 and regions.mimetype == "application/geo+json"
    collection = json.loads(regions.data)
    assert collection["type"] == "FeatureCollection" and collection["threshold"] == 0.5
    for obj in objects:
        hits = [
            f
            for f in collection["features"]
            if f["properties"]["classification"]["name"] == obj.label
            and shape(f["geometry"]).contains(shapely.Point(obj.center))
        ]
        assert hits and all(shape(f["geometry"]).is_valid for f in hits), obj
    assert client.get(f"/api/v1/jobs/{job_id}/regions/map").status_code == 404


def test_threshold_changes_the_regions_and_bad_thresholds_are_refused(service):
    client = service.client()
    image, _ = scene_png(256, 192, seed=4)
    for bad in ("abc", "nan", "inf"):
        response = service.submit(client, image, threshold=bad)
        assert response.status_code == 400 and response.json["error"]["code"] == "invalid_parameter", bad
    response = service.submit(client, image, classes="circle", threshold="-1000")
    done = service.wait_for(client, response.json["id"])
    assert done["status"] == "succeeded" and done["params"]["threshold"] == -1000
    (everything,) = json.loads(client.get(done["result"]["regions_url"]).data)["features"]
    grid = done["result"]["grid"]
    assert everything["properties"]["measurements"]["cells"] == grid["rows"] * grid["cols"]


def test_links_of_another_owner_and_unfinished_jobs(service):
    client = service.client()
    response = service.submit(client, scene_png(200, 200, seed=9)[0])
    job_id = response.json["id"]
    done = service.wait_for(client, job_id)
    other = service.client("bob")
    for route in ("raster", "regions"):
        assert other.get(f"/api/v1/jobs/{job_id}/{route}").status_code == 404
        assert client.get(f"/api/v1/jobs/{job_id}/{route}").status_code == 200
    assert done["result"]["raster_url"]


@pytest.mark.parametrize(
    "path, content_type",
    [
        ("/api/v1/jobs/{job_id}/raster", "image/tiff"),
        ("/api/v1/jobs/{job_id}/regions", "application/geo+json"),
        ("/api/v1/jobs/{job_id}/regions/map", "application/geo+json"),
    ],
)
def test_openapi_documents_the_routes_and_the_threshold(client, path, content_type):
    document = client.get("/api/v1/openapi.json").json
    assert content_type in document["paths"][path]["get"]["responses"]["200"]["content"]
    body = document["paths"]["/api/v1/jobs"]["post"]["requestBody"]["content"]["multipart/form-data"]
    schema = body["schema"]
    if "$ref" in schema:
        schema = document["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    assert schema["properties"]["threshold"]["type"] == "number"
