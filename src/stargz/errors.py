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
