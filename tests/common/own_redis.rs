//! A redis-server of the test's own, on a free loopback port, that the test can freeze, thaw, stop
//! and start again — never the shared one on 6379.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub(crate) struct OwnRedis {
    pub port: u16,
    child: Option<Child>,
}

/// A free loopback port.
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl OwnRedis {
    /// Starts one on `port` and waits until it answers.
    pub(crate) fn start(port: u16) -> Self {
        Self::start_with(port, &[])
    }

    /// Starts one on `port` with more arguments (`--maxmemory-policy`, `--cluster-enabled`, …).
    pub(crate) fn start_with(port: u16, extra: &[&str]) -> Self {
        let port_arg = port.to_string();
        let mut args = vec!["--port", &port_arg, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"];
        args.extend_from_slice(extra);
        Self::spawn(port, Command::new("redis-server").args(&args))
    }

    /// Runs `command` (a redis-server of some kind that listens on `port`) and waits until it answers.
    pub(crate) fn spawn(port: u16, command: &mut Command) -> Self {
        let child = command.stdout(Stdio::null()).spawn().expect("redis-server is installed");
        for _ in 0..250 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { port, child: Some(child) }
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
