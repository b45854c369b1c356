//! A `redis-server` that speaks only TLS (`--port 0`) and wants a password, with a CA, a
//! server certificate for 127.0.0.1 and a client certificate made by the test (rcgen), and a
//! second CA that signed nothing of this server's.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};
use tokio::process::{Child, Command};
use tokio::time::timeout;

use super::{eventually, free_port, ScratchDir, TestResult};

/// The PEM files of one test's PKI, in a scratch directory removed on drop.
pub struct TestPki {
    /// The CA that signed the server's and the client's certificates.
    pub ca_file: PathBuf,
    /// A CA that signed neither.
    pub other_ca_file: PathBuf,
    /// For 127.0.0.1; good for client authentication too (a node uses it both ways).
    pub server_cert_file: PathBuf,
    pub server_key_file: PathBuf,
    pub client_cert_file: PathBuf,
    pub client_key_file: PathBuf,
    pub dir: ScratchDir,
}

impl TestPki {
    pub fn generate() -> TestResult<TestPki> {
        static MADE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let made = MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = ScratchDir::create(&format!("ssehub-pki-{}-{made}", std::process::id()))?;
        let file = |name: &str, pem: String| -> TestResult<PathBuf> {
            let path = dir.0.join(name);
            std::fs::write(&path, pem)?;
            Ok(path)
        };
        let ca = certificate_authority("ssehub test CA")?;
        let other_ca = certificate_authority("some other CA")?;
        // A node presents its server certificate as a client too, to the node it replicates
        // and on the cluster bus (which always asks for one).
        let (server_cert, server_key) = leaf(
            &ca,
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        )?;
        let (client_cert, client_key) = leaf(&ca, vec![ExtendedKeyUsagePurpose::ClientAuth])?;
        Ok(TestPki {
            ca_file: file("ca.pem", ca.pem())?,
            other_ca_file: file("other-ca.pem", other_ca.pem())?,
            server_cert_file: file("server.pem", server_cert)?,
            server_key_file: file("server-key.pem", server_key)?,
            client_cert_file: file("client.pem", client_cert)?,
            client_key_file: file("client-key.pem", client_key)?,
            dir,
        })
    }
}

fn certificate_authority(name: &str) -> TestResult<CertifiedIssuer<'static, KeyPair>> {
    let mut params = CertificateParams::new(Vec::new())?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    Ok(CertifiedIssuer::self_signed(params, KeyPair::generate()?)?)
}

/// A certificate for 127.0.0.1 signed by `ca` for `usages`, and its key, in PEM.
fn leaf(
    ca: &CertifiedIssuer<'static, KeyPair>,
    usages: Vec<ExtendedKeyUsagePurpose>,
) -> TestResult<(String, String)> {
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_string()])?;
    params
        .distinguished_name
        .push(DnType::CommonName, "127.0.0.1");
    params.extended_key_usages = usages;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, ca)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A TLS-only `redis-server` owned by the test, killed on drop.
pub struct TlsRedis {
    pub port: u16,
    pub password: String,
    pub pki: TestPki,
    _child: Child,
}

impl TlsRedis {
    /// Starts the server; with `client_auth` it refuses clients without a certificate
    /// signed by the CA (`--tls-auth-clients yes`).
    pub async fn start(client_auth: bool) -> TestResult<TlsRedis> {
        let pki = TestPki::generate()?;
        let port = free_port()?;
        let password = format!("pw-{}", rand::random::<u64>());
        let log = pki.dir.0.join("redis.log");
        let child = Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--tls-cert-file")
            .arg(&pki.server_cert_file)
            .arg("--tls-key-file")
            .arg(&pki.server_key_file)
            .arg("--tls-ca-cert-file")
            .arg(&pki.ca_file)
            .args(["--tls-auth-clients", if client_auth { "yes" } else { "no" }])
            .args(["--requirepass", &password])
            .arg("--logfile")
            .arg(&log)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start redis-server (is it installed?): {e}"))?;
        let redis = TlsRedis {
            port,
            password,
            pki,
            _child: child,
        };
        let ready = eventually("the TLS redis-server answers PING", || async {
            redis.ping().await
        })
        .await;
        if let Err(e) = ready {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(format!("{e}; redis-server log:\n{log}").into());
        }
        Ok(redis)
    }

    /// `rediss://:<password>@127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("rediss://:{}@127.0.0.1:{}", self.password, self.port)
    }

    /// A connection trusting the test CA and presenting the client certificate.
    pub async fn connection(&self) -> TestResult<redis::aio::MultiplexedConnection> {
        // The redis crate's TLS takes rustls's process-wide provider.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let certificates = redis::TlsCertificates {
            client_tls: Some(redis::ClientTlsConfig {
                client_cert: std::fs::read(&self.pki.client_cert_file)?,
                client_key: std::fs::read(&self.pki.client_key_file)?,
            }),
            root_cert: Some(std::fs::read(&self.pki.ca_file)?),
        };
        let client = redis::Client::build_with_tls(self.url(), certificates)?;
        Ok(timeout(
            Duration::from_secs(2),
            client.get_multiplexed_async_connection(),
        )
        .await??)
    }

    async fn ping(&self) -> bool {
        let Ok(mut connection) = self.connection().await else {
            return false;
        };
        redis::cmd("PING")
            .query_async::<String>(&mut connection)
            .await
            .is_ok()
    }

    /// PUBLISHes and returns how many subscribers Redis delivered to.
    pub async fn publish(&self, channel: &str, payload: &str) -> TestResult<i64> {
        let mut connection = self.connection().await?;
        Ok(redis::cmd("PUBLISH")
            .arg(channel)
            .arg(payload)
            .query_async(&mut connection)
            .await?)
    }
}
