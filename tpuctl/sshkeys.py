"""The SSH key pair tpuctl puts into nodes' metadata, so no gcloud is needed to log in."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from tpuctl.config import config_dir, private_dir
from tpuctl.errors import TpuctlError

if TYPE_CHECKING:
    from tpuctl.config import Settings


def default_key_path() -> Path:
    """Where tpuctl keeps the private key it generates."""
    return config_dir() / "ssh" / "id_ed25519"


def ensure_keypair(settings: Settings) -> tuple[Path, str]:
    """(private key path, public key line) from `ssh.key`, generating tpuctl's own
    ed25519 pair in the config dir when no key is configured and none exists yet."""
    private = private_key_path(settings)
    return private, _public_line_for(private)


def private_key_path(settings: Settings) -> Path:
    """The private key of `ensure_keypair`, without reading its public half: all that
    logging in needs (deriving it imports cryptography, in every `exec`)."""
    configured = settings.get("ssh.key")
    if configured:
        private = Path(os.path.expanduser(str(configured)))
        if not private.is_file():
            raise TpuctlError(
                f"ssh.key {private} (from {settings.source('ssh.key')}) does not exist; "
                "point it at a private key or unset it to let tpuctl generate one"
            )
        return private
    private = default_key_path()
    if not private.is_file():
        _generate(private, comment=f"{settings.get('ssh.user')}@{socket.gethostname()}")
    return private


def metadata_ssh_keys(user: str, public_line: str) -> str:
    """The `ssh-keys` metadata value that makes the TPU VMs accept the key for `user`."""
    return f"{user}:{public_line.strip()}"


def _generate(private: Path, comment: str) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private_dir(private.parent)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    # Created 0600 from the start: the key is never readable by others, even briefly.
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    Path(f"{private}.pub").write_text(f"{public.decode()} {comment}\n")


def _public_line_for(private: Path) -> str:
    """The public key line: from KEY.pub, else derived from the private key."""
    public = Path(f"{private}.pub")
    if public.is_file():
        return public.read_text().strip()
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_ssh_private_key(private.read_bytes(), password=None)
    except (ValueError, TypeError) as err:
        raise TpuctlError(
            f"cannot read SSH key {private} ({err}); give an unencrypted OpenSSH private "
            f"key or put its public key next to it as {public.name}"
        ) from None
    line = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return line.decode()
