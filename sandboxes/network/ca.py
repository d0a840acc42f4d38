"""A per-sandbox certificate authority for credential brokering.

The broker terminates a sandbox's TLS to a brokered host so it can put the real secret into the request headers.
The sandbox trusts that only through a CA made for it alone: the CA's private key stays in the worker's memory,
its certificate goes into a CA bundle (the system's roots plus this CA) that the sandbox reads through the usual
variables. The CA is name-constrained to the brokered hosts, so even its key could sign for nothing else, and
leaf certificates are made on demand and cached. `cryptography` is the optional ``encryption`` extra, imported
here only.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tardigrade.sandboxes.errors import SandboxError

EXTRA = "encryption"
MAX_CACHED_LEAVES = 256
# Where the system's roots live when Python's own default path is not a file (Debian, RHEL, Alpine, SUSE).
_SYSTEM_BUNDLES = (
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
    "/etc/ssl/ca-bundle.pem",
)


def _crypto() -> Any:
    try:
        import cryptography  # noqa: F401
    except ModuleNotFoundError:
        raise SandboxError(
            "brokered secrets (secrets: [{name: ..., hosts: [...]}]) need the 'cryptography' package to make the"
            " sandbox's certificate authority; install it with: pip install 'tardigrade-temporal[encryption]'"
        ) from None
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    return x509, hashes, serialization, ec, NameOID


def host_pattern_root(pattern: str) -> str:
    """``*.github.com`` -> ``github.com``: the name-constraint subtree that covers a host pattern."""
    return pattern[2:] if pattern.startswith("*.") else pattern


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def system_bundle() -> Path | None:
    """The system's CA bundle on this worker, if it has one."""
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile, *_SYSTEM_BUNDLES):
        if candidate and os.path.isfile(candidate):
            return Path(candidate)
    return None


def _ca_key_usage(x509: Any) -> Any:
    """Key usage of a CA that signs certificates and nothing else."""
    signs = {"key_cert_sign": True, "crl_sign": True}
    others = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment", "key_agreement",
              "encipher_only", "decipher_only")  # fmt: skip
    return x509.KeyUsage(**dict.fromkeys(others, False), **signs)


class SandboxCA:
    """A certificate authority for one sandbox, valid only for ``hosts`` (exact names, ``*.`` patterns, IPs)."""

    def __init__(self, hosts: Iterable[str], *, days: int = 365) -> None:
        x509, hashes, serialization, ec, name_oid = _crypto()
        self.hosts = tuple(sorted(set(hosts)))
        if not self.hosts:
            raise ValueError("a sandbox CA needs at least one host")
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self._not_before = now - datetime.timedelta(minutes=5)  # small clock skews between worker and sandbox
        self._not_after = now + datetime.timedelta(days=days)
        self._name = x509.Name([x509.NameAttribute(name_oid.COMMON_NAME, "tardigrade sandbox broker CA")])
        dns = [x509.DNSName(host_pattern_root(h)) for h in self.hosts if _ip(h) is None]
        ips = [x509.IPAddress(ipaddress.ip_network(f"{ip}/{ip.max_prefixlen}")) for h in self.hosts if (ip := _ip(h))]
        builder = (
            x509.CertificateBuilder()
            .subject_name(self._name)
            .issuer_name(self._name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self._not_before)
            .not_valid_after(self._not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_ca_key_usage(x509), critical=True)
            .add_extension(x509.NameConstraints(permitted_subtrees=dns + ips or None, excluded_subtrees=None), True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False)
        )
        self._cert = builder.sign(self._key, hashes.SHA256())
        self.cert_pem: bytes = self._cert.public_bytes(serialization.Encoding.PEM)
        self._leaf_key = ec.generate_private_key(ec.SECP256R1())  # one key for every leaf: only certs differ
        self._contexts: dict[str, ssl.SSLContext] = {}

    def write_bundle(self, path: Path) -> Path:
        """Write the system's roots plus this CA to ``path`` (0644: the sandbox's uid reads it through a bind)."""
        system = system_bundle()
        data = system.read_bytes() if system is not None else b""
        if data and not data.endswith(b"\n"):
            data += b"\n"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data + b"# tardigrade sandbox broker CA\n" + self.cert_pem)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        return path

    def server_context(self, host: str) -> ssl.SSLContext:
        """A TLS server context presenting a certificate for ``host`` signed by this CA (HTTP/1.1 only)."""
        context = self._contexts.get(host)
        if context is None:
            if len(self._contexts) >= MAX_CACHED_LEAVES:  # a wildcard host admits endless names: keep the newest
                del self._contexts[next(iter(self._contexts))]
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.set_alpn_protocols(["http/1.1"])  # the broker speaks HTTP/1.1; clients must not pick h2
            cert, key = self._leaf_pem(host)
            _load_chain_from_memory(context, cert + self.cert_pem, key)
            self._contexts[host] = context
        return context

    def _leaf_pem(self, host: str) -> tuple[bytes, bytes]:
        x509, hashes, serialization, _ec, _name_oid = _crypto()
        ip = _ip(host)
        san = x509.IPAddress(ip) if ip is not None else x509.DNSName(host)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))  # no CN: verifiers would check it against the name constraints too
            .issuer_name(self._name)
            .public_key(self._leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self._not_before)
            .not_valid_after(self._not_after)
            .add_extension(x509.SubjectAlternativeName([san]), critical=True)  # critical: the subject is empty
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        key = self._leaf_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return cert.public_bytes(serialization.Encoding.PEM), key


def _load_chain_from_memory(context: ssl.SSLContext, chain: bytes, key: bytes) -> None:
    """`load_cert_chain` reads only paths: hand it memory files, so no private key ever touches a disk."""
    fds = []
    try:
        for data in (chain, key):
            fd = os.memfd_create("tardigrade-broker-cert", os.MFD_CLOEXEC)
            fds.append(fd)
            os.write(fd, data)
        context.load_cert_chain(f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}")
    finally:
        for fd in fds:
            os.close(fd)
