//! The simulated cluster's certificates and etcd roles: a CA of its own; a server and
//! peer certificate per etcd member; a client certificate per host (CN = the host's
//! name), for the CLI (CN = `violin`) and for the administrator (CN = `root`). etcd
//! takes a client certificate's CN as the user, and each user's role lets it write
//! only its own keys.

use crate::config::EtcdTls;
use crate::store::Keys;
use anyhow::{Context, Result};
use etcd_client::{Client, Permission};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

/// The CLI's user (its certificate's CN).
pub const CLI_USER: &str = "violin";

/// A CA that signs the cluster's certificates, kept in `dir`.
pub struct Pki {
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    /// Makes a new CA in `dir` (`ca.pem`; its key stays in memory and in `ca.key`).
    pub fn create(dir: &Path, cluster: &str) -> Result<Pki> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.distinguished_name
            .push(DnType::CommonName, format!("violin cluster {cluster} CA"));
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate()?;
        let cert = p.self_signed(&key)?;
        write_private(&dir.join("ca.key"), &key.serialize_pem())?;
        std::fs::write(dir.join("ca.pem"), cert.pem())?;
        Ok(Pki {
            dir: dir.to_path_buf(),
            issuer: Issuer::new(p, key),
        })
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// A certificate for `name` (its CN) valid for the given addresses; `server`: also
    /// for serving TLS (etcd members), else a client's only.
    pub fn issue(&self, name: &str, ips: &[Ipv4Addr], server: bool) -> Result<EtcdTls> {
        let mut p =
            CertificateParams::new(ips.iter().map(|i| i.to_string()).collect::<Vec<String>>())?;
        p.distinguished_name.push(DnType::CommonName, name);
        p.use_authority_key_identifier_extension = true;
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        if server {
            p.extended_key_usages
                .push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        let key = KeyPair::generate()?;
        let cert = p.signed_by(&key, &self.issuer)?;
        let (c, k) = (
            self.dir.join(format!("{name}.pem")),
            self.dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem())?;
        write_private(&k, &key.serialize_pem())?;
        Ok(EtcdTls {
            ca: self.ca(),
            cert: c,
            key: k,
        })
    }
}

/// Writes a file only its owner may read.
fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

fn random_password() -> Result<String> {
    use std::io::Read;
    let mut b = [0u8; 18];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Creates the users and roles (as the administrator, before auth is on), then turns
/// authentication on: `root` may do anything; host `h` reads `config/` and the hosts'
/// statuses (a migration's source reads where its target listens) and writes only its
/// registration, liveness and status; the CLI reads everything and writes specs and
/// migration orders.
pub async fn enable_auth(c: &mut Client, cluster: &str, hosts: &[String]) -> Result<()> {
    let keys = Keys::new(cluster);
    c.role_add("root").await.context("adding role root")?;
    c.user_add("root", random_password()?, None).await?;
    c.user_grant_role("root", "root").await?;
    for h in hosts {
        let role = format!("host-{h}");
        c.role_add(role.as_str()).await?;
        for p in [
            Permission::read(keys.config()).with_prefix(),
            Permission::read(keys.statuses()).with_prefix(),
            Permission::read_write(keys.host(h)),
            Permission::read_write(keys.alive(h)),
            Permission::read_write(keys.status(h)),
        ] {
            c.role_grant_permission(role.as_str(), p).await?;
        }
        c.user_add(h.as_str(), random_password()?, None).await?;
        c.user_grant_role(h.as_str(), role.as_str()).await?;
    }
    c.role_add("cli").await?;
    for p in [
        Permission::read(keys.all()).with_prefix(),
        Permission::read_write(keys.specs()).with_prefix(),
        Permission::read_write(keys.migrations()).with_prefix(),
    ] {
        c.role_grant_permission("cli", p).await?;
    }
    c.user_add(CLI_USER, random_password()?, None).await?;
    c.user_grant_role(CLI_USER, "cli").await?;
    c.auth_enable()
        .await
        .context("turning etcd's authentication on")?;
    Ok(())
}
