//! QEMU guests on a simulated cluster (root): real VMs (TCG here) attached to their
//! host's daemon through `-netdev stream|dgram` on their UNIX socket, beside netns guests.
//! Kept small: two tiny VMs.

mod common;

use common::*;
use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;
use std::time::{Duration, Instant};

/// One VM and one netns guest on two hosts; `vm_host` runs the VM.
fn spec(name: &str, vni: u32, vm_host: &str, n_host: &str, framing: &str, extra: &str) -> String {
    format!(
        r#"
name = "{name}"
vni = {vni}
[[guest]]
name = "vm"
host = "{vm_host}"
ip = "10.0.0.1/24"
kind = "qemu"
socket = "{framing}"
memory = "128mb"
{extra}
[[guest]]
name = "n"
host = "{n_host}"
ip = "10.0.0.2/24"
"#
    )
}

/// `violin exec` in a guest: (exit status, output).
fn exec(c: &Cluster, violin: &str, guest: &str, cmd: &[&str]) -> (i32, String) {
    let mut args = vec!["exec", violin, guest, "--"];
    args.extend_from_slice(cmd);
    let o = c.cmd(&args);
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr),
    )
}

fn rx_packets(c: &Cluster, violin: &str) -> u64 {
    let (st, out) = exec(
        c,
        violin,
        "vm",
        &["cat", "/sys/class/net/eth0/statistics/rx_packets"],
    );
    assert_eq!(st, 0, "{out}");
    out.trim().parse().unwrap_or_else(|_| panic!("{out:?}"))
}

fn c_run_dir(c: &Cluster) -> String {
    c.run_dir.join(&c.name).display().to_string()
}

fn vm_pids() -> Vec<(i32, u32)> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            let uid = status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))?
                .split_whitespace()
                .next()?
                .parse()
                .ok()?;
            String::from_utf8_lossy(&cmd)
                .contains("process=violin-vm")
                .then_some((pid, uid))
        })
        .collect()
}

/// QEMUs of this cluster whose command line also contains `part`: (pid, uid).
fn cluster_vms(c: &Cluster, part: &str) -> Vec<(i32, u32)> {
    let dir = c_run_dir(c);
    vm_pids()
        .into_iter()
        .filter(|(p, _)| {
            std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|cmd| {
                let cmd = String::from_utf8_lossy(&cmd);
                cmd.contains(&dir) && cmd.contains(part)
            })
        })
        .collect()
}

#[test]
fn a_vm_and_a_netns_guest_talk_and_a_vm_in_red_sees_nothing_of_blue() {
    if !can_run() {
        return;
    }
    let c = Cluster::up(2, "xdp", &[]);
    let before: Vec<i32> = vm_pids().iter().map(|p| p.0).collect();
    let t0 = Instant::now();
    // Blue's VM gets a disk image too: an ext4 filesystem with a marker file.
    struct RmDir(std::path::PathBuf);
    impl Drop for RmDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let dir = std::env::temp_dir().join(format!("violin-disk-{}", c.name));
    let _rm = RmDir(dir.clone());
    std::fs::create_dir_all(dir.join("content")).unwrap();
    std::fs::write(dir.join("content/marker"), "from-the-disk\n").unwrap();
    let img = dir.join("disk.img");
    let o = std::process::Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-d"])
        .arg(dir.join("content"))
        .arg(&img)
        .arg("8M")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let image = format!("image = \"{}\"", img.display());
    c.up_spec(
        "blue.toml",
        &spec("blue", 101, "h1", "h2", "stream", &image),
    );
    // Red's VM boots its disk's own userland: the default initramfs configures the
    // network, then switches root to /dev/vda, whose /sbin/init is the disk's.
    let root = dir.join("root");
    std::fs::create_dir_all(&root).unwrap();
    let initramfs = violin_dp::host::vm::image_dir(&[]).join("initramfs.cpio.gz");
    let o = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "gzip -dc {} | cpio -idm --quiet",
            initramfs.display()
        ))
        .current_dir(&root)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::create_dir_all(root.join("sbin")).unwrap();
    std::fs::write(
        root.join("sbin/init"),
        "#!/bin/sh\nmount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev\n\
         mkdir -p /dev/pts; mount -t devpts devpts /dev/pts; mount -t tmpfs tmp /tmp\n\
         echo disk > /etc/booted-from\n\
         ( while :; do /bin/violin-agent; sleep 0.2; done ) &\n\
         while :; do setsid cttyhack sh -l; sleep 0.2; done\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        root.join("sbin/init"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let root_img = dir.join("root.img");
    let o = std::process::Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-d"])
        .arg(&root)
        .arg(&root_img)
        .arg("64M")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::set_permissions(&root_img, std::fs::Permissions::from_mode(0o644)).unwrap();
    let boot_disk = format!(
        "image = \"{}\"\nappend = \"violin.root=/dev/vda\"",
        root_img.display()
    );
    c.up_spec(
        "red.toml",
        &spec("red", 102, "h2", "h1", "dgram", &boot_disk),
    );
    let (st, out) = exec(&c, "red", "vm", &["cat", "/etc/booted-from"]);
    assert_eq!(
        (st, out.trim()),
        (0, "disk"),
        "red's VM runs its disk's userland"
    );
    let (st, out) = exec(&c, "blue", "vm", &["cat", "/mnt/disk/marker"]);
    assert_eq!(
        (st, out.trim()),
        (0, "from-the-disk"),
        "the disk image is the VM's /dev/vda"
    );
    eprintln!("two VMs booted in {:.1} s", t0.elapsed().as_secs_f64());
    let ls = c.ok(&["ls"]);
    assert!(ls.contains("blue") && ls.contains("red"), "{ls}");

    // QEMU runs unprivileged, under TCG here (the PVM /dev/kvm takes no stock guests).
    let vms: Vec<(i32, u32)> = vm_pids()
        .into_iter()
        .filter(|(p, _)| !before.contains(p))
        .collect();
    assert_eq!(vms.len(), 2, "{vms:?}");
    // Each as the first uid of its guest's own range: no VM can signal or trace another.
    let mut expected: Vec<u32> = [("blue", "h1"), ("red", "h2")]
        .iter()
        .map(|(v, host)| {
            let key = violin_dp::host::vm::uid_key(&c.guest_ns(v, "vm"), host);
            violin_dp::host::uids::lookup(&key).unwrap_or_else(|| panic!("{v}'s VM has no uids"))
        })
        .collect();
    let mut uids: Vec<u32> = vms.iter().map(|(_, uid)| *uid).collect();
    expected.sort();
    uids.sort();
    assert_eq!(uids, expected, "QEMU's uids: {vms:?}");
    assert!(expected[0] != expected[1] && expected[0] >= 0x8_0000);
    let s = c.stats("blue");
    let vm = s
        .hosts
        .iter()
        .flat_map(|h| &h.ports)
        .find(|p| p.name == "vm")
        .unwrap();
    assert!(vm.accel.is_some(), "the accelerator is reported");

    // Both ways, in both Violins, with the same addresses.
    for v in ["blue", "red"] {
        let (st, out) = exec(&c, v, "vm", &["ping", "-c", "3", "-W", "2", "10.0.0.2"]);
        assert_eq!(st, 0, "{v}: vm → n: {out}");
        assert!(c.ping(v, "n", "10.0.0.1", 3), "{v}: n → vm");
    }
    let (st, out) = exec(&c, "blue", "vm", &["sh", "-c", "hostname; exit 7"]);
    assert_eq!(
        (st, out.trim()),
        (7, "vm"),
        "exit status and output come back"
    );
    c.assert_dataplane("blue", "xdp");

    // Blue floods broadcasts at its VM; red's VM, same IP and subnet, sees none of it.
    let (blue0, red0) = (rx_packets(&c, "blue"), rx_packets(&c, "red"));
    udp_send(&c.guest_ns("blue", "n"), "10.0.0.255:9", 200, 100, true);
    std::thread::sleep(Duration::from_millis(300));
    let (blue1, red1) = (rx_packets(&c, "blue"), rx_packets(&c, "red"));
    assert!(
        blue1 - blue0 >= 100,
        "blue's VM got {} of 100 broadcasts",
        blue1 - blue0
    );
    assert!(
        red1 - red0 <= 2,
        "red's VM received {} frames while blue flooded",
        red1 - red0
    );

    // The serial console: a shell on ttyS0.
    let mut con = c
        .command(&["console", "red", "vm"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = con.stdin.take().unwrap();
    stdin.write_all(b"\necho console-$((40+2))\n").unwrap();
    let mut lines = BufReader::new(con.stdout.take().unwrap()).lines();
    let saw = lines.any(|l| l.is_ok_and(|l| l.trim_end() == "console-42"));
    assert!(saw, "the console ran the command");
    stdin.write_all(&[0x1d]).unwrap();
    assert!(con.wait().unwrap().success());

    // h2's daemon crashes and restarts: red's VM (dgram: nothing to reconnect) keeps
    // running, the new daemon takes it over, and blue's n (a netns guest) its tap. The
    // new daemon would start red's VM with another command line (another TSC rate, as
    // after a frequency change): it takes the VM over all the same, by its pidfile.
    let uptime = |c: &Cluster| -> f64 {
        let (st, out) = exec(c, "red", "vm", &["cut", "-d", " ", "-f1", "/proc/uptime"]);
        assert_eq!(st, 0, "{out}");
        out.trim().parse().unwrap()
    };
    let red_qemu = |c: &Cluster| -> Vec<i32> {
        cluster_vms(c, "/h2/vms/red/")
            .into_iter()
            .map(|(p, _)| p)
            .collect()
    };
    let (before, pids) = (uptime(&c), red_qemu(&c));
    assert_eq!(pids.len(), 1, "{pids:?}");
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", pids[0])).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline);
    assert!(
        cmdline.contains("tsc_early_khz=") && !cmdline.contains("tsc_early_khz=1234567"),
        "{cmdline}"
    );
    let o = c
        .command(&["cluster", "restart", "h2", "--hard"])
        .env("VIOLIN_TSC_KHZ", "1234567")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(red_qemu(&c), pids, "red's QEMU was replaced");
    assert!(c
        .host_log("h2")
        .contains("VM still running: taking it over"));
    let after = uptime(&c);
    assert!(
        after > before,
        "red's VM rebooted: uptime {before} → {after}"
    );
    assert!(
        c.ping("red", "n", "10.0.0.1", 3),
        "red: n → vm after the restart"
    );
    let (st, out) = exec(&c, "red", "vm", &["ping", "-c", "2", "-W", "2", "10.0.0.2"]);
    assert_eq!(st, 0, "red: vm → n after the restart: {out}");

    // Down removes the VMs (also the one taken over).
    c.ok(&["down", "blue"]);
    c.ok(&["down", "red"]);
    let t = Instant::now();
    while vm_pids().iter().any(|(p, _)| vms.iter().any(|v| v.0 == *p)) {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "QEMU still running after down"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_vm_live_migrates_to_another_host_while_a_peer_pings_it() {
    if !can_run() {
        return;
    }
    // Through etcd: the two hosts' daemons move the VM's state over TCP between them.
    let c = Cluster::up_etcd(3, "udp", &[]);
    // This VM boots an image with an extra Debian package (built once, then cached).
    let pk = "packages = [\"iperf3\"]\ncpus = 1";
    c.up_spec("blue.toml", &spec("blue", 101, "h1", "h2", "stream", pk));
    let (st, out) = exec(&c, "blue", "vm", &["iperf3", "--version"]);
    assert!(st == 0 && out.starts_with("iperf 3"), "{out}");
    // State that only a live migration keeps: a file in the VM's RAM.
    let (st, out) = exec(
        &c,
        "blue",
        "vm",
        &["sh", "-c", "echo kept-$$ > /tmp/state; cat /tmp/state"],
    );
    assert_eq!(st, 0, "{out}");
    let state = out.trim().to_string();
    let out = c.ok(&["migrate", "blue", "vm", "--to", "h3", "--json"]);
    let m: serde_json::Value = serde_json::from_str(&out).unwrap();
    eprintln!("VM migration: {m}");
    assert_eq!(m["probed_from"], "n");
    assert_eq!(m["resumed"], true, "{m}");
    assert!(m["outage_ms"].as_f64().unwrap() < 1000.0, "{m}");
    assert!(
        m["vm_downtime_ms"].as_u64().is_some(),
        "QEMU reports its downtime: {m}"
    );
    // The same VM, now on h3.
    let (st, out) = exec(&c, "blue", "vm", &["cat", "/tmp/state"]);
    assert_eq!(
        (st, out.trim()),
        (0, state.as_str()),
        "the VM's memory came along"
    );
    let s = c.stats("blue");
    let hosts: Vec<&str> = s
        .hosts
        .iter()
        .filter(|h| h.ports.iter().any(|p| p.name == "vm"))
        .map(|h| h.host.as_str())
        .collect();
    assert_eq!(hosts, vec!["h3"]);
    assert!(
        c.ping("blue", "n", "10.0.0.1", 3),
        "n reaches the VM on its new host"
    );
    let (st, out) = exec(
        &c,
        "blue",
        "vm",
        &["ping", "-c", "2", "-W", "2", "10.0.0.2"],
    );
    assert_eq!(st, 0, "{out}");
    // Nothing left on h1.
    let h1 = c.run_dir.join(&c.name).join("h1");
    assert!(
        !h1.join("vms").join("blue").join("vm").exists(),
        "h1 kept the VM's directory"
    );
    let key = |host| violin_dp::host::vm::uid_key(&c.guest_ns("blue", "vm"), host);
    assert!(
        violin_dp::host::uids::lookup(&key("h1")).is_none(),
        "h1 kept the VM's uid range"
    );
    assert!(
        violin_dp::host::uids::lookup(&key("h3")).is_some(),
        "the VM on h3 has no uid range"
    );
    let left = cluster_vms(&c, "");
    assert_eq!(left.len(), 1, "exactly one QEMU for the VM: {left:?}");
    let uid = left.first().map(|(_, u)| *u);
    assert_eq!(
        uid,
        violin_dp::host::uids::lookup(&key("h3")),
        "QEMU's uid on h3"
    );
}

#[test]
fn a_vm_that_does_not_boot_fails_up_with_its_console_line_and_leaves_nothing() {
    if !can_run() {
        return;
    }
    let c = Cluster::up(1, "udp", &[]);
    // The default kernel with an initrd that is no archive: the kernel panics (no root).
    let junk = c.write_spec("junk.img", &"not an initramfs\n".repeat(512));
    let kernel = violin_dp::host::vm::image_dir(&[]).join("vmlinux");
    let boot = format!("kernel = \"{}\"\ninitrd = \"{junk}\"", kernel.display());
    let spec = c.write_spec("blue.toml", &spec("blue", 101, "h1", "h1", "stream", &boot));
    let t0 = Instant::now();
    let o = c.cmd(&["up", &spec]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "up succeeded: {err}");
    assert!(err.contains("guest vm@h1 did not boot"), "{err}");
    assert!(err.contains("Kernel panic - not syncing"), "{err}");
    assert!(err.contains("console.log"), "{err}");
    eprintln!("up failed after {:.1} s", t0.elapsed().as_secs_f64());
    // Well before the attach timeout, and nothing is left: no QEMU, no VM directory.
    assert!(t0.elapsed() < Duration::from_secs(60));
    let left = cluster_vms(&c, "");
    assert!(left.is_empty(), "QEMU left running: {left:?}");
    let vms = c.run_dir.join(&c.name).join("h1/vms/blue/vm");
    assert!(!vms.exists(), "{} is left", vms.display());
    assert!(!c.ok(&["ls"]).contains("blue"));
}
