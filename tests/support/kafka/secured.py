"""An Apache Kafka node that speaks every security protocol the bridge offers, with a throwaway CA.

Beside the PLAINTEXT listeners of `KafkaNode` (CLIENT, which the tests read back through, INTERNAL and
CONTROLLER), one node has four more, each on its own port:

- SASL_PLAIN: SASL_PLAINTEXT, with PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512;
- SASL_TLS: SASL_SSL, the same mechanisms over TLS;
- TLS: SSL, the broker's certificate only;
- MTLS: SSL with `ssl.client.auth=required`, mutual TLS.

One user, `USER`, has `PASSWORD` for every mechanism: PLAIN's in the listeners' JAAS configs, SCRAM's
written into the storage when it is formatted (`--add-scram`). The CA, the broker's certificate and a client
certificate are made by `trustme` in the node's folder; a second CA, which signed nothing the broker
presents, stands for a client that trusts the wrong one.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import trustme
from cryptography.hazmat.primitives import serialization

from bridge.secret import Secret
from bridge.tools.embedded import free_port
from tests.support.kafka.nodes import KafkaNode, KafkaNodeError

USER = "bridge"
PASSWORD = "s3cret-Pa55-for-the-test"  # noqa: S105 - the throwaway broker's own user
MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


@dataclass(frozen=True)
class Pki:
    """PEM files: the CA the broker's certificate is signed by, a client's certificate and key, another CA."""

    ca: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    broker_keystore: Path
    """The broker's PKCS#8 key, its certificate and the CA, in one file (Kafka's PEM keystore)."""

    @property
    def secret_texts(self) -> list[str]:
        """The private keys' base64 lines: none of them may ever show in a log."""
        lines: list[str] = []
        for path in (self.client_key, self.broker_keystore):
            text = path.read_text()
            body = text.split("-----BEGIN PRIVATE KEY-----")[1].split("-----END PRIVATE KEY-----")[0]
            lines += [line for line in body.split() if len(line) > 16]
        return lines


def _pkcs8(leaf: trustme.LeafCert) -> bytes:
    """The key as PKCS#8 ("BEGIN PRIVATE KEY"), which Kafka's PEM keystore reads (trustme writes another)."""
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), password=None)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca, other = trustme.CA(), trustme.CA()
    broker = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("bridge-client.test", common_name=USER)
    pki = Pki(
        ca=directory / "ca.pem",
        client_cert=directory / "client-cert.pem",
        client_key=directory / "client-key.pem",
        other_ca=directory / "other-ca.pem",
        broker_keystore=directory / "broker-keystore.pem",
    )
    ca.cert_pem.write_to_path(str(pki.ca))
    other.cert_pem.write_to_path(str(pki.other_ca))
    client.cert_chain_pems[0].write_to_path(str(pki.client_cert))
    pki.client_key.write_bytes(_pkcs8(client))
    chain = b"".join(blob.bytes() for blob in broker.cert_chain_pems) + ca.cert_pem.bytes()
    pki.broker_keystore.write_bytes(_pkcs8(broker) + chain)
    for path in (pki.client_key, pki.broker_keystore):
        path.chmod(0o600)
    return pki


def _jaas(mechanism: str) -> str:
    if mechanism == "PLAIN":
        return f'org.apache.kafka.common.security.plain.PlainLoginModule required user_{USER}="{PASSWORD}";'
    return "org.apache.kafka.common.security.scram.ScramLoginModule required;"


class SecuredKafkaNode(KafkaNode):
    """A single combined node with SASL_PLAINTEXT, SASL_SSL, SSL and mutual-TLS listeners besides CLIENT."""

    def __init__(self, directory: Path, pki: Pki) -> None:
        super().__init__(directory, short_lived=True)
        self.pki = pki
        self.ports = {name: free_port() for name in ("SASL_PLAIN", "SASL_TLS", "TLS", "MTLS")}

    def address(self, listener: str) -> str:
        return f"127.0.0.1:{self.ports[listener]}"

    def properties(self) -> dict[str, str]:
        result = super().properties()
        secured = ",".join(f"{name}://127.0.0.1:{port}" for name, port in self.ports.items())
        result["listeners"] += "," + secured
        result["advertised.listeners"] += "," + secured
        result["listener.security.protocol.map"] += (
            ",SASL_PLAIN:SASL_PLAINTEXT,SASL_TLS:SASL_SSL,TLS:SSL,MTLS:SSL"
        )
        result |= {
            "sasl.enabled.mechanisms": ",".join(MECHANISMS),
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": str(self.pki.broker_keystore),
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(self.pki.ca),
            "listener.name.mtls.ssl.client.auth": "required",
        }
        for listener in ("sasl_plain", "sasl_tls"):
            for mechanism in MECHANISMS:
                result[f"listener.name.{listener}.{mechanism.lower()}.sasl.jaas.config"] = _jaas(mechanism)
        return result

    def format(self) -> None:
        """Format storage of its own with the SCRAM credentials: the shared template holds none."""
        self.directory.mkdir(parents=True, exist_ok=True)
        config = self.directory / "server.properties"
        config.write_text("".join(f"{key}={value}\n" for key, value in self.properties().items()))
        command = [*self._java(heap="128m"), "kafka.tools.StorageTool", "format"]
        command += ["--cluster-id", self.cluster, "--config", str(config)]
        for mechanism in MECHANISMS[1:]:
            command += ["--add-scram", f"{mechanism}=[name={USER},password={PASSWORD}]"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        if result.returncode != 0:
            raise KafkaNodeError(f"formatting the secured node failed:\n{result.stdout}{result.stderr}")
        self.formatted = True

    def set_scram_password(self, user: str, password: str, mechanism: str = "SCRAM-SHA-256") -> None:
        """Give `user` `password` for `mechanism`, creating the user if new, as an operator rotating it
        would: Kafka's own `kafka-configs` (aiokafka has no AlterUserScramCredentials), through the PLAINTEXT
        listener; one mechanism a call, as Kafka takes it. Connections logged in already stay; new ones need
        the new password."""
        command = [*self._java(heap="128m"), "kafka.admin.ConfigCommand"]
        command += ["--bootstrap-server", self.bootstrap_servers, "--alter", "--entity-type", "users"]
        command += ["--entity-name", user, "--add-config", f"{mechanism}=[password={password}]"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        if result.returncode != 0:
            raise KafkaNodeError(f"setting {user}'s SCRAM password failed:\n{result.stdout}{result.stderr}")


PROTOCOLS = {"SASL_PLAIN": "SASL_PLAINTEXT", "SASL_TLS": "SASL_SSL", "TLS": "SSL", "MTLS": "SSL"}


def connection_settings(node: SecuredKafkaNode, kind: str) -> dict[str, object]:
    """`ServeSettings` fields for connecting to `node` as `kind` says: a listener and, for SASL, a mechanism
    (`SASL_PLAIN/SCRAM-SHA-256`, `SASL_TLS/PLAIN`), or `TLS`, or `MTLS`; with the right password and the
    client certificate the listener needs."""
    listener, _, mechanism = kind.partition("/")
    fields: dict[str, object] = {"bootstrap_servers": (node.address(listener),)}
    if listener in ("SASL_TLS", "TLS", "MTLS"):
        fields["ssl_cafile"] = str(node.pki.ca)
    if listener == "MTLS":
        fields |= {"ssl_certfile": str(node.pki.client_cert), "ssl_keyfile": str(node.pki.client_key)}
    if mechanism:
        fields |= {"sasl_mechanism": mechanism, "sasl_username": USER, "sasl_password": Secret(PASSWORD)}
    fields["security_protocol"] = PROTOCOLS[listener]
    return fields
