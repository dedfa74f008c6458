//! Identity resolution: the one place that decides who a connection is.
//!
//! Today identities are claimed with `?user=`; signed tokens will be checked here too, so
//! the shard code never changes when authentication does.

use crate::http::request::{query_param, Request};
use crate::protocol::valid_user;

/// Why a request's identity was refused (answered with 400/401 before the upgrade).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// `user` is not 1–128 characters of `[A-Za-z0-9_.@-]`.
    #[error("invalid user id: must be 1-128 characters of [A-Za-z0-9_.@-]")]
    BadUser,
}

impl IdentityError {
    /// HTTP status to answer with.
    pub fn status(&self) -> u16 {
        match self {
            IdentityError::BadUser => 400,
        }
    }
}

/// Who a connection is: a named user, or anonymous (named by the server).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// A user id given by the client.
    User(String),
    /// No identity was given; the server names the connection `anon-<conn>`.
    Anonymous,
}

/// Resolves the identity of an upgrade (or SSE) request.
pub fn resolve(req: &Request) -> Result<Identity, IdentityError> {
    match req.query.as_deref().and_then(|q| {
        q.split('&')
            .any(|kv| kv == "user" || kv.starts_with("user="))
            .then(|| query_param(Some(q), "user").unwrap_or_default())
    }) {
        None => Ok(Identity::Anonymous),
        Some(u) if valid_user(&u) => Ok(Identity::User(u)),
        Some(_) => Err(IdentityError::BadUser),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(q: Option<&str>) -> Request {
        Request {
            query: q.map(str::to_owned),
            ..Request::default()
        }
    }

    #[test]
    fn user_rules() {
        assert_eq!(
            resolve(&req(Some("user=alice"))),
            Ok(Identity::User("alice".into()))
        );
        assert_eq!(
            resolve(&req(Some("x=1&user=a%40b"))),
            Ok(Identity::User("a@b".into()))
        );
        assert_eq!(resolve(&req(None)), Ok(Identity::Anonymous));
        assert_eq!(resolve(&req(Some("user="))), Err(IdentityError::BadUser));
        assert_eq!(resolve(&req(Some("user"))), Err(IdentityError::BadUser));
        assert_eq!(
            resolve(&req(Some("user=a%20b"))),
            Err(IdentityError::BadUser)
        );
        let long = format!("user={}", "a".repeat(129));
        assert_eq!(resolve(&req(Some(&long))), Err(IdentityError::BadUser));
    }
}
