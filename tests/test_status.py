"""Issue 9, section 2: one table between domain errors and gRPC statuses serves the
servicer, `BrokerClient` and the CLI (tokenbroker.status)."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest

from tokenbroker import attestation, client_auth, config, errors, registry_file
from tokenbroker.service.servicer import STATUS_BY_ERROR, status_for
from tokenbroker.status import ERROR_BY_STATUS, error_for_status, status_name_for, status_name_of


def _domain_errors() -> list[type[errors.TokenBrokerError]]:
    """Every exception tokenbroker defines: `tokenbroker.errors` and the modules that
    refine them."""
    found = {
        value
        for module in (errors, client_auth, config, registry_file, attestation)
        for value in vars(module).values()
        if isinstance(value, type) and issubclass(value, errors.TokenBrokerError)
    }
    return sorted(found, key=lambda e: e.__name__)


DOMAIN_ERRORS = _domain_errors()


def _one(error_type: type[errors.TokenBrokerError]) -> errors.TokenBrokerError:
    """An instance, whatever its constructor asks for (the table only looks at its type)."""
    return error_type.__new__(error_type)


def test_every_error_kind_is_found() -> None:
    names = {e.__name__ for e in DOMAIN_ERRORS}
    assert set(errors.__all__) <= names
    assert {"ClientThrottledError", "CredentialRefusedError", "ConfigError", "RegistryFileError"} <= names


@pytest.mark.parametrize("error_type", DOMAIN_ERRORS, ids=lambda e: e.__name__)
def test_a_status_comes_back_as_an_error_sent_with_that_status(error_type: type[errors.TokenBrokerError]) -> None:
    name = status_name_for(_one(error_type))
    back = error_for_status(name)
    assert status_name_for(_one(back)) == name
    if name == "INTERNAL":
        assert back is errors.TokenBrokerError


def test_the_statuses_a_domain_error_is_sent_as() -> None:
    assert {e.__name__: status_name_for(_one(e)) for e in DOMAIN_ERRORS} == {
        "AttestationError": "UNAUTHENTICATED",
        "AuthenticationError": "UNAUTHENTICATED",
        # Caught by the authenticator, which refuses the credential; never sent as such.
        "CimdDocumentError": "INVALID_ARGUMENT",
        "CimdFetchError": "INTERNAL",
        "ClientNotAllowedError": "PERMISSION_DENIED",
        "ClientRefusedError": "PERMISSION_DENIED",
        "ClientThrottledError": "RESOURCE_EXHAUSTED",
        "ConfigError": "INVALID_ARGUMENT",
        "CredentialExpiredError": "UNAUTHENTICATED",
        "CredentialRefusedError": "UNAUTHENTICATED",
        "InvalidArgumentError": "INVALID_ARGUMENT",
        "InvalidKeyError": "INTERNAL",
        "PermissionDeniedError": "PERMISSION_DENIED",
        "RateLimitedError": "RESOURCE_EXHAUSTED",
        "RegistryFileError": "INVALID_ARGUMENT",
        "SessionLimitExceededError": "RESOURCE_EXHAUSTED",
        "SessionNotFoundError": "NOT_FOUND",
        "StoreUnavailableError": "UNAVAILABLE",
        "TokenBrokerError": "INTERNAL",
        "UnknownKeyIdError": "INTERNAL",
    }


def test_the_errors_a_client_raises_for_a_status() -> None:
    assert dict(ERROR_BY_STATUS) == {
        "UNAUTHENTICATED": errors.AuthenticationError,
        "PERMISSION_DENIED": errors.PermissionDeniedError,
        "INVALID_ARGUMENT": errors.InvalidArgumentError,
        "RESOURCE_EXHAUSTED": errors.SessionLimitExceededError,
        "NOT_FOUND": errors.SessionNotFoundError,
        "UNAVAILABLE": errors.StoreUnavailableError,
        "DEADLINE_EXCEEDED": errors.StoreUnavailableError,
    }
    for name in ("INTERNAL", "UNKNOWN", "CANCELLED", "FAILED_PRECONDITION", ""):
        assert error_for_status(name) is errors.TokenBrokerError


def test_the_servicer_sends_the_shared_table_as_grpc_codes() -> None:
    assert [(e, code.name) for e, code in STATUS_BY_ERROR] == [
        (errors.InvalidArgumentError, "INVALID_ARGUMENT"),
        (errors.AuthenticationError, "UNAUTHENTICATED"),
        (errors.PermissionDeniedError, "PERMISSION_DENIED"),
        (errors.ClientNotAllowedError, "PERMISSION_DENIED"),
        (errors.SessionLimitExceededError, "RESOURCE_EXHAUSTED"),
        (errors.RateLimitedError, "RESOURCE_EXHAUSTED"),
        (errors.SessionNotFoundError, "NOT_FOUND"),
        (errors.StoreUnavailableError, "UNAVAILABLE"),
    ]
    for error_type in DOMAIN_ERRORS:
        assert status_for(_one(error_type)) is grpc.StatusCode[status_name_for(_one(error_type))]
    assert status_for(errors.InvalidKeyError("x")) is grpc.StatusCode.INTERNAL


class _RpcError:
    def __init__(self, code: object) -> None:
        self._code = code

    def code(self) -> object:
        return self._code


def test_the_status_name_of_an_rpc_error() -> None:
    assert status_name_of(_RpcError(grpc.StatusCode.DEADLINE_EXCEEDED)) == "DEADLINE_EXCEEDED"
    assert status_name_of(_RpcError("WEIRD")) == "WEIRD"
    assert status_name_of(object()) == "None"  # not an RpcError: said as such, never raised


def test_the_table_does_not_load_grpc() -> None:
    code = "import sys, tokenbroker.status, tokenbroker.cli._errors; print('grpc' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"
