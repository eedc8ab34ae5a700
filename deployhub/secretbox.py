"""Encryption at rest for secret build variables.

Fernet (from `cryptography`) rather than anything of our own: a well-kept, authenticated
construction (AES-128-CBC with HMAC-SHA256, encrypt-then-MAC), so a value cannot be read or
altered without the key, and its tokens carry a version byte and a timestamp, so a later
format can be told apart from this one. The key is the setting `DEPLOYHUB_SECRETS_KEY` or,
without it, `<data-dir>/secrets.key`, made on first use with mode 0600. Whoever copies the Redis
data alone gets ciphertext.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from .settings import Settings, SettingsError

KEY_FILE = "secrets.key"


class SecretUnreadable(Exception):
    """A stored secret that this key cannot decrypt (a different key, or tampered data)."""


class SecretBox:
    """Encrypts and decrypts text with one Fernet key."""

    def __init__(self, key: bytes) -> None:
        try:
            # MultiFernet of one: rotation later is adding the new key in front.
            self._fernet = MultiFernet([Fernet(key)])
        except (ValueError, TypeError):
            raise SettingsError(
                "DEPLOYHUB_SECRETS_KEY must be a Fernet key: 32 random bytes in url-safe "
                "base64 (make one with `python -c 'from cryptography.fernet import Fernet; "
                "print(Fernet.generate_key().decode())'`)"
            ) from None

    def seal(self, value: str) -> str:
        return self._fernet.encrypt(value.encode()).decode("ascii")

    def open(self, sealed: str, what: str) -> str:
        try:
            return self._fernet.decrypt(sealed.encode("ascii")).decode()
        except (InvalidToken, UnicodeError):
            raise SecretUnreadable(
                f"{what} cannot be decrypted with this server's key: DEPLOYHUB_SECRETS_KEY "
                f"(or {KEY_FILE} in the data directory) is not the key it was stored with; "
                "set it again"
            ) from None


@functools.lru_cache(maxsize=16)
def secret_box(settings: Settings) -> SecretBox:
    """The box for these settings: the configured key, else the data directory's key file
    (created on first use). Cached: the file is read once per process."""
    if settings.secrets_key is not None:
        return SecretBox(settings.secrets_key.reveal().encode())
    return SecretBox(load_or_create_key(settings.data_dir / KEY_FILE))


def load_or_create_key(path: Path) -> bytes:
    """The key in `path`, or a new one written there with mode 0600.

    Written to a temporary file and linked into place, so two processes starting at once
    agree on one key and nobody ever reads a half-written file.
    """
    with contextlib.suppress(FileNotFoundError):
        return _read_key(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(Fernet.generate_key() + b"\n")
            out.flush()
            os.fsync(out.fileno())
        with contextlib.suppress(FileExistsError):  # someone else's won: use theirs
            os.link(temporary, path)
    finally:
        temporary.unlink()
    return _read_key(path)


def _read_key(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as handle:
        return handle.read().strip()
