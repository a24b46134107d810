"""The Lua scripts of the Redis store (files in `lua/`), as Redis gets them.

Scripts carry a `#!lua` shebang, so an out-of-memory Redis refuses them before they write
anything (fail closed); each one starts with the shared `_prelude.lua`."""

from __future__ import annotations

from importlib import resources

SCRIPT_NAMES = (
    "open_session",
    "continue_session",
    "check_token",
    "check_jti",
    "remember",
    "epoch_init",
    "epoch_restamp",
    "revoke_session",
    "revoke_client",
    "revoke_token",
)
# Redis 7 script flags, after `#!lua`: these two take every epoch of one node at once.
_FLAGS = {"epoch_init": " flags=allow-cross-slot-keys", "epoch_restamp": " flags=allow-cross-slot-keys"}


def script_text(name: str) -> str:
    """A script as the store sends it: the `#!lua` line (with its flags), the shared
    prelude, then the script's own file."""
    package = resources.files("tokenbroker.store")
    prelude = package.joinpath("lua", "_prelude.lua").read_text()
    return f"#!lua{_FLAGS.get(name, '')}\n{prelude}\n{package.joinpath('lua', f'{name}.lua').read_text()}"
