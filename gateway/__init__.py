"""gateway: an authentication sidecar for reverse proxies."""

__version__ = "0.1.0"
