"""A small client of the heatmap service's HTTP API (``/api/v1``), on `requests`.

Uploads are streamed from the file (``requests_toolbelt``'s MultipartEncoder: a 2 GB slide
is never held in memory), downloads are streamed to a temporary file and renamed into
place, and every refusal comes back as a `ClientError` with the service's own error code.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from urllib.parse import quote

import requests
from requests_toolbelt import MultipartEncoder

from shared.jobs.job_status import TERMINAL

API = "/api/v1"


class ClientError(Exception):
    """A request that did not do what was asked: `code` is the service's error code (4xx/5xx
    answers), or ``connection_failed`` / ``timeout`` / ``bad_response`` from the client."""

    def __init__(self, code: str, message: str, status: int | None = None):
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.status = code, message, status


def job_id_of(reference: str) -> str:
    """A job id, or the job's URL (as printed by `heatmap submit`): the last path segment."""
    return reference.rstrip("/").rsplit("/", 1)[-1]


def _error_from(response: requests.Response) -> ClientError:
    try:
        error = response.json()["error"]
        return ClientError(str(error["code"]), str(error["message"]), response.status_code)
    except (ValueError, KeyError, TypeError):
        return ClientError(f"http_{response.status_code}", response.reason or "unexpected answer", response.status_code)


class HeatmapClient:
    """One service, one API key; the methods mirror the API's routes."""

    def __init__(self, server: str, api_key: str | None = None, timeout: float = 30.0):
        self.server = server.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        self.session.headers["User-Agent"] = "heatmap-cli"
        if api_key:
            self.session.headers["X-API-Key"] = api_key

    def url(self, path: str) -> str:
        """An absolute URL for a path the service returned (``/api/v1/jobs/...``)."""
        return path if path.startswith(("http://", "https://")) else self.server + path

    def _call(self, method: str, path: str, expect: tuple[int, ...] = (200,), **kwargs) -> requests.Response:
        try:
            response = self.session.request(method, self.url(path), timeout=self.timeout, **kwargs)
        except requests.Timeout:
            raise ClientError("timeout", f"{self.server} did not answer within {self.timeout:g} s") from None
        except requests.RequestException as exc:
            raise ClientError("connection_failed", f"cannot reach {self.server} ({type(exc).__name__})") from None
        if response.status_code not in expect:
            raise _error_from(response)
        return response

    def _json(self, method: str, path: str, expect: tuple[int, ...] = (200,), **kwargs) -> dict:
        response = self._call(method, path, expect, **kwargs)
        try:
            return response.json()
        except ValueError:
            raise ClientError("bad_response", f"{path} did not answer JSON", response.status_code) from None

    def submit(self, image: str | Path | None, fields: Mapping[str, str], idempotency_key: str | None = None) -> dict:
        """POST the image (streamed) with the job's form fields; returns the job. `image`
        None: a submission by reference (``fields["image_url"]``), nothing is uploaded."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        with contextlib.ExitStack() as stack:
            parts: dict = dict(fields)
            if image is not None:
                image = Path(image)
                parts["image"] = (image.name, stack.enter_context(open(image, "rb")), "application/octet-stream")
            encoder = MultipartEncoder(parts)
            headers["Content-Type"] = encoder.content_type
            return self._json("POST", f"{API}/jobs", (200, 202), data=encoder, headers=headers)

    def job(self, job_id: str) -> dict:
        return self._json("GET", f"{API}/jobs/{quote(job_id_of(job_id), safe='')}")

    def jobs(self, status: str | None = None, limit: int | None = None, cursor: str | None = None) -> dict:
        query = {key: value for key, value in (("status", status), ("limit", limit), ("cursor", cursor)) if value}
        return self._json("GET", f"{API}/jobs", params=query)

    def cancel(self, job_id: str) -> dict:
        """Cancel a queued or running job (never deletes one that ended: 409 job_finished)."""
        return self._json("POST", f"{API}/jobs/{quote(job_id_of(job_id), safe='')}/cancel", (202,))

    def models(self) -> dict:
        return self._json("GET", f"{API}/models")

    def get_json(self, path: str) -> dict:
        return self._json("GET", path)

    def wait(self, job_id: str, on_update: Callable[[dict], None] | None = None, interval: float = 0.25) -> dict:
        """Poll until the job ends; `on_update` sees every answer. Polls quickly at first and
        then every 2 s, so a long job does not cost a request a quarter second."""
        started = time.monotonic()
        while True:
            job = self.job(job_id)
            if on_update is not None:
                on_update(job)
            if job["status"] in TERMINAL:
                return job
            time.sleep(interval if time.monotonic() - started < 10 else 2.0)

    def download(self, path: str, destination: Path) -> Path:
        """Stream an artifact to `destination` (temporary name first, then renamed)."""
        destination.parent.mkdir(parents=True, exist_ok=True)
        temp = destination.with_name(f".{destination.name}.part-{uuid.uuid4().hex[:8]}")
        try:
            with self._call("GET", path, stream=True) as response, open(temp, "wb") as handle:
                for chunk in response.iter_content(chunk_size=1 << 20):
                    handle.write(chunk)
            os.replace(temp, destination)
        except requests.RequestException as exc:  # the connection broke mid-download
            raise ClientError("connection_failed", f"download of {path} broke off ({type(exc).__name__})") from None
        finally:
            temp.unlink(missing_ok=True)
        return destination
