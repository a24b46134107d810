"""What importing tokenbroker loads: an embedded broker needs neither the Redis client nor
gRPC, so neither is imported until something asks for `RedisStore` or the service."""

from __future__ import annotations

import subprocess
import sys

import pytest

_HEAVY = "sorted(m for m in sys.modules if m.startswith(('redis', 'grpc')))"


def _run(code: str) -> None:
    """Runs `code` in a fresh interpreter (this one has imported everything already)."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "module",
    ["tokenbroker", "tokenbroker.broker", "tokenbroker.store", "tokenbroker.store.memory", "tokenbroker.keyring"],
)
def test_the_embedded_api_imports_neither_redis_nor_grpc(module: str) -> None:
    _run(
        f"import sys, importlib, tokenbroker; importlib.import_module({module!r}); tokenbroker.Broker; "
        f"assert 'redis' not in sys.modules and 'grpc' not in sys.modules, {_HEAVY}"
    )


@pytest.mark.parametrize("module", ["tokenbroker.client_assertion", "tokenbroker.client", "tokenbroker.mcp.auth"])
def test_client_code_does_not_import_the_brokers_authenticator(module: str) -> None:
    if module == "tokenbroker.mcp.auth":
        pytest.importorskip("httpx")  # the `mcp` extra
    _run(
        f"import sys, importlib; importlib.import_module({module!r}); "
        "assert 'tokenbroker.client_auth' not in sys.modules, sorted(m for m in sys.modules if 'tokenbroker' in m)"
    )


def test_redis_store_is_still_importable_from_the_package() -> None:
    _run(
        "import sys, tokenbroker; from tokenbroker import RedisStore; "
        "from tokenbroker.store import RedisStore as FromStore; "
        "from tokenbroker.store.redis import RedisStore as FromModule; "
        "assert RedisStore is FromStore is FromModule is tokenbroker.RedisStore; "
        "assert 'redis' in sys.modules"
    )


def test_unknown_attributes_still_raise_attribute_error() -> None:
    import tokenbroker
    import tokenbroker.store

    for module in (tokenbroker, tokenbroker.store):
        with pytest.raises(AttributeError, match="no attribute 'NoSuchThing'"):
            module.NoSuchThing  # noqa: B018


def test_every_name_in_all_resolves() -> None:
    import tokenbroker
    import tokenbroker.store

    for module in (tokenbroker, tokenbroker.store):
        for name in module.__all__:
            assert getattr(module, name) is not None
