//! A redis-server of the test's own, on a free loopback port, that the test can freeze, thaw, stop
//! and start again — never the shared one on 6379.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub(crate) struct OwnRedis {
    pub port: u16,
    child: Option<Child>,
}

/// A free loopback port for a server the test starts, taken from *below* the kernel's ephemeral range.
///
/// Why not `bind(":0")`: that draws from the ephemeral range, and once the probe closes, any outgoing
/// connection (the app's, the shared Redis's clients') may take the same number as its local port, so
/// the server's `bind` fails with "address in use" — a flaky test, seen in CI. Below the range, only
/// servers bind, and this counter (offset by the process id, so parallel test binaries differ) never
/// hands out one number twice in a process.
pub(crate) fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    let (first, span) = (10_000, low.saturating_sub(10_000).max(1_000));
    let start = std::process::id().wrapping_mul(7_919) % span;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(n < span, "no free port below the ephemeral range");
        let port = (first + (start + n) % span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

impl OwnRedis {
    /// Starts one on `port` and waits until it answers.
    pub(crate) fn start(port: u16) -> Self {
        Self::start_with(port, &[])
    }

    /// Starts one on `port` with more arguments (`--maxmemory-policy`, `--cluster-enabled`, …).
    pub(crate) fn start_with(port: u16, extra: &[&str]) -> Self {
        let port_arg = port.to_string();
        // A replica saves what a full sync sends it into `dir` even with `--save ""`: keep it out of
        // the working directory (a `dump.rdb` was once committed from there).
        // One file per server, so two replicas never load each other's.
        let dir = std::env::temp_dir();
        let dir = dir.to_str().expect("a UTF-8 temp dir");
        let file = format!("keygate-{}-{port}.rdb", std::process::id());
        let mut args = vec!["--port", &port_arg, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"];
        args.extend(["--dir", dir, "--dbfilename", &file]);
        args.extend_from_slice(extra);
        Self::spawn(port, Command::new("redis-server").args(&args))
    }

    /// Runs `command` (a redis-server of some kind that listens on `port`) and waits until it answers.
    ///
    /// Panics with the server's own log if it exits or accepts no connection within 10 s, so a
    /// failure to start reads as that, not as a refused connection later in the test.
    pub(crate) fn spawn(port: u16, command: &mut Command) -> Self {
        let log = std::env::temp_dir().join(format!("keygate-redis-{}-{port}.log", std::process::id()));
        let out = std::fs::File::create(&log).unwrap();
        let child = command.stdout(out).stderr(Stdio::null()).spawn().expect("redis-server is installed");
        let mut own = Self { port, child: Some(child) };
        let started = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            let exited = own.child.as_mut().unwrap().try_wait().unwrap();
            if exited.is_some() || started.elapsed() > Duration::from_secs(10) {
                let said = std::fs::read_to_string(&log).unwrap_or_default();
                panic!("redis-server on port {port} did not start ({exited:?}):\n{said}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = std::fs::remove_file(&log);
        own
    }

    /// Runs a redis-cli command against this server and returns what it printed.
    pub(crate) fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli").args(["-p", &self.port.to_string()]).args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        assert!(Command::new("kill").args([sig, &pid]).status().unwrap().success());
    }

    /// `SIGSTOP`: the server holds its connections open and answers nothing.
    pub(crate) fn freeze(&self) {
        self.signal("-STOP");
    }

    /// `SIGCONT`: it runs what queued up meanwhile.
    pub(crate) fn thaw(&self) {
        self.signal("-CONT");
    }

    pub(crate) fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").args(["-CONT", &c.id().to_string()]).status();
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.stop();
    }
}
