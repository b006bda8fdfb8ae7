"""`crypto-init-hsm`: create the root key object in a PKCS#11 token, once.

Reads the server's own settings (CRYPTO_PKCS11_LIBRARY, CRYPTO_PKCS11_TOKEN_LABEL, CRYPTO_PKCS11_PIN_FILE and
CRYPTO_PKCS11_KEY_LABEL, or --label). The key is generated inside the token: AES-256, stored on the token,
private, CKA_SENSITIVE=true and CKA_EXTRACTABLE=false (its value never leaves the token, in the clear or
wrapped), good for encryption and decryption only, and not modifiable (nobody can relax these later through
PKCS#11).

Idempotent: when the token already holds a fit key under the label, it says so and creates nothing. It never
creates a second key under a label that is taken, and refuses a key under the label that is unfit to be a root
key. Prints one JSON line: created or not, the token, the label and the key's fingerprint (what the servers log
as "root key loaded").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Sequence
from typing import Any

from pkcs11 import Attribute, KeyType, ObjectClass
from pkcs11 import exceptions as p11

from crypto_server.config import ConfigError, Settings
from crypto_server.domain.key_wrap import KEY_BYTES
from crypto_server.pkcs11_root_key import Pkcs11Module, Pkcs11RootKey, key_attributes_problem
from crypto_server.root_key import read_pin

PROGRAM = "crypto-init-hsm"
EXIT_DONE = 0
EXIT_REFUSED = 2
ROOT_KEY_TEMPLATE = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.ENCRYPT: True,
    Attribute.DECRYPT: True,
    Attribute.WRAP: False,
    Attribute.UNWRAP: False,
    Attribute.SIGN: False,
    Attribute.VERIFY: False,
    Attribute.DERIVE: False,
    Attribute.MODIFIABLE: False,
}


class Refused(Exception):
    pass


def _keys_labelled(session: Any, label: str) -> list[Any]:
    return list(session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: label}))


def create_root_key(settings: Settings, label: str) -> bool:
    """Create the key labelled `label` unless the token holds a fit one; whether it was created.

    Raises ConfigError for settings that do not reach the token, Refused for a label that is taken by a key
    unfit to be the root key, or by several keys.
    """
    if settings.pkcs11_library is None or settings.pkcs11_token_label is None or settings.pkcs11_pin_file is None:
        raise ConfigError(
            f"{PROGRAM} needs CRYPTO_PKCS11_LIBRARY, CRYPTO_PKCS11_TOKEN_LABEL and CRYPTO_PKCS11_PIN_FILE"
        )
    pin = read_pin(settings)
    module = Pkcs11Module.load(settings.pkcs11_library)
    with module.calls() as generation:
        token = module.token(settings.pkcs11_token_label)
        try:
            session = module.open_session(token, pin, generation, rw=True)
        except Exception as error:  # _PinRefused, or the token refuses a read-write session
            raise ConfigError(
                f"CRYPTO_PKCS11_PIN_FILE: token {settings.pkcs11_token_label!r} refused the login "
                f"({error or type(error).__name__})"
            ) from None
        try:
            existing = _keys_labelled(session, label)
            if len(existing) > 1:
                raise Refused(f"token {token.label!r} holds {len(existing)} secret keys labelled {label!r}")
            if existing:
                problem = key_attributes_problem(existing[0])
                if problem is not None:
                    raise Refused(
                        f"token {token.label!r} holds a key labelled {label!r} that {problem}; refusing to create "
                        "a second key under the same label (choose another label, or delete that key knowingly)"
                    )
                return False
            created = session.generate_key(
                KeyType.AES, KEY_BYTES * 8, label=label, store=True, template=ROOT_KEY_TEMPLATE
            )
            if len(_keys_labelled(session, label)) > 1:
                # Another crypto-init-hsm created one at the same moment: keep theirs.
                with contextlib.suppress(p11.PKCS11Error):
                    created.destroy()
                return False
            return True
        finally:
            with contextlib.suppress(p11.PKCS11Error):
                session.close()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description=(
            "Create the root key (non-extractable, sensitive AES-256) in the PKCS#11 token named by the server's\n"
            "CRYPTO_PKCS11_* settings, unless it exists. docs/operations.md, 'The root key in an HSM'."
        ),
        epilog="exit codes: 0 created, or already there; 2 refused or bad settings (nothing created)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--label", help="the key's label (default: CRYPTO_PKCS11_KEY_LABEL)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    key: Pkcs11RootKey | None = None
    try:
        settings = Settings.from_env()
        label = arguments.label or settings.pkcs11_key_label or settings.pkcs11_other_key_label
        if not label:
            raise ConfigError("name the key: --label, or CRYPTO_PKCS11_KEY_LABEL")
        created = create_root_key(settings, label)
        assert settings.pkcs11_library is not None and settings.pkcs11_token_label is not None
        key = Pkcs11RootKey(
            Pkcs11Module.load(settings.pkcs11_library), settings.pkcs11_token_label, label, read_pin(settings)
        )
    except (ConfigError, Refused) as error:
        print(f"{PROGRAM}: {error}", file=sys.stderr)
        return EXIT_REFUSED
    print(
        json.dumps(
            {"created": created, "token": settings.pkcs11_token_label, "label": label, "fingerprint": key.fingerprint}
        )
    )
    key.stop()
    return EXIT_DONE


if __name__ == "__main__":
    raise SystemExit(main())
