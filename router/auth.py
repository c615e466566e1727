"""API-key auth: `Authorization: Bearer <key>` against the keys in `router.api_keys` and the
LLM_CLUSTER_API_KEYS environment variable (comma-separated). No keys = an open endpoint, announced with a
warning at start. Keys are never logged.
"""
from __future__ import annotations

import hmac
import logging
import os
from typing import Iterable, Mapping

from router.config import RouterSettings
from router.errors import APIError

log = logging.getLogger("llm_cluster.router")

ENV_VAR = "LLM_CLUSTER_API_KEYS"


class ApiKeys:
    def __init__(self, keys: Iterable[str]):
        self._keys = sorted({k.encode() for k in keys if k})

    @classmethod
    def from_config(cls, settings: RouterSettings, env: Mapping[str, str] | None = None) -> "ApiKeys":
        # The env var is read here too: the ingress may run where the config was built without it.
        env = os.environ if env is None else env
        from_env = [k.strip() for k in env.get(ENV_VAR, "").split(",")]
        return cls([k.get_secret_value() for k in settings.api_keys] + from_env)

    @property
    def open(self) -> bool:
        return not self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def check(self, authorization: str | None) -> None:
        """Raise 401 unless the header carries a configured key."""
        if self.open:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key")
        given = token.strip().encode()
        # Compare against every key (no early exit), in constant time per key.
        ok = False
        for key in self._keys:
            ok |= hmac.compare_digest(given, key)
        if not ok:
            raise APIError(401, "invalid API key", code="invalid_api_key")

    def announce(self) -> None:
        if self.open:
            log.warning("no API keys configured (router.api_keys / %s): the endpoint is OPEN to anyone "
                        "who can reach it", ENV_VAR)
        else:
            log.info("API key auth on (%d key(s))", len(self))
