"""A client of the service's HTTP API (httpx), for the `submit`, `runs`, `status`, `logs`,
`cancel` and `download` commands and for tests."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from pipcook_sandbox.runner.errors import ClientError

TOKEN_ENV = "PIPCOOK_SANDBOX_TOKEN"
SERVER_ENV = "PIPCOOK_SANDBOX_SERVER"


class Client:
    def __init__(self, server: str, token: str, timeout: float = 60.0) -> None:
        self.server = server.rstrip("/")
        self.http = httpx.Client(base_url=self.server, headers={"Authorization": f"Bearer {token}"},
                                 timeout=timeout, follow_redirects=False)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ClientError(f"cannot reach the server at {self.server}: {exc}") from None
        if response.status_code >= 400:
            raise ClientError(_detail(response), response.status_code)
        return response

    def submit(self, pipeline: str | dict[str, Any], limits: dict[str, Any] | None = None,
               gpu: int = 0) -> dict[str, Any]:
        """PIPELINE: an http(s) URL, a dict, or a local JSON file (sent inline)."""
        body: dict[str, Any] = {}
        if isinstance(pipeline, dict):
            body["pipeline"] = pipeline
        elif pipeline.lower().startswith(("http://", "https://")):
            body["pipeline_url"] = pipeline
        else:
            try:
                body["pipeline"] = json.loads(Path(pipeline).read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ClientError(f"cannot read the pipeline file {pipeline}: {exc}") from None
        if limits:
            body["limits"] = limits
        if gpu:
            body["gpu"] = gpu
        return self._call("POST", "/v1/runs", json=body).json()

    def runs(self, status: str | None = None) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/runs", params={"status": status} if status else None).json()["runs"]

    def status(self, run_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/runs/{run_id}").json()

    def cancel(self, run_id: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/runs/{run_id}/cancel").json()

    def delete(self, run_id: str) -> None:
        self._call("DELETE", f"/v1/runs/{run_id}")

    def log(self, run_id: str, stage: str) -> str:
        return self._call("GET", f"/v1/runs/{run_id}/logs/{stage}").text

    def download(self, run_id: str, dest: Path, name: str = "model.zip") -> Path:
        path = f"/v1/runs/{run_id}/model.zip" if name == "model.zip" else f"/v1/runs/{run_id}/artifacts/{name}"
        try:
            with self.http.stream("GET", path) as response:
                if response.status_code >= 400:
                    response.read()
                    raise ClientError(_detail(response), response.status_code)
                tmp = dest.with_name(f".{dest.name}.part")
                with open(tmp, "wb") as f:
                    f.writelines(response.iter_bytes())
                tmp.replace(dest)
        except httpx.HTTPError as exc:
            raise ClientError(f"cannot download from {self.server}: {exc}") from None
        return dest

    def events(self, run_id: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """(kind, event) from the server-sent event stream until the run ends (kind `state` last)."""
        try:
            with self.http.stream("GET", f"/v1/runs/{run_id}/events", timeout=httpx.Timeout(60, read=None)) as r:
                if r.status_code >= 400:
                    r.read()
                    raise ClientError(_detail(r), r.status_code)
                kind, data = "message", ""
                for line in r.iter_lines():
                    if line.startswith("event:"):
                        kind = line[6:].strip()
                    elif line.startswith("data:"):
                        data += line[5:].strip()
                    elif line == "" and data:
                        try:
                            yield kind, json.loads(data)
                        except ValueError:
                            pass
                        kind, data = "message", ""
        except httpx.HTTPError as exc:
            raise ClientError(f"lost the event stream from {self.server}: {exc}") from None


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail")
    except ValueError:
        detail = None
    if isinstance(detail, list):  # pydantic's validation errors
        detail = "; ".join(f"{'.'.join(str(p) for p in d.get('loc', []))}: {d.get('msg')}" for d in detail)
    return f"the server answered {response.status_code}: {detail or response.text[:300] or response.reason_phrase}"
