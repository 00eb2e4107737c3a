"""Exception types. Every user-facing failure is a :class:`CertbnnError` whose
message is one line that names the offending file/option and what is wrong;
the CLI prints it as ``certbnn: error: <message>`` and exits non-zero."""


class CertbnnError(Exception):
    """Base class of all errors certbnn reports to users."""


class DataError(CertbnnError):
    """A data set is missing, corrupt, truncated or inconsistent."""


class DownloadError(DataError):
    """A download failed or its checksum did not match."""


class ConfigError(CertbnnError):
    """An impossible or inconsistent option or configuration file."""


class UnsupportedLayerError(CertbnnError):
    """The bound engine met a layer it has no sound rule for."""
