//! Where the broker's Redis is: a plain URL (`redis://host:port`), or Redis Sentinel
//! (`redis+sentinel://[user:password@]host:port[,host:port…]/<master name>[/db]`), where the
//! sentinels are asked for the master's address every time a connection opens. After a
//! failover the old master's connections fail; the next connection goes wherever the
//! sentinels say the master is now, and is used only once it says it is a master (`ROLE`):
//! a demoted master that comes back as a replica is never written to.

use std::sync::Arc;
use std::time::Duration;

use redis::{ConnectionAddr, ConnectionInfo, RedisResult};
use tracing::warn;

/// How long asking one sentinel may take.
const ASK_TIMEOUT: Duration = Duration::from_millis(500);

/// The URL scheme of a Sentinel deployment.
pub const SCHEME: &str = "redis+sentinel://";

/// How to reach the broker's Redis: its settings (password, database), and where.
#[derive(Debug, Clone)]
pub struct Seed {
    /// Settings, and the address for a plain URL.
    info: ConnectionInfo,
    /// Sentinels to ask for the master's address, when the URL names them.
    sentinel: Option<Arc<Sentinels>>,
}

/// Sentinel addresses and the name of the master they watch.
#[derive(Debug)]
struct Sentinels {
    addrs: Vec<(String, u16)>,
    name: String,
}

/// A client error with a message (a URL the parser refused).
fn invalid(what: &'static str, detail: String) -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::InvalidClientConfig, what, detail))
}

impl Seed {
    /// Parses a `--broker` URL: `redis://…` (or `rediss://…`, `unix://…`) as the redis crate
    /// reads it, or the `redis+sentinel://` form.
    pub fn parse(url: &str) -> RedisResult<Seed> {
        let Some(rest) = url.strip_prefix(SCHEME) else {
            let info = redis::IntoConnectionInfo::into_connection_info(url)?;
            return Ok(Seed {
                info,
                sentinel: None,
            });
        };
        let (auth, rest) = match rest.rsplit_once('@') {
            Some((a, r)) => (Some(a), r),
            None => (None, rest),
        };
        let (hosts, path) = rest.split_once('/').unwrap_or((rest, ""));
        let mut parts = path.split('/').filter(|p| !p.is_empty());
        let name = parts
            .next()
            .ok_or_else(|| invalid("no master name", format!("{SCHEME}HOST:PORT/<name>")))?;
        let db = parts.next().unwrap_or("0");
        let mut addrs = Vec::new();
        for h in hosts.split(',').filter(|h| !h.is_empty()) {
            let (host, port) = h.rsplit_once(':').unwrap_or((h, "26379"));
            let port = port
                .parse()
                .map_err(|_| invalid("bad sentinel port", h.to_owned()))?;
            addrs.push((host.trim_matches(['[', ']']).to_owned(), port));
        }
        if addrs.is_empty() {
            return Err(invalid("no sentinel address", url.to_owned()));
        }
        // The master's settings: the URL's user, password and database, at an address the
        // sentinels give later.
        let auth = auth.map(|a| format!("{a}@")).unwrap_or_default();
        let info = redis::IntoConnectionInfo::into_connection_info(
            format!("redis://{auth}127.0.0.1:6379/{db}").as_str(),
        )?;
        Ok(Seed {
            info,
            sentinel: Some(Arc::new(Sentinels {
                addrs,
                name: name.to_owned(),
            })),
        })
    }

    /// Sets the password of the master (and every cluster node) when the URL gave none.
    pub fn with_password(mut self, password: String) -> Seed {
        if self.info.redis_settings().password().is_none() {
            let settings = self.info.redis_settings().clone().set_password(password);
            self.info = self.info.set_redis_settings(settings);
        }
        self
    }

    /// Whether the sentinels say where the master is.
    pub fn is_sentinel(&self) -> bool {
        self.sentinel.is_some()
    }

    /// The settings (password, database) every connection uses.
    pub fn settings(&self) -> &ConnectionInfo {
        &self.info
    }

    /// Where the master is now: the URL's address, or the first sentinel that knows.
    pub fn master(&self) -> RedisResult<ConnectionInfo> {
        let Some(s) = &self.sentinel else {
            return Ok(self.info.clone());
        };
        let mut last = None;
        for (host, port) in &s.addrs {
            match ask(host, *port, &s.name) {
                Ok(Some((h, p))) => {
                    return Ok(self.info.clone().set_addr(ConnectionAddr::Tcp(h, p)))
                }
                Ok(None) => {
                    last = Some(invalid(
                        "the sentinel does not know the master",
                        s.name.clone(),
                    ))
                }
                Err(e) => last = Some(e),
            }
        }
        let e = last.unwrap_or_else(|| invalid("no sentinel", String::new()));
        warn!(master = %s.name, error = %e, "broker: no sentinel gave the master's address");
        Err(e)
    }
}

/// `SENTINEL get-master-addr-by-name` of one sentinel.
fn ask(host: &str, port: u16, name: &str) -> RedisResult<Option<(String, u16)>> {
    let mut c = redis::Client::open(ConnectionAddr::Tcp(host.to_owned(), port))?
        .get_connection_with_timeout(ASK_TIMEOUT)?;
    c.set_read_timeout(Some(ASK_TIMEOUT))?;
    redis::cmd("SENTINEL")
        .arg("get-master-addr-by-name")
        .arg(name)
        .query(&mut c)
}

/// Whether the Redis behind `con` is a master now (`ROLE`).
pub fn is_master(con: &mut redis::Connection) -> RedisResult<bool> {
    let role: Vec<redis::Value> = redis::cmd("ROLE").query(con)?;
    Ok(matches!(role.first(), Some(redis::Value::BulkString(r)) if r == b"master"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentinel_urls_name_sentinels_master_and_settings() {
        let s =
            Seed::parse("redis+sentinel://:pw@10.0.0.1:26379,[::1]:26380,h3/mymaster/2").unwrap();
        let st = s.sentinel.as_ref().unwrap();
        assert_eq!(
            st.addrs,
            vec![
                ("10.0.0.1".to_owned(), 26379),
                ("::1".to_owned(), 26380),
                ("h3".to_owned(), 26379)
            ]
        );
        assert_eq!(st.name, "mymaster");
        assert_eq!(s.settings().redis_settings().password(), Some("pw"));
        assert_eq!(s.settings().redis_settings().db(), 2);
        assert!(Seed::parse("redis+sentinel://h:1").is_err(), "no name");
        assert!(Seed::parse("redis+sentinel:///m").is_err(), "no sentinel");
        assert!(Seed::parse("redis+sentinel://h:x/m").is_err(), "bad port");
        let plain = Seed::parse("redis://127.0.0.1:7000").unwrap();
        assert!(!plain.is_sentinel());
        assert_eq!(plain.master().unwrap().addr().to_string(), "127.0.0.1:7000");
    }
}
