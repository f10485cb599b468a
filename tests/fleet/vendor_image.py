"""A host as it comes from a board vendor's image: one default user with a known password.

Radxa's Debian images for the Rock 5B ship `rock`/`rock` (Armbian and Ubuntu Rockchip do the same
with their own names): password logins are on, the default user has no authorized keys and gets root
through sudo with its password, and root cannot log in over SSH. `ansible/bootstrap.yml` starts from
there. The user is written into the host's root before it boots, with the controller's `useradd
--prefix`, so no command runs inside the image (the same on every arch, no qemu).
"""

from __future__ import annotations

from pathlib import Path

from .commands import run

KEY_LOGIN = "key"
PASSWORD_LOGIN = "password"
LOGINS = (KEY_LOGIN, PASSWORD_LOGIN)

VENDOR_USER = "rock"
VENDOR_PASSWORD = "rock"
# Named like an image's own drop-in (cloud-init writes 50-cloud-init.conf): sshd takes the first value
# it reads for a keyword, so a drop-in that means to override this one must sort before it.
VENDOR_SSHD_DROPIN = "etc/ssh/sshd_config.d/50-vendor-image.conf"
VENDOR_SSHD_SETTINGS = "PasswordAuthentication yes\nPermitRootLogin no\n"


def install_vendor_login(root: Path) -> None:
    """Make the image at root log in like a vendor image: the default user by password only."""
    password_hash = run(["openssl", "passwd", "-6", VENDOR_PASSWORD]).stdout.strip()
    run(["useradd", "--prefix", str(root), "--create-home", "--shell", "/bin/bash", "--groups", "sudo",
         "--password", password_hash, VENDOR_USER])
    dropin = root / VENDOR_SSHD_DROPIN
    dropin.parent.mkdir(parents=True, exist_ok=True)
    dropin.write_text(VENDOR_SSHD_SETTINGS)
