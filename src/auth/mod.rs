//! Identity resolution: the one place that decides who a connection is.
//!
//! Without a key, identities are claimed with `?user=` (and the server warns at start-up).
//! With `--jwt-secret` (HS256) or `--jwt-public-key` (RS256/ES256), `/ws` and `/events` need a
//! signed token in `?token=` or `Authorization: Bearer`: `sub` is the user, `exp` is enforced
//! (also on open connections, with 4003), and `channels` grants `private:*` channels.

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::config::Config;
use crate::http::request::{query_param, Request};
use crate::protocol::valid_user;

/// Why a request's identity was refused (answered before the upgrade).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// `user` is not 1–128 characters of `[A-Za-z0-9_.@-]`.
    #[error("invalid user id: must be 1-128 characters of [A-Za-z0-9_.@-]")]
    BadUser,
    /// A token is required and none was given.
    #[error("a signed token is required (?token= or Authorization: Bearer)")]
    MissingToken,
    /// The token's signature, algorithm or claims are wrong.
    #[error("invalid token: {0}")]
    BadToken(String),
    /// The token's `exp` has passed.
    #[error("token expired")]
    Expired,
}

impl IdentityError {
    /// HTTP status to answer with.
    pub fn status(&self) -> u16 {
        match self {
            IdentityError::BadUser => 400,
            _ => 401,
        }
    }
}

/// What a token granted beyond the user id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Expiry, Unix seconds.
    pub exp: u64,
    /// `private:` channel patterns (exact, or a prefix ending in `*`).
    pub channels: Vec<String>,
}

/// Who a connection is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// A user id, with the token's grant when one was verified.
    User(String, Option<Box<Grant>>),
    /// No identity was given (only without a key); the server names it `anon-<conn>`.
    Anonymous,
}

/// Why authentication could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    /// The public key is neither an RSA nor an EC PEM key.
    #[error("--jwt-public-key is not an RSA or EC public key in PEM: {0}")]
    PublicKey(String),
}

/// The token verifier built from the configuration.
pub struct Auth {
    verifier: Option<(DecodingKey, Validation)>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("tokens", &self.requires_token())
            .finish()
    }
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default)]
    channels: Vec<String>,
}

impl Auth {
    /// Builds the verifier, if a key is configured.
    pub fn from_config(cfg: &Config) -> Result<Auth, AuthSetupError> {
        let verifier = if let Some(secret) = &cfg.jwt_secret {
            Some((
                DecodingKey::from_secret(secret.as_bytes()),
                validation(&[Algorithm::HS256]),
            ))
        } else if let Some(pem) = &cfg.jwt_public_key_pem {
            if let Ok(k) = DecodingKey::from_rsa_pem(pem.as_bytes()) {
                Some((k, validation(&[Algorithm::RS256])))
            } else {
                let k = DecodingKey::from_ec_pem(pem.as_bytes())
                    .map_err(|e| AuthSetupError::PublicKey(e.to_string()))?;
                Some((k, validation(&[Algorithm::ES256])))
            }
        } else {
            None
        };
        Ok(Auth { verifier })
    }

    /// No verification: identities are claimed with `?user=`.
    pub fn none() -> Auth {
        Auth { verifier: None }
    }

    /// Whether `/ws` and `/events` need a signed token.
    pub fn requires_token(&self) -> bool {
        self.verifier.is_some()
    }

    /// Resolves the identity of an upgrade or SSE request; a token's `exp` is checked
    /// against `now_unix_s`, the shard's clock (never a hidden system-clock read).
    pub fn resolve(&self, req: &Request, now_unix_s: u64) -> Result<Identity, IdentityError> {
        let Some((key, validation)) = &self.verifier else {
            return resolve_claimed(req);
        };
        let token = query_param(req.query.as_deref(), "token")
            .or_else(|| {
                req.authorization
                    .as_deref()
                    .and_then(|a| a.strip_prefix("Bearer ").map(|t| t.trim().to_owned()))
            })
            .filter(|t| !t.is_empty())
            .ok_or(IdentityError::MissingToken)?;
        let data = jsonwebtoken::decode::<Claims>(&token, key, validation).map_err(|e| match e
            .kind()
        {
            jsonwebtoken::errors::ErrorKind::ExpiredSignature => IdentityError::Expired,
            _ => IdentityError::BadToken(e.to_string()),
        })?;
        let c = data.claims;
        if c.exp <= now_unix_s {
            return Err(IdentityError::Expired);
        }
        if !valid_user(&c.sub) {
            return Err(IdentityError::BadUser);
        }
        Ok(Identity::User(
            c.sub,
            Some(Box::new(Grant {
                exp: c.exp,
                channels: c.channels,
            })),
        ))
    }
}

fn validation(algs: &[Algorithm]) -> Validation {
    let mut v = Validation::new(algs[0]);
    v.algorithms = algs.to_vec();
    v.leeway = 0;
    // `exp` is checked against the shard clock in `resolve`.
    v.validate_exp = false;
    v.validate_aud = false;
    v.set_required_spec_claims(&["exp", "sub"]);
    v
}

fn resolve_claimed(req: &Request) -> Result<Identity, IdentityError> {
    match req.query.as_deref().and_then(|q| {
        q.split('&')
            .any(|kv| kv == "user" || kv.starts_with("user="))
            .then(|| query_param(Some(q), "user").unwrap_or_default())
    }) {
        None => Ok(Identity::Anonymous),
        Some(u) if valid_user(&u) => Ok(Identity::User(u, None)),
        Some(_) => Err(IdentityError::BadUser),
    }
}

/// Whether a connection may use `channel`: `private:*` channels need a matching pattern in
/// the token's `channels` claim (exact, or a prefix followed by `*`).
pub fn channel_allowed(grant: Option<&Grant>, channel: &str) -> bool {
    if !channel.starts_with("private:") {
        return true;
    }
    grant.is_some_and(|g| {
        g.channels.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => channel.starts_with(prefix),
            None => p == channel,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};

    fn req(q: Option<&str>) -> Request {
        Request {
            query: q.map(str::to_owned),
            ..Request::default()
        }
    }

    #[test]
    fn claimed_user_rules() {
        let a = Auth::none();
        assert_eq!(
            a.resolve(&req(Some("user=alice")), NOW),
            Ok(Identity::User("alice".into(), None))
        );
        assert_eq!(
            a.resolve(&req(Some("x=1&user=a%40b")), NOW),
            Ok(Identity::User("a@b".into(), None))
        );
        assert_eq!(a.resolve(&req(None), NOW), Ok(Identity::Anonymous));
        assert_eq!(
            a.resolve(&req(Some("user=")), NOW),
            Err(IdentityError::BadUser)
        );
        assert_eq!(
            a.resolve(&req(Some("user")), NOW),
            Err(IdentityError::BadUser)
        );
        assert_eq!(
            a.resolve(&req(Some("user=a%20b")), NOW),
            Err(IdentityError::BadUser)
        );
        let long = format!("user={}", "a".repeat(129));
        assert_eq!(
            a.resolve(&req(Some(&long)), NOW),
            Err(IdentityError::BadUser)
        );
    }

    /// The shard clock in these tests (unix seconds).
    const NOW: u64 = 1_800_000_000;

    fn now() -> u64 {
        NOW
    }

    fn token(secret: &str, sub: &str, exp: u64, channels: &[&str]) -> String {
        let claims = serde_json::json!({"sub": sub, "exp": exp, "channels": channels});
        encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    #[test]
    fn hs256_tokens() {
        let cfg = Config {
            jwt_secret: Some("s3cret".into()),
            ..Config::default()
        };
        let a = Auth::from_config(&cfg).unwrap();
        let t = token("s3cret", "alice", now() + 60, &["private:team-*"]);
        let id = a.resolve(&req(Some(&format!("token={t}"))), NOW).unwrap();
        let Identity::User(user, Some(grant)) = id else {
            panic!("{id:?}")
        };
        assert_eq!(user, "alice");
        assert!(channel_allowed(Some(&grant), "private:team-1"));
        assert!(!channel_allowed(Some(&grant), "private:other"));
        assert!(channel_allowed(Some(&grant), "public"));
        // Bearer header works too.
        let mut r = req(None);
        r.authorization = Some(format!("Bearer {t}"));
        assert!(a.resolve(&r, NOW).is_ok());
        // Forged, expired, missing, claimed.
        let forged = token("wrong", "alice", now() + 60, &[]);
        assert!(matches!(
            a.resolve(&req(Some(&format!("token={forged}"))), NOW),
            Err(IdentityError::BadToken(_))
        ));
        let old = token("s3cret", "alice", now() - 5, &[]);
        assert_eq!(
            a.resolve(&req(Some(&format!("token={old}"))), NOW),
            Err(IdentityError::Expired)
        );
        assert_eq!(a.resolve(&req(None), NOW), Err(IdentityError::MissingToken));
        assert_eq!(
            a.resolve(&req(Some("user=alice")), NOW),
            Err(IdentityError::MissingToken)
        );
        assert_eq!(IdentityError::Expired.status(), 401);
        // Expiry follows the clock handed in, not the system clock.
        let t = token("s3cret", "alice", NOW + 60, &[]);
        let r = req(Some(&format!("token={t}")));
        assert!(a.resolve(&r, NOW + 59).is_ok());
        assert_eq!(a.resolve(&r, NOW + 60), Err(IdentityError::Expired));
    }

    #[test]
    fn private_channels_need_a_grant() {
        assert!(!channel_allowed(None, "private:x"));
        assert!(channel_allowed(None, "room"));
        let g = Grant {
            exp: 0,
            channels: vec!["private:x".into()],
        };
        assert!(channel_allowed(Some(&g), "private:x"));
        assert!(!channel_allowed(Some(&g), "private:xy"));
    }
}
