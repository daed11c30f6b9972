//! TLS with mutual authentication on the control plane: the coordinator serves only clients
//! whose certificate its CA signed, and every client (node agent, worker) checks the
//! coordinator's certificate against the same CA and the host name it dialled.
//!
//! [`TlsFiles`] names a node's three PEM files (the CA certificate, the node's certificate and
//! its private key) and where they were configured ([`Setting`]), so that a message names the
//! config key, flag or variable to fix. [`Tls::load`] reads and checks them once, before
//! anything starts: each file parses, the certificate is one the CA signed for a node (client
//! and server use) and the key is its key. The launcher builds the coordinator's server from
//! [`Tls::server_config`]; clients dial with [`endpoint`]. Making the files is `launch certs`'s
//! job (the launcher's `certs` module); the token check stays in the crate root.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier as _;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::sign::CertifiedKey;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::Error;

/// The variables that hand a node's TLS files to the workers its agent (or a local `launch`)
/// starts, and that `launch agent` reads when its flags are not given.
pub const CA_VAR: &str = "TESSERA_TLS_CA";
pub const CERT_VAR: &str = "TESSERA_TLS_CERT";
pub const KEY_VAR: &str = "TESSERA_TLS_KEY";

/// A PEM file is a few KiB; anything this large is the wrong file.
const MAX_PEM_BYTES: u64 = 1 << 20;

/// How `launch certs` makes the files, for messages.
pub(crate) const MAKE_CERTS: &str = "`launch certs --out DIR --hosts HEAD,NODE1,...` makes a CA and a \
                          certificate per host";

/// Where a node's TLS files were configured: what a message tells the user to change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setting {
    /// `cluster.tls: {ca, cert, key}` in the head's config.
    Config,
    /// `launch agent --tls-ca/--tls-cert/--tls-key` (or their variables).
    Flags,
    /// TESSERA_TLS_CA, TESSERA_TLS_CERT and TESSERA_TLS_KEY, as workers get them.
    Environment,
}

impl Setting {
    /// The names of the CA, certificate and key settings.
    fn names(self) -> [&'static str; 3] {
        match self {
            Setting::Config => ["cluster.tls.ca", "cluster.tls.cert", "cluster.tls.key"],
            Setting::Flags => ["--tls-ca", "--tls-cert", "--tls-key"],
            Setting::Environment => [CA_VAR, CERT_VAR, KEY_VAR],
        }
    }
}

/// A node's three PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA certificate every node trusts (`ca.pem` of `launch certs`).
    pub ca: PathBuf,
    /// This node's certificate (`HOST.pem`), signed by the CA.
    pub cert: PathBuf,
    /// Its private key (`HOST-key.pem`).
    pub key: PathBuf,
    pub setting: Setting,
}

impl TlsFiles {
    /// TESSERA_TLS_CA, TESSERA_TLS_CERT and TESSERA_TLS_KEY: all three, or None when none is
    /// set. An empty value counts as unset (a `launch` without TLS passes its workers empty
    /// ones, so that they do not pick up files from the environment they inherit).
    pub fn from_env() -> Result<Option<TlsFiles>, Error> {
        TlsFiles::from_vars(|name| std::env::var_os(name))
    }

    /// [`TlsFiles::from_env`] with `var` for the environment.
    fn from_vars(
        var: impl Fn(&str) -> Option<std::ffi::OsString>,
    ) -> Result<Option<TlsFiles>, Error> {
        let read = |name: &str| var(name).filter(|value| !value.is_empty());
        let [ca, cert, key] = [CA_VAR, CERT_VAR, KEY_VAR].map(read);
        match (ca, cert, key) {
            (Some(ca), Some(cert), Some(key)) => Ok(Some(TlsFiles {
                ca: ca.into(),
                cert: cert.into(),
                key: key.into(),
                setting: Setting::Environment,
            })),
            (None, None, None) => Ok(None),
            (ca, cert, key) => {
                let given = [&ca, &cert, &key].map(Option::is_some);
                let names = Setting::Environment.names();
                let pick = |set: bool| -> Vec<&str> {
                    (0..3)
                        .filter(|&i| given[i] == set)
                        .map(|i| names[i])
                        .collect()
                };
                Err(Error::IncompleteTls {
                    given: pick(true).join(", "),
                    missing: pick(false).join(", "),
                })
            }
        }
    }

    /// The environment that hands these files to a worker, by absolute paths (relative ones
    /// are taken from the current directory) so that they hold wherever it starts.
    pub fn env(&self) -> [(String, String); 3] {
        [
            (CA_VAR, &self.ca),
            (CERT_VAR, &self.cert),
            (KEY_VAR, &self.key),
        ]
        .map(|(name, path)| {
            // Only an empty path or an unreadable current directory fail; the worker's own
            // check of the path as it is then names the problem.
            let path = std::path::absolute(path).unwrap_or_else(|_| path.clone());
            (name.to_string(), path.display().to_string())
        })
    }

    /// The environment of a worker whose coordinator has no TLS: the variables empty.
    pub fn env_off() -> [(String, String); 3] {
        [CA_VAR, CERT_VAR, KEY_VAR].map(|name| (name.to_string(), String::new()))
    }
}

/// A node's TLS material, read and checked by [`Tls::load`].
#[derive(Clone)]
pub struct Tls {
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
    roots: Arc<RootCertStore>,
    /// This node's certificate first, then any intermediates.
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    /// The PEM text as read, for tonic's client configuration.
    ca_pem: Vec<u8>,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Tls").field("files", &self.files).finish()
    }
}

impl Tls {
    /// Reads the three files and checks that they belong together: the CA file holds
    /// certificates, the certificate is one the CA signed for a node (it may act as a
    /// client: agents and workers present it), and the key is the certificate's.
    pub fn load(files: &TlsFiles) -> Result<Tls, Error> {
        let [ca_name, cert_name, key_name] = files.setting.names();
        let ca_pem = read(ca_name, &files.ca)?;
        let cert_pem = read(cert_name, &files.cert)?;
        let key_pem = read(key_name, &files.key)?;
        let certificates = |setting: &'static str, path: &Path, pem: &[u8]| {
            let parsed: Result<Vec<CertificateDer<'static>>, _> =
                CertificateDer::pem_slice_iter(pem).collect();
            match parsed {
                Ok(certs) if !certs.is_empty() => Ok(certs),
                Ok(_) => Err(Error::NoCertificate {
                    setting,
                    path: path.to_path_buf(),
                    reason: "no `-----BEGIN CERTIFICATE-----` block".into(),
                }),
                Err(e) => Err(Error::NoCertificate {
                    setting,
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                }),
            }
        };
        let ca = certificates(ca_name, &files.ca, &ca_pem)?;
        let chain = certificates(cert_name, &files.cert, &cert_pem)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| Error::NoKey {
            setting: key_name,
            path: files.key.clone(),
            reason: match e {
                rustls::pki_types::pem::Error::NoItemsFound => {
                    "no `-----BEGIN PRIVATE KEY-----` block".into()
                }
                other => other.to_string(),
            },
        })?;
        let mut roots = RootCertStore::empty();
        for certificate in ca {
            roots.add(certificate).map_err(|e| Error::NoCertificate {
                setting: ca_name,
                path: files.ca.clone(),
                reason: format!("not a CA certificate: {e}"),
            })?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = Tls {
            files: files.clone(),
            provider,
            roots: Arc::new(roots),
            chain,
            key: Arc::new(key),
            ca_pem,
            cert_pem,
            key_pem,
        };
        let untrusted = |reason: String| Error::Untrusted {
            cert_setting: cert_name,
            cert: files.cert.clone(),
            ca_setting: ca_name,
            ca: files.ca.clone(),
            reason,
        };
        let (end_entity, intermediates) = tls.chain.split_first().expect("invariant: not empty");
        tls.client_verifier()
            .map_err(|e| untrusted(e.to_string()))?
            .verify_client_cert(end_entity, intermediates, UnixTime::now())
            .map_err(|e| untrusted(e.to_string()))?;
        CertifiedKey::from_der(tls.chain.clone(), tls.key.clone_key(), &tls.provider).map_err(
            |e| match e {
                rustls::Error::InconsistentKeys(_) => Error::KeyMismatch {
                    key_setting: key_name,
                    key: files.key.clone(),
                    cert_setting: cert_name,
                    cert: files.cert.clone(),
                },
                other => Error::NoKey {
                    setting: key_name,
                    path: files.key.clone(),
                    reason: other.to_string(),
                },
            },
        )?;
        Ok(tls)
    }

    /// The files this was read from.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// Whether this node's certificate is valid for a server reached at `host` (a DNS name or
    /// an IP address), as clients check it; `who` says which clients, for the message.
    pub fn check_server_name(&self, host: &str, who: &str) -> Result<(), Error> {
        let [_, cert_name, _] = self.files.setting.names();
        let wrong = |reason: String| Error::WrongName {
            setting: cert_name,
            cert: self.files.cert.clone(),
            host: host.to_string(),
            who: who.to_string(),
            reason,
        };
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| wrong(format!("not a host name or IP address: {e}")))?;
        let verifier =
            WebPkiServerVerifier::builder_with_provider(self.roots.clone(), self.provider.clone())
                .build()
                .map_err(|e| wrong(e.to_string()))?;
        let (end_entity, intermediates) = self.chain.split_first().expect("invariant: not empty");
        verifier
            .verify_server_cert(end_entity, intermediates, &name, &[], UnixTime::now())
            .map(|_| ())
            .map_err(|e| wrong(e.to_string()))
    }

    /// The coordinator's server configuration: it presents this node's certificate and
    /// requires every client to present one the CA signed.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, Error> {
        let invalid = |e: &dyn std::fmt::Display| Error::NoKey {
            setting: self.files.setting.names()[2],
            path: self.files.key.clone(),
            reason: e.to_string(),
        };
        let verifier = self.client_verifier().map_err(|e| invalid(&e))?;
        let mut config = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid(&e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| invalid(&e))?;
        // gRPC is HTTP/2.
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// A client's configuration: it trusts the CA only, checks the server's certificate
    /// against the host it dials, and presents this node's certificate.
    pub fn client_config(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
    }

    fn client_verifier(
        &self,
    ) -> Result<Arc<dyn ClientCertVerifier>, rustls::server::VerifierBuilderError> {
        WebPkiClientVerifier::builder_with_provider(self.roots.clone(), self.provider.clone())
            .build()
    }
}

/// An endpoint of the coordinator at `address` (HOST:PORT): over TLS with `tls` (the server's
/// certificate must be valid for HOST), in plain text without.
pub fn endpoint(address: &str, tls: Option<&Tls>) -> Result<Endpoint, Error> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let bad = |e: tonic::transport::Error| Error::Address {
        address: address.to_string(),
        reason: crate::error_chain(&e),
    };
    let endpoint = Endpoint::from_shared(format!("{scheme}://{address}")).map_err(bad)?;
    match tls {
        Some(tls) => endpoint.tls_config(tls.client_config()).map_err(bad),
        None => Ok(endpoint),
    }
}

/// The bytes of a PEM file, or why they cannot be had.
fn read(setting: &'static str, path: &Path) -> Result<Vec<u8>, Error> {
    let failed = |source| Error::TlsRead {
        setting,
        path: path.to_path_buf(),
        source,
    };
    let metadata = std::fs::metadata(path).map_err(failed)?;
    if metadata.is_dir() {
        return Err(failed(std::io::Error::new(
            std::io::ErrorKind::IsADirectory,
            "it is a directory, not a PEM file",
        )));
    }
    if metadata.len() > MAX_PEM_BYTES {
        return Err(Error::NoCertificate {
            setting,
            path: path.to_path_buf(),
            reason: format!(
                "{} bytes is no PEM file of a certificate or key (limit {MAX_PEM_BYTES})",
                metadata.len()
            ),
        });
    }
    std::fs::read(path).map_err(failed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    };

    #[test]
    fn the_environment_gives_all_three_files_or_none_and_names_what_is_missing() {
        let vars = |set: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                set.iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| std::ffi::OsString::from(v))
            }
        };
        assert_eq!(TlsFiles::from_vars(vars(&[])).unwrap(), None);
        // Empty values (what a launch without TLS passes its workers) count as unset.
        let off = &[(CA_VAR, ""), (CERT_VAR, ""), (KEY_VAR, "")];
        assert_eq!(TlsFiles::from_vars(vars(off)).unwrap(), None);
        let all = &[
            (CA_VAR, "/c/ca.pem"),
            (CERT_VAR, "/c/n.pem"),
            (KEY_VAR, "/c/n-key.pem"),
        ];
        let files = TlsFiles::from_vars(vars(all)).unwrap().unwrap();
        assert_eq!(files.key, PathBuf::from("/c/n-key.pem"));
        assert_eq!(files.setting, Setting::Environment);
        assert_eq!(
            files.env()[1],
            (CERT_VAR.to_string(), "/c/n.pem".to_string())
        );
        let partial = &[(CERT_VAR, "/c/n.pem"), (KEY_VAR, "")];
        let message = TlsFiles::from_vars(vars(partial)).unwrap_err().to_string();
        assert_eq!(
            message,
            "TESSERA_TLS_CERT set but TESSERA_TLS_CA, TESSERA_TLS_KEY not: TLS needs all three \
             (the CA certificate, this node's certificate and its key)"
        );
    }

    /// Writes a CA and one certificate it signed with `usages` into `dir`.
    fn signed(dir: &Path, usages: Vec<ExtendedKeyUsagePurpose>) -> TlsFiles {
        std::fs::create_dir_all(dir).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["node-a".to_string()]).unwrap();
        params.extended_key_usages = usages;
        let cert = params.signed_by(&key, &Issuer::new(ca, ca_key)).unwrap();
        let files = TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join("node-a.pem"),
            key: dir.join("node-a-key.pem"),
            setting: Setting::Flags,
        };
        std::fs::write(&files.ca, ca_cert.pem()).unwrap();
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        files
    }

    #[test]
    fn a_certificate_that_may_not_act_as_a_client_is_refused_and_the_key_never_printed() {
        let dir = std::env::temp_dir().join(format!("tessera-proto-tls-{}", std::process::id()));
        let node = signed(
            &dir.join("node"),
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        );
        let tls = Tls::load(&node).unwrap();
        tls.check_server_name("node-a", "the agents").unwrap();
        let shown = format!("{tls:?}");
        assert!(
            shown.contains("node-a-key.pem") && !shown.contains("PRIVATE"),
            "{shown}"
        );

        // Agents and workers present their node's certificate: a server-only one cannot be.
        let server_only = signed(
            &dir.join("server"),
            vec![ExtendedKeyUsagePurpose::ServerAuth],
        );
        let message = Tls::load(&server_only).unwrap_err().to_string();
        assert!(
            message.contains("--tls-cert")
                && message.contains("is not a node certificate of the CA in --tls-ca")
                && message.contains("does not allow extended key usage for client authentication"),
            "{message}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
