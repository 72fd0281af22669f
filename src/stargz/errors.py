"""One closed set of error kinds, translated once per boundary.

Each subsystem raises these (or subclasses); the gRPC layer maps them to status codes,
the FUSE layer to errno, the CLI to one line on stderr.
"""


class StargzError(Exception):
    """Base of every error this package raises on purpose."""


class NotFound(StargzError):
    pass


class AlreadyExists(StargzError):
    pass


class FailedPrecondition(StargzError):
    pass


class InvalidArgument(StargzError):
    pass


class Unavailable(StargzError):
    pass


# --- format errors (stargz.estargz) -------------------------------------------------


class FormatError(InvalidArgument):
    """The blob is not a well-formed eStargz / zstd:chunked layer."""


class FooterError(FormatError):
    """No footer variant matched; the message lists every attempt."""


class TOCError(FormatError):
    """The TOC is missing, not JSON, or violates the format's rules."""


class UnsafePathError(TOCError):
    """A TOC entry name would escape the layer root."""


class ChunkError(FormatError):
    """A chunk's offsets or sizes are inconsistent, or it fails to decode."""


class DecompressionBombError(ChunkError):
    """A chunk inflates past its declared size."""


class VerificationError(StargzError):
    """Content does not match the digest that vouches for it (never serve those bytes)."""


class DigestMismatch(VerificationError):
    pass


# --- registry errors (stargz.remote) ----------------------------------------------------


class RegistryError(Unavailable):
    """A registry, mirror or blob store could not serve a request (after retries).

    ``status`` is the last HTTP status (None for a connection error or timeout) and
    ``url`` the URL that failed.
    """

    def __init__(self, message: str, *, status: int | None = None, url: str | None = None):
        super().__init__(message)
        self.status = status
        self.url = url


class AuthError(RegistryError):
    """The registry refused us (401/403) and the credentials we have cannot fix it."""


class RegistryProtocolError(RegistryError):
    """The server answered something we cannot parse (bad Content-Range, multipart...)."""


class RangeMismatch(RegistryProtocolError):
    """A 206 answer's Content-Range does not start where we asked, or ends too early."""


class NoTOCDigest(InvalidArgument):
    """The snapshot labels carry no TOC digest: a plain layer, or an eStargz layer whose
    image lost the annotation; either way it cannot be verified, so it is not mounted."""


class InvalidReference(InvalidArgument):
    """An image reference that does not parse (``name[:tag][@digest]``)."""


class ManifestNotFound(NotFound):
    """The registry has no manifest for this tag/digest, or no entry for our platform."""


class BlobNotFound(NotFound):
    """The registry has no blob with this digest in this repository."""


class RangeNotSatisfiable(InvalidArgument):
    """A byte range lies outside the blob (HTTP 416, or refused before sending)."""
