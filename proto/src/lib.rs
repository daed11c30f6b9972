//! tessera-proto: the control plane's gRPC messages and services, generated from
//! `proto/tessera.proto` (see that file for what each call means), the token check every
//! call goes through, and (`tls`) the TLS with mutual authentication that both ends of a
//! connection use when the run has `cluster.tls`.

use std::path::PathBuf;

pub mod tls;

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("tessera.v1");
}

/// What can go wrong setting up a connection of the control plane.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // --- a node's TLS files ---
    #[error("cannot read {setting} {}: {source}; {}", path.display(), tls::MAKE_CERTS)]
    TlsRead {
        setting: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{setting} {} holds no usable certificate: {reason}; give the ca.pem or HOST.pem that \
         `launch certs` wrote",
        path.display()
    )]
    NoCertificate {
        setting: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error(
        "{setting} {} holds no usable private key: {reason}; give the HOST-key.pem that \
         `launch certs` wrote beside HOST.pem",
        path.display()
    )]
    NoKey {
        setting: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error(
        "{key_setting} {} is not the private key of {cert_setting} {}; give the HOST-key.pem \
         that `launch certs` wrote with that HOST.pem",
        key.display(),
        cert.display()
    )]
    KeyMismatch {
        key_setting: &'static str,
        key: PathBuf,
        cert_setting: &'static str,
        cert: PathBuf,
    },
    #[error(
        "{cert_setting} {} is not a node certificate of the CA in {ca_setting} {}: {reason}; \
         use the CA and the certificates of one run of `launch certs`",
        cert.display(),
        ca.display()
    )]
    Untrusted {
        cert_setting: &'static str,
        cert: PathBuf,
        ca_setting: &'static str,
        ca: PathBuf,
        reason: String,
    },
    #[error(
        "{setting} {} is not valid for {host}, the address {who} reach the coordinator at: \
         {reason}; give the head a certificate for that name (`launch certs --hosts {host},...`)",
        cert.display()
    )]
    WrongName {
        setting: &'static str,
        cert: PathBuf,
        host: String,
        who: String,
        reason: String,
    },
    #[error(
        "{given} set but {missing} not: TLS needs all three (the CA certificate, this node's \
         certificate and its key)"
    )]
    IncompleteTls { given: String, missing: String },

    // --- dialling the coordinator ---
    #[error("{address} is not the coordinator's HOST:PORT: {reason}")]
    Address { address: String, reason: String },
}

/// `error` and its sources, outermost first, joined by ": " (tonic's transport errors say
/// little without their sources: "transport error").
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(error);
    while let Some(error) = next {
        let text = error.to_string();
        // Some wrappers repeat their source's text.
        if parts.last().is_none_or(|last| !last.contains(&text)) {
            parts.push(text);
        }
        next = error.source();
    }
    parts.join(": ")
}

/// The metadata key that carries the run's token.
pub const TOKEN_HEADER: &str = "authorization";

/// The value a call's `authorization` metadata must have for `token`.
pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// A client-side interceptor that adds the run's token to every call: what workers, node
/// agents and tests wrap their channel to the coordinator with.
#[derive(Clone)]
pub struct WithToken(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl WithToken {
    /// None when `token` holds characters a gRPC header cannot carry.
    pub fn new(token: &str) -> Option<WithToken> {
        bearer(token).parse().ok().map(WithToken)
    }
}

impl tonic::service::Interceptor for WithToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request.metadata_mut().insert(TOKEN_HEADER, self.0.clone());
        Ok(request)
    }
}

/// A client of the coordinator whose calls carry the run's token.
pub type Client = v1::coordinator_client::CoordinatorClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, WithToken>,
>;

/// `channel` as a [`Client`] with `token` (None: see [`WithToken::new`]).
pub fn client(channel: tonic::transport::Channel, token: &str) -> Option<Client> {
    WithToken::new(token)
        .map(|token| v1::coordinator_client::CoordinatorClient::with_interceptor(channel, token))
}
