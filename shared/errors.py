"""Errors fedtl raises for bad input: each names the culprit, the value received and the fix.

A site that refuses a request sends the server only the error's `code` and its `public()` reason; the
full message (file names, line numbers, counts: facts about private data) stays in the site's own log.
"""


class FedtlError(Exception):
    """Base class of every error fedtl raises on purpose."""

    code = "error"  # what a site tells the server, with `public()`, when this error makes it refuse
    public_reason = "the site could not answer (its operator has the details in the site's log)"

    def public(self) -> str:
        """Return the reason a site may send to the server: nothing about its data."""
        return self.public_reason


class ConfigError(FedtlError, ValueError):
    """A configuration key or value is unknown, mistyped or out of range."""

    code = "config"
    public_reason = "the site is misconfigured (its operator has the details in the site's log)"


class DataError(FedtlError, ValueError):
    """Site data cannot be used: unreadable, corrupt, empty, or labels out of range."""

    code = "data"
    public_reason = "the site's data cannot be used for this run (its operator has the details in the site's log)"


class BackboneError(FedtlError):
    """A backbone cannot be built or loaded (unknown name, weights file missing)."""

    code = "backbone"
    public_reason = "the site does not hold the run's backbone (the server sends it at set-up)"


class FingerprintMismatchError(FedtlError):
    """Backbone weights do not hash to the fingerprint they were announced under."""

    code = "backbone-mismatch"
    public_reason = "the backbone weights failed verification at the site"


class PrivacyBudgetError(FedtlError):
    """The work asked for would take a site past its privacy budget."""

    code = "budget"
    public_reason = "the site's privacy budget does not allow this release"


class ReplyError(FedtlError, ValueError):
    """A message or reply does not have the keys, shapes or dtypes fedtl expects."""

    code = "malformed-request"

    def public(self) -> str:
        """Return the message itself: it describes the request or the site's own settings, not its data."""
        return str(self)


class ModelFileError(FedtlError, ValueError):
    """An adapted-model file is missing fields or does not match its backbone."""


class FederationError(FedtlError):
    """The federation cannot go on: too few sites answered usefully (the run can be resumed)."""


class StorageError(FedtlError, OSError):
    """A file fedtl must write cannot be written: the disk is full, read-only, or the folder not writable."""

    code = "storage"
    public_reason = "the site cannot write its state (disk full or not writable; see the site's log)"
