//! tessera-proto: the control plane's gRPC messages and services, generated from
//! `proto/tessera.proto` (see that file for what each call means), and the token check every
//! call goes through.

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("tessera.v1");
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
