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
