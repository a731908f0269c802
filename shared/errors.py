"""Errors fedtl raises for bad input: each names the culprit, the value received and the fix."""


class FedtlError(Exception):
    """Base class of every error fedtl raises on purpose."""


class ConfigError(FedtlError, ValueError):
    """A configuration key or value is unknown, mistyped or out of range."""


class DataError(FedtlError, ValueError):
    """Site data cannot be used: unreadable, corrupt, empty, or labels out of range."""


class BackboneError(FedtlError):
    """A backbone cannot be built or loaded (unknown name, weights file missing)."""


class FingerprintMismatchError(FedtlError):
    """Backbone weights do not hash to the fingerprint they were announced under."""


class PrivacyBudgetError(FedtlError):
    """The work asked for would take a site past its privacy budget."""


class ReplyError(FedtlError, ValueError):
    """A message or reply does not have the keys, shapes or dtypes fedtl expects."""


class ModelFileError(FedtlError, ValueError):
    """An adapted-model file is missing fields or does not match its backbone."""


class FederationError(FedtlError):
    """The federation cannot go on: too few sites answered usefully (the run can be resumed)."""
