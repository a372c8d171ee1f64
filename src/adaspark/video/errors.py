"""`VideoDecodeError`: the one exception every video-reading failure is reported as."""

from __future__ import annotations

__all__ = ["VideoDecodeError"]


class VideoDecodeError(ValueError):
    """A video file could not be turned into frames.

    Raised for a missing path, an empty (0-byte) file, a file FFmpeg cannot parse (corrupt, not a
    video), a container without a video stream, and a video stream that yields no decodable frame.
    The message always names the path and the problem. Subclasses ``ValueError`` so callers that
    only guard against bad input keep working; the PyAV exception, when there was one, is quoted in
    the message but not chained (no raw PyAV traceback reaches the user).
    """
