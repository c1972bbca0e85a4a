"""A small stand-in for the Hugging Face hub on 127.0.0.1, for the real ``huggingface_hub`` client (``HF_ENDPOINT``).

It answers what ``hf_hub_download`` asks: ``HEAD``/``GET /<prefix><repo>/resolve/<revision>/<file>`` with the
``X-Repo-Commit``, ``ETag`` and ``Content-Length`` headers (``file_download.get_hf_file_metadata``), and
``X-Error-Code: EntryNotFound`` / ``RepoNotFound`` (404) and ``GatedRepo`` (403), and the tree listing
``/api/<type>s/<repo>/tree/<revision>/<folder>`` that transformers' tokenizer loading asks for, as the hub does.
``requests`` counts what each path was asked.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

PREFIX = {"dataset": "/datasets/", "model": "/"}


class Hub:
    """Repos as ``{(repo_type, repo_id): {filename: bytes}}``, each at one commit (``main`` resolves to it)."""

    def __init__(self) -> None:
        self.repos: dict[tuple[str, str], dict[str, bytes]] = {}
        self.commits: dict[tuple[str, str], str] = {}
        self.gated: set[tuple[str, str]] = set()
        self.static: dict[str, bytes] = {}  # plain files by path, for the non-hub sources of ``kvbench download``
        self.requests: Counter[str] = Counter()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def add(self, repo_type: str, repo_id: str, files: dict[str, bytes], commit: str | None = None) -> str:
        """Publish a repo; returns its commit (a sha1 of its contents unless given)."""
        key = (repo_type, repo_id)
        self.repos[key] = files
        digest = hashlib.sha1(b"".join(name.encode() + data for name, data in sorted(files.items())))
        self.commits[key] = commit or digest.hexdigest()
        return self.commits[key]

    def __enter__(self) -> Hub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _lookup(self, path: str) -> tuple[int, dict[str, str], bytes]:
        if path in self.static:
            return 200, {}, self.static[path]
        for (repo_type, repo_id), files in self.repos.items():
            tree = f"/api/{repo_type}s/{repo_id}/tree/"
            if path.startswith(tree):  # list_repo_tree (transformers asks for additional_chat_templates/)
                folder = path[len(tree) :].partition("/")[2].rstrip("/") + "/"
                entries = [
                    {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                    for name, data in files.items()
                    if name.startswith(folder)
                ]
                return 200, {"Content-Type": "application/json"}, json.dumps(entries).encode()
            base = f"{PREFIX[repo_type]}{repo_id}/resolve/"
            if not path.startswith(base):
                continue
            revision, _, filename = path[len(base) :].partition("/")
            commit = self.commits[(repo_type, repo_id)]
            if (repo_type, repo_id) in self.gated:
                return 403, {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access to this repo is restricted."}, b""
            if revision not in ("main", commit):
                return 404, {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"}, b""
            if filename not in files:
                return 404, {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found"}, b""
            data = files[filename]
            headers = {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
            return 200, headers, data
        return 404, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}, b""

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, body: bool) -> None:
                path = unquote(self.path.split("?")[0])
                hub.requests[f"{self.command} {path}"] += 1
                status, headers, data = hub._lookup(path)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def do_HEAD(self) -> None:  # noqa: N802
                self._answer(body=False)

            def do_GET(self) -> None:  # noqa: N802
                self._answer(body=True)

            def log_message(self, *args: object) -> None:
                pass

        return Handler
