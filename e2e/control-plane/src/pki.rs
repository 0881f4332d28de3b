//! A per-run PKI, as kubeadm would lay it out for one control plane: a CA,
//! kube-apiserver's serving certificate, client certificates minted on demand
//! (the certificate's CN is the user, its O the group), and the service-account
//! signing key.

use std::net::IpAddr;

use base64::Engine;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::error::Result;

/// A certificate and its private key, both PEM.
#[derive(Clone, Debug)]
pub struct CertPair {
    pub cert_pem: String,
    pub key_pem: String,
}

/// The run's certificate authority and the keys kube-apiserver is started with.
pub struct Pki {
    ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
    /// kube-apiserver's serving certificate.
    pub serving: CertPair,
    /// The service-account token signing key (private, PKCS#8 PEM).
    pub service_account_key_pem: String,
    /// Its public half, for `--service-account-key-file`.
    pub service_account_pub_pem: String,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki").finish_non_exhaustive()
    }
}

impl Pki {
    /// A fresh CA and a serving certificate valid for `ips` and the names the
    /// `kubernetes` Service is reached by.
    pub fn generate(ips: &[IpAddr]) -> Result<Self> {
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "planproxy e2e kubernetes CA");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);

        let serving_key = KeyPair::generate()?;
        let names = [
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ];
        let mut params = CertificateParams::new(names.map(str::to_owned).to_vec())?;
        params
            .subject_alt_names
            .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let serving_cert = params.signed_by(&serving_key, &issuer)?;

        let sa_key = KeyPair::generate()?;
        Ok(Pki {
            ca_pem: ca_cert.pem(),
            issuer,
            serving: CertPair {
                cert_pem: serving_cert.pem(),
                key_pem: serving_key.serialize_pem(),
            },
            service_account_key_pem: sa_key.serialize_pem(),
            service_account_pub_pem: sa_key.public_key_pem(),
        })
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// A client certificate for `user`, member of `group` if given (the API
    /// server reads the CN as the user name and the O as a group).
    pub fn client_cert(&self, user: &str, group: Option<&str>) -> Result<CertPair> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, user);
        if let Some(group) = group {
            params
                .distinguished_name
                .push(DnType::OrganizationName, group);
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(CertPair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// How a kubeconfig authenticates.
#[derive(Clone, Debug)]
pub enum Credentials {
    /// A client certificate.
    Cert(CertPair),
    /// A bearer token (a service account's).
    Token(String),
}

/// A kubeconfig (YAML) for `server` with the CA embedded.
pub fn kubeconfig(server: &str, ca_pem: &str, user: &str, credentials: &Credentials) -> String {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let user_entry = match credentials {
        Credentials::Cert(pair) => serde_json::json!({
            "client-certificate-data": b64(&pair.cert_pem),
            "client-key-data": b64(&pair.key_pem),
        }),
        Credentials::Token(token) => serde_json::json!({ "token": token }),
    };
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "planproxy-e2e", "cluster": {"server": server, "certificate-authority-data": b64(ca_pem)}}],
        "users": [{"name": user, "user": user_entry}],
        "contexts": [{"name": user, "context": {"cluster": "planproxy-e2e", "user": user, "namespace": "default"}}],
        "current-context": user,
    });
    serde_yaml::to_string(&config).unwrap_or_default()
}
