"""Certificates and keys for the local control plane (generated once per state dir)."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVICE_IP = "10.0.0.1"
SERVICE_CIDR = "10.0.0.0/24"
_DNS = [
    "localhost",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
]

# (file stem, CN, O) of every client certificate signed by the CA.
CLIENTS = {
    "admin": ("kubernetes-admin", "system:masters"),
    "controller-manager": ("system:kube-controller-manager", None),
    "scheduler": ("system:kube-scheduler", None),
    "apiserver-kubelet-client": ("kube-apiserver-kubelet-client", "system:masters"),
}


CA_NAME = "finetune-localcluster-ca"


@dataclass(frozen=True)
class Pki:
    """Paths of the generated material."""

    dir: Path

    @property
    def ca_cert(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.dir / "ca.key"

    @property
    def serving_cert(self) -> Path:
        return self.dir / "apiserver.crt"

    @property
    def serving_key(self) -> Path:
        return self.dir / "apiserver.key"

    @property
    def sa_key(self) -> Path:
        return self.dir / "sa.key"

    @property
    def sa_pub(self) -> Path:
        return self.dir / "sa.pub"

    def client(self, name: str) -> tuple[Path, Path]:
        """(cert, key) of a client in :data:`CLIENTS`."""
        return self.dir / f"{name}.crt", self.dir / f"{name}.key"


def _key() -> ec.EllipticCurvePrivateKey:
    # P-256 keys are generated in microseconds; RSA-2048 would cost ~0.1 s each.
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _name(cn: str, org: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


def _sign(
    subject: x509.Name,
    pub: ec.EllipticCurvePublicKey,
    ca_key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    *,
    ca: bool = False,
    server: bool = False,
    sans: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(pub)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        b = b.add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
    else:
        usages = [ExtendedKeyUsageOID.SERVER_AUTH] if server else [ExtendedKeyUsageOID.CLIENT_AUTH]
        b = b.add_extension(
            x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True
        ).add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return b.sign(ca_key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def issue_serving(pki: Pki, crt: Path, key_path: Path, cn: str, names: list[str], ips: list[str]) -> None:
    """A serving certificate signed by the cluster's CA, unless ``crt`` and ``key_path`` exist
    (the API server's, the node's, and components run beside the cluster such as Kueue)."""
    if crt.exists() and key_path.exists():
        return
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in names]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    key = _key()
    cert = _sign(_name(cn), key.public_key(), _load_key(pki.ca_key), _name(CA_NAME), server=True, sans=sans)
    crt.parent.mkdir(parents=True, exist_ok=True)
    _write_key(key_path, key)
    crt.write_bytes(_pem(cert))


def ensure(directory: Path) -> Pki:
    """Create whatever is missing: CA, serving certs, SA key pair, client certs.

    Existing files are kept, so kubeconfigs and issued tokens stay valid across restarts.
    """
    pki = Pki(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ca_name = _name(CA_NAME)
    if not (pki.ca_cert.exists() and pki.ca_key.exists()):
        for f in directory.iterdir():  # a new CA invalidates everything signed by the old one
            f.unlink()
        ca_key = _key()
        ca_cert = _sign(ca_name, ca_key.public_key(), ca_key, ca_name, ca=True)
        _write_key(pki.ca_key, ca_key)
        pki.ca_cert.write_bytes(_pem(ca_cert))
    else:
        ca_key = _load_key(pki.ca_key)

    def serving(stem: str, cn: str, names: list[str], ips: list[str]) -> None:
        issue_serving(pki, directory / f"{stem}.crt", directory / f"{stem}.key", cn, names, ips)

    serving("apiserver", "kube-apiserver", _DNS, ["127.0.0.1", SERVICE_IP])
    serving("kubelet", "local-node", ["localhost", "local-node"], ["127.0.0.1"])

    if not (pki.sa_key.exists() and pki.sa_pub.exists()):
        # The service-account signing key stays RSA: every JWT consumer supports RS256.
        sa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        _write_key(pki.sa_key, sa)
        pki.sa_pub.write_bytes(
            sa.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        )

    for stem, (cn, org) in CLIENTS.items():
        crt_path, key_path = pki.client(stem)
        if crt_path.exists() and key_path.exists():
            continue
        key = _key()
        cert = _sign(_name(cn, org), key.public_key(), ca_key, ca_name)
        _write_key(key_path, key)
        crt_path.write_bytes(_pem(cert))
    return pki
