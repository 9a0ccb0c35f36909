//! Helpers shared by the benchmark harnesses: CPU pinning, the file-descriptor limit, the
//! load generator child process, server processes, `/proc` readings and result tables.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write as _};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

/// Set in the environment of a harness that has re-executed itself under `taskset`.
const PINNED_ENV: &str = "WSENGINE_BENCH_PINNED";
/// Set to `1` to run without any CPU pinning.
pub(crate) const NO_PIN_ENV: &str = "WSENGINE_BENCH_NO_PIN";

/// Whether processes are pinned: `taskset` exists, at least two CPUs, not disabled. (A harness
/// that re-executed itself under `taskset` sees one CPU, so it relies on its marker.)
pub(crate) fn pinning() -> bool {
    if std::env::var_os(PINNED_ENV).is_some() {
        return true;
    }
    std::env::var_os(NO_PIN_ENV).is_none_or(|v| v != "1")
        && std::thread::available_parallelism().map_or(0, |n| n.get()) >= 2
        && Command::new("taskset").arg("-V").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok()
}

/// Re-executes this process under `taskset -c CPU` unless it already runs pinned (or pinning
/// is off). Returns only in the pinned (or unpinned) process.
pub(crate) fn pin_self(cpu: usize) {
    if std::env::var_os(PINNED_ENV).is_some() || !pinning() {
        return;
    }
    let exe = std::env::current_exe().expect("current_exe");
    let status = Command::new("taskset")
        .arg("-c")
        .arg(cpu.to_string())
        .arg(exe)
        .args(std::env::args_os().skip(1))
        .env(PINNED_ENV, "1")
        .status()
        .expect("run taskset");
    std::process::exit(status.code().unwrap_or(1));
}

/// A command for `program`, pinned to `cpu` with `taskset` when pinning is on.
pub(crate) fn pinned_command(cpu: usize, program: impl Into<PathBuf>) -> Command {
    let program = program.into();
    if pinning() {
        let mut command = Command::new("taskset");
        command.arg("-c").arg(cpu.to_string()).arg(program);
        command
    } else {
        Command::new(program)
    }
}

/// Raises the soft file-descriptor limit to the hard limit (children inherit it).
pub(crate) fn raise_fd_limit() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(error) => {
            eprintln!("warning: cannot raise the file descriptor limit: {error}");
            rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(0, |(soft, _)| soft)
        }
    }
}

/// Nanoseconds since the Unix epoch (the clock the load generator reports in).
pub(crate) fn unix_ns() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or_default()
}

/// A number from the environment, or `default`.
pub(crate) fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(value) => value.parse().unwrap_or_else(|_| panic!("{name}={value:?} is not a valid number")),
        Err(_) => default,
    }
}

/// The benchmark-relevant command-line arguments: `cargo bench` adds `--bench`, which is
/// dropped here.
pub(crate) fn args() -> Vec<String> {
    std::env::args().skip(1).filter(|a| a != "--bench").collect()
}

/// Memory figures of one process, in KiB, from `/proc/PID/status`.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Memory {
    pub(crate) rss: u64,
    pub(crate) anon: u64,
    pub(crate) file: u64,
}

/// Reads `/proc/PID/status` (`pid` = `None` for this process).
pub(crate) fn memory(pid: Option<u32>) -> Memory {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/status"),
        None => "/proc/self/status".to_owned(),
    };
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse().ok())
            .unwrap_or(0)
    };
    Memory { rss: field("VmRSS:"), anon: field("RssAnon:"), file: field("RssFile:") }
}

/// Waits until a process's RSS stops moving (two readings 250 ms apart within 0.2 % or
/// 32 KiB), at most `limit`; returns the last reading.
pub(crate) fn settled_memory(pid: Option<u32>, limit: Duration) -> Memory {
    let deadline = Instant::now() + limit;
    let mut last = memory(pid);
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let now = memory(pid);
        let delta = now.rss.abs_diff(last.rss);
        if delta <= 32.max(now.rss / 500) || Instant::now() >= deadline {
            return now;
        }
        last = now;
    }
}

/// Machine-wide CPU time counters (the `cpu` line of `/proc/stat`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct CpuSample {
    total: u64,
    idle: u64,
    /// user + nice + system + steal: process time, without interrupt and softirq time (on
    /// loopback the softirq time is mostly the benchmark's own TCP traffic, which the kernel
    /// does not charge to any process).
    process: u64,
}

/// Reads the machine-wide CPU counters.
pub(crate) fn cpu_sample() -> CpuSample {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let values: Vec<u64> =
        text.lines().next().unwrap_or_default().split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    let field = |i: usize| values.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal guest guest_nice (guest time is already in user)
    CpuSample {
        total: values.iter().take(8).sum(),
        idle: field(3) + field(4),
        process: field(0) + field(1) + field(2) + field(7),
    }
}

impl CpuSample {
    /// Busy share of all CPUs between `earlier` and this sample.
    pub(crate) fn busy_since(&self, earlier: &CpuSample) -> f64 {
        let total = self.total.saturating_sub(earlier.total).max(1) as f64;
        1.0 - self.idle.saturating_sub(earlier.idle) as f64 / total
    }

    /// How many CPUs ran processes on average between `earlier` and this sample (interrupt and
    /// softirq time left out).
    pub(crate) fn busy_cpus_since(&self, earlier: &CpuSample) -> f64 {
        let total = self.total.saturating_sub(earlier.total).max(1) as f64;
        self.process.saturating_sub(earlier.process) as f64 / total * online_cpus() as f64
    }
}

/// CPUs of the machine (the `cpuN` lines of `/proc/stat`; not this process's affinity).
pub(crate) fn online_cpus() -> usize {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    text.lines().filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit)).count().max(1)
}

/// Busy share of all CPUs over `window`.
pub(crate) fn machine_busy(window: Duration) -> f64 {
    let before = cpu_sample();
    std::thread::sleep(window);
    cpu_sample().busy_since(&before)
}

/// Flags CPU use by other processes during a run: `foreign` is in CPUs.
pub(crate) fn warn_foreign(foreign: f64) -> String {
    if foreign > 0.15 {
        println!("WARNING: other processes used {foreign:.2} CPUs during a run; its figures are skewed");
    }
    format!("{foreign:.2}")
}

/// Prints how busy the machine was just before the benchmark (other work skews results).
/// With `WSENGINE_BENCH_WAIT_QUIET=SECS` it first waits up to SECS seconds for the CPUs to be
/// at most 5 % busy.
pub(crate) fn report_machine_load() {
    let wait: f64 = env_or("WSENGINE_BENCH_WAIT_QUIET", 0.0);
    let deadline = Instant::now() + Duration::from_secs_f64(wait);
    let mut busy = machine_busy(Duration::from_secs(1));
    while busy > 0.05 && Instant::now() < deadline {
        busy = machine_busy(Duration::from_secs(1));
    }
    println!("machine load before the run: {:.0} % of all CPUs busy", busy * 100.0);
    println!("engine configuration overrides from the environment: {}", engine_overrides());
    if busy > 0.05 {
        println!("WARNING: other processes are using the CPUs; the figures below are not representative");
    }
}

/// The `WSENGINE_*` configuration variables in this environment (they configure the engine
/// under test: the harnesses pass them on and print them).
pub(crate) fn engine_overrides() -> String {
    let mut vars: Vec<String> = std::env::vars()
        .filter(|(name, _)| name.starts_with("WSENGINE_") && !name.starts_with("WSENGINE_BENCH_"))
        .map(|(name, value)| format!("{name}={value}"))
        .collect();
    vars.sort();
    if vars.is_empty() { "none".to_owned() } else { vars.join(" ") }
}

/// Memory of all TCP socket buffers of the machine, in MiB (`TCP: … mem PAGES` of
/// `/proc/net/sockstat`).
pub(crate) fn kernel_tcp_mib() -> f64 {
    let text = std::fs::read_to_string("/proc/net/sockstat").unwrap_or_default();
    let pages = text
        .lines()
        .find(|line| line.starts_with("TCP:"))
        .and_then(|line| line.split_whitespace().skip_while(|w| *w != "mem").nth(1))
        .and_then(|pages| pages.parse::<f64>().ok())
        .unwrap_or(0.0);
    pages * 4096.0 / (1024.0 * 1024.0)
}

/// CPU seconds (user + system) of a process or of one thread (`/proc/PID/task/TID/stat`).
pub(crate) fn cpu_seconds(stat_path: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(stat_path) else { return 0.0 };
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else { return 0.0 };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11..13).map_or(0.0, |f| f.iter().filter_map(|v| v.parse::<f64>().ok()).sum());
    ticks / 100.0
}

/// The `/proc` stat path of the calling thread.
pub(crate) fn current_thread_stat() -> String {
    match std::fs::read_link("/proc/thread-self") {
        Ok(path) => format!("/proc/{}/stat", path.display()),
        Err(_) => "/proc/self/stat".to_owned(),
    }
}

/// A child process that prints one JSON object per line (the load generator).
pub(crate) struct JsonChild {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<Value>,
    what: String,
}

impl JsonChild {
    /// Spawns `command` with piped stdin and stdout; stderr goes to ours.
    pub(crate) fn spawn(mut command: Command, what: &str) -> JsonChild {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let stdin = child.stdin.take();
        let (tx, lines) = mpsc::channel();
        let name = what.to_owned();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                match serde_json::from_str::<Value>(&line) {
                    Ok(value) => {
                        if tx.send(value).is_err() {
                            break;
                        }
                    }
                    Err(_) => eprintln!("{name}: {line}"),
                }
            }
        });
        JsonChild { child, stdin, lines, what: what.to_owned() }
    }

    /// The next line, or a panic naming the child after `timeout`.
    pub(crate) fn next(&mut self, timeout: Duration) -> Value {
        match self.lines.recv_timeout(timeout) {
            Ok(value) => value,
            Err(_) => {
                let status = self.child.try_wait().ok().flatten();
                panic!("{}: no output within {timeout:?} (exit status: {status:?})", self.what)
            }
        }
    }

    /// The next line with `"event": event` (other lines are skipped; `error` lines panic).
    pub(crate) fn expect(&mut self, event: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let value = self.next(left);
            if value["event"] == event {
                return value;
            }
            if value["event"] == "error" {
                panic!("{}: {}", self.what, value["message"]);
            }
        }
    }

    /// The raw line channel (for harnesses that react to progress lines).
    pub(crate) fn lines(&self) -> &mpsc::Receiver<Value> {
        &self.lines
    }

    /// Closes the child's stdin (holding modes then exit) and waits up to `timeout` before
    /// killing it.
    pub(crate) fn finish(mut self, timeout: Duration) {
        drop(self.stdin.take());
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

impl Drop for JsonChild {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.child.kill().ok();
            self.child.wait().ok();
        }
    }
}

/// Path of the load generator binary (built by Cargo for benchmark targets).
pub(crate) fn loadgen_exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_wsengine-loadgen"))
}

/// A load generator command pinned to `cpu`.
pub(crate) fn loadgen(cpu: usize, args: &[String]) -> Command {
    let mut command = pinned_command(cpu, loadgen_exe());
    command.args(args);
    command
}

/// A server process that prints its address on stdout (`listening on ADDR` or the
/// `wsengine` binary's `wsengine listening on ws://ADDR/…` line).
pub(crate) struct Server {
    child: Child,
    /// `IP:PORT` it listens on.
    pub(crate) addr: String,
}

impl Server {
    /// Starts `command` and waits (up to 30 s) for its address line. With `quiet` its stderr
    /// is discarded (the bare echo reports every connection the load generator drops).
    pub(crate) fn start(mut command: Command, what: &str, quiet: bool) -> Server {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(if quiet { Stdio::null() } else { Stdio::inherit() })
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if !sent {
                    let addr = line
                        .strip_prefix("listening on ")
                        .or_else(|| line.split("ws://").nth(1).and_then(|rest| rest.split('/').next()))
                        .map(|addr| addr.trim().to_owned());
                    if let Some(addr) = addr {
                        tx.send(addr).ok();
                        sent = true;
                    }
                }
            }
        });
        let addr = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_else(|_| {
            child.kill().ok();
            panic!("{what} did not print its address within 30 s")
        });
        Server { child, addr }
    }

    /// The server's process id (of `taskset`'s exec'd program: `taskset` execs in place).
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the server.
    pub(crate) fn stop(mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

/// Builds the release examples and returns the path of `name`.
pub(crate) fn example(name: &str) -> PathBuf {
    let deps = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<bench>-<hash> → target/<profile>/examples/<name>
    let profile_dir = deps.parent().and_then(|d| d.parent()).expect("target/<profile>").to_path_buf();
    let path = profile_dir.join("examples").join(name);
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
    let status = Command::new(cargo)
        .args(["build", "--release", "--quiet", "--manifest-path", manifest, "--example", name])
        .status();
    if !matches!(status, Ok(s) if s.success()) && !path.exists() {
        panic!("cannot build example {name}; run `cargo build --release --example {name}` first");
    }
    path
}

/// Prints a table with a header row; columns are right-aligned except the first.
pub(crate) fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.len());
        }
    }
    let line = |cells: Vec<String>| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i == 0 {
                out.push_str(&format!("| {:<w$} ", cell, w = widths[i]));
            } else {
                out.push_str(&format!("| {:>w$} ", cell, w = widths[i]));
            }
        }
        out.push('|');
        out
    };
    println!("{}", line(header.iter().map(|h| h.to_string()).collect()));
    println!("|{}|", widths.iter().map(|w| "-".repeat(w + 2)).collect::<Vec<_>>().join("|"));
    for row in rows {
        println!("{}", line(row.clone()));
    }
    std::io::stdout().flush().ok();
}

/// `1234567.8` → `1,234,568`.
pub(crate) fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The median of some values (0 when empty).
pub(crate) fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

/// A GET request to `addr` on loopback; the response body (for `/health`).
pub(crate) fn http_get(addr: &str, path: &str) -> Option<String> {
    use std::io::Read as _;
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response.split_once("\r\n\r\n").map(|(_, body)| body.to_owned())
}

/// A number from the environment variable `name`, or `default`.
pub(crate) fn env_number(name: &str, default: f64) -> f64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Median ns per call of `op` over `reps` rounds of `seconds` each.
pub(crate) fn measure(mut op: impl FnMut(), reps: usize, seconds: f64) -> f64 {
    let round = Duration::from_secs_f64(seconds);
    let warmup = Instant::now();
    while warmup.elapsed() < round / 2 {
        op();
    }
    let mut rounds = Vec::with_capacity(reps);
    for _ in 0..reps {
        let started = Instant::now();
        let mut done = 0u64;
        while started.elapsed() < round {
            for _ in 0..8 {
                op();
            }
            done += 8;
        }
        rounds.push(started.elapsed().as_nanos() as f64 / done as f64);
    }
    rounds.sort_by(f64::total_cmp);
    rounds[rounds.len() / 2]
}
