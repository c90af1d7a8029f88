"""Device keys, challenges and tokens (identity.py), without sockets."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from swiftftp.identity import (
    KEY_FILE,
    DeviceKey,
    KeyFileError,
    b64,
    fingerprint,
    load_or_create_key,
    new_challenge,
    new_token,
    parse_public_key,
    same_token,
    signed_message,
    unb64,
    verify,
)


def test_a_signature_answers_one_challenge_for_one_id() -> None:
    key = DeviceKey.generate()
    challenge = new_challenge()
    signature = key.sign("agent-1", challenge)
    assert verify(key.public, "agent-1", challenge, signature)
    assert not verify(key.public, "agent-2", challenge, signature)  # another id
    assert not verify(key.public, "agent-1", new_challenge(), signature)  # another challenge
    assert not verify(DeviceKey.generate().public, "agent-1", challenge, signature)  # another key
    assert not verify(key.public, "agent-1", challenge, "not base64!")
    assert not verify(key.public, "agent-1", challenge, b64(b"short"))
    # domain-separated: the bytes signed start with the scheme's name, then the id
    assert signed_message("a", b"c" * 32) == b"swiftftp-device-login-v1\0a\0" + b"c" * 32


def test_public_keys_are_checked_and_fingerprinted() -> None:
    key = DeviceKey.generate()
    assert parse_public_key(key.public) == key.public
    for bad in ("", "!!!!", b64(b"x" * 31), b64(b"x" * 33)):
        with pytest.raises(ValueError):
            parse_public_key(bad)
    print_ = fingerprint(key.public)
    assert print_.startswith("SHA256:") and len(print_) == 7 + 43 and "=" not in print_
    assert len(unb64(new_token(), 32)) == 32


def test_tokens_compare_in_constant_time_and_never_equal_none() -> None:
    token = new_token()
    assert same_token(token, token)
    assert not same_token(token, new_token())
    assert not same_token(token, None)


def test_the_key_file_is_made_once_private_and_kept(tmp_path: Path) -> None:
    state = tmp_path / "state"
    key, made = load_or_create_key(state)
    assert made
    path = state / KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again, made = load_or_create_key(state)
    assert not made and again.public == key.public
    path.chmod(0o644)  # loosened by hand: tightened again
    load_or_create_key(state)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not [p for p in os.listdir(state) if p.startswith(".")]  # no temporary left


def test_a_key_file_that_does_not_read_is_never_replaced(tmp_path: Path) -> None:
    (tmp_path / KEY_FILE).write_text("garbage")
    with pytest.raises(KeyFileError) as info:
        load_or_create_key(tmp_path)
    assert "does not read" in str(info.value) and "\n" not in str(info.value)
    assert (tmp_path / KEY_FILE).read_text() == "garbage"
