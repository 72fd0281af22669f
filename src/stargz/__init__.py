"""stargz: lazy-pulling eStargz snapshotter for containerd."""

__version__ = "0.1.0"
