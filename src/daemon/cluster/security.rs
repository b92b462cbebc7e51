//! How rld proves who it is to etcd and checks that etcd is etcd: TLS (the
//! CA that signed etcd's certificate, and a client certificate for
//! `--client-cert-auth`) and etcd's user/password authentication (the
//! password read from a file, never from the command line or config).
//!
//! Shared by the daemon and `rlctl audit`. Files are read and checked when
//! the config is checked (`rld --check-config` catches a missing key), and
//! again at connect.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use etcd_client::{Certificate, ConnectOptions, Identity, TlsOptions};

/// TLS and authentication settings for etcd (all optional).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EtcdSecurity {
    /// PEM CA certificate(s) that signed etcd's server certificate.
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate and its key, for etcd's `--client-cert-auth`.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Name to check etcd's certificate against, when not the endpoint's host.
    pub tls_domain: Option<String>,
    /// etcd user (with `auth enable`).
    pub user: Option<String>,
    /// File holding that user's password (one line; not readable by others).
    pub password_file: Option<PathBuf>,
}

/// Settings that cannot work, with what to change.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("{field}: cannot read {}: {source}", path.display())]
    Read {
        field: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

impl EtcdSecurity {
    fn uses_tls(&self) -> bool {
        self.tls_ca.is_some()
            || self.tls_cert.is_some()
            || self.tls_key.is_some()
            || self.tls_domain.is_some()
    }

    /// Checks the settings against the endpoints and reads every file.
    ///
    /// # Errors
    /// Mixed or incomplete settings, unreadable files, files that are not
    /// PEM, a password file others may read.
    pub fn check(&self, endpoints: &[String]) -> Result<(), SecurityError> {
        self.connect_options(endpoints, ConnectOptions::new())
            .map(|_| ())
    }

    /// `options` with TLS and authentication applied.
    ///
    /// # Errors
    /// As [`check`](Self::check).
    pub fn connect_options(
        &self,
        endpoints: &[String],
        mut options: ConnectOptions,
    ) -> Result<ConnectOptions, SecurityError> {
        let invalid = |field, message: &str| {
            Err(SecurityError::Invalid {
                field,
                message: message.into(),
            })
        };
        let https = endpoints
            .iter()
            .filter(|e| e.starts_with("https://"))
            .count();
        if https > 0 && https < endpoints.len() {
            return invalid(
                "etcd",
                "mixes http:// and https:// endpoints; use https:// for all of them",
            );
        }
        if https > 0 && self.tls_ca.is_none() {
            return invalid(
                "etcd_tls_ca",
                "https:// endpoints need the CA certificate that signed etcd's certificate \
                 (a PEM file)",
            );
        }
        if https == 0 && self.uses_tls() {
            return invalid(
                "etcd_tls_ca",
                "TLS settings need https:// endpoints (etcd listens with TLS on those)",
            );
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return invalid(
                "etcd_tls_cert",
                "a client certificate needs its key (etcd_tls_key), and the key its certificate",
            );
        }
        if self.user.is_some() != self.password_file.is_some() {
            return invalid(
                "etcd_user",
                "an etcd user needs etcd_password_file (a file holding the password), and a \
                 password file its user",
            );
        }
        if let Some(ca) = &self.tls_ca {
            let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(read_pem(
                "etcd_tls_ca",
                ca,
                "CERTIFICATE",
            )?));
            if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
                let cert = read_pem("etcd_tls_cert", cert, "CERTIFICATE")?;
                let key = read_pem("etcd_tls_key", key, "PRIVATE KEY")?;
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            if let Some(domain) = &self.tls_domain {
                tls = tls.domain_name(domain.clone());
            }
            options = options.with_tls(tls);
        }
        if self.user.is_some() && https == 0 && !endpoints.iter().all(|e| is_loopback(e)) {
            return invalid(
                "etcd_user",
                "a password would cross the network in clear over http://; use https:// \
                 endpoints (with etcd_tls_ca), or loopback ones",
            );
        }
        if let (Some(user), Some(file)) = (&self.user, &self.password_file) {
            let password = read_password(file)?;
            options = options
                .with_user(user.clone(), password)
                .with_auto_token_refresh(true);
        }
        Ok(options)
    }
}

/// Whether an http:// endpoint is on this host (127.0.0.0/8, ::1, localhost).
fn is_loopback(endpoint: &str) -> bool {
    let host = endpoint.trim_start_matches("http://");
    let host = host.split('/').next().unwrap_or("");
    let host = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn read_pem(field: &'static str, path: &Path, kind: &str) -> Result<Vec<u8>, SecurityError> {
    let pem = std::fs::read(path).map_err(|source| SecurityError::Read {
        field,
        path: path.to_owned(),
        source,
    })?;
    let text = String::from_utf8_lossy(&pem);
    if !text.contains("-----BEGIN ") || !text.contains(kind) {
        return Err(SecurityError::Invalid {
            field,
            message: format!("{} is not a PEM file holding a {kind}", path.display()),
        });
    }
    Ok(pem)
}

fn read_password(path: &Path) -> Result<String, SecurityError> {
    let read_error = |source| SecurityError::Read {
        field: "etcd_password_file",
        path: path.to_owned(),
        source,
    };
    let mode = std::fs::metadata(path)
        .map_err(read_error)?
        .permissions()
        .mode();
    if mode & 0o004 != 0 {
        return Err(SecurityError::Invalid {
            field: "etcd_password_file",
            message: format!(
                "{} is readable by every user; chmod o-r it (0600 or 0640)",
                path.display()
            ),
        });
    }
    let text = std::fs::read_to_string(path).map_err(read_error)?;
    let password = text.trim_end_matches(['\n', '\r']);
    if password.is_empty() || password.contains('\n') {
        return Err(SecurityError::Invalid {
            field: "etcd_password_file",
            message: format!("{} must hold the password on one line", path.display()),
        });
    }
    Ok(password.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eps(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    fn field_of(e: SecurityError) -> &'static str {
        match e {
            SecurityError::Invalid { field, .. } | SecurityError::Read { field, .. } => field,
        }
    }

    #[test]
    fn incomplete_or_mixed_settings_are_refused_with_the_key_to_fix() {
        let dir = tempfile::tempdir().unwrap();
        let pem = dir.path().join("ca.pem");
        std::fs::write(
            &pem,
            "-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let secret = dir.path().join("pw");
        std::fs::write(&secret, "s3cret\n").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
        let https = eps(&["https://127.0.0.1:2379"]);
        let cases = [
            (
                eps(&["https://a:1", "http://b:1"]),
                EtcdSecurity::default(),
                "etcd",
            ),
            (https.clone(), EtcdSecurity::default(), "etcd_tls_ca"),
            (
                eps(&["http://a:1"]),
                EtcdSecurity {
                    tls_ca: Some(pem.clone()),
                    ..Default::default()
                },
                "etcd_tls_ca",
            ),
            (
                https.clone(),
                EtcdSecurity {
                    tls_ca: Some(pem.clone()),
                    tls_cert: Some(pem.clone()),
                    ..Default::default()
                },
                "etcd_tls_cert",
            ),
            (
                https.clone(),
                EtcdSecurity {
                    tls_ca: Some(dir.path().join("missing.pem")),
                    ..Default::default()
                },
                "etcd_tls_ca",
            ),
            (
                https.clone(),
                EtcdSecurity {
                    tls_ca: Some(secret.clone()),
                    ..Default::default()
                },
                "etcd_tls_ca",
            ),
            (
                eps(&["http://a:1"]),
                EtcdSecurity {
                    user: Some("root".into()),
                    ..Default::default()
                },
                "etcd_user",
            ),
            (
                eps(&["http://127.0.0.1:1"]),
                EtcdSecurity {
                    user: Some("root".into()),
                    password_file: Some(secret.clone()),
                    ..Default::default()
                },
                "etcd_password_file",
            ),
            (
                eps(&["http://10.0.0.1:2379"]),
                EtcdSecurity {
                    user: Some("root".into()),
                    password_file: Some(secret.clone()),
                    ..Default::default()
                },
                "etcd_user",
            ),
        ];
        for (endpoints, security, field) in cases {
            let e = security.check(&endpoints).expect_err(field);
            assert_eq!(field_of(e), field, "{security:?}");
        }
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        let fine = EtcdSecurity {
            tls_ca: Some(pem),
            user: Some("root".into()),
            password_file: Some(secret),
            ..Default::default()
        };
        fine.check(&https)
            .expect("a CA and a private password file");
    }
}
