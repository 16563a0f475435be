//! Certificates made at test time (rcgen): a CA, a server certificate for 127.0.0.1 and
//! localhost, a client certificate, and the broken ones (another CA, a wrong name, expired),
//! written as PEM files into a temporary directory removed on drop.

use std::path::PathBuf;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

pub struct Pki {
    pub dir: PathBuf,
    /// The CA that signs everything below but `other_*`.
    pub ca: PathBuf,
    /// Server certificate and key for `127.0.0.1` and `localhost`.
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// A second server pair (same names), for rotation.
    pub server2_cert: PathBuf,
    pub server2_key: PathBuf,
    /// Client certificate and key (mTLS).
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// A server pair signed by another CA, with that CA.
    pub other_ca: PathBuf,
    pub other_cert: PathBuf,
    pub other_key: PathBuf,
    /// A client pair signed by the other CA.
    pub other_client_cert: PathBuf,
    pub other_client_key: PathBuf,
    /// A server pair naming only `elsewhere.example`.
    pub wrong_name_cert: PathBuf,
    pub wrong_name_key: PathBuf,
    /// A server pair that expired in 2020.
    pub expired_cert: PathBuf,
    pub expired_key: PathBuf,
}

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    CertifiedIssuer::self_signed(p, KeyPair::generate().expect("key")).expect("CA")
}

/// A leaf certificate: (certificate PEM, key PEM).
fn leaf(
    issuer: &CertifiedIssuer<'static, KeyPair>,
    names: &[&str],
    client: bool,
    expired: bool,
) -> (String, String) {
    let mut p = CertificateParams::new(
        names
            .iter()
            .filter(|n| n.parse::<std::net::IpAddr>().is_err())
            .map(|n| n.to_string())
            .collect::<Vec<_>>(),
    )
    .expect("params");
    for n in names {
        if let Ok(ip) = n.parse() {
            p.subject_alt_names.push(SanType::IpAddress(ip));
        }
    }
    p.distinguished_name.push(DnType::CommonName, if client { "routerd" } else { names[0] });
    p.extended_key_usages = vec![if client {
        ExtendedKeyUsagePurpose::ClientAuth
    } else {
        ExtendedKeyUsagePurpose::ServerAuth
    }];
    if expired {
        p.not_before = rcgen::date_time_ymd(2019, 1, 1);
        p.not_after = rcgen::date_time_ymd(2020, 1, 1);
    }
    let key = KeyPair::generate().expect("key");
    let cert = p.signed_by(&key, issuer).expect("sign");
    (cert.pem(), key.serialize_pem())
}

impl Pki {
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("routerd-pki-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let write = |file: &str, text: &str| {
            let path = dir.join(file);
            std::fs::write(&path, text).expect("write PEM");
            path
        };
        let pair = |stem: &str, (cert, key): (String, String)| {
            (write(&format!("{stem}.pem"), &cert), write(&format!("{stem}.key"), &key))
        };
        let main = ca("routerd test CA");
        let other = ca("another CA");
        let here = ["127.0.0.1", "localhost"];
        let (server_cert, server_key) = pair("server", leaf(&main, &here, false, false));
        let (server2_cert, server2_key) = pair("server2", leaf(&main, &here, false, false));
        let (client_cert, client_key) = pair("client", leaf(&main, &["routerd"], true, false));
        let (other_cert, other_key) = pair("other", leaf(&other, &here, false, false));
        let (other_client_cert, other_client_key) =
            pair("other-client", leaf(&other, &["routerd"], true, false));
        let (wrong_name_cert, wrong_name_key) =
            pair("wrong-name", leaf(&main, &["elsewhere.example"], false, false));
        let (expired_cert, expired_key) = pair("expired", leaf(&main, &here, false, true));
        Self {
            ca: write("ca.pem", &main.pem()),
            other_ca: write("other-ca.pem", &other.pem()),
            dir,
            server_cert,
            server_key,
            server2_cert,
            server2_key,
            client_cert,
            client_key,
            other_cert,
            other_key,
            other_client_cert,
            other_client_key,
            wrong_name_cert,
            wrong_name_key,
            expired_cert,
            expired_key,
        }
    }

    /// A reqwest client that trusts this CA (and shows the client certificate when asked).
    pub fn client(&self, with_client_cert: bool) -> reqwest::Client {
        let ca = std::fs::read(&self.ca).expect("read CA");
        let mut b = reqwest::Client::builder()
            .no_proxy()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).expect("CA PEM"));
        if with_client_cert {
            let mut pem = std::fs::read(&self.client_cert).expect("read cert");
            pem.extend(std::fs::read(&self.client_key).expect("read key"));
            b = b.identity(reqwest::Identity::from_pem(&pem).expect("identity"));
        }
        b.build().expect("TLS client")
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
