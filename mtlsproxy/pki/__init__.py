"""The private CA tooling: init, issue, show (and later renew, rotate, serve)."""

from mtlsproxy.pki.ca import CertificateAuthority, IssuedCertificate, Kind
from mtlsproxy.pki.keys import KEY_TYPES, KeyType

__all__ = ["KEY_TYPES", "CertificateAuthority", "IssuedCertificate", "KeyType", "Kind"]
