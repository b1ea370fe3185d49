"""Zip passwords: random from `secrets`, in an alphabet people can read off a screen and retype."""

from __future__ import annotations

import secrets
import string

# Letters and digits without the look-alikes 0/O/o, 1/l/I (people retype these passwords).
DEFAULT_ALPHABET = "".join(c for c in string.ascii_letters + string.digits if c not in "0Oo1lI")
DEFAULT_LENGTH = 12
MIN_LENGTH = 8


def generate_password(length: int = DEFAULT_LENGTH, alphabet: str = DEFAULT_ALPHABET) -> str:
    """A fresh password; with a mixed alphabet it has a lower, an upper letter and a digit.

    Many recipients' password rules want all three; asking for them costs < 1 bit of entropy
    (length 12 over 56 symbols ≈ 69 bits).
    """
    chars = "".join(dict.fromkeys(alphabet))  # unique, order kept
    if length < MIN_LENGTH:
        raise ValueError(f"password_length {length} is below {MIN_LENGTH}")
    if len(chars) < 10:
        raise ValueError("password_alphabet needs at least 10 distinct characters")
    classes = [
        set(chars) & set(string.ascii_lowercase),
        set(chars) & set(string.ascii_uppercase),
        set(chars) & set(string.digits),
    ]
    need = [c for c in classes if c]
    for _ in range(1000):  # expected tries ≈ 1.3 with the default alphabet
        pw = "".join(secrets.choice(chars) for _ in range(length))
        if len(need) > length or all(any(ch in c for ch in pw) for c in need):
            return pw
    return pw
