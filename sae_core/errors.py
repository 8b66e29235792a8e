"""One base class for every error a user can cause; the CLI prints its message as one line."""

from __future__ import annotations


class SaescopeError(ValueError):
    """Bad input from the user: the message says what was wrong and what to do."""


class NotFoundError(SaescopeError):
    """Something a request names (an SAE, one of its features) is not in the store; raised by
    ``sae_core.store.lookup`` and answered 404 by the server (``app.errors``)."""

    @classmethod
    def sae(cls, name: str) -> NotFoundError:
        return cls(f"no SAE named {name!r} in this store; see /api/v1/saes for the list")

    @classmethod
    def release(cls, name: str) -> NotFoundError:
        return cls(f"no release named {name!r} in this store; see /api/v1/releases for the list")

    @classmethod
    def feature(cls, sae_name: str, index: int, d_sae: int) -> NotFoundError:
        return cls(f"SAE {sae_name!r} has no feature {index}; its features are 0..{d_sae - 1}")
