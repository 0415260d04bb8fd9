//! The `postgres` check: the PostgreSQL cluster on the recovery point starts
//! (crash recovery replays its WAL), its tables and indexes pass `pg_amcheck`,
//! and the configured query returns what is expected.
//!
//! The disk's filesystems are mounted writable on the throwaway overlay (see
//! [`super::MountTree`]); the data directory is found at its source path on a
//! Linux root found on the disk, else under any suffix of that path on each
//! filesystem (`/var/lib/postgresql/15/main` is looked for as
//! `var/lib/postgresql/15/main`, `lib/postgresql/15/main`, ..., `main`), a
//! symlink in the image resolving inside the image, never on the host.
//!
//! The server is this node's own PostgreSQL of the data directory's major
//! version (`/usr/lib/postgresql/MAJOR/bin`, or `/usr/pgsql-MAJOR/bin`), run as
//! the host's `postgres` user with a minimal configuration of ours that
//! overrides whatever the data directory's `postgresql.auto.conf` says about
//! the network, archiving, replication, preloaded libraries and files outside
//! the data directory: it listens on a Unix socket only, archives and
//! restores nothing, does not fsync. It runs in a private mount namespace (a
//! private `/tmp` holding bind mounts of the mounted tree and of its socket
//! folder, so it needs no access to the drill's private folder) and, where
//! the host allows, a network namespace of its own.

use std::ffi::CString;
use std::fs::File;
use std::io::Write as _;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
use std::os::unix::io::AsRawFd as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use drmesh_topology::DrillPostgres;

use super::{kill_group, mount_tree, nap, netns_available, normalize, read_log_tail, resolve_in, run_tool, status_text, Disk, MountTree, Outcome, Ran, SpawnError};
use crate::mounts::run;

/// The port of the server's socket name (`.s.PGSQL.5432`); nothing listens on TCP.
const PORT: &str = "5432";
/// Where the server sees its socket folder and configuration (in its namespace).
const NS_PG: &str = "/tmp/pg";
/// Where the server sees `work/root`.
const NS_ROOT: &str = "/tmp/root";
/// Where the server sees `work/more`.
const NS_MORE: &str = "/tmp/more";
/// How long a fast shutdown may take before the server is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// The database superuser the checks connect as (the bootstrap superuser of
/// Debian's and the PGDG packages' clusters).
const SUPERUSER: &str = "postgres";

/// A failure: its summary; the output gathered so far goes with it.
type Failed = String;

/// Starts the PostgreSQL cluster of `cfg.path` on the disk, after crash
/// recovery; fails when it does not start (the log's PANIC or FATAL line is
/// the summary), when `pg_amcheck --all` finds corruption, when the query
/// fails, or when its result (trimmed) differs from `cfg.expect`. The output
/// ends with the line `query result: VALUE` when a query ran. The server is
/// stopped (fast shutdown, then SIGKILL) and everything unmounted before this
/// returns.
pub fn postgres(disk: &Disk, cfg: &DrillPostgres, deadline: Instant) -> Outcome {
    let mut output = String::new();
    let result = check(disk, cfg, deadline, &mut output);
    match result {
        Ok(summary) => Outcome::pass(summary, &output),
        Err(summary) => Outcome::fail(summary, &output),
    }
}

/// The host's `postgres` user: uid, primary gid, all its groups.
struct PgUser {
    uid: u32,
    gid: u32,
    groups: Vec<u32>,
}

fn pg_user() -> Option<PgUser> {
    let num = |flag: &str| run(Command::new("id").arg(flag).arg(SUPERUSER)).ok();
    let uid = num("-u")?.parse().ok()?;
    let gid = num("-g")?.parse().ok()?;
    let groups = num("-G")?.split_whitespace().filter_map(|g| g.parse().ok()).collect();
    Some(PgUser { uid, gid, groups })
}

/// Where `path` (as the source server saw it) is on the mounted tree, if
/// `want` accepts it: at its place under the Linux root, else at a suffix of
/// it on a filesystem whose mount point on the source is not known.
fn locate(tree: &MountTree, path: &str, want: &dyn Fn(&Path) -> bool) -> Option<(PathBuf, String)> {
    let path = normalize(path);
    if tree.has_root_fs {
        if let Ok(Some(p)) = resolve_in(&tree.root, &path) {
            if want(&p) {
                return Some((p, format!("{path} on the recovery point's root filesystem")));
            }
        }
    }
    let parts: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    for m in tree.mounts.iter().filter(|m| m.source_point.is_none()) {
        for i in 0..parts.len() {
            let rel = parts[i..].join("/");
            if let Ok(Some(p)) = resolve_in(&m.point, &rel) {
                if want(&p) {
                    return Some((p, format!("/{rel} on {}", m.what)));
                }
            }
        }
    }
    None
}

/// Where the server sees the host path `p` (under `work/root` or `work/more`).
fn ns_path(work: &Path, p: &Path) -> Option<PathBuf> {
    if let Ok(rel) = p.strip_prefix(work.join("root")) {
        return Some(Path::new(NS_ROOT).join(rel));
    }
    p.strip_prefix(work.join("more")).ok().map(|rel| Path::new(NS_MORE).join(rel))
}

/// Gives the tree at `top` to `uid:gid` (symlinks themselves, never followed).
fn chown_tree(top: &Path, uid: u32, gid: u32, deadline: Instant) -> Result<u64, Failed> {
    let mut todo = vec![top.to_path_buf()];
    let mut n = 0u64;
    while let Some(p) = todo.pop() {
        if n.is_multiple_of(1024) && Instant::now() >= deadline {
            return Err("time limit reached while preparing the data directory".into());
        }
        std::os::unix::fs::lchown(&p, Some(uid), Some(gid)).map_err(|e| format!("cannot give {} to the postgres user: {e}", p.display()))?;
        n += 1;
        let meta = std::fs::symlink_metadata(&p).map_err(|e| format!("cannot look at {}: {e}", p.display()))?;
        if meta.is_dir() {
            let entries = std::fs::read_dir(&p).map_err(|e| format!("cannot list {}: {e}", p.display()))?;
            todo.extend(entries.flatten().map(|e| e.path()));
        }
    }
    Ok(n)
}

/// The numeric major version of a PG_VERSION text ("15" -> 15, "9.6" -> 9).
fn major_number(version: &str) -> u32 {
    version.split('.').next().and_then(|m| m.parse().ok()).unwrap_or(0)
}

/// The most telling line of a server log: the last PANIC, else FATAL, else
/// ERROR line (from its level on), else the last line.
fn log_verdict(log: &str) -> String {
    for level in ["PANIC:", "FATAL:", "ERROR:"] {
        if let Some(line) = log.lines().rev().find(|l| l.contains(level)) {
            let at = line.find(level).unwrap_or(0);
            return line[at..].split_whitespace().collect::<Vec<_>>().join(" ");
        }
    }
    log.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no log output").trim().to_string()
}

/// The running server: stopped (fast shutdown, then killed) on drop.
struct Server {
    child: Child,
    pid_file: PathBuf,
}

impl Server {
    fn stop(&mut self) -> String {
        if let Ok(Some(status)) = self.child.try_wait() {
            kill_group(self.child.id());
            let _ = std::fs::remove_file(&self.pid_file);
            return format!("it had already exited ({})", status_text(Some(status)));
        }
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap_or(i32::MAX));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        let until = Instant::now() + STOP_GRACE;
        let mut how = "fast shutdown".to_string();
        let status = loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                break Some(s);
            }
            if Instant::now() >= until {
                how = format!("killed: no fast shutdown within {} s", STOP_GRACE.as_secs());
                kill_group(self.child.id());
                let _ = self.child.kill();
                break self.child.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        // Backends left behind by a killed postmaster go with its group.
        kill_group(self.child.id());
        let _ = std::fs::remove_file(&self.pid_file);
        format!("{how} ({})", status.map_or("status unknown".into(), |s| status_text(Some(s))))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.stop();
        }
    }
}

/// First descriptor number of the folders bound into the server's namespace.
const BIND_FD_BASE: libc::c_int = 900;

/// A host folder shown in the server's namespace.
struct Bind {
    /// Its host path.
    host: CString,
    /// The descriptor it is opened at in the child.
    fd: libc::c_int,
    /// `/proc/self/fd/FD`.
    via: CString,
    /// Where the server sees it.
    inside: CString,
}

/// C strings prepared before the fork for the server's namespace set-up.
struct NsPlan {
    slash: CString,
    tmp: CString,
    tmpfs: CString,
    tmpfs_opts: CString,
    binds: Vec<Bind>,
    net: bool,
    uid: u32,
    gid: u32,
    groups: Vec<libc::gid_t>,
    parent: u32,
}

fn cstr(p: &Path) -> Result<CString, Failed> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| format!("the path {} holds a NUL byte", p.display()))
}

/// Starts the server in its namespaces as the postgres user.
fn spawn_server(cmd: &mut Command, plan: NsPlan) -> std::io::Result<Child> {
    #[allow(unsafe_code)]
    // SAFETY: the closure runs in the forked child before exec; it only makes
    // async-signal-safe system calls (unshare, open, dup3, close, mount,
    // mkdir, setgroups, setgid, setuid, prctl, getppid) on C strings and a group list prepared
    // before the fork; it allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(move || {
            let check = |rc: libc::c_int| if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) };
            let flags = libc::CLONE_NEWNS | if plan.net { libc::CLONE_NEWNET } else { 0 };
            check(libc::unshare(flags))?;
            // Nothing mounted here propagates to the host.
            check(libc::mount(std::ptr::null(), plan.slash.as_ptr(), std::ptr::null(), libc::MS_REC | libc::MS_PRIVATE, std::ptr::null()))?;
            for b in &plan.binds {
                let fd = libc::open(b.host.as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::dup3(fd, b.fd, libc::O_CLOEXEC) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(fd);
            }
            check(libc::mount(plan.tmpfs.as_ptr(), plan.tmp.as_ptr(), plan.tmpfs.as_ptr(), libc::MS_NOSUID | libc::MS_NODEV, plan.tmpfs_opts.as_ptr().cast()))?;
            for b in &plan.binds {
                check(libc::mkdir(b.inside.as_ptr(), 0o755))?;
                check(libc::mount(b.via.as_ptr(), b.inside.as_ptr(), std::ptr::null(), libc::MS_BIND | libc::MS_REC, std::ptr::null()))?;
            }
            check(libc::setgroups(plan.groups.len(), plan.groups.as_ptr()))?;
            check(libc::setgid(plan.gid))?;
            check(libc::setuid(plan.uid))?;
            // After the user switch, which clears the death signal.
            check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0))?;
            if libc::getppid() as u32 != plan.parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        })
    };
    cmd.spawn()
}

/// Makes a child enter the mount namespace of the process whose
/// `/proc/PID/ns/mnt` is `ns` (so psql reaches the server's socket at
/// [`NS_PG`]).
fn enter_mount_ns(cmd: &mut Command, ns: &File) {
    let fd = ns.as_raw_fd();
    #[allow(unsafe_code)]
    // SAFETY: the closure runs in the forked child before exec and only makes
    // the async-signal-safe setns system call on a descriptor the parent
    // keeps open until the spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNS) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
}

/// A psql-family client of the server.
struct Client<'a> {
    bin: &'a Path,
    ns: &'a File,
    logs: &'a Path,
    deadline: Instant,
}

impl Client<'_> {
    /// Runs `tool ARGS` against the server; split output (stdout, stderr).
    fn run(&self, tool: &str, args: &[&str], log_name: &str, split: bool) -> Result<Ran, Failed> {
        let mut cmd = Command::new(self.bin.join(tool));
        cmd.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("LANG", "C")
            .env("PGCONNECT_TIMEOUT", "10")
            .env("PGAPPNAME", "drmesh-drill")
            .args(["-h", NS_PG, "-p", PORT, "-U", SUPERUSER])
            .args(args)
            .current_dir("/");
        enter_mount_ns(&mut cmd, self.ns);
        match run_tool(&mut cmd, &self.logs.join(log_name), split, None, self.deadline) {
            Ok(ran) if ran.status.is_none() => Err(format!("time limit reached during {tool}")),
            Ok(ran) => Ok(ran),
            Err(SpawnError::NotFound) => Err(format!("{} is not installed", self.bin.join(tool).display())),
            Err(SpawnError::Other(e)) => Err(e),
        }
    }

    /// Runs `sql` in `db` with psql (unaligned, tuples only); its result.
    fn query(&self, db: &str, sql: &str, log_name: &str) -> Result<String, Failed> {
        let ran = self.run("psql", &["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-d", db, "-c", sql], log_name, true)?;
        if !ran.success() {
            let err = ran.errors.lines().find(|l| !l.trim().is_empty()).unwrap_or("no error message").trim().to_string();
            return Err(format!("psql in database {db} failed ({}): {err}", ran.how()));
        }
        Ok(ran.output.trim().to_string())
    }
}

fn check(disk: &Disk, cfg: &DrillPostgres, deadline: Instant, out: &mut String) -> Result<String, Failed> {
    if !cfg.path.starts_with('/') {
        return Err(format!("the data directory path {} is not absolute", cfg.path));
    }
    let logs = disk.work.join("logs");
    std::fs::create_dir_all(&logs).map_err(|e| format!("cannot make {}: {e}", logs.display()))?;
    let tree = mount_tree(disk, true, deadline).map_err(|e| format!("cannot mount the recovery point's filesystems: {e}"))?;
    out.push_str(&tree.describe(false));
    let has_version = |p: &Path| p.join("PG_VERSION").is_file();
    let Some((data, found_at)) = locate(&tree, &cfg.path, &has_version) else {
        let places: Vec<&str> = tree.mounts.iter().map(|m| m.what.as_str()).collect();
        return Err(format!("no PostgreSQL data directory {} (with PG_VERSION) on the recovery point; looked on {}", cfg.path, places.join(", ")));
    };
    out.push_str(&format!("data directory: {found_at}\n"));
    let version = std::fs::read_to_string(data.join("PG_VERSION")).map_err(|e| format!("cannot read PG_VERSION of {}: {e}", cfg.path))?.trim().to_string();
    if version.is_empty() || version.len() > 8 || !version.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err(format!("{}/PG_VERSION does not hold a PostgreSQL version", cfg.path));
    }
    let major = major_number(&version);
    let Some(bin) = [format!("/usr/lib/postgresql/{version}/bin"), format!("/usr/pgsql-{version}/bin")].into_iter().map(PathBuf::from).find(|b| b.join("postgres").is_file()) else {
        return Err(format!("PostgreSQL {version} is not installed on this node; the data directory is version {version} (Debian package postgresql-{version})"));
    };
    let Some(user) = pg_user() else {
        return Err(format!("this node has no `{SUPERUSER}` user to run PostgreSQL {version} as (PostgreSQL refuses to run as root)"));
    };

    // The copy on the overlay: no stale lock, no standby or archive recovery.
    for stale in ["postmaster.pid", "standby.signal", "recovery.signal", "recovery.conf"] {
        if std::fs::symlink_metadata(data.join(stale)).is_ok() {
            std::fs::remove_file(data.join(stale)).map_err(|e| format!("cannot remove {stale} from the copy of {}: {e}", cfg.path))?;
            let why = match stale {
                "postmaster.pid" => "the recovery point was taken while PostgreSQL ran",
                _ => "the copy is started as a primary",
            };
            out.push_str(&format!("removed {stale} from the copy ({why})\n"));
        }
    }
    // WAL and tablespaces may live elsewhere: links to source paths point at
    // the same paths on the recovery point (or the check fails), never at the host.
    let mut links = Vec::new();
    for wal in ["pg_wal", "pg_xlog"] {
        links.push((data.join(wal), format!("{}/{wal}", cfg.path.trim_end_matches('/'))));
    }
    if let Ok(entries) = std::fs::read_dir(data.join("pg_tblspc")) {
        for e in entries.flatten() {
            links.push((e.path(), format!("{}/pg_tblspc/{}", cfg.path.trim_end_matches('/'), e.file_name().to_string_lossy())));
        }
    }
    let mut extra_trees = Vec::new();
    for (link, source) in links {
        let Ok(meta) = std::fs::symlink_metadata(&link) else { continue };
        if !meta.file_type().is_symlink() {
            continue;
        }
        let target = std::fs::read_link(&link).map_err(|e| format!("cannot read the link {source}: {e}"))?.to_string_lossy().into_owned();
        let target_source = if target.starts_with('/') { normalize(&target) } else { normalize(&format!("{}/../{target}", source)) };
        let is_dir = |p: &Path| p.is_dir();
        let Some((host, at)) = locate(&tree, &target_source, &is_dir) else {
            return Err(format!("{source} links to {target_source}, which is on none of the recovery point's filesystems"));
        };
        let inside = ns_path(disk.work, &host).ok_or_else(|| format!("{source} links to {target_source}, outside the mounted filesystems"))?;
        std::fs::remove_file(&link).and_then(|()| std::os::unix::fs::symlink(&inside, &link)).map_err(|e| format!("cannot repoint {source} in the copy: {e}"))?;
        out.push_str(&format!("{source} -> {target_source}: found as {at}\n"));
        extra_trees.push(host);
    }
    let mut files = chown_tree(&data, user.uid, user.gid, deadline)?;
    for t in &extra_trees {
        files += chown_tree(t, user.uid, user.gid, deadline)?;
    }
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).map_err(|e| format!("cannot set the mode of the data directory: {e}"))?;
    out.push_str(&format!("gave {files} files of the copy to the postgres user ({}:{})\n", user.uid, user.gid));

    // Our configuration and socket folder.
    let pg_dir = disk.work.join("pg");
    let _ = std::fs::remove_dir_all(&pg_dir);
    std::fs::DirBuilder::new().mode(0o700).create(&pg_dir).map_err(|e| format!("cannot make {}: {e}", pg_dir.display()))?;
    std::os::unix::fs::chown(&pg_dir, Some(user.uid), Some(user.gid)).map_err(|e| format!("cannot give {} to the postgres user: {e}", pg_dir.display()))?;
    let conf = [
        ("postgresql.conf", "# drmesh drill: every setting is given on the command line\n"),
        ("pg_hba.conf", "# drmesh drill: Unix socket only, in a private folder\nlocal all all trust\n"),
        ("pg_ident.conf", ""),
    ];
    for (name, text) in conf {
        let path = pg_dir.join(name);
        File::create(&path).and_then(|mut f| f.write_all(text.as_bytes())).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    let data_inside = ns_path(disk.work, &data).ok_or("the data directory is outside the mounted filesystems")?;

    let mut settings: Vec<String> = [
        format!("config_file={NS_PG}/postgresql.conf"),
        format!("hba_file={NS_PG}/pg_hba.conf"),
        format!("ident_file={NS_PG}/pg_ident.conf"),
        "listen_addresses=".into(),
        format!("unix_socket_directories={NS_PG}"),
        "unix_socket_permissions=0700".into(),
        format!("port={PORT}"),
        // Not empty: PostgreSQL would try to write a file named "".
        format!("external_pid_file={NS_PG}/external-pid"),
        "archive_mode=off".into(),
        "archive_command=".into(),
        "hot_standby=off".into(),
        "max_connections=20".into(),
        "shared_buffers=16MB".into(),
        "huge_pages=off".into(),
        "shared_preload_libraries=".into(),
        "session_preload_libraries=".into(),
        "local_preload_libraries=".into(),
        "ssl=off".into(),
        "fsync=off".into(),
        "synchronous_commit=off".into(),
        "synchronous_standby_names=".into(),
        "autovacuum=off".into(),
        "logging_collector=off".into(),
        "log_destination=stderr".into(),
        "log_min_messages=warning".into(),
        "log_line_prefix=%m [%p] ".into(),
        "cluster_name=drmesh-drill".into(),
    ]
    .into();
    if major >= 12 {
        settings.extend(["restore_command=".into(), "primary_conninfo=".into(), "primary_slot_name=".into()]);
    }
    if major >= 15 {
        settings.push("archive_library=".into());
    }
    if major >= 11 {
        settings.push("jit=off".into());
    }
    let mut cmd = Command::new(bin.join("postgres"));
    cmd.arg("-D").arg(&data_inside);
    for s in &settings {
        cmd.arg("-c").arg(s);
    }
    let log_path = logs.join("postgres.log");
    let log = File::create(&log_path).map_err(|e| format!("cannot create {}: {e}", log_path.display()))?;
    let log2 = log.try_clone().map_err(|e| format!("cannot create {}: {e}", log_path.display()))?;
    cmd.env_clear().env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin").env("LANG", "C").current_dir("/").stdin(Stdio::null()).stdout(log).stderr(log2).process_group(0);
    // The folders to bind are opened in the namespace before its /tmp covers
    // the host's (`work` itself may be under /tmp), at fixed descriptors.
    let more = disk.work.join("more");
    let mut sources = vec![(tree.root.clone(), NS_ROOT), (pg_dir.clone(), NS_PG)];
    if more.is_dir() {
        sources.push((more, NS_MORE));
    }
    let mut binds = Vec::new();
    for (i, (host, inside)) in sources.into_iter().enumerate() {
        let fd = BIND_FD_BASE + i as libc::c_int;
        binds.push(Bind { host: cstr(&host)?, fd, via: cstr(Path::new(&format!("/proc/self/fd/{fd}")))?, inside: cstr(Path::new(inside))? });
    }
    let net = netns_available();
    let plan = NsPlan {
        slash: CString::from(c"/"),
        tmp: CString::from(c"/tmp"),
        tmpfs: CString::from(c"tmpfs"),
        tmpfs_opts: CString::from(c"mode=0755,size=1m"),
        binds,
        net,
        uid: user.uid,
        gid: user.gid,
        groups: if user.groups.is_empty() { vec![user.gid] } else { user.groups.clone() },
        parent: std::process::id(),
    };
    if !net {
        out.push_str("note: this host cannot make a network namespace; PostgreSQL listens on its Unix socket only\n");
    }
    let started = Instant::now();
    let child = spawn_server(&mut cmd, plan).map_err(|e| format!("cannot start PostgreSQL {version} (private mount namespace, user {SUPERUSER}): {e}"))?;
    let pid_file = disk.work.join("postgres.pid");
    let _ = std::fs::write(&pid_file, format!("{}\n", child.id()));
    let mut server = Server { child, pid_file };
    let ns = File::open(format!("/proc/{}/ns/mnt", server.child.id())).map_err(|e| format!("cannot open PostgreSQL's mount namespace: {e}"))?;

    // Crash recovery, then connections.
    let ready = loop {
        let text = read_log_tail(&log_path);
        if text.contains("database system is ready to accept connections") {
            break Ok(text);
        }
        if let Ok(Some(status)) = server.child.try_wait() {
            let text = read_log_tail(&log_path);
            break Err(format!("PostgreSQL {version} did not start from {} ({}): {}", cfg.path, status_text(Some(status)), log_verdict(&text)));
        }
        if Instant::now() >= deadline {
            break Err(format!("time limit reached during PostgreSQL {version}'s crash recovery of {}", cfg.path));
        }
        nap(deadline, Duration::from_millis(50));
    };
    let took = started.elapsed().as_secs_f64();
    let text = match ready {
        Ok(t) => t,
        Err(why) => {
            let stopped = server.stop();
            out.push_str(&format!("--- PostgreSQL log:\n{}\n(server: {stopped})\n", read_log_tail(&log_path)));
            return Err(why);
        }
    };
    let recovered = ["not properly shut down", "automatic recovery in progress", "was interrupted", "redo starts at"].iter().any(|m| text.contains(m));
    let mut summary = if recovered {
        format!("PostgreSQL {version} started after crash recovery in {took:.1} s")
    } else {
        format!("PostgreSQL {version} started in {took:.1} s (it had been shut down cleanly)")
    };

    let client = Client { bin: &bin, ns: &ns, logs: &logs, deadline };
    let result = (|| -> Result<(), Failed> {
        let dbs = client.query("postgres", "select datname from pg_database where datallowconn order by 1", "psql-databases.log")?;
        let dbs: Vec<&str> = dbs.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
        out.push_str(&format!("databases: {}\n", dbs.join(", ")));
        let names = if dbs.len() <= 5 { format!(" ({})", dbs.join(", ")) } else { String::new() };
        summary.push_str(&format!("; {} {}{names}", dbs.len(), if dbs.len() == 1 { "database" } else { "databases" }));
        if bin.join("pg_amcheck").is_file() {
            let ran = client.run("pg_amcheck", &["--all", "--install-missing", "--no-password"], "pg_amcheck.log", false)?;
            out.push_str(&format!("$ pg_amcheck --all --install-missing\n{}", ran.output));
            if !ran.success() {
                let first = ran.output.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("no output").to_string();
                let what = if ran.status.and_then(|s| s.code()) == Some(2) { "found corruption" } else { "failed" };
                return Err(format!("{summary}; pg_amcheck {what} ({}): {first}", ran.how()));
            }
            out.push_str("pg_amcheck: clean\n");
            summary.push_str("; pg_amcheck clean");
        } else {
            out.push_str("pg_amcheck is not part of PostgreSQL before 14: tables and indexes not checked\n");
            summary.push_str("; not checked with pg_amcheck (PostgreSQL before 14)");
        }
        if let Some(sql) = &cfg.query {
            let value = client.query(&cfg.database, sql, "psql-query.log").map_err(|e| format!("{summary}; the query failed: {e}"))?;
            let shown = if value.contains('\n') { format!("{} rows", value.lines().count()) } else { value.clone() };
            match &cfg.expect {
                Some(want) if want.trim() != value => {
                    out.push_str(&format!("expected: {}\nquery result: {value}\n", want.trim()));
                    return Err(format!("{summary}; the query in {} returned {shown}, expected {}", cfg.database, want.trim()));
                }
                _ => {
                    out.push_str(&format!("query result: {value}\n"));
                    summary.push_str(&format!("; query returned {shown}"));
                }
            }
        }
        Ok(())
    })();
    let stopped = server.stop();
    drop(ns);
    drop(tree);
    // The query result stays the last line: the server's log goes before it.
    let log_tail = read_log_tail(&log_path);
    let (head, last) = match out.rfind("query result: ") {
        Some(i) => (out[..i].to_string(), out[i..].to_string()),
        None => (out.clone(), String::new()),
    };
    *out = format!("{head}--- PostgreSQL log (server stopped: {stopped}):\n{}\n{last}", super::tail_lines(&log_tail, 40));
    result.map(|()| summary)
}
