//! The deploy/ files for real: deploy/slurm's sbatch script trains the tiny job under a Slurm
//! installed and started on this machine (slurmctld and slurmd, one node), and deploy/k8s's
//! manifests pass Kubernetes' schemas. Each installs what it needs (Debian's slurm-wlm; the
//! kubernetes-validate Python package into target/tmp); the Slurm test needs root and says it
//! skipped without it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("launcher/ has a parent")
        .to_path_buf()
}

fn succeeds(command: &mut Command) -> bool {
    command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn root() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    // /proc/self belongs to the process's effective user.
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// Slurm's daemons for one test, stopped on drop.
struct Slurm {
    dir: PathBuf,
    daemons: Vec<Child>,
}

impl Slurm {
    fn start() -> Slurm {
        if !succeeds(Command::new("sh").args(["-c", "command -v sbatch && command -v slurmd"])) {
            let installed = Command::new("apt-get")
                .args(["install", "-y", "-q", "slurm-wlm"])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .output()
                .expect("apt-get runs");
            assert!(
                installed.status.success(),
                "cannot install slurm-wlm: {}",
                String::from_utf8_lossy(&installed.stderr)
            );
        }
        // munged authenticates every Slurm message; it runs as the munge user.
        let _ = std::fs::create_dir_all("/run/munge");
        let _ = Command::new("chown")
            .args(["munge:munge", "/run/munge"])
            .status();
        if !succeeds(Command::new("pgrep").arg("-x").arg("munged")) {
            assert!(
                succeeds(Command::new("runuser").args(["-u", "munge", "--", "/usr/sbin/munged"])),
                "cannot start munged"
            );
        }
        let dir = std::env::temp_dir().join(format!("tessera-slurm-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["state", "spool"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        let host = nix::unistd::gethostname().unwrap().into_string().unwrap();
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let port = 17_000 + (std::process::id() % 1000) as u16 * 2;
        let d = dir.display();
        let conf = format!(
            "ClusterName=tesseratest\nSlurmctldHost={host}\nSlurmctldPort={port}\n\
             SlurmdPort={}\nAuthType=auth/munge\nStateSaveLocation={d}/state\n\
             SlurmdSpoolDir={d}/spool\nSlurmctldPidFile={d}/slurmctld.pid\n\
             SlurmdPidFile={d}/slurmd.pid\nSlurmctldLogFile={d}/slurmctld.log\n\
             SlurmdLogFile={d}/slurmd.log\nProctrackType=proctrack/linuxproc\n\
             TaskPlugin=task/none\nSelectType=select/cons_tres\nSelectTypeParameters=CR_Core\n\
             ReturnToService=2\nSlurmUser=root\nSlurmdUser=root\nMpiDefault=none\n\
             NodeName={host} CPUs={cpus} State=UNKNOWN\n\
             PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP\n",
            port + 1
        );
        std::fs::write(dir.join("slurm.conf"), conf).unwrap();
        let conf = dir.join("slurm.conf");
        let daemons = ["slurmctld", "slurmd"]
            .iter()
            .map(|daemon| {
                Command::new(daemon)
                    .arg("-D")
                    .arg("-f")
                    .arg(&conf)
                    .env("SLURM_CONF", &conf)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap_or_else(|e| panic!("cannot start {daemon}: {e}"))
            })
            .collect();
        let slurm = Slurm { dir, daemons };
        let start = Instant::now();
        while !slurm.node_idle() {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "the Slurm node never came up: {}",
                std::fs::read_to_string(slurm.dir.join("slurmd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        slurm
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command.env("SLURM_CONF", self.dir.join("slurm.conf"));
        command
    }

    fn node_idle(&self) -> bool {
        self.command("sinfo")
            .args(["-h", "-o", "%t"])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "idle")
    }
}

impl Drop for Slurm {
    fn drop(&mut self) {
        for daemon in &mut self.daemons {
            let _ = daemon.kill();
            let _ = daemon.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn the_slurm_script_trains_the_tiny_job_through_sbatch_in_plain_text_and_over_tls() {
    if !root() {
        eprintln!("skipped: starting slurmctld and slurmd needs root");
        return;
    }
    let slurm = Slurm::start();
    let port = 29_000 + (std::process::id() % 400) as u16;
    // The node as Slurm names it (and as the agents dial the head).
    let host = nix::unistd::gethostname().unwrap().into_string().unwrap();
    let certs = slurm.dir.join("certs");
    let made = Command::new(env!("CARGO_BIN_EXE_launch"))
        .arg("certs")
        .arg("--out")
        .arg(&certs)
        .args(["--hosts", &host])
        .output()
        .expect("launch certs runs");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    for tls in [false, true] {
        let output = slurm.dir.join(format!("job-{tls}.out"));
        let mut sbatch = slurm.command("sbatch");
        sbatch
            .arg("--wait")
            .arg(format!("--output={}", output.display()))
            .arg(format!("--chdir={}", repo().display()))
            .arg("deploy/slurm/tessera.sbatch")
            .arg("configs/tiny-cpu.yaml")
            .args(["--set", "parallel.data=2", "--set", "parallel.tensor=1"])
            .args([
                "--set",
                "parallel.pipeline=1",
                "--set",
                "cluster.gpus_per_node=2",
            ])
            .args(["--set", "training.steps=3", "--threads", "1"])
            .arg("--set")
            .arg(format!(
                "checkpoint.dir={}",
                slurm.dir.join(format!("ckpt-{tls}")).display()
            ))
            .current_dir(repo())
            .env("TESSERA_LAUNCH", env!("CARGO_BIN_EXE_launch"))
            .env("TESSERA_PORT", port.to_string())
            .env_remove("TESSERA_TOKEN")
            .env_remove("TESSERA_TLS_CA")
            .env_remove("TESSERA_TLS_CERT")
            .env_remove("TESSERA_TLS_KEY");
        if tls {
            sbatch.env("TESSERA_TLS_DIR", &certs);
        } else {
            sbatch.env_remove("TESSERA_TLS_DIR");
        }
        let out = sbatch.output().expect("sbatch runs");
        let log = std::fs::read_to_string(&output).unwrap_or_default();
        assert!(
            out.status.success(),
            "tls {tls}: {}\n{log}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            log.contains("node 0 of 1"),
            "an agent started by srun: {log}"
        );
        assert!(log.contains("done: 3 steps on 2 ranks"), "{log}");
        assert_eq!(
            log.contains("warning: cluster.tls is not set"),
            !tls,
            "{log}"
        );
        assert!(!log.contains("refused a connection"), "{log}");
    }
}

/// `kubernetes-validate` in a venv under target/tmp, installed on first use.
fn validator() -> PathBuf {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("k8s-venv");
    let tool = venv.join("bin").join("kubernetes-validate");
    if !tool.exists() {
        assert!(
            succeeds(Command::new("python3").arg("-m").arg("venv").arg(&venv)),
            "cannot make a Python venv in {}",
            venv.display()
        );
        let out = Command::new(venv.join("bin").join("pip"))
            .args(["install", "-q", "kubernetes-validate==1.37.0"])
            .output()
            .expect("pip runs");
        assert!(
            out.status.success(),
            "cannot install kubernetes-validate: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    tool
}

#[test]
fn the_kubernetes_manifests_pass_the_schemas_and_a_broken_one_does_not() {
    let tool = validator();
    let manifest = repo().join("deploy/k8s/tessera.yaml");
    let out = Command::new(&tool)
        .arg("--strict")
        .arg(&manifest)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for resource in ["secret/tessera-token", "service/tessera", "job/tessera"] {
        assert!(
            report.contains(&format!("passed for resource {resource}")),
            "{report}"
        );
    }
    // The validator must be able to say no: a misspelled field fails it.
    let broken = Path::new(env!("CARGO_TARGET_TMPDIR")).join("broken-tessera.yaml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(&broken, text.replace("completionMode:", "completionMod:")).unwrap();
    let out = Command::new(&tool)
        .arg("--strict")
        .arg(&broken)
        .output()
        .unwrap();
    assert!(!out.status.success(), "a broken manifest passed");
}
