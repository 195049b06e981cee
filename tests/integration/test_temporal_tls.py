"""TEMPORAL_TLS_* and TEMPORAL_API_KEY reach every Temporal client forgespace creates.

The dev server has no TLS flags (`temporal server start-dev --help` lists none), so TLS is
tested end to end through a TLS-terminating proxy in front of it (tests/support/tlsproxy.py)
that requires a client certificate: the client must present the configured certificate and
trust the configured CA. The API key travels inside the encrypted HTTP/2 headers, which the
proxy does not decode, so its test checks that it reaches ``Client.connect``.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from support.s3server import env_for
from support.temporal import WorkerProcess, start_worker_process
from support.tlsproxy import make_pki, tls_proxy

from forgespace.config import Settings
from forgespace.errors import ConfigError
from forgespace.temporal.client import connect
from forgespace.temporal.devserver import DevServer, DevServerError

pytestmark = [pytest.mark.integration]


def tls_settings(settings: Settings, address: str, pki: Any, **over: Any) -> Settings:
    fields = {
        "temporal_address": address,
        "temporal_tls_cert": pki.client_cert,
        "temporal_tls_key": pki.client_key,
        "temporal_tls_ca": pki.ca,
    }
    return settings.with_(**{**fields, **over})


def test_mtls_client_connects_through_a_tls_frontend(
    temporal_server: DevServer, settings: Settings, tmp_path: Path
) -> None:
    pki = make_pki(tmp_path / "pki")
    with tls_proxy(temporal_server.address, pki) as proxy:
        s = tls_settings(settings, proxy.address, pki)

        async def main() -> int:
            client = await connect(s)
            return (await client.count_workflows()).count

        assert asyncio.run(main()) >= 0
        assert "forgespace-worker" in proxy.client_names  # the configured client certificate


def test_tls_without_the_client_certificate_or_with_another_ca_fails_naming_the_address(
    temporal_server: DevServer, settings: Settings, tmp_path: Path
) -> None:
    pki = make_pki(tmp_path / "pki")
    other = make_pki(tmp_path / "other", ca_name="another CA")
    with tls_proxy(temporal_server.address, pki) as proxy:
        no_cert = settings.with_(temporal_address=proxy.address, temporal_tls_ca=pki.ca)
        wrong_ca = tls_settings(settings, proxy.address, pki, temporal_tls_ca=other.ca)
        for s in (no_cert, wrong_ca):
            with pytest.raises(DevServerError, match=f"Temporal at {proxy.address} over TLS"):
                asyncio.run(connect(s, timeout=10))
        assert proxy.client_names == []
        # Plaintext to a TLS frontend fails too: the settings are what made it work above.
        with pytest.raises(DevServerError):
            asyncio.run(connect(settings.with_(temporal_address=proxy.address), timeout=10))


def test_a_worker_process_polls_through_tls(
    temporal_server: DevServer,
    settings: Settings,
    task_queue: str,
    tmp_path: Path,
    worker_processes: list[WorkerProcess],
) -> None:
    pki = make_pki(tmp_path / "pki")
    with tls_proxy(temporal_server.address, pki) as proxy:
        env = env_for(settings.with_(temporal_address=proxy.address))
        env.update(
            TEMPORAL_TLS_CERT=str(pki.client_cert),
            TEMPORAL_TLS_KEY=str(pki.client_key),
            TEMPORAL_TLS_CA=str(pki.ca),
        )
        worker = start_worker_process(env, task_queue, tmp_path / "w.log", "--metrics-port", "0")
        worker_processes.append(worker)
        worker.wait_ready()
        assert f"Temporal {proxy.address}" in worker.text()
        port = int(worker.text().split("/metrics")[0].rsplit(":", 1)[1])
        deadline = time.monotonic() + 20
        while True:  # healthy = polling through the TLS frontend
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, worker.text()[-2000:]
            time.sleep(0.2)
        assert "forgespace-worker" in proxy.client_names


def test_api_key_and_tls_files_reach_client_connect(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from temporalio.client import Client

    pki = make_pki(tmp_path / "pki")
    seen: dict[str, Any] = {}

    async def fake_connect(target: str, **kwargs: Any) -> str:
        seen.update(kwargs, target=target)
        return "client"

    monkeypatch.setattr(Client, "connect", fake_connect)
    s = Settings.from_env(
        {
            "CACHE_DIR": str(tmp_path / "c"),
            "TEMPORAL_ADDRESS": "example.tmprl.cloud:7233",
            "TEMPORAL_NAMESPACE": "ns.acct",
            "TEMPORAL_API_KEY": "secret-key",
            "TEMPORAL_TLS_CA": str(pki.ca),
            "TEMPORAL_TLS_CERT": str(pki.client_cert),
            "TEMPORAL_TLS_KEY": str(pki.client_key),
        }
    )
    assert "secret-key" not in repr(s)
    assert asyncio.run(connect(s)) == "client"
    assert seen["target"] == "example.tmprl.cloud:7233" and seen["namespace"] == "ns.acct"
    assert seen["api_key"] == "secret-key"
    tls = seen["tls"]
    assert tls.server_root_ca_cert == pki.ca.read_bytes()
    assert tls.client_cert == pki.client_cert.read_bytes()
    assert tls.client_private_key == pki.client_key.read_bytes()
    # The embedded dev server (another address) is plaintext: none of it is sent there.
    seen.clear()
    asyncio.run(connect(s, address="127.0.0.1:7233"))
    assert "tls" not in seen and "api_key" not in seen


def test_tls_settings_errors_name_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="TEMPORAL_TLS_CERT is set but TEMPORAL_TLS_KEY is not"):
        Settings.from_env({"TEMPORAL_TLS_CERT": str(tmp_path / "c.pem")})
    with pytest.raises(ConfigError, match="TEMPORAL_TLS_KEY is set but TEMPORAL_TLS_CERT is not"):
        Settings.from_env({"TEMPORAL_TLS_KEY": str(tmp_path / "k.pem")})
    s = Settings.from_env(
        {"TEMPORAL_ADDRESS": "h:7233", "TEMPORAL_TLS_CA": str(tmp_path / "missing.pem")}
    )
    with pytest.raises(ConfigError, match=r"TEMPORAL_TLS_CA=.*missing.pem: cannot read it"):
        asyncio.run(connect(s))
    (tmp_path / "not.pem").write_text("hello")
    s = s.with_(temporal_tls_ca=tmp_path / "not.pem")
    with pytest.raises(ConfigError, match=r"TEMPORAL_TLS_CA=.*not a PEM file"):
        asyncio.run(connect(s))
