"""trio I/O: listeners, the per-connection task, the HTTP relay loop, the upstream pool."""
