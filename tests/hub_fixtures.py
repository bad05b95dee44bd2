"""Pytest fixtures pointing the real huggingface_hub client at the in-memory Hub of
``tests/hub_server.py``. Enable with ``pytest_plugins = ["tests.hub_fixtures"]`` in conftest.py.

``hub`` starts a server and, for this test only, points the client at it in this process
(``huggingface_hub.constants`` is read at import, so the values are patched) and in any
subprocess (``HF_ENDPOINT``, ``HF_HUB_CACHE``, ``HF_HOME``). The Hub cache and the token file
live in the test's tmp_path, so a developer's login and cache are never touched.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
from huggingface_hub import constants

from tests.hub_server import HubServer

HUB_USER = "dmsae-tester"
HUB_ORG = "dmsae-org"
HUB_TOKEN = "hf_dmsaeTestToken0123456789abcdef"


class HubTestEnv(NamedTuple):
    server: HubServer
    token: str
    user: str
    org: str
    cache_dir: Path

    def subprocess_env(self, **extra: str) -> dict[str, str]:
        """Environment for a child process that talks to this Hub with this cache."""
        env = {key: value for key, value in os.environ.items() if key not in ("HF_TOKEN", "HF_HUB_OFFLINE")}
        env.update(
            HF_ENDPOINT=self.server.url,
            HF_HUB_CACHE=str(self.cache_dir),
            HF_HOME=str(self.cache_dir.parent / "hf_home"),
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
        )
        env.update(extra)
        return env


def point_client_at(monkeypatch: pytest.MonkeyPatch, endpoint: str, cache_dir: Path, home: Path) -> None:
    """Everything huggingface_hub (and transformers through it) caches about the endpoint,
    the cache folder and the stored token."""
    import huggingface_hub.hf_api

    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache_dir))
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_URL_HOSTS", constants.HF_URL_HOSTS | {"127.0.0.1"})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache_dir))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # The module-level HfApi behind huggingface_hub.create_repo & co. fixed its endpoint at import.
    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", endpoint)


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubTestEnv]:
    """A running test Hub with one user (``HUB_USER``, token ``HUB_TOKEN``, member of ``HUB_ORG``);
    HF_TOKEN is set to that token."""
    server = HubServer(tokens={HUB_TOKEN: HUB_USER}, orgs={HUB_USER: [HUB_ORG]}).start()
    cache_dir, home = tmp_path / "hf_cache", tmp_path / "hf_home"
    cache_dir.mkdir()
    home.mkdir()
    point_client_at(monkeypatch, server.url, cache_dir, home)
    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
    try:
        yield HubTestEnv(server, HUB_TOKEN, HUB_USER, HUB_ORG, cache_dir)
    finally:
        server.stop()
