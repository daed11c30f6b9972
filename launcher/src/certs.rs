//! `launch certs`: a CA and one certificate per host for TLS on the control plane
//! (`cluster.tls` on the head, `launch agent --tls-*` on the nodes).
//!
//! Every host's certificate serves both ends of a connection: the head's is the coordinator's
//! server certificate, and every node's (the head's too, for a run on one machine) is the
//! client certificate its agent and workers present. So each carries the host's name (a DNS
//! name or an IP address, as the other nodes dial it) and both the server and client uses.
//! Reading and checking the files is `tessera_proto::tls`'s job.

use std::fs;
use std::io::Write as _;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use crate::cli::CertsArgs;
use crate::exit::Failure;

/// The file names `launch certs` writes; a host may not be called so.
pub const CA_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";

/// How far back certificates are valid from: nodes' clocks may lag the machine that made them.
const CLOCK_SKEW: time::Duration = time::Duration::days(1);

/// What [`make`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub ca: PathBuf,
    pub ca_key: PathBuf,
    /// Each host with its certificate and key, in the order given.
    pub hosts: Vec<(String, PathBuf, PathBuf)>,
}

/// `launch certs`: makes the files and says how to use them.
pub fn run(args: &CertsArgs) -> Result<(), Failure> {
    let written = make(&args.out, &args.hosts, args.days, args.force)?;
    let out = args.out.display();
    let (head, _, _) = &written.hosts[0];
    println!(
        "wrote {out}/{CA_FILE}, {out}/{CA_KEY_FILE} (mode 0600: it signs certificates, keep it \
         off the cluster) and a certificate and key (mode 0600) for each of {} host{}: {}",
        written.hosts.len(),
        if written.hosts.len() == 1 { "" } else { "s" },
        written
            .hosts
            .iter()
            .map(|(host, _, _)| host.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "valid for {} days. To use them, if {head} is the head:",
        args.days
    );
    println!(
        "  head config: cluster: {{tls: {{ca: {out}/{CA_FILE}, cert: {out}/{head}.pem, key: \
         {out}/{head}-key.pem}}}}"
    );
    println!(
        "  each node:   launch agent --coordinator {head}:29400 --tls-ca {out}/{CA_FILE} \
         --tls-cert {out}/NODE.pem --tls-key {out}/NODE-key.pem"
    );
    Ok(())
}

/// Writes a new CA and a certificate for each of `hosts`, valid for `days`, into `out`
/// (created if missing; a non-empty one only with `force`, replacing files of the same names).
pub fn make(out: &Path, hosts: &[String], days: u32, force: bool) -> Result<Written, Failure> {
    let hosts = check_hosts(hosts)?;
    if days == 0 {
        return Err(Failure::usage(
            "--days 0 makes certificates that are never valid; give 1 or more (default 365)",
        ));
    }
    prepare(out, force)?;
    let now = time::OffsetDateTime::now_utc();
    let (not_before, not_after) = (now - CLOCK_SKEW, now + time::Duration::days(days.into()));
    let failed =
        |what: &str, e: rcgen::Error| Failure::Runtime(anyhow::anyhow!("cannot make {what}: {e}"));

    let ca_key = KeyPair::generate().map_err(|e| failed("the CA's key", e))?;
    let mut ca = CertificateParams::default();
    // Named apart from every other CA (by its key): a certificate of another one is then an
    // unknown issuer, not a bad signature of a CA of the same name.
    let id: String = ca.key_identifier(&ca_key)[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    ca.distinguished_name = DistinguishedName::new();
    ca.distinguished_name
        .push(DnType::CommonName, format!("tessera control-plane CA {id}"));
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.not_before = not_before;
    ca.not_after = not_after;
    let ca_cert = ca
        .self_signed(&ca_key)
        .map_err(|e| failed("the CA's certificate", e))?;
    let written_ca = out.join(CA_FILE);
    let written_ca_key = out.join(CA_KEY_FILE);
    write(&written_ca, &ca_cert.pem(), 0o644)?;
    write(&written_ca_key, &ca_key.serialize_pem(), 0o600)?;
    let issuer = Issuer::new(ca, ca_key);

    let mut written = Vec::new();
    for (host, names) in hosts {
        let key = KeyPair::generate().map_err(|e| failed(&format!("{host}'s key"), e))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, host.as_str());
        params.subject_alt_names = names;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(|e| failed(&format!("{host}'s certificate"), e))?;
        let cert_path = out.join(format!("{host}.pem"));
        let key_path = out.join(format!("{host}-key.pem"));
        write(&cert_path, &cert.pem(), 0o644)?;
        write(&key_path, &key.serialize_pem(), 0o600)?;
        written.push((host, cert_path, key_path));
    }
    Ok(Written {
        ca: written_ca,
        ca_key: written_ca_key,
        hosts: written,
    })
}

/// Each host with the names its certificate carries: itself (`localhost` also 127.0.0.1 and
/// ::1, which a run on one machine dials).
fn check_hosts(hosts: &[String]) -> Result<Vec<(String, Vec<SanType>)>, Failure> {
    if hosts.is_empty() {
        return Err(Failure::usage(
            "--hosts is empty; list the head and every node as the others reach them, e.g. \
             --hosts head,node1 (or localhost for a run on one machine)",
        ));
    }
    let mut checked: Vec<(String, Vec<SanType>)> = Vec::new();
    for host in hosts {
        let host = host.trim();
        let names = if let Ok(ip) = host.parse::<IpAddr>() {
            vec![SanType::IpAddress(ip)]
        } else {
            if rustls::pki_types::DnsName::try_from(host).is_err() || host.contains('*') {
                return Err(Failure::usage(format!(
                    "--hosts: `{host}` is neither a host name (letters, digits, `-` and `.`) nor \
                     an IP address; give each host as the other nodes reach it"
                )));
            }
            let dns = SanType::DnsName(host.try_into().map_err(|e| {
                Failure::usage(format!(
                    "--hosts: `{host}` cannot be a certificate name: {e}"
                ))
            })?);
            if host.eq_ignore_ascii_case("localhost") {
                vec![
                    dns,
                    SanType::IpAddress(IpAddr::from([127, 0, 0, 1])),
                    SanType::IpAddress(std::net::Ipv6Addr::LOCALHOST.into()),
                ]
            } else {
                vec![dns]
            }
        };
        if [CA_FILE, CA_KEY_FILE].contains(&format!("{host}.pem").as_str()) {
            return Err(Failure::usage(format!(
                "--hosts: a host called `{host}` would overwrite {CA_FILE} or {CA_KEY_FILE}; \
                 name it by another of its names"
            )));
        }
        if checked.iter().any(|(h, _)| h.eq_ignore_ascii_case(host)) {
            return Err(Failure::usage(format!("--hosts lists {host} twice")));
        }
        checked.push((host.to_string(), names));
    }
    Ok(checked)
}

/// Creates `out` (mode 0700) or checks that it may be written into.
fn prepare(out: &Path, force: bool) -> Result<(), Failure> {
    let shown = out.display();
    match fs::read_dir(out) {
        Ok(entries) => {
            let mut names: Vec<String> = entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            if !names.is_empty() && !force {
                let listed = if names.len() > 4 {
                    format!("{}, ...", names[..4].join(", "))
                } else {
                    names.join(", ")
                };
                return Err(Failure::usage(format!(
                    "--out {shown} is not empty ({listed}); give a new directory, or --force to \
                     replace the files of the same names (a new CA: certificates it does not \
                     replace stop working with it)"
                )));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(out)
            .map_err(|e| Failure::usage(format!("cannot create --out {shown}: {e}"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => Err(Failure::usage(format!(
            "--out {shown} is a file; give a directory for the certificates"
        ))),
        Err(e) => Err(Failure::usage(format!("cannot read --out {shown}: {e}"))),
    }
}

/// Writes `text` to `path` with `mode` (also when the file existed with another one).
fn write(path: &Path, text: &str, mode: u32) -> Result<(), Failure> {
    let failed = |e: std::io::Error| {
        Failure::Runtime(anyhow::anyhow!("cannot write {}: {e}", path.display()))
    };
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(failed)?;
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(failed)?;
    file.write_all(text.as_bytes()).map_err(failed)?;
    file.sync_all().map_err(failed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_proto::tls::{Setting, Tls, TlsFiles};

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tessera-certs-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn hosts(list: &[&str]) -> Vec<String> {
        list.iter().map(|h| h.to_string()).collect()
    }

    fn files(written: &Written, index: usize) -> TlsFiles {
        let (_, cert, key) = &written.hosts[index];
        TlsFiles {
            ca: written.ca.clone(),
            cert: cert.clone(),
            key: key.clone(),
            setting: Setting::Config,
        }
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn each_host_gets_a_certificate_of_the_ca_for_its_own_names_and_keys_are_private() {
        let dir = scratch("names");
        let written = make(
            &dir,
            &hosts(&["node-1.cluster", "10.1.2.3", "localhost"]),
            30,
            false,
        )
        .unwrap();
        assert_eq!(written.ca, dir.join("ca.pem"));
        assert_eq!(written.hosts[1].1, dir.join("10.1.2.3.pem"));
        assert_eq!(written.hosts[1].2, dir.join("10.1.2.3-key.pem"));
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&written.ca_key), 0o600);
        assert_eq!(mode(&written.ca), 0o644);
        for (_, cert, key) in &written.hosts {
            assert_eq!(mode(key), 0o600, "{}", key.display());
            assert_eq!(mode(cert), 0o644, "{}", cert.display());
        }
        let node = Tls::load(&files(&written, 0)).unwrap();
        node.check_server_name("node-1.cluster", "the agents")
            .unwrap();
        let error = node
            .check_server_name("node-2.cluster", "the agents")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("is not valid for node-2.cluster, the address the agents reach"),
            "{error}"
        );
        let ip = Tls::load(&files(&written, 1)).unwrap();
        ip.check_server_name("10.1.2.3", "the agents").unwrap();
        assert!(ip.check_server_name("10.1.2.4", "the agents").is_err());
        let local = Tls::load(&files(&written, 2)).unwrap();
        for name in ["localhost", "127.0.0.1", "::1"] {
            local
                .check_server_name(name, "this machine's workers")
                .unwrap();
        }
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_directory_with_files_is_kept_unless_forced_and_bad_hosts_are_named() {
        let dir = scratch("force");
        let first = make(&dir, &hosts(&["a"]), 1, false).unwrap();
        let before = fs::read_to_string(&first.ca).unwrap();
        let error = make(&dir, &hosts(&["a"]), 1, false)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("is not empty (a-key.pem, a.pem, ca-key.pem, ca.pem)")
                && error.contains("--force"),
            "{error}"
        );
        assert_eq!(fs::read_to_string(&first.ca).unwrap(), before, "untouched");
        // Forced: a new CA, whose certificates work with it.
        let second = make(&dir, &hosts(&["a"]), 1, true).unwrap();
        assert_ne!(fs::read_to_string(&second.ca).unwrap(), before);
        Tls::load(&files(&second, 0)).unwrap();

        for (bad, expected) in [
            ("no/slash", "is neither a host name"),
            ("*.wild", "is neither a host name"),
            ("ca", "would overwrite ca.pem"),
        ] {
            let error = make(&scratch("bad"), &hosts(&[bad]), 1, false)
                .unwrap_err()
                .to_string();
            assert!(error.contains(expected), "{bad}: {error}");
        }
        let error = make(&scratch("twice"), &hosts(&["a", "A"]), 1, false)
            .unwrap_err()
            .to_string();
        assert!(error.contains("lists A twice"), "{error}");
        let error = make(&scratch("days"), &hosts(&["a"]), 0, false)
            .unwrap_err()
            .to_string();
        assert!(error.contains("--days 0"), "{error}");
        let _ = fs::remove_dir_all(&dir);
    }
}
