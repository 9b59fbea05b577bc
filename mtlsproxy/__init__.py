"""mtlsproxy: a mutual-TLS reverse proxy that trusts only your own CA."""

__version__ = "0.1.0"
